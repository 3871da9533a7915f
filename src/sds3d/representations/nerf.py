"""A hash-grid NeRF for text-to-3D: density τ and albedo ρ from one small MLP (DreamFusion §3.1).

- Scene bound: the cube [−bound, bound]³ (world units, +Z up); points outside have zero density.
- Density: softplus(raw + blob(x)), with Magic3D's density blob
  blob(x) = scale·(1 − ‖x‖/std) (threestudio `blob_magic3d`, scale 10, std 0.5), so training starts
  from a soft ball at the origin rather than from nothing.
- Albedo: sigmoid of the MLP's colour head, in [0, 1].
- Normals: n = −∇τ/‖∇τ‖, only when shading needs them: by autograd of the density (`analytic`,
  DreamFusion; shading losses then need a second backward), or by differences of τ with step ε,
  central (`finite_difference`, threestudio's: six more queries) or forward (`forward_difference`:
  three more, O(ε) error), or in closed form (`closed_form`: the exact ∇τ from the hash grid's
  spatial derivative through the MLP by the chain rule, from the same corner lookups). All but
  `analytic` need first-order autograd only, so the whole field query can be compiled.
- Background: `BackgroundConfig`: solid colour, a random solid colour per image, or a small MLP of
  the view direction (learned).
- Latent warm-up (a first stage with `render="latent"`, stages.py; Latent-NeRF, Metzer et al. 2023; threestudio's
  `rgb_as_latents`): NeRF and background get a second colour head of C unbounded channels that a
  latent diffusion model reads as its latents; `latent=True` renders it instead of the albedo.
  `latent_head_to_rgb_` then writes the RGB head from it with an affine latent→RGB map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sds3d.devices import Generators, device_generator, draw_rows
from sds3d.representations.encodings import HashGridConfig


@dataclass
class HashGridNeRFConfig:
    bound: float = 1.0
    grid: HashGridConfig = field(default_factory=HashGridConfig)
    hidden_dim: int = 32
    blob_scale: float = 10.0
    blob_std: float = 0.5
    normal_type: Literal["analytic", "finite_difference", "forward_difference", "closed_form"] = "analytic"
    finite_difference_eps: float = 0.01  # threestudio's finite_difference_normal_eps
    # torch.compile the field query (hash grid + MLP, with its normals): fused kernels on a GPU.
    # Needs normals other than "analytic" (compiled functions have no double backward).
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" replays CUDA graphs

    def build(self, latent_channels: int = 0) -> HashGridNeRF:
        if self.compile and self.normal_type == "analytic":
            raise ValueError("a compiled NeRF needs normals without a second backward, not 'analytic'")
        return HashGridNeRF(self, latent_channels)


@dataclass
class DensityAlbedo:
    density: torch.Tensor  # [N], ≥ 0
    albedo: torch.Tensor  # [N, 3] in [0, 1]; [N, C] unbounded latents when queried with latent=True


def latent_head_to_rgb_(layer: nn.Linear, rgb: slice, latent: slice, to_rgb: torch.Tensor) -> None:
    """Write the RGB rows of `layer` (read through a sigmoid) from its latent rows (read as they
    are), given the affine map rgb ≈ z·M + c (`to_rgb` = [M; c], [C + 1, 3]): since
    sigmoid(x) ≈ 1/2 + x/4 near x = 0, raw = 4(z·M + c − 1/2) shows the same colours to first
    order around mid-grey, and saturates smoothly outside [0, 1]."""
    m, c = to_rgb[:-1].to(layer.weight), to_rgb[-1].to(layer.weight)
    with torch.no_grad():
        layer.weight[rgb] = 4 * m.T @ layer.weight[latent]
        layer.bias[rgb] = 4 * (layer.bias[latent] @ m + c - 0.5)


class HashGridNeRF(nn.Module):
    def __init__(self, config: HashGridNeRFConfig, latent_channels: int = 0):
        super().__init__()
        self.config = config
        self.latent_channels = latent_channels
        self.encoding = config.grid.build()
        self.mlp = nn.Sequential(
            nn.Linear(self.encoding.output_dim, config.hidden_dim),
            nn.ReLU(inplace=True),
            # raw density, raw albedo (3), and the latent head's channels (Latent-NeRF warm-up)
            nn.Linear(config.hidden_dim, 4 + latent_channels),
        )
        # Compiled callables beside the module (the state dict stays the plain module's).
        compile = (
            (lambda fn: torch.compile(fn, mode=config.compile_mode)) if config.compile else (lambda fn: fn)
        )
        self._query = compile(self._field)
        self._query_fd = compile(self._field_and_fd_normals)
        self._query_closed = compile(self._field_and_closed_form_normals)

    def density_blob(self, points: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N]
        return self.config.blob_scale * (1 - points.norm(dim=-1) / self.config.blob_std)

    def _unit(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points in the unit cube of the hash grid, and which of them lie inside the scene."""
        unit = (points + self.config.bound) / (2 * self.config.bound)
        return unit, ((unit >= 0) & (unit <= 1)).all(dim=-1)

    @staticmethod
    def _color(raw: torch.Tensor, latent: bool) -> torch.Tensor:
        """The albedo in [0, 1], or the latent head's channels as they are."""
        return raw[:, 4:] if latent else torch.sigmoid(raw[:, 1:4])

    def _field(self, points: torch.Tensor, latent: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        unit, inside = self._unit(points)
        raw = self.mlp(self.encoding(unit))
        density = F.softplus(raw[:, 0] + self.density_blob(points)) * inside
        return density, self._color(raw, latent)

    def _field_and_fd_normals(
        self, points: torch.Tensor, latent: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One query of the N points and their neighbours x ± ε·e_i (central) or x + ε·e_i (forward):
        density, albedo, normals."""
        n, eps = points.shape[0], self.config.finite_difference_eps
        steps = eps * torch.eye(3, device=points.device, dtype=points.dtype)
        central = self.config.normal_type == "finite_difference"
        offsets = torch.cat([steps, -steps]) if central else steps
        neighbours = points[None] + offsets[:, None]  # [6 or 3, N, 3]
        density, albedo = self._field(torch.cat([points, neighbours.reshape(-1, 3)]), latent)
        d = density[n:].reshape(-1, n)
        grad = ((d[:3] - d[3:]) / (2 * eps) if central else (d - density[:n]) / eps).T  # [N, 3]
        return density[:n], albedo[:n], -F.normalize(grad, dim=-1, eps=1e-6)

    def _field_and_closed_form_normals(
        self, points: torch.Tensor, latent: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Density, albedo and n = −∇τ/‖∇τ‖ with ∇τ by the chain rule written out:
        τ = softplus(z)·inside, z = W₂[0]·relu(W₁e + b₁) + b₂[0] + blob(x), e the hash features, so
        ∇τ = sigmoid(z)·(W₂[0]·(1[h>0] ⊙ W₁ ∂e/∂x) + ∇blob)."""
        unit, inside = self._unit(points)
        e, de = self.encoding.forward_with_gradient(unit)  # [N, K], [N, K, 3] per unit coordinate
        first, last = self.mlp[0], self.mlp[2]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        h = first(e)
        raw = last(torch.relu(h))
        dh = torch.einsum("hk,nkd->nhd", first.weight, de / (2 * self.config.bound))  # [N, H, 3]
        d_raw = torch.einsum("h,nhd->nd", last.weight[0], dh * (h > 0)[..., None])
        norm = points.norm(dim=-1, keepdim=True)
        d_blob = -(self.config.blob_scale / self.config.blob_std) * points / norm.clamp_min(1e-12)
        z = raw[:, 0] + self.density_blob(points)
        density = F.softplus(z) * inside
        grad = (torch.sigmoid(z) * inside)[:, None] * (d_raw + d_blob)
        return density, self._color(raw, latent), -F.normalize(grad, dim=-1, eps=1e-6)

    def forward(
        self, points: torch.Tensor, latent: bool = False
    ) -> DensityAlbedo:  # points [N, 3], world units
        density, albedo = self._query(points, latent)
        return DensityAlbedo(density=density, albedo=albedo)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward(points).density

    def normals(
        self, points: torch.Tensor, create_graph: bool, latent: bool = False
    ) -> tuple[DensityAlbedo, torch.Tensor]:
        """Density, albedo and n = −∇τ/‖∇τ‖ [N, 3]. Analytic normals: `create_graph` lets losses
        on n train τ. The other normal types always carry their (first-order) graph."""
        if self.config.normal_type != "analytic":
            query = self._query_closed if self.config.normal_type == "closed_form" else self._query_fd
            density, albedo, normals = query(points, latent)
            return DensityAlbedo(density=density, albedo=albedo), normals
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            out = self.forward(points, latent)
            # retain_graph: the density's graph is still needed by the loss's backward.
            (grad,) = torch.autograd.grad(
                out.density.sum(), points, create_graph=create_graph, retain_graph=True
            )
        return out, -F.normalize(grad, dim=-1, eps=1e-6)

    def latent_head_to_rgb_(self, to_rgb: torch.Tensor) -> None:
        """End of the latent warm-up: the albedo head from the latent head (`latent_head_to_rgb_`)."""
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        latent_head_to_rgb_(last, slice(1, 4), slice(4, 4 + self.latent_channels), to_rgb)


BackgroundKind = Literal["solid", "random", "learned"]


@dataclass
class BackgroundConfig:
    kind: BackgroundKind = "solid"
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hidden_dim: int = 16

    def build(self, latent_channels: int = 0) -> Background:
        return Background(self, latent_channels)


class Background(nn.Module):
    """The colour behind the scene for each ray: [B, H, W, 3] in [0, 1], or [B, H, W, C] latents
    with `latent=True` (the learned MLP's latent head; solid and random colours through the affine
    map `rgb_to_latent`, [4, C], which the trainer fits to the VAE)."""

    color: torch.Tensor  # [3], a buffer
    rgb_to_latent: torch.Tensor  # [4, C], a buffer (latent warm-up only)

    def __init__(self, config: BackgroundConfig, latent_channels: int = 0):
        super().__init__()
        self.config = config
        self.latent_channels = latent_channels
        # The solid colour as a buffer: it moves with the module, no host-to-device copy per render.
        self.register_buffer("color", torch.tensor(config.color, dtype=torch.float32), persistent=False)
        if latent_channels:
            self.register_buffer("rgb_to_latent", torch.zeros(4, latent_channels))
        if config.kind == "learned":
            self.mlp = nn.Sequential(
                nn.Linear(3, config.hidden_dim), nn.ReLU(inplace=True),
                nn.Linear(config.hidden_dim, 3 + latent_channels),
            )  # fmt: skip

    def forward(
        self,
        dirs: torch.Tensor,
        generator: Generators = None,
        random: bool = True,
        latent: bool = False,
    ) -> torch.Tensor:  # dirs [B, H, W, 3]
        b = dirs.shape[0]
        if self.config.kind == "learned":
            raw = self.mlp(dirs)
            return raw[..., 3:] if latent else torch.sigmoid(raw[..., :3])
        if self.config.kind == "random" and random:
            g = device_generator(generator, dirs.device)
            color = draw_rows(g, b, lambda n, gk: torch.rand(n, 1, 1, 3, generator=gk, device=dirs.device))
            color = color.to(dirs.dtype)
        else:
            color = self.color.to(dirs.dtype).expand(b, 1, 1, 3)
        if latent:
            color = color @ self.rgb_to_latent[:3].to(dirs.dtype) + self.rgb_to_latent[3].to(dirs.dtype)
        return color.expand(*dirs.shape[:-1], color.shape[-1])

    def latent_head_to_rgb_(self, to_rgb: torch.Tensor) -> None:
        """End of the latent warm-up: a learned background's RGB head from its latent head."""
        if self.config.kind == "learned":
            last = self.mlp[2]
            assert isinstance(last, nn.Linear)
            latent_head_to_rgb_(last, slice(0, 3), slice(3, 3 + self.latent_channels), to_rgb)
