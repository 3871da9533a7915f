"""A text-conditioned diffusers `UNet2DConditionModel` pipeline as the prior: a diffusers-format
folder or hub id with `model_index.json`, `scheduler/`, `tokenizer/`, `text_encoder/`, `unet/` and,
for latent models, `vae/`, loaded with `from_pretrained` and the classes `model_index.json` names,
the same code path for every such model: Stable Diffusion 1.x/2.x (latent, CLIP), SDXL (latent, two
CLIP encoders, pooled embedding and size conditioning), DeepFloyd IF stage I (pixels, T5) and
sds3d's own prior (pixels, CLIP, camera-conditioned).

Images: the render [0, 1] is resized to the model's image size and mapped to [−1, 1]; latent models
then encode it with the VAE, with gradient (the posterior mean × `vae.config.scaling_factor`), so
SDS runs in latent space and its gradient flows back through the encoder to the render.
Text: the tokenizer pads to its `model_max_length`; the embedding is the text encoder's last hidden
state, computed once per text (prompts.PromptProcessor caches it). SDXL (a `text_encoder_2` in
`model_index.json`), as `StableDiffusionXLPipeline.encode_prompt`: both encoders' penultimate hidden
states side by side, plus the second encoder's pooled projection, an `SDXLEmbedding`; the empty
(negative) text is zeros when the pipeline says `force_zeros_for_empty_prompt`. The U-Net also gets
the size conditioning (original size, crop (0, 0), target size), all the model's image size.
ε: `unet(x_t, t, encoder_hidden_states).sample`; a U-Net that also predicts a variance (IF:
out_channels = 2·in_channels) has its first half taken; v-prediction models (SD 2.x at 768) are
converted, ε = √ᾱ_t v + √(1−ᾱ_t) x_t.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from sds3d.cameras import CameraConfig, Cameras
from sds3d.errors import UserError
from sds3d.guidance.base import Prior, resize_to

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Models that ship inside the package, named like hub ids; they resolve to their folder and load
# through the same `from_pretrained` calls as any other folder.
BUILTIN_PRIOR = "sds3d/world-prior-32"  # the first built-in prior (the Gaussians and refine presets)
FRONTS_PRIOR = "sds3d/world-prior-32-fronts"  # fine-tuned to know where a front is (the default preset)
# Each one's folder holds its README: the model card.
_WEIGHTS = Path(__file__).parents[1] / "prior" / "weights"
BUILTIN_MODELS = {name: _WEIGHTS / name.split("/")[1] for name in (BUILTIN_PRIOR, FRONTS_PRIOR)}


def resolve_model(model: str) -> str:
    """A built-in model's folder, or `model` unchanged (a hub id or a local folder)."""
    return str(BUILTIN_MODELS[model]) if model in BUILTIN_MODELS else model


@dataclass
class DiffusersGuidanceConfig:
    model: str = ""  # hub id, local folder, or a built-in name (BUILTIN_MODELS)
    dtype: str = "float32"
    # Pass the rendering camera to a camera-conditioned U-Net (class_embed_type "projection");
    # False gives it the "no camera" label it was trained with for dropped cameras.
    camera_condition: bool = True
    compile: bool = False  # torch.compile the U-Net and the VAE encoder (GPU)
    # torch.compile's mode: "reduce-overhead" replays them as CUDA graphs (no per-kernel launches).
    compile_mode: str = "default"
    channels_last: bool = False
    kind: Literal["diffusers"] = "diffusers"

    def build(self, camera: CameraConfig) -> DiffusersGuidance:
        return DiffusersGuidance(self)


@dataclass
class SDXLEmbedding:
    """One text for SDXL: its token embeddings and its pooled embedding."""

    hidden: torch.Tensor  # [L, D₁ + D₂]: both encoders' penultimate hidden states, concatenated
    pooled: torch.Tensor  # [P]: the second encoder's projected pooled output


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") != 1


# What a model_index.json may name: a user-supplied folder must not make sds3d import arbitrary code.
ALLOWED_LIBRARIES = ("diffusers", "transformers")
WEIGHT_SUFFIXES_REFUSED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _component_class(library: str, class_name: str, subfolder: str) -> Any:
    """The class `model_index.json` names for `subfolder`, if it is a diffusers/transformers model,
    tokenizer or scheduler class; one line otherwise."""
    import importlib

    if library not in ALLOWED_LIBRARIES or not isinstance(class_name, str) or not class_name.isidentifier():
        raise UserError(
            f"model_index.json names {library}.{class_name} for {subfolder!r}; sds3d loads only classes "
            f"of {' and '.join(ALLOWED_LIBRARIES)}"
        )
    cls = getattr(importlib.import_module(library), class_name, None)
    bases = _loadable_bases()
    if not isinstance(cls, type) or not (issubclass(cls, bases) or class_name == "AutoTokenizer"):
        raise UserError(
            f"model_index.json names {library}.{class_name} for {subfolder!r}: not a model, tokenizer or "
            "scheduler class that sds3d loads"
        )
    return cls


def _loadable_bases() -> tuple[type, ...]:
    import diffusers
    import transformers

    return (diffusers.ModelMixin, diffusers.SchedulerMixin, transformers.PreTrainedModel,
            transformers.PreTrainedTokenizerBase)  # fmt: skip


def _pickle_weights(model: str, subfolder: str) -> list[str]:
    folder = Path(model).expanduser() / subfolder
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES_REFUSED)


def load_component(model: str, subfolder: str, library: str, class_name: str, **kwargs: Any) -> Any:
    """`<library>.<class_name>.from_pretrained(model, subfolder=...)`, weights from safetensors only,
    with one clear error when they are missing, pickled, or neither on disk nor in the hub cache."""
    import diffusers
    import transformers

    cls = _component_class(library, class_name, subfolder)
    if issubclass(cls, (diffusers.ModelMixin, transformers.PreTrainedModel)):
        kwargs["use_safetensors"] = True  # never unpickle weights
    try:
        return cls.from_pretrained(model, subfolder=subfolder, **kwargs)
    except OSError as err:
        pickled = _pickle_weights(model, subfolder) if _looks_local(model) else []
        if pickled:
            raise UserError(
                f"cannot load {model!r} ({subfolder}): sds3d loads only safetensors weights, and "
                f"{subfolder}/ has {', '.join(pickled)}; convert it (save_pretrained(..., safe_serialization=True))"
            ) from None
        if _looks_local(model):
            raise UserError(
                f"cannot load {model!r} ({subfolder}): {' '.join(str(err).split())[:200]}"
            ) from None
        raise UserError(
            f"cannot load {model!r} ({subfolder}): not found locally and it could not be downloaded "
            f"({type(err).__name__}); fetch it where the hub is reachable with `huggingface-cli download {model}` "
            f"and copy the cache, or pass a local folder"
        ) from None


def _component(index: dict[str, Any], name: str, default: list[str] | None = None) -> list[str] | None:
    """model_index.json's [library, class] for `name`; None where absent (or [null, null])."""
    entry = index.get(name, default)
    if entry is None or (isinstance(entry, list) and entry == [None, None]):
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise UserError(f"model_index.json: {name!r} must be [library, class], not {json.dumps(entry)[:60]}")
    return entry


def read_model_index(model: str) -> dict[str, Any]:
    """The pipeline's `model_index.json` (component → [library, class])."""
    if _looks_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise UserError(f"model folder {model!r} does not exist")
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(f"{model!r} is not a diffusers model folder (no model_index.json)")
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{index} is not readable JSON ({err})") from None
        if not isinstance(data, dict):
            raise UserError(f"{index} must hold a JSON object")
        return data
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


class DiffusersGuidance(Prior):
    """Any text-conditioned `UNet2DConditionModel` pipeline: pixel space (IF stage I, sds3d's prior)
    or latent space when the folder has a `vae` (Stable Diffusion 1.x/2.x, SD-Turbo, SDXL)."""

    add_time_ids: torch.Tensor  # [6], a buffer: SDXL's size conditioning

    def __init__(self, config: DiffusersGuidanceConfig, components: dict[str, Any] | None = None):
        """Loads `config.model` with `from_pretrained`, or takes ready `components` (scheduler_config,
        tokenizer, text_encoder, unet and optionally vae; the speed benchmark builds them)."""
        if config.dtype not in DTYPES:
            raise UserError(f"unknown dtype {config.dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[config.dtype]
        if components is None:
            if not config.model:
                raise UserError("the diffusers prior needs a model: a diffusers folder or hub id")
            components = load_pipeline_components(resolve_model(config.model), dtype)
        super().__init__(dict(components["scheduler_config"]))
        self.config = config
        self.dtype = dtype
        self.prediction_type = str(components["scheduler_config"].get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"{config.model!r} predicts {self.prediction_type!r}; SDS needs epsilon or v_prediction"
            )
        self._embeddings: dict[str, torch.Tensor | SDXLEmbedding] = {}
        self.tokenizer = components["tokenizer"]
        self.text_encoder: nn.Module | None = components["text_encoder"]
        # SDXL's second tokenizer and encoder (CLIPTextModelWithProjection), else None.
        self.tokenizer_2 = components.get("tokenizer_2")
        self.text_encoder_2: nn.Module | None = components.get("text_encoder_2")
        self.force_zeros_for_empty_prompt = bool(components.get("force_zeros_for_empty_prompt", False))
        self.unet = components["unet"]
        self.vae = components.get("vae")
        # SDXL's VAE overflows in float16: with `force_upcast` it runs in float32, as diffusers' SDXL
        # pipelines do (only they read the flag; AutoencoderKL defaults it to true for every VAE).
        upcast = (
            self.vae is not None
            and self.text_encoder_2 is not None
            and dtype == torch.float16
            and bool(getattr(self.vae.config, "force_upcast", False))
        )
        self.vae_dtype = torch.float32 if upcast else dtype
        with quiet_loading():
            for module in (self.text_encoder, self.text_encoder_2, self.unet, self.vae):
                if module is not None:  # frozen: SDS trains the scene, never the prior
                    module.to(self.vae_dtype if module is self.vae else dtype).eval().requires_grad_(False)
        # Latent models: the render is resized to the VAE's input size (e.g. 512 for SD 1.5).
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.image_size = int(self.unet.config.sample_size) * self.vae_scale
        # SDXL's size conditioning: original size, crop top-left, target size (StableDiffusionXLPipeline).
        size = float(self.image_size)
        self.register_buffer(
            "add_time_ids", torch.tensor([size, size, 0.0, 0.0, size, size], dtype=dtype), persistent=False
        )
        if config.channels_last:
            for module in (self.unet, self.vae):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        # Compiled callables beside the modules (state dicts and configs stay the plain modules').
        compile = (
            (lambda fn: torch.compile(fn, mode=config.compile_mode)) if config.compile else (lambda fn: fn)
        )
        self._unet = compile(self.unet)
        self._vae_encode = None if self.vae is None else compile(self.vae.encode)

    def _check_builtin_vocabulary(self, text: str) -> None:
        """The built-in prior's tokenizer spells unknown words letter by letter; say so instead."""
        vocab = self.tokenizer.get_vocab()
        unknown = [w for w in re.findall(r"[a-z]+", text.lower()) if f"{w}</w>" not in vocab]
        if unknown:
            forms = '"a {colour} {shape}", e.g. "a blue torus"'
            if "with</w>" in vocab:
                forms += ', or "a {colour} {shape} with a {colour} front"'
            raise UserError(
                f"the built-in prior {self.config.model} knows only the synthetic-world prompts "
                f"({forms}), not the word(s) {', '.join(unknown)}; pass --model for another diffusers model"
            )

    @staticmethod
    def _tokens(tokenizer: Any, text: str) -> Any:
        return tokenizer(
            text,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode_prompt(self, text: str) -> torch.Tensor | SDXLEmbedding:
        """The text's embedding, computed once: every run that shares this prior reuses it, also
        after `release_text_encoder`."""
        if text not in self._embeddings:
            self._embeddings[text] = self._encode_prompt(text)
        return self._embeddings[text]

    def _encode_prompt(self, text: str) -> torch.Tensor | SDXLEmbedding:
        if self.config.model in BUILTIN_MODELS:
            self._check_builtin_vocabulary(text)
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was released; every text must be encoded before")
        if self.text_encoder_2 is not None:
            return self._encode_prompt_sdxl(text)
        tokens = self._tokens(self.tokenizer, text)
        device = next(self.text_encoder.parameters()).device
        kwargs = {}
        if "T5" in type(self.text_encoder).__name__:  # IF: T5 sees its attention mask (as IFPipeline)
            kwargs["attention_mask"] = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), **kwargs)[0][0]  # [L, D]

    def _encode_prompt_sdxl(self, text: str) -> SDXLEmbedding:
        hidden, pooled = [], None
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            assert encoder is not None
            ids = self._tokens(tokenizer, text).input_ids.to(next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2][0])
            pooled = out[0][0]  # the second encoder's: its projected pooled output (text_embeds)
        assert pooled is not None
        embedding = SDXLEmbedding(hidden=torch.cat(hidden, dim=-1), pooled=pooled)
        if self.force_zeros_for_empty_prompt and not text:
            return SDXLEmbedding(torch.zeros_like(embedding.hidden), torch.zeros_like(embedding.pooled))
        return embedding

    def release_text_encoder(self) -> None:
        """Free the text encoders once every embedding exists (T5-XXL alone is 9 GB in fp16)."""
        self.text_encoder = self.text_encoder_2 = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        x = resize_to(rgb, self.image_size) * 2 - 1
        if self.vae is None or self._vae_encode is None:
            return x
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # The posterior mean (deterministic), scaled to unit variance as the U-Net was trained.
        latents = self._vae_encode(x.to(self.vae_dtype)).latent_dist.mean
        return latents.float() * float(self.vae.config.scaling_factor)

    def _require_vae(self) -> Any:  # the AutoencoderKL
        if self.vae is None:
            raise UserError(
                f"{self.config.model or 'this model'} works in pixels (no VAE): the latent warm-up needs a latent model"
            )
        return self.vae

    def latents_from_render(self, latents: torch.Tensor) -> torch.Tensor:
        self._require_vae()
        return resize_to(latents, int(self.unet.config.sample_size))

    @torch.no_grad()
    def latent_rgb_maps(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Affine maps between this VAE's scaled latents and RGB in [0, 1], fitted by least squares
        (`fit_latent_rgb_maps`): latent→RGB [C + 1, 3] and RGB→latent [4, C]."""
        vae = self._require_vae()
        device = next(vae.parameters()).device

        def encode(rgb: torch.Tensor) -> torch.Tensor:  # the plain encoder: no compiled graph for this batch
            latents = vae.encode((rgb * 2 - 1).to(device, self.vae_dtype)).latent_dist.mean
            return latents.float().cpu() * float(vae.config.scaling_factor)

        return fit_latent_rgb_maps(encode, self.image_size, self.vae_scale, generator=generator)

    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        embeddings: Sequence[torch.Tensor | SDXLEmbedding],
        cameras: Cameras | None,
    ) -> torch.Tensor:
        added_cond_kwargs = None
        if isinstance(embeddings[0], SDXLEmbedding):  # SDXL: pooled text and size conditioning
            sdxl = cast(Sequence[SDXLEmbedding], embeddings)
            emb = torch.stack([e.hidden for e in sdxl]).to(device=x_t.device, dtype=self.dtype)
            added_cond_kwargs = {
                "text_embeds": torch.stack([e.pooled for e in sdxl]).to(device=x_t.device, dtype=self.dtype),
                "time_ids": self.add_time_ids.expand(x_t.shape[0], -1),
            }
        else:
            emb = torch.stack(list(cast(Sequence[torch.Tensor], embeddings))).to(x_t.device, self.dtype)
        class_labels = None
        if self.unet.config.class_embed_type == "projection":  # camera-conditioned (sds3d's own prior)
            from sds3d.prior.model import CAMERA_DIM, camera_condition

            if cameras is None or not self.config.camera_condition:
                class_labels = torch.zeros(x_t.shape[0], CAMERA_DIM, device=x_t.device)
            else:
                class_labels = camera_condition(cameras.elevation_deg, cameras.azimuth_deg).to(x_t.device)
            class_labels = class_labels.to(self.dtype)
        x_in = x_t.to(self.dtype)
        if self.config.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        out = self._unet(
            x_in, t, encoder_hidden_states=emb, class_labels=class_labels, added_cond_kwargs=added_cond_kwargs
        ).sample
        channels = x_t.shape[1]
        if out.shape[1] == 2 * channels:  # learned variance (IF): keep ε
            out = out[:, :channels]
        out = out.to(x_t.dtype)
        if self.prediction_type == "v_prediction":  # SD 2.x at 768: ε = √ᾱ v + √(1−ᾱ) x_t
            abar = self.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
            out = abar.sqrt() * out + (1 - abar).sqrt() * x_t
        return out


def fit_latent_rgb_maps(
    encode: Callable[[torch.Tensor], torch.Tensor],  # [B, 3, S, S] in [0, 1] → latents [B, C, S/f, S/f]
    image_size: int,
    scale: int,  # f, pixels per latent cell
    images: int = 4,
    blocks: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine maps between latents and colours, from `images` pictures of
    `blocks`×`blocks` random solid colour squares: each latent cell is paired with the mean colour
    of the pixels it covers. Returns latent→RGB [C + 1, 3] (rgb ≈ z·M + c) and RGB→latent [4, C]
    (z ≈ rgb·P + q), the last rows the offsets. Exact when `encode` is itself affine per cell;
    for Stable Diffusion's VAE it is the linear latent preview Latent-NeRF uses, fitted rather
    than typed in, so it holds for any VAE."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    colours = torch.rand(images, 3, blocks, blocks, generator=g)
    rgb = F.interpolate(colours, size=(image_size, image_size), mode="nearest")
    z = encode(rgb)  # [B, C, h, w]
    cells = F.avg_pool2d(rgb, scale)  # the colour under each latent cell
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    rgb_flat = cells.permute(0, 2, 3, 1).reshape(-1, 3).double()
    ones = torch.ones(z_flat.shape[0], 1, dtype=torch.float64)
    to_rgb = torch.linalg.lstsq(torch.cat([z_flat, ones], 1), rgb_flat).solution
    to_latent = torch.linalg.lstsq(torch.cat([rgb_flat, ones], 1), z_flat).solution
    return to_rgb.float(), to_latent.float()


@contextlib.contextmanager
def quiet_loading():
    """No per-file progress bars or advice (install accelerate, keep modules in fp32) from
    diffusers and transformers while a model loads: the user's terminal shows sds3d's own lines."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    # Only their critical lines: a failed load's error is logged before it is raised, and sds3d
    # turns the raised one into its own line.
    dlog.set_verbosity(dlog.CRITICAL), tlog.set_verbosity(tlog.CRITICAL)
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar(), tlog.enable_progress_bar()


def load_pipeline_components(model: str, dtype: torch.dtype) -> dict[str, Any]:
    """Scheduler config, tokenizer, text encoder, U-Net and (latent models) VAE of a diffusers
    folder or hub id, each with `from_pretrained` and the class its `model_index.json` names."""
    with quiet_loading():
        return _load_pipeline_components(model, dtype)


def _load_pipeline_components(model: str, dtype: torch.dtype) -> dict[str, Any]:
    index = read_model_index(model)
    tok_lib, tok_cls = _component(index, "tokenizer", ["transformers", "AutoTokenizer"]) or ("", "")
    enc_lib, enc_cls = _component(index, "text_encoder", ["transformers", "CLIPTextModel"]) or ("", "")
    components = {
        "scheduler_config": load_component(model, "scheduler", "diffusers", "DDPMScheduler").config,
        "tokenizer": load_component(model, "tokenizer", tok_lib, tok_cls),
        "text_encoder": load_component(model, "text_encoder", enc_lib, enc_cls, torch_dtype=dtype),
        "unet": load_component(model, "unet", "diffusers", "UNet2DConditionModel", torch_dtype=dtype),
    }
    if vae := _component(index, "vae"):
        components["vae"] = load_component(model, "vae", *vae, torch_dtype=dtype)
    if encoder_2 := _component(index, "text_encoder_2"):  # SDXL
        tokenizer_2 = _component(index, "tokenizer_2", [tok_lib, tok_cls]) or [tok_lib, tok_cls]
        components["tokenizer_2"] = load_component(model, "tokenizer_2", *tokenizer_2)
        components["text_encoder_2"] = load_component(model, "text_encoder_2", *encoder_2, torch_dtype=dtype)
        components["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", False))
    return components
