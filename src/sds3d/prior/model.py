"""The built-in prior's architecture and its diffusers-format folder.

- `unet/`: UNet2DConditionModel in pixel space (32×32×3), ε-prediction, cross-attention on the text
  encoder's hidden states, and MVDream-style camera conditioning through the class embedding
  (`class_embed_type="projection"`): the vector (sin az, cos az, sin el, cos el, 1) or zeros for
  "no camera" (dropped out in training so the model also works without one).
- `text_encoder/`: a small CLIPTextModel trained from scratch; `tokenizer/`: the world's CLIP
  tokenizer (world/tokenizer.py); `scheduler/`: DDPM's linear β schedule.
Everything loads with `from_pretrained` (guidance/diffusers_prior.py), as a hub model would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sds3d.diffusion import DDPM_SCHEDULER_CONFIG
from sds3d.world.tokenizer import write_world_tokenizer

CAMERA_DIM = 5
# The weights shipped with the package (see its README.md, the model card).
SHIPPED_PRIOR = (
    Path(__file__).parent / "weights" / "world-prior-32"
)  # = BUILTIN_MODELS["sds3d/world-prior-32"]


@dataclass
class PriorModelConfig:
    resolution: int = 32
    # 4.2 M parameters: one CFG pair takes 50 ms on a 2-core CPU (budget 60 ms).
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16
    camera_conditioning: bool = True


def camera_condition(
    elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, 5]: (sin az, cos az, sin el, cos el, 1), zeroed where `present` is False."""
    el, az = torch.deg2rad(elevation_deg.float()), torch.deg2rad(azimuth_deg.float())
    vec = torch.stack([az.sin(), az.cos(), el.sin(), el.cos(), torch.ones_like(el)], dim=-1)
    return vec if present is None else vec * present[:, None].to(vec)


def build_models(config: PriorModelConfig, tokenizer_dir: Path):
    """(tokenizer, text_encoder, unet) with random weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_world_tokenizer(tokenizer_dir, config.max_tokens))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_dim,
            intermediate_size=4 * config.text_dim,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    )
    n = len(config.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=config.resolution, in_channels=3, out_channels=3, layers_per_block=config.layers_per_block,
        block_out_channels=config.block_out_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=config.text_dim, attention_head_dim=32, norm_num_groups=16,
        class_embed_type="projection" if config.camera_conditioning else None,
        projection_class_embeddings_input_dim=CAMERA_DIM if config.camera_conditioning else None,
    )  # fmt: skip
    return tokenizer, text_encoder, unet


def save_pipeline(out: Path, tokenizer, text_encoder, unet, dtype: torch.dtype = torch.float16) -> Path:
    """Write the diffusers folder: fp16 safetensors, model_index.json, scheduler and tokenizer."""
    import diffusers
    from diffusers import DDPMScheduler

    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    text_encoder.to(dtype).save_pretrained(out / "text_encoder", safe_serialization=True)
    unet.to(dtype).save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler.from_config(DDPM_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    }  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
