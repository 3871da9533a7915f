"""The pixel-space diffusers prior, loaded from a tiny random-weight folder through the same
from_pretrained path as a hub model."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from conftest import sds_step, tiny_diffusers_run
from sds3d.cameras import CameraConfig, sample_cameras
from sds3d.errors import UserError
from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig
from sds3d.render.volume import render
from sds3d.train import build_prior, build_scene, train


def test_loads_tokenises_and_predicts(tiny_pixel_model):
    guidance = DiffusersGuidanceConfig(model=str(tiny_pixel_model)).build(CameraConfig())
    ids = guidance.tokenizer("a blue torus, side view").input_ids
    tokens = guidance.tokenizer.convert_ids_to_tokens(ids)
    assert tokens == [
        "<|startoftext|>",
        "a</w>",
        "blue</w>",
        "torus</w>",
        ",</w>",
        "side</w>",
        "view</w>",
        "<|endoftext|>",
    ]
    emb = guidance.encode_prompt("a blue torus")
    assert emb.shape == (guidance.tokenizer.model_max_length, 16)
    eps = guidance.predict_noise(torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), [emb, emb], None)
    assert eps.shape == (2, 3, 8, 8) and torch.isfinite(eps).all()
    assert not any(p.requires_grad for p in guidance.unet.parameters())


def test_sds_gradient_equals_an_independent_diffusers_computation(tiny_pixel_model):
    scale = 7.5
    guidance = DiffusersGuidanceConfig(model=str(tiny_pixel_model)).build(CameraConfig())
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    cond = [guidance.encode_prompt("a red cube")] * 2
    uncond = [guidance.encode_prompt("")] * 2
    out = sds_step(guidance, rgb, cond, uncond, 0.3, scale, generator=torch.Generator().manual_seed(1))
    (ours,) = torch.autograd.grad(out.losses["sds"], rgb)

    # The same step by hand from diffusers' own pieces, with the same t and ε.
    g = torch.Generator().manual_seed(1)
    t = torch.randint(20, 981, (2,), generator=g)
    x = torch.nn.functional.interpolate(rgb.detach(), size=(8, 8), mode="bilinear", antialias=True) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    assert torch.equal(t, out.timesteps)
    sched = DDPMScheduler.from_pretrained(tiny_pixel_model, subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(tiny_pixel_model, subfolder="unet")
    x_t = sched.add_noise(x, noise, t)
    with torch.no_grad():
        e_u = unet(x_t, t, encoder_hidden_states=torch.stack(uncond)).sample
        e_c = unet(x_t, t, encoder_hidden_states=torch.stack(cond)).sample
    w = (1 - sched.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    grad_x = w * (e_u + scale * (e_c - e_u) - noise) / 2  # ∂loss/∂x = g / B
    x_leaf = rgb.detach().requires_grad_(True)
    x_again = torch.nn.functional.interpolate(x_leaf, size=(8, 8), mode="bilinear", antialias=True) * 2 - 1
    (expected,) = torch.autograd.grad((x_again * grad_x).sum(), x_leaf)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-4)


def test_sds_steps_train_a_nerf_and_leave_the_prior_untouched(tiny_pixel_model, tmp_path):
    config = tiny_diffusers_run(tiny_pixel_model, size=8, steps=3)
    out = train(config, tmp_path, progress=False)
    assert out.steps_done == 3 and out.final_losses["grad_norm"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in out.final_losses.values())
    # One step by hand: gradients reach the NeRF's tables, none reach the U-Net or text encoder.
    scene, guidance = build_scene(config), build_prior(config)
    cams = sample_cameras(config.camera, torch.Generator().manual_seed(0))
    rgb = render(scene.nerf, scene.background, cams, config.renderer.num_samples).rgb
    emb = [guidance.encode_prompt(config.prompt)]
    sds_step(guidance, rgb, emb, [guidance.encode_prompt("")], 0.5, 20.0).losses["sds"].backward()
    tables = scene.nerf.encoding.tables.grad
    assert tables is not None and torch.isfinite(tables).all() and tables.abs().sum() > 0
    assert all(p.grad is None for p in [*guidance.unet.parameters(), *guidance.text_encoder.parameters()])


def test_missing_model_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        DiffusersGuidanceConfig(model=str(tmp_path / "nope")).build(CameraConfig())
    with pytest.raises(UserError, match="no model_index.json"):
        DiffusersGuidanceConfig(model=str(tmp_path)).build(CameraConfig())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="huggingface-cli download nobody/no-such-model"):
        DiffusersGuidanceConfig(model="nobody/no-such-model").build(CameraConfig())
