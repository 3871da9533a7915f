"""The Prior seam: what every frozen diffusion prior implements (the rules in rules/ use it).

A prior provides three things, and nothing about how they are turned into a loss:
1. `encode_prompt(text)`: an embedding of one text (cached by `prompts.PromptProcessor`);
2. `encode_images(rgb)`: the render [B, 3, H, W] in [0, 1] → the model's space (pixels in
   [−1, 1] at the model resolution, or VAE latents), differentiably; latent models also take a
   render of latents as it is (`latents_from_render`, Latent-NeRF: resized, no encoder);
3. `predict_noise(x_t, t, embeddings, cameras)`: ε̂ for a batch; the conditional and
   unconditional halves of CFG arrive as one batch of 2B;
and its noise schedule `alphas_cumprod` [T]. A prior is frozen: training never changes it, so one
prior can serve many runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sds3d import diffusion
from sds3d.cameras import Cameras


class Prior(nn.Module):
    """Base class of ε-prediction priors. Subclasses implement the three protocol methods."""

    alphas_cumprod: torch.Tensor  # [T], a buffer

    def __init__(self, scheduler_config: dict):
        super().__init__()
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


def resize_to(rgb: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of [B, C, H, W] to the model resolution; identity if equal."""
    if rgb.shape[-1] == resolution and rgb.shape[-2] == resolution:
        return rgb
    return F.interpolate(
        rgb, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
    )
