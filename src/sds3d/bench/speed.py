"""`sds3d bench speed`: one SDS step against its floor, for a published architecture with random
weights (timing does not depend on the weights, and nothing is downloaded).

    sds3d bench speed --arch sd15|sd21|sdxl|builtin [--device cuda] [--compile] [--out benchmarks]

The real training loop (`train.train`, the fast-sd preset's NeRF, renderer and SDS settings, 64×64
renders) runs with a `DiffusersGuidance` built from the architecture's published config. Reported:
- step: median wall time between consecutive steps after warm-up (CUDA events on a GPU);
- phases inside those steps: render (NeRF forward), VAE encode (forward), U-Net (the CFG pair),
  and the rest (backward through VAE and NeRF, optimiser, SDS arithmetic);
- floor: the U-Net CFG-pair forward + the VAE encoder forward and backward, measured alone in the
  same process and mode (eager or compiled) — what no implementation of this step can beat;
- step / floor, peak GPU memory over the run, and 10k steps projected from the median step.
`builtin` is sds3d's own prior (pixels, 32×32) with the default preset instead. `tiny-sd` is a toy
SD layout for tests. `--rgb-as-latents` times the latent warm-up's step (Latent-NeRF: the render
is the latents, no VAE encoder), against the U-Net pair alone as its floor.

`--representation nerf,gaussians` also times the Gaussians' step (the dreamgaussian-sd preset, or
gaussians with `builtin`): render = the dense splat of render/splat.py; same floor.

`--rule a,b,…` times each distillation rule (`sds3d rules`) with the preset's t, w(t) and CFG. A
rule's floor counts the U-Net calls it makes: the batch size of every `predict_noise` call of one
step is recorded in the run, and each of those calls is timed alone (same mode) and summed. So ISM's
inversion steps, SDI's guided inversion, NFSD's and Perp-Neg's extra texts and VSD's particle
training call are all in their floors; VSD's own small network and the literal rule's backward
through the U-Net are not (they are the rule's work beyond the prior's forward passes).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sds3d.bench.report import describe_machine, write_report
from sds3d.config import RunConfig, preset
from sds3d.guidance.diffusers_prior import BUILTIN_PRIOR, DiffusersGuidance, DiffusersGuidanceConfig
from sds3d.prompts import PromptProcessor
from sds3d.stages import StageConfig

PROMPT = "a blue torus"
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "epsilon", "clip_sample": False}  # fmt: skip
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4, "layers_per_block": 2,
          "sample_size": 512, "scaling_factor": 0.18215}  # fmt: skip
_SD_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}  # fmt: skip
# Published configs: runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base and
# stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/, text_encoder_2/ config.json).
ARCHS: dict[str, dict[str, Any]] = {
    "sd15": {
        "unet": {**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
        "vae": SD_VAE,
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
    },
    "sd21": {
        "unet": {**_SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                 "use_linear_projection": True},
        "vae": SD_VAE,
        "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
                 "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512},
    },
    "sdxl": {
        "unet": {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
                 "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
                 "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816},
        "vae": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
        "text_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                   "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280},
    },
    "tiny-sdxl": {  # the SDXL layout at toy size (tests)
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
                 "layers_per_block": 1, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 16 + 24,
                 "attention_head_dim": (2, 4), "use_linear_projection": True, "addition_embed_type": "text_time",
                 "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 8 * 6 + 12,
                 "norm_num_groups": 8},
        "vae": {"block_out_channels": (8, 16), "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2, "latent_channels": 4, "norm_num_groups": 4,
                "layers_per_block": 1, "sample_size": 16, "force_upcast": True},
        "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "max_position_embeddings": 16},
        "text_2": {"hidden_size": 24, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "max_position_embeddings": 16, "projection_dim": 12},
    },
    "tiny-sd": {  # the SD layout at toy size: 16×16 images ↔ 8×8 latents (tests)
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
                 "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 16,
                 "attention_head_dim": 4, "norm_num_groups": 8},
        "vae": {"block_out_channels": (8, 16), "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2, "latent_channels": 4, "norm_num_groups": 4,
                "layers_per_block": 1, "sample_size": 16},
        "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "max_position_embeddings": 16},
    },
}  # fmt: skip


def build_components(arch: str, tokenizer_dir: Path) -> dict[str, Any]:
    """Random-weight scheduler config, tokenizer, CLIP text encoder, U-Net and VAE of `arch` (and
    SDXL's second tokenizer and projected text encoder). The tokenizer is the world's CLIP tokenizer
    (written to `tokenizer_dir`), padded to the text encoder's length."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sds3d.world.tokenizer import write_world_tokenizer

    spec = ARCHS[arch]
    length = int(spec["text"]["max_position_embeddings"])
    tokenizer = CLIPTokenizer.from_pretrained(write_world_tokenizer(tokenizer_dir, model_max_length=length))
    vocab = max(len(tokenizer), 49408) if length == 77 else len(tokenizer)
    components = {
        "scheduler_config": DDPMScheduler.from_config(SD_SCHEDULER).config,
        "tokenizer": tokenizer,
        "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=vocab, **spec["text"])),
        "unet": UNet2DConditionModel(**spec["unet"]),
        "vae": AutoencoderKL(**spec["vae"]),
    }
    if "text_2" in spec:  # SDXL (its model_index.json says force_zeros_for_empty_prompt: true)
        components["tokenizer_2"] = tokenizer
        components["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(vocab_size=vocab, **spec["text_2"])
        )
        components["force_zeros_for_empty_prompt"] = True
    return components


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU (no sync), host time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return float(a.elapsed_time(b))
        return (b - a) * 1000.0


def median_ms(fn: Callable[[], Any], clock: Clock, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    marks = [clock.mark()]
    for _ in range(iters):
        fn()
        marks.append(clock.mark())
    return statistics.median(clock.ms(a, b) for a, b in zip(marks, marks[1:], strict=False))


def run_config(
    arch: str,
    device: str,
    compile: bool,
    dtype: str,
    compile_mode: str = "default",
    nerf_compile: bool = False,
    normals: str | None = None,
    nerf_compile_mode: str = "default",
    hash_grid: str = "torch",
    channels_last: bool | None = None,
    latent_steps: int = 0,
    rule: str = "sds",
    representation: str = "nerf",
) -> RunConfig:
    from sds3d.rules import with_rule

    # The preset each (prior, representation) is timed with: the built-in prior's, or the SD recipe's.
    presets = {"nerf": "default", "gaussians": "gaussians"} if arch == "builtin" else {
        "nerf": "fast-sd", "gaussians": "dreamgaussian-sd"}  # fmt: skip
    config = dataclasses.replace(preset(presets[representation]), prompt=PROMPT)
    assert isinstance(config.guidance, DiffusersGuidanceConfig)
    guidance = dataclasses.replace(config.guidance, compile=compile, compile_mode=compile_mode, dtype=dtype)
    if channels_last is not None:  # else the preset's
        guidance = dataclasses.replace(guidance, channels_last=channels_last)
    # The NeRF eager with autograd normals (DreamFusion's) unless told otherwise; compiled, it needs
    # normals without a second backward (forward differences unless told otherwise).
    normals = normals or ("forward_difference" if nerf_compile else "analytic")
    nerf = dataclasses.replace(
        config.nerf,
        compile=nerf_compile,
        compile_mode=nerf_compile_mode,
        normal_type=normals,  # type: ignore[arg-type]
        grid=dataclasses.replace(config.nerf.grid, kernel=hash_grid),  # type: ignore[arg-type]
    )
    return dataclasses.replace(
        config, device=device, guidance=guidance, nerf=nerf, validate_every=0, checkpoint_every=10**9,
        stages=[StageConfig(steps=latent_steps, render="latent")] if latent_steps else [],
        rule=with_rule(config.rule, rule),
    )  # fmt: skip


def measure(
    arch: str, device: str, compile: bool, dtype: str, steps: int, warmup: int,
    compile_mode: str = "default", nerf_compile: bool = False, normals: str | None = None,
    nerf_compile_mode: str = "default", hash_grid: str = "torch", channels_last: bool | None = None,
    rgb_as_latents: bool = False, rule: str = "sds", representation: str = "nerf",
) -> dict[str, Any]:  # fmt: skip
    from sds3d import train as train_module
    from sds3d.representations import gaussians, nerf_scene

    # The function the scene renders with, timed as the step's render phase.
    scene_module, render_name = (
        (gaussians, "splat") if representation == "gaussians" else (nerf_scene, "render")
    )

    dev = torch.device(device)
    clock = Clock(dev)
    # With rgb_as_latents every step of the run is a latent warm-up step.
    config = run_config(
        arch, device, compile, dtype, compile_mode, nerf_compile, normals, nerf_compile_mode, hash_grid,
        channels_last, latent_steps=warmup + steps + 1 if rgb_as_latents else 0, rule=rule,
        representation=representation,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if arch == "builtin":
            guidance = DiffusersGuidanceConfig(
                model=BUILTIN_PRIOR, compile=compile, compile_mode=compile_mode, dtype=dtype,
                channels_last=bool(channels_last),
            ).build(config.camera)  # fmt: skip
        else:
            assert isinstance(config.guidance, DiffusersGuidanceConfig)
            guidance = DiffusersGuidance(config.guidance, build_components(arch, Path(tmp) / "tokenizer"))
        guidance.to(dev)
        build_s = time.perf_counter() - t0
        # The floor, alone: U-Net on a CFG pair, and the VAE encoder forward + backward.
        emb = guidance.encode_prompt(PROMPT)
        res = config.camera.width
        channels = int(guidance.unet.config.in_channels)
        size = int(guidance.unet.config.sample_size)
        x_t = torch.randn(2, channels, size, size, device=dev)
        t = torch.tensor([500, 500], device=dev)

        def unet_pair() -> None:
            with torch.no_grad():
                guidance.predict_noise(x_t, t, [emb, emb], None)

        rgb = torch.rand(1, 3, res, res, device=dev, requires_grad=True)

        def vae_fb() -> None:
            guidance.encode_images(rgb).sum().backward()

        floor = {"unet_pair_ms": median_ms(unet_pair, clock, warmup, steps)}
        floor["vae_encode_fb_ms"] = (
            median_ms(vae_fb, clock, warmup, steps) if guidance.vae is not None else 0.0
        )
        # The floor's total is set after the run, from the rule's U-Net calls; the latent warm-up's
        # step has no VAE encoder, so its floor is those calls alone.

        # The real loop, with marks around the render, the VAE encode and the U-Net of every step.
        phases: dict[str, list[tuple[Any, Any]]] = {"render": [], "vae_encode": [], "unet": []}

        def timed(name: str, fn: Callable) -> Callable:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                a = clock.mark()
                out = fn(*args, **kwargs)
                phases[name].append((a, clock.mark()))
                return out

            return wrapper

        step_marks: list[Any] = []
        real_render = getattr(scene_module, render_name)
        setattr(scene_module, render_name, timed("render", real_render))
        if guidance.vae is not None:
            guidance.encode_images = timed("vae_encode", guidance.encode_images)  # type: ignore[method-assign]
        call_rows: list[int] = []  # the batch of every U-Net call, for the rule's floor
        real_predict = guidance.predict_noise

        def counted(x_t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            call_rows.append(int(x_t.shape[0]))
            return real_predict(x_t, *args, **kwargs)

        guidance.predict_noise = timed("unet", counted)  # type: ignore[method-assign]
        # The run's texts encoded before the measured loop, then the text encoder released, as a run
        # with its own prior does (train keeps a prior it is given as it is).
        processor = PromptProcessor(config.prompt, config.prompts, guidance.encode_prompt)
        train_module.build_rule(config).prepare(guidance, processor)  # the rule's own texts (NFSD, Perp-Neg)
        processor.precompute()
        guidance.release_text_encoder()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            step_marks.append(clock.mark())
            train_module.train(dataclasses.replace(config, steps=warmup + steps), Path(tmp) / "run", progress=False,
                               prior=guidance, on_step=lambda step, scene: step_marks.append(clock.mark()))  # fmt: skip
        finally:
            setattr(scene_module, render_name, real_render)
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
        step_ms = [
            clock.ms(a, b) for a, b in zip(step_marks[warmup:], step_marks[warmup + 1 :], strict=False)
        ]
        inside = {name: _per_step_ms(marks, clock, warmup, steps) for name, marks in phases.items() if marks}
    step = statistics.median(step_ms)
    phase_ms = {name: statistics.median(v) for name, v in inside.items()}
    phase_ms["rest"] = step - sum(phase_ms.values())
    # The rule's floor: one step's U-Net calls (the last step's), each timed alone.
    per_step = len(call_rows) // (warmup + steps)
    calls = call_rows[len(call_rows) - per_step :]
    guidance.predict_noise = real_predict  # type: ignore[method-assign]
    unet_ms = sum(_call_ms(guidance, n, emb, channels, size, dev, clock, warmup, steps) for n in calls)
    floor["unet_calls"] = calls  # type: ignore[assignment]
    floor["unet_ms"] = unet_ms
    floor["floor_ms"] = unet_ms + (0.0 if rgb_as_latents else floor["vae_encode_fb_ms"])
    scene_note = (
        f"{config.gaussians.num_init} Gaussians at first" if representation == "gaussians"
        else f"{config.renderer.num_samples} samples"
    )  # fmt: skip
    return {
        "rule": rule, "representation": representation, "scene": scene_note,
        "arch": arch, "device": device, "compile": compile, "compile_mode": compile_mode if compile else None,
        "nerf_compile": nerf_compile, "nerf_compile_mode": nerf_compile_mode if nerf_compile else None,
        "hash_grid": hash_grid, "channels_last": guidance.config.channels_last, "rgb_as_latents": rgb_as_latents,
        "normals": config.nerf.normal_type, "dtype": dtype, "preset": config.preset,
        "render_resolution": res, "samples_per_ray": config.renderer.num_samples, "steps_timed": steps,
        "warmup": warmup, "build_s": round(build_s, 1), "step_ms": round(step, 2),
        "steps_per_s": round(1000 / step, 2), "phases_ms": {k: round(v, 2) for k, v in phase_ms.items()},
        "floor_ms": {k: v if isinstance(v, list) else round(v, 2) for k, v in floor.items()},
        "step_over_floor": round(step / floor["floor_ms"], 3),
        "peak_gpu_gb": None if peak_gb is None else round(peak_gb, 2),
        "projected_10k_min": round(step * 10_000 / 60_000, 2),
    }  # fmt: skip


def _per_step_ms(marks: list[tuple[Any, Any]], clock: Clock, warmup: int, steps: int) -> list[float]:
    """Each timed step's total in one phase; a rule may call a phase several times per step, and
    calls before the loop (a rule's set-up) are left out."""
    per = len(marks) // (warmup + steps)
    ms = [clock.ms(a, b) for a, b in marks[len(marks) - per * (warmup + steps) :]]
    return [sum(ms[i * per : (i + 1) * per]) for i in range(warmup, warmup + steps)]


_CALL_CACHE: dict[tuple[int, int], float] = {}


def _call_ms(guidance: Any, rows: int, emb: Any, channels: int, size: int, dev: torch.device, clock: Clock,
             warmup: int, steps: int) -> float:  # fmt: skip
    """Median ms of one U-Net forward on `rows` rows, alone (cached per guidance and batch size)."""
    key = (id(guidance), rows)
    if key not in _CALL_CACHE:
        x_t = torch.randn(rows, channels, size, size, device=dev)
        t = torch.full((rows,), 500, device=dev)

        def call() -> None:
            with torch.no_grad():
                guidance.predict_noise(x_t, t, [emb] * rows, None)

        _CALL_CACHE[key] = median_ms(call, clock, warmup, steps)
    return _CALL_CACHE[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sds3d bench speed", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", help=f"comma-separated: {', '.join([*ARCHS, 'builtin'])}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net and VAE encoder")
    parser.add_argument(
        "--compile-mode", default="default", help="torch.compile mode; reduce-overhead = CUDA graphs"
    )
    parser.add_argument(
        "--nerf-compile", action="store_true",
        help="also torch.compile the NeRF's field query (with forward-difference normals unless --normals)",
    )  # fmt: skip
    parser.add_argument("--nerf-compile-mode", default="default", help="torch.compile mode of the NeRF")
    parser.add_argument(
        "--hash-grid", default="torch", choices=["auto", "torch", "triton"],
        help="the hash grid's kernels (triton: fused Triton kernels on a GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="U-Net and VAE in channels-last memory format (default: the preset's; fast-sd: on)",
    )  # fmt: skip
    parser.add_argument(
        "--normals", choices=["analytic", "finite_difference", "forward_difference", "closed_form"],
        help="the NeRF's normals (default: analytic, or forward_difference with --nerf-compile)",
    )  # fmt: skip
    parser.add_argument(
        "--rgb-as-latents", action="store_true",
        help="time the latent warm-up's step (the render is the latents; no VAE encoder)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", default=None, help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)"
    )
    parser.add_argument("--rule", default="sds", help="comma-separated distillation rules (`sds3d rules`)")
    parser.add_argument(
        "--representation", default="nerf",
        help="comma-separated: nerf (fast-sd / default preset), gaussians (dreamgaussian-sd / gaussians preset)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=50, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--name", default=None, help="report name (default: speed_<archs>[_compile])")
    args = parser.parse_args(argv)
    archs = args.arch.split(",")
    unknown = [a for a in archs if a not in ARCHS and a != "builtin"]
    if unknown:
        parser.error(f"unknown arch {', '.join(unknown)}; choose from {', '.join([*ARCHS, 'builtin'])}")
    from sds3d.rules import RULES

    rules = args.rule.split(",")
    if unknown := [r for r in rules if r not in RULES]:
        parser.error(f"unknown rule {', '.join(unknown)}; choose from {', '.join(RULES)}")
    representations = args.representation.split(",")
    if unknown := [r for r in representations if r not in ("nerf", "gaussians")]:
        parser.error(f"unknown representation {', '.join(unknown)}; choose from nerf, gaussians")
    if args.rgb_as_latents and "gaussians" in representations:
        parser.error("--rgb-as-latents needs a NeRF; Gaussians render albedo only")
    if args.rgb_as_latents and "builtin" in archs:
        parser.error("--rgb-as-latents needs a latent model; builtin works in pixels")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    rows = []
    for arch in archs:
        for representation in representations:
            for rule in rules:
                rows.append(measure(arch, args.device, args.compile, dtype, args.steps, args.warmup,
                                    args.compile_mode, args.nerf_compile, args.normals, args.nerf_compile_mode,
                                    args.hash_grid, args.channels_last, args.rgb_as_latents, rule,
                                    representation))  # fmt: skip
                print(rows[-1], flush=True)
    command = "sds3d bench speed " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {"command": command.strip(), "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
              "results": rows}  # fmt: skip
    m = report["machine"]
    mode = f"torch.compile, mode {args.compile_mode}" if args.compile else "eager"
    mode += (
        f", NeRF compiled ({args.nerf_compile_mode})" if args.nerf_compile else ""
    ) + f", {rows[0]['normals'].replace('_', '-')} normals, hash grid {args.hash_grid}"
    mode += ", channels-last" if rows[0]["channels_last"] else ""
    mode += ", latent warm-up step (rgb_as_latents)" if args.rgb_as_latents else ""
    lines = [
        f"# SDS step against its floor ({mode}, {dtype})",
        "",
        f"Command: `{report['command']}` ({report['date']})  ",
        f"Machine: GPU {m['gpu']}, {m['cpu']} ({m['cores']} cores), torch {m['torch']}",
        "",
        "Random weights in each architecture's published config; the real training loop on a NeRF (or 3D "
        "Gaussians: the dreamgaussian-sd preset with SD layouts, gaussians with the built-in prior). "
        f"Medians of {args.steps} steps after {args.warmup} warm-up steps. Floor = the step's U-Net forwards "
        "(SDS: one CFG pair; other rules: every call they make, with its batch in rows) + VAE encoder forward "
        "and backward, each measured alone in the same process and mode"
        + (
            "; the latent warm-up's step has no VAE encoder, so its floor is the U-Net pair alone (the "
            "VAE column still shows the encoder's f/b for reference)."
            if args.rgb_as_latents
            else "."
        ),
        "",
        "| arch | rule | preset | scene, render | step ms | steps/s | render ms | VAE enc ms | U-Net ms | rest ms "
        "| U-Net calls (rows) | floor ms (U-Net + VAE f/b) | step / floor | step / NeRF SDS step | peak GPU GB "
        "| 10k steps (min) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    sds_ms = {r["arch"]: r["step_ms"] for r in rows if r["rule"] == "sds" and r["representation"] == "nerf"}
    for r in rows:
        p, f = r["phases_ms"], r["floor_ms"]
        versus = f"{r['step_ms'] / sds_ms[r['arch']]:.2f}" if r["arch"] in sds_ms else "—"
        lines.append(
            f"| {r['arch']} | {r['rule']} | {r['preset']} | {r['representation']}, {r['render_resolution']}², {r['scene']} "
            f"| {r['step_ms']:.1f} | {r['steps_per_s']:.1f} | {p.get('render', 0):.1f} | {p.get('vae_encode', 0):.1f} "
            f"| {p.get('unet', 0):.1f} | {p['rest']:.1f} | {' + '.join(map(str, f['unet_calls']))} "
            f"| {f['floor_ms']:.1f} ({f['unet_ms']:.1f} + "
            + (
                f"0; VAE f/b {f['vae_encode_fb_ms']:.1f} not in the step)"
                if r["rgb_as_latents"]
                else f"{f['vae_encode_fb_ms']:.1f})"
            )
            + f" | {r['step_over_floor']:.2f} | {versus} | {r['peak_gpu_gb'] or '—'} "
            f"| {r['projected_10k_min']:.1f} |"
        )
    name = args.name or ("speed_" + "_".join(archs) + ("_compile" if args.compile else "")
                         + ("" if rules == ["sds"] else "_rules")
                         + ("" if representations == ["nerf"] else "_" + "_".join(representations)))  # fmt: skip
    write_report(args.out, name, report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
