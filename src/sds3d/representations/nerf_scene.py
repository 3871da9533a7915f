"""The hash-grid NeRF as one representation: the field (nerf.py) and its background, rendered by
the volume renderer (render/volume.py), regularised by losses.py and meshed by export.py.

With a latent warm-up (Latent-NeRF) field and background carry a latent head, and the scene keeps
the affine latent→RGB map (`latent_to_rgb`, [C + 1, 3]) that previews latent renders and ends the
warm-up. Its state dict (`nerf.*`, `background.*`, `latent_to_rgb`) is what checkpoints hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sds3d import losses
from sds3d.cameras import Cameras
from sds3d.ramp import Scheduled, value_at
from sds3d.render.volume import RenderOutput, Shading, VolumeRendererConfig, render
from sds3d.representations.base import Representation
from sds3d.representations.nerf import Background, BackgroundConfig, HashGridNeRF, HashGridNeRFConfig

if TYPE_CHECKING:
    from sds3d.config import OptimConfig
    from sds3d.export import ExportConfig, MeshOutput


@dataclass
class RegularizerConfig:
    """Weights of the regularisers in `losses.py`; each a float or a `Ramp` over training."""

    orientation: Scheduled = 0.0
    sparsity: Scheduled = 0.0
    entropy: Scheduled = 0.0


class NeRFScene(Representation):
    latent_to_rgb: torch.Tensor  # [C + 1, 3], a buffer (latent warm-up only)

    def __init__(
        self,
        nerf: HashGridNeRFConfig,
        background: BackgroundConfig,
        renderer: VolumeRendererConfig,
        regularizers: RegularizerConfig,
        latent_channels: int = 0,
    ):
        super().__init__()
        self.nerf: HashGridNeRF = nerf.build(latent_channels=latent_channels)
        self.background: Background = background.build(latent_channels=latent_channels)
        self.renderer = renderer
        self.weights = regularizers
        if latent_channels:
            self.register_buffer("latent_to_rgb", torch.zeros(latent_channels + 1, 3))

    # --- the seam -----------------------------------------------------------------------------
    def render(
        self,
        cameras: Cameras,
        shading: Shading = "albedo",
        light_positions: torch.Tensor | None = None,  # [B, 3]
        num_samples: int | None = None,  # default: the renderer's
        solid_background: tuple[float, float, float] | None = None,  # instead of the scene's own
        **options: Any,  # render.volume.render's: stratified, need_normals, random_background, latent, …
    ) -> RenderOutput:
        background = self.background
        if solid_background is not None:
            device = next(self.nerf.parameters()).device
            background = Background(BackgroundConfig(kind="solid", color=solid_background)).to(device)
        return render(
            self.nerf, background, cameras, num_samples or self.renderer.num_samples, shading=shading,
            light_positions=light_positions, **{"ambient": self.renderer.ambient, **options},
        )  # fmt: skip

    def render_train(
        self,
        cameras: Cameras,
        shading: Shading,
        light_positions: torch.Tensor | None,
        step_ratio: float,
        generator: torch.Generator | None,
        latent: bool = False,
    ) -> RenderOutput:
        """Stratified samples; normals with their graph where the orientation loss needs them."""
        oriented = value_at(self.weights.orientation, step_ratio) > 0
        return self.render(
            cameras, shading, light_positions, stratified=True, need_normals=oriented,
            normals_create_graph=oriented, generator=generator, latent=latent,
        )  # fmt: skip

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """The hash tables at Instant-NGP's learning rate, everything else at the MLP's."""
        rest = [p for n, p in self.named_parameters() if n != "nerf.encoding.tables"]
        return [
            {"params": [self.nerf.encoding.tables], "lr": optim.lr_grid},
            {"params": rest, "lr": optim.lr_mlp},
        ]

    def regularizers(self, out: RenderOutput, step_ratio: float) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        opacity = out.opacity.flatten()
        if (w := value_at(self.weights.orientation, step_ratio)) > 0 and out.sample_normals is not None:
            terms["orientation"] = w * losses.orientation_loss(
                out.weights, out.sample_normals, out.ray_dirs, opacity
            )
        if (w := value_at(self.weights.sparsity, step_ratio)) > 0:
            terms["sparsity"] = w * losses.sparsity_loss(opacity)
        if (w := value_at(self.weights.entropy, step_ratio)) > 0:
            terms["entropy"] = w * losses.entropy_loss(opacity)
        return terms

    def to_mesh(self, config: ExportConfig) -> MeshOutput:
        from sds3d.export import extract_mesh

        return extract_mesh(self.nerf, self.background, config)

    def render_turntable(self, config: ExportConfig, shading: Shading, progress: bool = False) -> np.ndarray:
        """Volume renders of the field on the export's orbit ([N, H, W, 3] uint8)."""
        from sds3d.export import render_turntable

        return render_turntable(self.nerf, self.background, config, shading, progress)

    # --- the latent warm-up -------------------------------------------------------------------
    def set_latent_maps(self, to_rgb: torch.Tensor, to_latent: torch.Tensor) -> None:
        """The VAE's affine maps latent→RGB [C + 1, 3] and RGB→latent [4, C] (fitted once per run)."""
        self.latent_to_rgb.copy_(to_rgb)
        self.background.rgb_to_latent.copy_(to_latent)

    def start_stage(self, previous_render: str, render: str) -> None:
        if (previous_render, render) == ("latent", "rgb"):
            self.latents_to_rgb_()
        else:
            super().start_stage(previous_render, render)

    def latents_to_rgb_(self) -> None:
        """End of the latent warm-up: NeRF and background RGB heads from their latent heads."""
        self.nerf.latent_head_to_rgb_(self.latent_to_rgb)
        self.background.latent_head_to_rgb_(self.latent_to_rgb)

    def preview_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """A latent render [B, C, H, W] as colours [B, 3, H, W] in [0, 1], by the affine map."""
        m = self.latent_to_rgb.to(latents)
        return (torch.einsum("bchw,cd->bdhw", latents, m[:-1]) + m[-1].view(1, 3, 1, 1)).clamp(0, 1)
