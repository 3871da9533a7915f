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
    """A random-weight diffusers-format folder of the pixel-unet layout (IF stage I / our prior):
    our world CLIP tokenizer, a tiny CLIPTextModel, a tiny UNet2DConditionModel, DDPM's scheduler."""
    import json
    from pathlib import Path

    import diffusers
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sds3d.diffusion import DDPM_SCHEDULER_CONFIG
    from sds3d.world.tokenizer import write_world_tokenizer

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_world_tokenizer(out / "tokenizer"))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    text_encoder.save_pretrained(out / "text_encoder")
    unet.save_pretrained(out / "unet")
    DDPMScheduler.from_config(DDPM_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    }  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_pixel_model(tmp_path_factory):
    return build_tiny_pixel_pipeline(tmp_path_factory.mktemp("tiny-pixel-unet"))
