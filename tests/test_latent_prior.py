"""Stable Diffusion's (latent, VAE) and DeepFloyd IF's (pixels, T5, learned variance) layouts through
the one diffusers guidance, from tiny random-weight folders loaded as a hub model would be."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from conftest import sds_step, tiny_diffusers_run
from sds3d.cameras import CameraConfig, sample_cameras
from sds3d.config import preset
from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig
from sds3d.render.volume import render
from sds3d.train import build_scene, train


def _guidance(model, **kwargs):
    return DiffusersGuidanceConfig(model=str(model), **kwargs).build(CameraConfig())


def test_sd_layout_loads_with_its_vae(tiny_sd_model):
    guidance = _guidance(tiny_sd_model)
    assert isinstance(guidance.vae, AutoencoderKL)
    assert guidance.vae_scale == 2 and guidance.image_size == 16  # 8×8 latents ← 16×16 images
    x = guidance.encode_images(torch.rand(1, 3, 32, 32))
    assert x.shape == (1, 4, 8, 8)
    emb = guidance.encode_prompt("a red cube")
    assert emb.shape == (guidance.tokenizer.model_max_length, 16)


def test_latent_sds_gradient_equals_an_independent_diffusers_computation(tiny_sd_model):
    scale = 7.5
    guidance = _guidance(tiny_sd_model)
    rgb = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    cond, uncond = [guidance.encode_prompt("a red cube")] * 2, [guidance.encode_prompt("")] * 2
    out = sds_step(guidance, rgb, cond, uncond, 0.3, scale, generator=torch.Generator().manual_seed(1))
    (ours,) = torch.autograd.grad(out.losses["sds"], rgb)

    # By hand from diffusers' pieces, with the step's t and ε: encode, noise, CFG, w(t)(ε̂ − ε).
    vae = AutoencoderKL.from_pretrained(tiny_sd_model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(tiny_sd_model, subfolder="scheduler")
    leaf = rgb.detach().requires_grad_(True)
    image = F.interpolate(leaf, size=(16, 16), mode="bilinear", antialias=True) * 2 - 1
    latents = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    t, noise = out.timesteps, out.noise
    x_t = sched.add_noise(latents.detach(), noise, t)
    with torch.no_grad():
        e_u = unet(x_t, t, encoder_hidden_states=torch.stack(uncond)).sample
        e_c = unet(x_t, t, encoder_hidden_states=torch.stack(cond)).sample
    w = (1 - sched.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    grad_latents = w * (e_u + scale * (e_c - e_u) - noise) / 2  # ∂loss/∂latents = g / B
    (expected,) = torch.autograd.grad((latents * grad_latents).sum(), leaf)
    assert ours.abs().sum() > 0
    assert torch.allclose(ours, expected, atol=1e-6, rtol=1e-4)


def test_latent_sds_trains_a_nerf_through_the_vae_and_leaves_the_prior_untouched(tiny_sd_model, tmp_path):
    config = tiny_diffusers_run(tiny_sd_model, size=16, steps=3)
    out = train(config, tmp_path, progress=False)
    assert out.steps_done == 3 and out.final_losses["grad_norm"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in out.final_losses.values())

    scene, guidance = build_scene(config), _guidance(tiny_sd_model)
    cams = sample_cameras(config.camera, torch.Generator().manual_seed(0))
    rgb = render(scene.nerf, scene.background, cams, config.renderer.num_samples).rgb
    rgb.retain_grad()  # the VAE encoder's input
    emb = [guidance.encode_prompt(config.prompt)]
    sds_step(guidance, rgb, emb, [guidance.encode_prompt("")], 0.5, 20.0).losses["sds"].backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    tables = scene.nerf.encoding.tables.grad
    assert tables is not None and torch.isfinite(tables).all() and tables.abs().sum() > 0
    frozen = [*guidance.unet.parameters(), *guidance.vae.parameters(), *guidance.text_encoder.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


def test_the_text_encoder_can_be_released_after_encoding(tiny_sd_model):
    guidance = _guidance(tiny_sd_model)
    emb = guidance.encode_prompt("a red cube")
    guidance.release_text_encoder()
    assert guidance.text_encoder is None
    rgb = torch.rand(1, 3, 16, 16)
    assert torch.isfinite(sds_step(guidance, rgb, [emb], [emb], 0.5, 20.0).losses["sds"])
    with pytest.raises(RuntimeError, match="released"):
        guidance.encode_prompt("a blue torus")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_prior_gives_float32_gradients(tiny_sd_model, dtype):
    guidance = _guidance(tiny_sd_model, dtype=dtype)
    assert guidance.unet.dtype == guidance.vae.dtype == getattr(torch, dtype)
    rgb = torch.rand(2, 3, 16, 16).requires_grad_(True)
    emb = [guidance.encode_prompt("a red cube")] * 2
    out = sds_step(
        guidance,
        rgb,
        emb,
        [guidance.encode_prompt("")] * 2,
        0.5,
        5.0,
        generator=torch.Generator().manual_seed(0),
    )
    out.losses["sds"].backward()
    assert (
        out.losses["sds"].dtype == torch.float32 and rgb.grad is not None and rgb.grad.dtype == torch.float32
    )
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


def test_v_prediction_models_are_converted_to_epsilon(tmp_path):
    from conftest import build_tiny_sd_pipeline

    model = build_tiny_sd_pipeline(tmp_path / "v", prediction_type="v_prediction")
    guidance = _guidance(model)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    emb = [guidance.encode_prompt("a red cube")] * 2
    with torch.no_grad():
        v = guidance.unet(x_t, t, encoder_hidden_states=torch.stack(emb)).sample
        eps = guidance.predict_noise(x_t, t, emb, None)
    abar = DDPMScheduler.from_pretrained(model, subfolder="scheduler").alphas_cumprod[t].view(-1, 1, 1, 1)
    # x_t = √ᾱ x0 + √(1−ᾱ) ε and v = √ᾱ ε − √(1−ᾱ) x0  ⇒  ε = √ᾱ v + √(1−ᾱ) x_t
    assert torch.allclose(eps, abar.sqrt() * v + (1 - abar).sqrt() * x_t, atol=1e-5)


def test_sdxl_layout_matches_diffusers_own_pipeline(tiny_sdxl_model, tmp_path):
    """SDXL through the same guidance: text embeddings equal `StableDiffusionXLPipeline.encode_prompt`'s
    (zeros for the empty negative), the size ids equal the pipeline's, and the SDS gradient equals an
    independent computation from diffusers' pieces; a run trains, with a latent warm-up step."""
    from diffusers import StableDiffusionXLPipeline

    from sds3d.stages import StageConfig

    scale = 7.5
    guidance = _guidance(tiny_sdxl_model)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    cond, uncond = guidance.encode_prompt("a red cube"), guidance.encode_prompt("")
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        "a red cube", device="cpu", num_images_per_prompt=1
    )
    assert cond.hidden.shape == (16, 16 + 24) and cond.pooled.shape == (12,)
    assert torch.allclose(cond.hidden, embeds[0], atol=1e-6) and torch.allclose(
        cond.pooled, pooled[0], atol=1e-6
    )
    assert not neg_embeds.any() and not neg_pooled.any()  # force_zeros_for_empty_prompt
    assert not uncond.hidden.any() and not uncond.pooled.any()
    time_ids = pipe._get_add_time_ids(
        (16, 16), (0, 0), (16, 16), dtype=torch.float32, text_encoder_projection_dim=12
    )  # fmt: skip
    assert torch.equal(guidance.add_time_ids, time_ids[0])

    rgb = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = sds_step(
        guidance, rgb, [cond] * 2, [uncond] * 2, 0.3, scale, generator=torch.Generator().manual_seed(1)
    )
    (ours,) = torch.autograd.grad(out.losses["sds"], rgb)
    leaf = rgb.detach().requires_grad_(True)
    image = F.interpolate(leaf, size=(16, 16), mode="bilinear", antialias=True) * 2 - 1
    latents = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
    t, noise = out.timesteps, out.noise
    x_t = pipe.scheduler.add_noise(latents.detach(), noise, t)
    added = {"time_ids": time_ids.expand(2, -1)}
    with torch.no_grad():
        e_u = pipe.unet(
            x_t,
            t,
            neg_embeds.expand(2, -1, -1),
            added_cond_kwargs={**added, "text_embeds": neg_pooled.expand(2, -1)},
        ).sample
        e_c = pipe.unet(
            x_t, t, embeds.expand(2, -1, -1), added_cond_kwargs={**added, "text_embeds": pooled.expand(2, -1)}
        ).sample
    w = (1 - pipe.scheduler.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    (expected,) = torch.autograd.grad((latents * w * (e_u + scale * (e_c - e_u) - noise) / 2).sum(), leaf)
    assert ours.abs().sum() > 0 and torch.allclose(ours, expected, atol=1e-6, rtol=1e-4)

    config = dataclasses.replace(
        tiny_diffusers_run(tiny_sdxl_model, size=8, steps=2), stages=[StageConfig(steps=1, render="latent")]
    )
    run = train(config, tmp_path, progress=False)
    assert run.steps_done == 2 and run.final_losses["grad_norm"] > 0
    half = _guidance(tiny_sdxl_model, dtype="float16")  # SDXL's VAE overflows in float16: kept in float32
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32


def test_if_layout_t5_and_learned_variance(tiny_if_model, tmp_path):
    guidance = _guidance(tiny_if_model)
    assert guidance.vae is None and type(guidance.text_encoder).__name__ == "T5EncoderModel"
    emb = guidance.encode_prompt("a red cube")
    assert emb.shape == (guidance.tokenizer.model_max_length, 24)
    eps = guidance.predict_noise(torch.randn(2, 3, 8, 8), torch.tensor([5, 500]), [emb, emb], None)
    assert eps.shape == (2, 3, 8, 8)  # the variance half (channels 3–5) is dropped
    config = tiny_diffusers_run(tiny_if_model, size=8, steps=2)
    out = train(config, tmp_path, progress=False)
    assert out.steps_done == 2 and out.final_losses["grad_norm"] > 0


@pytest.mark.parametrize("name", ["dreamfusion-sd", "fast-sd", "dreamfusion-if", "dreamgaussian-sd"])
def test_gpu_presets_run_their_recipe_with_a_local_stand_in_model(
    name, tiny_sd_model, tiny_if_model, tmp_path
):
    """The presets' recipe (learned background, shading mix, orientation and sparsity losses, their
    SDS settings) for two steps on the CPU, the hub model swapped for a tiny local one and the scene
    made small (32×32 renders, 16 samples, 2^15 table entries) so that it takes seconds."""
    config = preset(name)
    config.camera.width = config.camera.height = 32
    config.renderer.num_samples = 16
    config.nerf.grid.log2_table_size = 15
    config.gaussians.num_init = 300
    assert isinstance(config.guidance, DiffusersGuidanceConfig) and config.rule.guidance_scale in (
        101.0,
        21.0,
        100.0,  # DreamGaussian's CFG is already in the diffusers form
    )
    stand_in = tiny_if_model if name.endswith("-if") else tiny_sd_model
    # Compiled parts stay eager on the CPU (their parity with eager is tested in test_render.py).
    config = dataclasses.replace(config, prompt="a red cube", steps=2, device="cpu", validate_every=0,
                                 nerf=dataclasses.replace(config.nerf, compile=False),
                                 guidance=dataclasses.replace(config.guidance, model=str(stand_in), dtype="float32",
                                                              compile=False))  # fmt: skip
    out = train(config, tmp_path, progress=False)
    assert out.steps_done == 2 and all(torch.isfinite(torch.tensor(v)) for v in out.final_losses.values())
    if name == "dreamfusion-sd":
        assert out.final_losses["orientation"] >= 0 and "sparsity" in out.final_losses
    if name == "dreamgaussian-sd":  # the preset's Gaussians trained: SD's gradient reached them
        from sds3d.runs import load_checkpoint

        state = load_checkpoint(tmp_path).state["scene"]
        assert state["means"].shape == (300, 3) and state["color_logits"].abs().sum() > 0


def test_speed_benchmark_times_the_real_step_against_its_floor(tmp_path):
    """`sds3d bench speed` on the toy SD layout, on the CPU: every phase and the floor are measured
    and the report names its configuration."""
    import json

    from sds3d.cli import main

    args = ["bench", "speed", "--arch", "tiny-sd", "--device", "cpu", "--steps", "2", "--warmup", "1"]
    assert main([*args, "--out", str(tmp_path), "--name", "speed"]) == 0
    (row,) = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert row["arch"] == "tiny-sd" and row["normals"] == "analytic" and not row["nerf_compile"]
    assert row["step_ms"] > 0 and all(row["phases_ms"][k] > 0 for k in ("render", "vae_encode", "unet"))
    floor = row["floor_ms"]
    assert floor["unet_pair_ms"] > 0 and floor["vae_encode_fb_ms"] > 0 and floor["unet_calls"] == [2]
    assert floor["floor_ms"] == pytest.approx(floor["unet_ms"] + floor["vae_encode_fb_ms"], abs=0.02)
    assert row["step_over_floor"] == pytest.approx(row["step_ms"] / floor["floor_ms"], rel=0.01)
    assert (
        (tmp_path / "speed.md")
        .read_text()
        .startswith("# SDS step against its floor (eager, analytic normals")
    )
    # The latent warm-up's step: no VAE encoder inside it, and the U-Net pair alone as its floor
    # (on the SDXL layout: two text encoders, pooled text and size conditioning).
    args[3] = "tiny-sdxl"
    assert main([*args, "--rgb-as-latents", "--out", str(tmp_path), "--name", "latent"]) == 0
    (row,) = json.loads((tmp_path / "latent.json").read_text())["results"]
    assert row["rgb_as_latents"] and "vae_encode" not in row["phases_ms"] and row["phases_ms"]["unet"] > 0
    assert row["floor_ms"]["floor_ms"] == pytest.approx(row["floor_ms"]["unet_ms"], abs=0.02)
    # Rules: each one's floor counts the U-Net calls it makes in a step (ISM: 5 inversion steps, ε_∅
    # at s, the CFG pair at t; VSD: the CFG pair and the particle network's training call).
    args[3] = "tiny-sd"
    assert main([*args, "--rule", "sds,ism,vsd", "--out", str(tmp_path), "--name", "rules"]) == 0
    rows = {r["rule"]: r for r in json.loads((tmp_path / "rules.json").read_text())["results"]}
    assert rows["ism"]["floor_ms"]["unet_calls"] == [1, 1, 1, 1, 1, 1, 2]
    assert rows["vsd"]["floor_ms"]["unet_calls"] == [2, 1]
    assert rows["ism"]["floor_ms"]["unet_ms"] > rows["sds"]["floor_ms"]["unet_ms"]
    assert "| tiny-sd | ism |" in (tmp_path / "rules.md").read_text()
    # Gaussians: the dreamgaussian-sd preset's step, its render phase the splat.
    assert main([*args, "--representation", "gaussians", "--out", str(tmp_path), "--name", "gs"]) == 0
    (row,) = json.loads((tmp_path / "gs.json").read_text())["results"]
    assert row["representation"] == "gaussians" and row["preset"] == "dreamgaussian-sd"
    assert row["phases_ms"]["render"] > 0 and row["floor_ms"]["unet_calls"] == [2]
    assert (
        "| tiny-sd | sds | dreamgaussian-sd | gaussians, 64², 5000 Gaussians"
        in (tmp_path / "gs.md").read_text()
    )


# --- the latent warm-up (Latent-NeRF; threestudio's rgb_as_latents) --------------------------------
def test_latent_rgb_maps_are_exact_for_an_affine_encoder():
    """With an encoder that is affine per latent cell, z = P·mean(rgb over the cell) + q, both fitted
    maps are exact: RGB→latent recovers (P, q) and latent→RGB inverts it on new colours."""
    from sds3d.guidance.diffusers_prior import fit_latent_rgb_maps

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 4, generator=g), torch.randn(4, generator=g)

    def encode(rgb):  # [B, 3, 16, 16] → [B, 4, 8, 8]
        cells = F.avg_pool2d(rgb, 2)
        return torch.einsum("bchw,cd->bdhw", cells, p) + q.view(1, 4, 1, 1)

    to_rgb, to_latent = fit_latent_rgb_maps(encode, image_size=16, scale=2)
    assert to_rgb.shape == (5, 3) and to_latent.shape == (4, 4)
    assert torch.allclose(to_latent[:3], p, atol=1e-4) and torch.allclose(to_latent[3], q, atol=1e-4)
    colours = torch.rand(10, 3, generator=g)
    z = colours @ p + q
    assert torch.allclose(z @ to_rgb[:4] + to_rgb[4], colours, atol=1e-4)


def test_latent_heads_turn_into_rgb_heads_to_first_order():
    """`latents_to_rgb_` writes raw = 4(z·M + c − 1/2) into the RGB heads of the NeRF and of a
    learned background, exactly, and a solid background renders rgb·P + q as latents."""
    from sds3d.config import RunConfig
    from sds3d.representations.encodings import HashGridConfig
    from sds3d.representations.nerf import BackgroundConfig, HashGridNeRFConfig
    from sds3d.stages import StageConfig
    from sds3d.train import build_scene

    config = RunConfig(
        nerf=HashGridNeRFConfig(grid=HashGridConfig(num_levels=4, log2_table_size=10)),
        background=BackgroundConfig(kind="learned"), stages=[StageConfig(steps=5, render="latent")],
    )  # fmt: skip
    scene = build_scene(config)
    for p in scene.parameters():  # away from the initial zeros, so that every row matters
        torch.nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(1)
    to_rgb, to_latent = torch.randn(5, 3, generator=g) * 0.3, torch.randn(4, 4, generator=g)
    scene.set_latent_maps(to_rgb, to_latent)
    points = torch.rand(64, 3, generator=g) * 1.6 - 0.8
    dirs = torch.nn.functional.normalize(torch.randn(1, 4, 4, 3, generator=g), dim=-1)
    with torch.no_grad():
        z = scene.nerf(points, latent=True).albedo
        z_bg = scene.background(dirs, latent=True)
        density = scene.nerf(points).density
        assert z.shape == (64, 4) and z_bg.shape == (1, 4, 4, 4)
        scene.latents_to_rgb_()
        after = scene.nerf(points)
        expected = torch.sigmoid(4 * (z @ to_rgb[:4] + to_rgb[4] - 0.5))
        assert torch.allclose(after.albedo, expected, atol=1e-5)
        assert torch.equal(after.density, density)  # geometry untouched
        expected_bg = torch.sigmoid(4 * (z_bg @ to_rgb[:4] + to_rgb[4] - 0.5))
        assert torch.allclose(scene.background(dirs), expected_bg, atol=1e-5)
        solid = build_scene(dataclasses.replace(config, background=BackgroundConfig(color=(0.2, 0.4, 0.6))))
        solid.set_latent_maps(to_rgb, to_latent)
        rgb = torch.tensor([0.2, 0.4, 0.6])
        assert torch.allclose(
            solid.background(dirs, latent=True)[0, 0, 0], rgb @ to_latent[:3] + to_latent[3]
        )


def test_latent_warmup_skips_the_vae_then_trains_through_it_and_resumes(tiny_sd_model, tmp_path):
    """Two of four steps render latents straight into the U-Net (the VAE encoder runs only for
    the maps' fit), the last two go through the encoder; every step's gradient reaches the scene;
    a run stopped by Ctrl-C inside the warm-up resumes to the same parameters; validation images
    of both phases are written."""
    import os
    import signal

    from sds3d.stages import StageConfig
    from sds3d.train import load_scene

    config = dataclasses.replace(
        tiny_diffusers_run(tiny_sd_model, size=8, steps=4), validate_every=1, checkpoint_every=1,
        stages=[StageConfig(steps=2, render="latent")],
    )  # fmt: skip
    guidance = config.guidance.build(config.camera)
    encoder_batches: list[int] = []
    guidance.vae.encoder.register_forward_hook(lambda m, args, out: encoder_batches.append(args[0].shape[0]))
    calls_after_step: list[int] = []
    grads: list[float] = []
    heads: dict[int, torch.Tensor] = {}

    def watch(step, scene):
        calls_after_step.append(len(encoder_batches))
        heads[step] = scene.nerf.mlp[2].weight.detach().clone()
        if step == 2:  # the conversion the next stage's start must make
            heads[-1] = 4 * scene.latent_to_rgb[:-1].T @ heads[2][4:]

    out = train(config, tmp_path / "a", progress=False, prior=guidance, on_step=watch)
    # Stage 2 began with RGB rows written from the latent rows (then one Adam step, ≤ a few lr).
    assert (heads[3][1:4] - heads[-1]).abs().max() < 5e-3 < (heads[2][1:4] - heads[-1]).abs().max()
    assert out.steps_done == 4 and out.final_losses["grad_norm"] > 0
    assert encoder_batches[0] == 4  # the maps' fit: 4 images of colour blocks
    assert calls_after_step == [1, 1, 2, 3]  # steps 1–2: no encoder; steps 3–4: one call each
    assert sorted(p.name for p in (tmp_path / "a" / "validation").iterdir()) == [
        f"step_{i:06d}.png" for i in range(1, 5)
    ]

    def ctrl_c(step, scene):
        grads.append(float(scene.nerf.mlp[2].weight.grad[4:].abs().sum()))  # the latent head learns
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(config, tmp_path / "b", progress=False, on_step=ctrl_c)
    assert stopped.interrupted and stopped.steps_done == 1 and grads[0] > 0
    train(config, tmp_path / "b", resume=True, progress=False)
    a, b = load_scene(tmp_path / "a")[1].state_dict(), load_scene(tmp_path / "b")[1].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_in_the_warmup_exports_in_colour(tiny_sd_model, tmp_path):
    from sds3d.stages import StageConfig
    from sds3d.train import build_scene, load_scene

    config = dataclasses.replace(
        tiny_diffusers_run(tiny_sd_model, size=8, steps=2), stages=[StageConfig(steps=2, render="latent")]
    )
    train(config, tmp_path, progress=False)
    loaded_config, scene, step = load_scene(tmp_path)
    raw = build_scene(loaded_config)  # the checkpoint as saved: still latent
    raw.load_state_dict(torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["scene"])
    points = torch.rand(32, 3) - 0.5
    with torch.no_grad():
        z = raw.nerf(points, latent=True).albedo
        m = raw.latent_to_rgb
        assert step == 2 and m.abs().sum() > 0
        assert torch.allclose(
            scene.nerf(points).albedo, torch.sigmoid(4 * (z @ m[:4] + m[4] - 0.5)), atol=1e-5
        )


def test_latent_warmup_needs_a_latent_model(tiny_if_model, tmp_path, capsys):
    from sds3d.cli import main
    from sds3d.errors import UserError
    from sds3d.stages import StageConfig

    config = dataclasses.replace(
        tiny_diffusers_run(tiny_if_model, size=8, steps=2), stages=[StageConfig(steps=1, render="latent")]
    )
    with pytest.raises(UserError, match="works in pixels"):
        train(config, tmp_path / "if", progress=False)
    argv = [
        "generate",
        "a red cube",
        "--preset",
        "empirical",
        "--latent-warmup",
        "5",
        "--out",
        str(tmp_path / "e"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "latent warm-up needs a latent diffusion model" in err and "\n" not in err
