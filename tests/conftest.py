"""Shared fixtures: small analytic fields for renderer and exporter tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sds3d.representations.nerf import DensityAlbedo
from sds3d.world.shapes import shape_sdf

torch.set_num_threads(2)


@dataclass
class _FieldConfig:
    bound: float = 1.0


class AnalyticField(nn.Module):
    """A field with the NeRF's interface whose density and albedo are given functions."""

    def __init__(self, density_fn, albedo=(0.5, 0.5, 0.5), bound: float = 1.0):
        super().__init__()
        self.config = _FieldConfig(bound)
        self.density_fn = density_fn
        self.register_buffer("albedo", torch.tensor(albedo))
        self.dummy = nn.Parameter(torch.zeros(()))  # so that next(parameters()) has a device

    def forward(self, points: torch.Tensor) -> DensityAlbedo:
        density = self.density_fn(points) + 0 * self.dummy
        return DensityAlbedo(density=density, albedo=self.albedo.expand(points.shape[0], 3))

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward(points).density

    def normals(self, points: torch.Tensor, create_graph: bool):
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            out = self.forward(points)
            (grad,) = torch.autograd.grad(out.density.sum(), points, create_graph=create_graph)
        return out, -torch.nn.functional.normalize(grad, dim=-1, eps=1e-6)


def shape_field(
    shape: str, albedo=(0.9, 0.1, 0.1), sharpness: float = 300.0, peak: float = 200.0
) -> AnalyticField:
    """A soft version of a world primitive: density peak·sigmoid(−sharpness·sdf)."""
    return AnalyticField(lambda p: peak * torch.sigmoid(-sharpness * shape_sdf(shape, p)), albedo)


@pytest.fixture
def field_factory():
    return AnalyticField


def build_tiny_pixel_pipeline(out, sample_size: int = 8, seed: int = 0):
    """A random-weight diffusers-format folder of the pixel-unet layout (IF stage I / our prior), made
    by the built-in prior's own builder at toy size, without camera conditioning."""
    from pathlib import Path

    from sds3d.prior.model import PriorModelConfig, build_models, save_pipeline

    out = Path(out)
    torch.manual_seed(seed)
    config = PriorModelConfig(resolution=sample_size, block_out_channels=(16, 32), layers_per_block=1, text_dim=16,
                              text_heads=2, text_layers=1, camera_conditioning=False)  # fmt: skip
    tokenizer, text_encoder, unet = build_models(config, out / "tokenizer")
    return save_pipeline(out, tokenizer, text_encoder, unet, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_pixel_model(tmp_path_factory):
    return build_tiny_pixel_pipeline(tmp_path_factory.mktemp("tiny-pixel-unet"))
