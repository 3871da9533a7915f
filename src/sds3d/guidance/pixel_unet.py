"""A pixel-space, text-conditioned diffusers U-Net as the prior (DeepFloyd IF stage I's layout,
and the layout of sds3d's own learned prior): a diffusers-format folder with `model_index.json`,
`scheduler/`, `tokenizer/`, `text_encoder/` and `unet/`, loaded by hub id or local path with
`from_pretrained`, the same code path for every such model.

Images: the render [0, 1] is resized to `unet.config.sample_size` and mapped to [−1, 1].
Text: the tokenizer pads to its `model_max_length`; the embedding is the text encoder's last hidden
state, computed once per text (prompts.PromptProcessor caches it).
ε: `unet(x_t, t, encoder_hidden_states).sample`; a U-Net that also predicts a variance (IF:
out_channels = 2·in_channels) has its first half taken.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sds3d.cameras import CameraConfig, Cameras
from sds3d.errors import UserError
from sds3d.guidance.base import NoisePredictionGuidance, SDSConfig, resize_to

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PixelUNetGuidanceConfig:
    model: str = ""  # hub id or local folder
    sds: SDSConfig = field(default_factory=lambda: SDSConfig(guidance_scale=20.0))
    dtype: str = "float32"
    kind: Literal["pixel-unet"] = "pixel-unet"

    def build(self, camera: CameraConfig) -> PixelUNetGuidance:
        return PixelUNetGuidance(self)


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") != 1


def load_component(model: str, subfolder: str, library: str, class_name: str, **kwargs: Any) -> Any:
    """`<library>.<class_name>.from_pretrained(model, subfolder=...)`, with one clear error when the
    weights are neither on disk nor in the local hub cache."""
    import importlib

    cls = getattr(importlib.import_module(library), class_name)
    try:
        return cls.from_pretrained(model, subfolder=subfolder, **kwargs)
    except OSError as err:
        raise UserError(
            f"cannot load {model!r} ({subfolder}): not found locally and it could not be downloaded "
            f"({type(err).__name__}); fetch it where the hub is reachable with `huggingface-cli download {model}` "
            f"and copy the cache, or pass a local folder"
        ) from None


def read_model_index(model: str) -> dict[str, Any]:
    """The pipeline's `model_index.json` (component → [library, class])."""
    if _looks_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise UserError(f"model folder {model!r} does not exist")
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(f"{model!r} is not a diffusers model folder (no model_index.json)")
        return json.loads(index.read_text())
    try:
        from huggingface_hub import constants, hf_hub_download

        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in (
            "1",
            "true",
            "yes",
        )
        return json.loads(
            Path(hf_hub_download(model, "model_index.json", local_files_only=offline)).read_text()
        )
    except Exception as err:  # offline, unknown repo, no cache: one line for the user
        raise UserError(
            f"cannot load {model!r}: not in the local hub cache and the hub is unreachable "
            f"({type(err).__name__}); fetch it with `huggingface-cli download {model}` or pass a local folder"
        ) from None


class PixelUNetGuidance(NoisePredictionGuidance):
    def __init__(self, config: PixelUNetGuidanceConfig):
        if not config.model:
            raise UserError("the pixel-unet prior needs a model: a diffusers folder or hub id")
        if config.dtype not in DTYPES:
            raise UserError(f"unknown dtype {config.dtype!r}; choose from {', '.join(DTYPES)}")
        index = read_model_index(config.model)
        scheduler_config = load_component(config.model, "scheduler", "diffusers", "DDPMScheduler").config
        super().__init__(config.sds, dict(scheduler_config))
        self.config = config
        self.config_scheduler = dict(scheduler_config)
        self.dtype = DTYPES[config.dtype]
        tok_lib, tok_cls = index.get("tokenizer", ["transformers", "AutoTokenizer"])
        enc_lib, enc_cls = index.get("text_encoder", ["transformers", "CLIPTextModel"])
        self.tokenizer = load_component(config.model, "tokenizer", tok_lib, tok_cls)
        self.text_encoder = load_component(
            config.model, "text_encoder", enc_lib, enc_cls, torch_dtype=self.dtype
        )
        self.unet = load_component(
            config.model, "unet", "diffusers", "UNet2DConditionModel", torch_dtype=self.dtype
        )
        for module in (self.text_encoder, self.unet):
            module.eval().requires_grad_(False)  # frozen: SDS trains the scene, never the prior

    @torch.no_grad()
    def encode_prompt(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer(
            text,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device))[0][0]  # [L, D]

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        return resize_to(rgb, int(self.unet.config.sample_size)) * 2 - 1

    def predict_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, embeddings: Sequence[torch.Tensor], cameras: Cameras | None
    ) -> torch.Tensor:
        emb = torch.stack(list(embeddings)).to(device=x_t.device, dtype=self.dtype)
        class_labels = None
        if self.unet.config.class_embed_type == "projection":  # camera-conditioned (sds3d's own prior)
            from sds3d.prior.model import CAMERA_DIM, camera_condition

            if cameras is None:
                class_labels = torch.zeros(x_t.shape[0], CAMERA_DIM, device=x_t.device)
            else:
                class_labels = camera_condition(cameras.elevation_deg, cameras.azimuth_deg).to(x_t.device)
            class_labels = class_labels.to(self.dtype)
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=emb, class_labels=class_labels).sample
        channels = x_t.shape[1]
        if out.shape[1] == 2 * channels:  # learned variance (IF): keep ε
            out = out[:, :channels]
        return out.to(x_t.dtype)
