"""A hash-grid NeRF for text-to-3D: density τ and albedo ρ from one small MLP (DreamFusion §3.1).

- Scene bound: the cube [−bound, bound]³ (world units, +Z up); points outside have zero density.
- Density: softplus(raw + blob(x)), with Magic3D's density blob
  blob(x) = scale·(1 − ‖x‖/std) (threestudio `blob_magic3d`, scale 10, std 0.5), so training starts
  from a soft ball at the origin rather than from nothing.
- Albedo: sigmoid of the MLP's colour head, in [0, 1].
- Normals: n = −∇τ/‖∇τ‖, by autograd of the density (DreamFusion), only when shading needs them.
- Background: `BackgroundConfig`: solid colour, a random solid colour per image, or a small MLP of
  the view direction (learned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sds3d.devices import device_generator
from sds3d.representations.encodings import HashGridConfig


@dataclass
class HashGridNeRFConfig:
    bound: float = 1.0
    grid: HashGridConfig = field(default_factory=HashGridConfig)
    hidden_dim: int = 32
    blob_scale: float = 10.0
    blob_std: float = 0.5

    def build(self) -> HashGridNeRF:
        return HashGridNeRF(self)


@dataclass
class DensityAlbedo:
    density: torch.Tensor  # [N], ≥ 0
    albedo: torch.Tensor  # [N, 3] in [0, 1]


class HashGridNeRF(nn.Module):
    def __init__(self, config: HashGridNeRFConfig):
        super().__init__()
        self.config = config
        self.encoding = config.grid.build()
        self.mlp = nn.Sequential(
            nn.Linear(self.encoding.output_dim, config.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.hidden_dim, 4),  # raw density, raw albedo (3)
        )

    def density_blob(self, points: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N]
        return self.config.blob_scale * (1 - points.norm(dim=-1) / self.config.blob_std)

    def forward(self, points: torch.Tensor) -> DensityAlbedo:  # points [N, 3] in world units
        bound = self.config.bound
        unit = (points + bound) / (2 * bound)
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        raw = self.mlp(self.encoding(unit))
        density = F.softplus(raw[:, 0] + self.density_blob(points)) * inside
        return DensityAlbedo(density=density, albedo=torch.sigmoid(raw[:, 1:]))

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward(points).density

    def normals(self, points: torch.Tensor, create_graph: bool) -> tuple[DensityAlbedo, torch.Tensor]:
        """Density, albedo and n = −∇τ/‖∇τ‖ [N, 3]; `create_graph` lets losses on n train τ."""
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            out = self.forward(points)
            # retain_graph: the density's graph is still needed by the loss's backward.
            (grad,) = torch.autograd.grad(
                out.density.sum(), points, create_graph=create_graph, retain_graph=True
            )
        return out, -F.normalize(grad, dim=-1, eps=1e-6)


BackgroundKind = Literal["solid", "random", "learned"]


@dataclass
class BackgroundConfig:
    kind: BackgroundKind = "solid"
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hidden_dim: int = 16

    def build(self) -> Background:
        return Background(self)


class Background(nn.Module):
    """The colour behind the scene for each ray: [B, H, W, 3] in [0, 1]."""

    color: torch.Tensor  # [3], a buffer

    def __init__(self, config: BackgroundConfig):
        super().__init__()
        self.config = config
        # The solid colour as a buffer: it moves with the module, no host-to-device copy per render.
        self.register_buffer("color", torch.tensor(config.color, dtype=torch.float32), persistent=False)
        if config.kind == "learned":
            self.mlp = nn.Sequential(
                nn.Linear(3, config.hidden_dim), nn.ReLU(inplace=True), nn.Linear(config.hidden_dim, 3)
            )

    def forward(
        self, dirs: torch.Tensor, generator: torch.Generator | None = None, random: bool = True
    ) -> torch.Tensor:  # dirs [B, H, W, 3]
        b = dirs.shape[0]
        if self.config.kind == "learned":
            return torch.sigmoid(self.mlp(dirs))
        if self.config.kind == "random" and random:
            g = device_generator(generator, dirs.device)
            color = torch.rand(b, 1, 1, 3, generator=g, device=dirs.device).to(dirs.dtype)
            return color.expand_as(dirs)
        return self.color.to(dirs.dtype).expand_as(dirs)
