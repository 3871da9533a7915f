"""Shared fixtures: small analytic fields for renderer and exporter tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
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

    def forward(self, points: torch.Tensor, latent: bool = False) -> DensityAlbedo:
        if latent:
            raise ValueError("an analytic field has no latent head")
        density = self.density_fn(points) + 0 * self.dummy
        return DensityAlbedo(density=density, albedo=self.albedo.expand(points.shape[0], 3))

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward(points).density

    def normals(self, points: torch.Tensor, create_graph: bool, latent: bool = False):
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            out = self.forward(points, latent)
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


def _save_index(out, components: dict[str, list[str]]) -> None:
    import json

    import diffusers

    index = {"_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__, **components}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def build_tiny_sd_pipeline(out, seed: int = 0, prediction_type: str = "epsilon"):
    """A random-weight folder of Stable Diffusion's layout at toy size: AutoencoderKL (2 blocks, so
    16×16 images ↔ 8×8 latents), CLIPTextModel, CLIPTokenizer, a latent U-Net, SD's scheduler."""
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sds3d.world.tokenizer import write_world_tokenizer

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_world_tokenizer(out / "tokenizer"))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16)).save_pretrained(out / "text_encoder")  # fmt: skip
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=16).save_pretrained(out / "vae")  # fmt: skip
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(out / "unet")  # fmt: skip
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
                  clip_sample=False).save_pretrained(out / "scheduler")  # fmt: skip
    _save_index(out, {"scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                      "vae": ["diffusers", "AutoencoderKL"]})  # fmt: skip
    return out


def build_tiny_sdxl_pipeline(out, seed: int = 0):
    """A random-weight folder of SDXL's layout at toy size: two CLIP tokenizers and encoders (the
    second with a projection, whose pooled output conditions the U-Net with the size ids), a U-Net
    with `text_time` added conditioning, an upcasting VAE, and `force_zeros_for_empty_prompt`."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sds3d.world.tokenizer import write_world_tokenizer

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_world_tokenizer(out / "tokenizer"))
    write_world_tokenizer(out / "tokenizer_2")
    text = dict(vocab_size=len(tokenizer), intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16)  # fmt: skip
    CLIPTextModel(CLIPTextConfig(hidden_size=16, **text)).save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=12, **text)).save_pretrained(
        out / "text_encoder_2"
    )
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=16, scaling_factor=0.13025, force_upcast=True).save_pretrained(out / "vae")  # fmt: skip
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16 + 24,
                         attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 12,
                         norm_num_groups=8).save_pretrained(out / "unet")  # fmt: skip
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False).save_pretrained(out / "scheduler")  # fmt: skip
    _save_index(out, {"scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})  # fmt: skip
    index = json.loads((out / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def build_tiny_if_pipeline(out, seed: int = 0):
    """A random-weight folder of DeepFloyd IF stage I's layout at toy size: T5EncoderModel, a pixel
    U-Net with a text projection, text-pooled time embedding and learned variance (6 output
    channels), IF's cosine scheduler. The tokenizer is the world's CLIP tokenizer (T5's needs
    sentencepiece files no test can download)."""
    from pathlib import Path

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    from sds3d.world.tokenizer import write_world_tokenizer

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_world_tokenizer(out / "tokenizer"))
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=32, num_layers=1,
                            num_heads=2)).save_pretrained(out / "text_encoder")  # fmt: skip
    UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                         up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                         mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=16, attention_head_dim=4,
                         encoder_hid_dim=24, encoder_hid_dim_type="text_proj", addition_embed_type="text",
                         addition_embed_type_num_heads=2,
                         norm_num_groups=8).save_pretrained(out / "unet")  # fmt: skip
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                  clip_sample=False).save_pretrained(out / "scheduler")  # fmt: skip
    _save_index(out, {"scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"]})  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tiny_sd_model(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_if_model(tmp_path_factory):
    return build_tiny_if_pipeline(tmp_path_factory.mktemp("tiny-if"))


def tiny_diffusers_run(model, size: int, steps: int):
    """The fast preset shrunk to seconds (size² renders, 8 samples) with a local diffusers model."""
    import dataclasses

    from sds3d.config import preset
    from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig

    config = preset("fast")
    config.camera.width = config.camera.height = size
    config.renderer.num_samples = 8
    return dataclasses.replace(config, prompt="a red cube", steps=steps, validate_every=0,
                               guidance=DiffusersGuidanceConfig(model=str(model)))  # fmt: skip


def sds_step(prior, rgb, cond, uncond, step_ratio: float, scale: float, **kwargs):
    """One step of the SDS rule with CFG scale `scale` (its other settings the defaults)."""
    from sds3d.rules import SDSRuleConfig

    return SDSRuleConfig(guidance_scale=scale).build()(prior, rgb, cond, uncond, step_ratio, **kwargs)


def make_mesh_run(path, prompt: str = "a red sphere"):
    """A finished run folder whose exported mesh is an icosphere (a mesh run itself: stages chain)."""
    import trimesh

    from sds3d import runs
    from sds3d.config import preset, save_config
    from sds3d.representations.mesh import MeshScene

    m = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    v = torch.tensor(m.vertices, dtype=torch.float32)
    f = torch.tensor(m.faces, dtype=torch.long)
    colors = np.random.default_rng(0).uniform(0.1, 0.9, size=(len(m.vertices), 3))
    config = dataclasses.replace(preset("refine"), prompt=prompt)
    config.mesh = dataclasses.replace(config.mesh, from_previous="(made by the test)")
    scene = MeshScene(config.mesh)
    scene.set_mesh(m.vertices, m.faces, (colors * 255).astype(np.uint8))
    path.mkdir(parents=True)
    runs.mark_run(path)
    save_config(config, path / "config.json")
    optimizer = torch.optim.Adam(scene.parameters())
    runs.save_checkpoint(path, {"scene": scene.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": config.steps, "rng": torch.Generator().get_state()})  # fmt: skip
    return v, f
