"""The guidance seam: what every diffusion prior implements, and the SDS step built on it.

A prior provides three things (the protocol), and `NoisePredictionGuidance.forward` turns them
into one score-distillation step:
1. `encode_prompt(text)`: an embedding of one text (cached by `prompts.PromptProcessor`);
2. `encode_images(rgb)`: the render [B, 3, H, W] in [0, 1] → the model's space (pixels in
   [−1, 1] at the model resolution, or VAE latents), differentiably; latent models also take a
   render of latents as it is (`rgb_as_latents`, Latent-NeRF: resized, no encoder);
3. `predict_noise(x_t, t, embeddings, cameras)`: ε̂ for a batch; the conditional and
   unconditional halves of CFG arrive as one batch of 2B.

The step (DreamFusion eq. 3; see `diffusion.py` for the derivation):
    x = E(render); t ~ schedule(step_ratio); ε ~ N(0, I); x_t = α_t x + σ_t ε
    ε̂ = ε_∅ + s(ε_y − ε_∅);  g = clip(guard(w(t)(ε̂ − ε)));  loss = 0.5‖x − sg(x − g)‖² / B
so that ∂loss/∂x = g/B (the batch mean, as threestudio). In `literal` mode the loss is
Σ w(t)‖ε̂ − ε‖²/B back-propagated through the denoiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sds3d import diffusion
from sds3d.cameras import Cameras
from sds3d.devices import device_generator
from sds3d.ramp import Scheduled, value_at


@dataclass
class SDSConfig:
    guidance_scale: float = 1.0  # s in ε̂ = ε_∅ + s(ε_y − ε_∅); DreamFusion's ω = s − 1
    weighting: diffusion.Weighting = "dreamfusion"
    t_schedule: diffusion.TimestepSchedule = "constant"
    t_min: float = 0.02
    t_max: float = 0.98
    t_max_end: float = 0.5  # where `linear` and `step` schedules lower t_max to
    t_drop_at: float = 0.5  # step ratio of the `step` schedule's drop
    grad_clip: Scheduled | None = None  # Debiased SDS: clamp g to ±c(step_ratio)
    mode: Literal["sds", "literal"] = "sds"


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar; its gradient w.r.t. the render is the SDS gradient
    grad_norm: torch.Tensor  # scalar, mean over the batch of ‖g‖ (a tensor: no host sync)
    timesteps: torch.Tensor  # [B] long
    noise: torch.Tensor  # ε, in the model's space


class NoisePredictionGuidance(nn.Module):
    """Base class of ε-prediction priors. Subclasses implement the three protocol methods."""

    alphas_cumprod: torch.Tensor  # [T], a buffer

    def __init__(self, sds: SDSConfig, scheduler_config: dict):
        super().__init__()
        self.sds = sds
        self.scheduler_config = dict(scheduler_config)  # for samplers (prior/sample.py)
        self.register_buffer(
            "alphas_cumprod", diffusion.alphas_cumprod_from_config(scheduler_config), persistent=False
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    # --- the protocol -------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> Any:
        raise NotImplementedError

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """Default for pixel-space priors: [0, 1] → [−1, 1]."""
        return rgb * 2 - 1

    def latents_from_render(self, latents: torch.Tensor) -> torch.Tensor:
        """A render of latents [B, C, H, W] → the model's latent size (latent models only)."""
        raise ValueError(f"{type(self).__name__} works in pixels; it has no latents to render")

    def predict_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, embeddings: Sequence[Any], cameras: Cameras | None
    ) -> torch.Tensor:
        raise NotImplementedError

    # --- the SDS step ---------------------------------------------------------------------------
    def forward(
        self,
        rgb: torch.Tensor,  # [B, 3, H, W] in [0, 1]
        cond: Sequence[Any],
        uncond: Sequence[Any],
        step_ratio: float,
        cameras: Cameras | None = None,
        generator: torch.Generator | None = None,
        rgb_as_latents: bool = False,  # `rgb` holds latents (Latent-NeRF warm-up), not colours
    ) -> GuidanceOutput:
        sds = self.sds
        x = self.latents_from_render(rgb) if rgb_as_latents else self.encode_images(rgb)
        b = x.shape[0]
        # 1. Timestep and noise.
        bounds = diffusion.timestep_bounds(
            sds.t_schedule, step_ratio, sds.t_min, sds.t_max, sds.t_max_end, sds.t_drop_at
        )
        # On a GPU drawn there from a seed of the run's generator (no host copy, no sync); the run's
        # generator itself on the CPU.
        g = device_generator(generator, x.device)
        t = diffusion.sample_timesteps(b, bounds, self.num_train_timesteps, g, x.device)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32, device=x.device).to(x)
        abar_t = self.alphas_cumprod[t]
        literal = sds.mode == "literal"
        # 2. ε̂ with CFG, conditional and unconditional in one batch (skipped when s = 1).
        with torch.set_grad_enabled(literal and torch.is_grad_enabled()):
            x_t = diffusion.add_noise(x if literal else x.detach(), noise, t, self.alphas_cumprod)
            if sds.guidance_scale == 1.0:
                eps = self.predict_noise(x_t, t, list(cond), cameras)
            else:
                both_cams = None if cameras is None else concat_cameras(cameras, cameras)
                eps_both = self.predict_noise(
                    torch.cat([x_t, x_t]), torch.cat([t, t]), list(uncond) + list(cond), both_cams
                )
                eps_uncond, eps_cond = eps_both.chunk(2)
                eps = diffusion.classifier_free_guidance(eps_uncond, eps_cond, sds.guidance_scale)
        # 3. w(t)(ε̂ − ε), guarded and clipped, injected as a gradient.
        weight = diffusion.sds_weight(abar_t, sds.weighting)
        grad = diffusion.sds_gradient(eps.detach(), noise, weight)
        grad = diffusion.nan_guard(grad)
        if sds.grad_clip is not None:
            grad = diffusion.clip_gradient(grad, value_at(sds.grad_clip, step_ratio))
        if literal:
            loss = diffusion.literal_loss(eps, noise, weight) / b
        else:
            loss = diffusion.reparameterised_loss(x, grad) / b
        return GuidanceOutput(
            loss=loss,
            grad_norm=grad.flatten(1).norm(dim=1).mean(),
            timesteps=t,
            noise=noise,
        )


def resize_to(rgb: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of [B, C, H, W] to the model resolution; identity if equal."""
    if rgb.shape[-1] == resolution and rgb.shape[-2] == resolution:
        return rgb
    return F.interpolate(
        rgb, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
    )


def concat_cameras(a: Cameras, b: Cameras) -> Cameras:
    return Cameras(
        torch.cat([a.c2w, b.c2w]), torch.cat([a.fovy_deg, b.fovy_deg]), torch.cat([a.elevation_deg, b.elevation_deg]),
        torch.cat([a.azimuth_deg, b.azimuth_deg]), torch.cat([a.radius, b.radius]), a.width, a.height,
    )  # fmt: skip
