"""Sampling from a diffusers prior with diffusers' DDIM, for sample grids and the prior-accuracy
check: x_T ~ N(0, I), then `steps` DDIM updates with CFG ε̂ = ε_∅ + s(ε_y − ε_∅); deterministic
with η = 0, ancestral (DDPM-like fresh noise at every step) with η = 1 (Song et al. 2021, eq. 16).

Options for large guidance scales, all diffusers' own: dynamic thresholding of the predicted x_0
(Imagen; DeepFloyd IF's scheduler uses ratio 0.95, max 1.5), CFG rescale (Lin et al. 2024, φ), and
the timestep spacing of the DDIM steps ("leading" starts at t = 957 for 30 steps, "trailing" at 999).

Camera guidance (a camera-conditioned prior; the image-and-text CFG of InstructPix2Pix with the
camera as the second condition): ε̂ += s_c (ε_{y,c} − ε_{y,∅c}), the conditional prediction with the
camera minus the same without it, which amplifies what the camera changes.
"""

from __future__ import annotations

import numpy as np
import torch

from sds3d.guidance.diffusers_prior import DiffusersGuidance
from sds3d.rules.base import predict_guided


@torch.no_grad()
def sample_images(
    guidance: DiffusersGuidance, prompts: list[str], guidance_scale: float = 3.0, steps: int = 30, seed: int = 0,
    cameras=None, eta: float = 0.0, threshold_ratio: float = 0.0, threshold_max: float = 1.5,
    guidance_rescale: float = 0.0, spacing: str | None = None, clip_sample: bool | None = None,
    camera_guidance_scale: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """[N, 3, R, R] in [0, 1], one image per prompt. `threshold_ratio` > 0 turns on dynamic
    thresholding with that percentile and `threshold_max`; `guidance_rescale` is φ of CFG rescale;
    `spacing` and `clip_sample` override the scheduler config's; `camera_guidance_scale` is s_c
    (module docstring; needs `cameras`)."""
    from diffusers import DDIMScheduler
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    overrides: dict = {}
    if threshold_ratio > 0:
        overrides |= {"thresholding": True, "dynamic_thresholding_ratio": threshold_ratio,
                      "sample_max_value": threshold_max}  # fmt: skip
    if spacing is not None:
        overrides["timestep_spacing"] = spacing
    if clip_sample is not None:
        overrides["clip_sample"] = clip_sample
    scheduler = DDIMScheduler.from_config(guidance.scheduler_config, **overrides)
    scheduler.set_timesteps(steps)
    res = int(guidance.unet.config.sample_size)
    device = next(guidance.unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 3, res, res, generator=g).to(device)
    cond = [guidance.encode_prompt(p) for p in prompts]
    uncond = [guidance.encode_prompt("")] * len(prompts)
    for t in scheduler.timesteps:
        tt = torch.full((len(prompts),), int(t), device=device, dtype=torch.long)
        # The rules' guided prediction: CFG in one batch of 2B, camera guidance one more call.
        e, _, e_c = predict_guided(guidance, x, tt, cond, uncond, cameras, guidance_scale, always_both=True,
                                   camera_scale=camera_guidance_scale)  # fmt: skip
        if guidance_rescale > 0:
            e = rescale_noise_cfg(e, e_c, guidance_rescale)
        x = scheduler.step(e, t, x, eta=eta, generator=g).prev_sample
    return ((x + 1) / 2).clamp(0, 1).cpu()


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] → one uint8 image, `columns` per row."""
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.ones(3, rows * h, columns * w)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
