"""Run configuration: one dataclass tree, presets as plain Python, JSON in and out.

Each component's config lives beside its class (`CameraConfig` in cameras.py, …); `RunConfig`
only composes them. The typed union `GuidanceConfig` is the registry of priors, told apart by
their `kind` field. Presets are `RunConfig`s built with `dataclasses.replace`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from sds3d.cameras import CameraConfig
from sds3d.errors import UserError
from sds3d.export import ExportConfig
from sds3d.guidance.analytic import (
    EmpiricalPriorGuidanceConfig,
    GaussianPriorGuidanceConfig,
    WorldViewsConfig,
)
from sds3d.guidance.base import SDSConfig
from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig
from sds3d.prompts import PromptConfig
from sds3d.ramp import Ramp, Scheduled
from sds3d.render.volume import VolumeRendererConfig
from sds3d.representations.encodings import HashGridConfig
from sds3d.representations.nerf import BackgroundConfig, HashGridNeRFConfig

GuidanceConfig = Union[EmpiricalPriorGuidanceConfig, GaussianPriorGuidanceConfig, DiffusersGuidanceConfig]
GUIDANCE_KINDS: dict[str, type] = {
    "empirical": EmpiricalPriorGuidanceConfig,
    "gaussian": GaussianPriorGuidanceConfig,
    "diffusers": DiffusersGuidanceConfig,
}


@dataclass
class RegularizerConfig:
    """Weights of the regularisers in `losses.py`; each a float or a `Ramp` over training."""

    orientation: Scheduled = 0.0
    sparsity: Scheduled = 0.0
    entropy: Scheduled = 0.0


@dataclass
class OptimConfig:
    """Adam, with Instant-NGP's settings for the hash tables (lr 1e-2, eps 1e-15)."""

    lr_grid: float = 0.01
    lr_mlp: float = 0.001
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15


@dataclass
class RunConfig:
    prompt: str = "a blue torus"
    preset: str = "default"
    seed: int = 0
    steps: int = 600
    device: str = "cpu"
    validate_every: int = 100
    checkpoint_every: int = 100
    camera: CameraConfig = field(default_factory=CameraConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    nerf: HashGridNeRFConfig = field(default_factory=HashGridNeRFConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    renderer: VolumeRendererConfig = field(default_factory=VolumeRendererConfig)
    guidance: GuidanceConfig = field(default_factory=EmpiricalPriorGuidanceConfig)
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --- presets ------------------------------------------------------------------------------------
# The CPU default: the empirical prior of the synthetic world (the exact denoiser of 256
# ground-truth renders per object, camera-conditioned with a 10° kernel) at 32×32; s = 1 (no CFG;
# diffusers convention, DreamFusion ω = 0); w = 1 − ᾱ_t; t ~ U[0.02, t_max] with t_max annealed
# linearly 0.98 → 0.3; an entropy penalty on opacity that grows over the second part of training
# removes semi-transparent haze. Cameras reach 85° elevation so that the torus hole is seen.
_DEFAULT = RunConfig(
    steps=400,
    camera=CameraConfig(
        elevation_deg=(-10.0, 85.0), radius=(2.5, 2.5), fovy_deg=(40.0, 40.0), width=32, height=32
    ),
    nerf=HashGridNeRFConfig(grid=HashGridConfig(num_levels=8, max_resolution=128)),
    renderer=VolumeRendererConfig(num_samples=40),
    guidance=EmpiricalPriorGuidanceConfig(
        sds=SDSConfig(guidance_scale=1.0, t_schedule="linear", t_max_end=0.3),
        views=WorldViewsConfig(resolution=32, views_per_object=256),
        camera_kernel_deg=10.0,
    ),
    regularizers=RegularizerConfig(entropy=Ramp(0.0, 0.05, 0.3, 1.0)),
)

PRESETS: dict[str, RunConfig] = {
    "default": _DEFAULT,
    # A few hundred steps: a first look in about a minute.
    "fast": dataclasses.replace(_DEFAULT, preset="fast", steps=200, validate_every=50, checkpoint_every=50),
    # The analytic Gaussian prior: N(mean render, 0.5²I) per prompt. A smoke test of the whole path.
    "gaussian": dataclasses.replace(
        _DEFAULT, preset="gaussian", steps=200,
        guidance=GaussianPriorGuidanceConfig(sds=SDSConfig(guidance_scale=1.0), views=WorldViewsConfig(resolution=32)),
    ),
    # The literal diffusion loss, back-propagated through the denoiser (the Jacobian SDS omits).
    "literal": dataclasses.replace(
        _DEFAULT, preset="literal",
        guidance=dataclasses.replace(_DEFAULT.guidance, sds=dataclasses.replace(_DEFAULT.guidance.sds, mode="literal")),
    ),
}  # fmt: skip


PRESET_NOTES: dict[str, str] = {
    "default": "empirical prior of the synthetic world, camera-conditioned, 32x32, s=1 (diffusers CFG), w=1-abar",
    "fast": "the default, fewer steps: a first look",
    "gaussian": "analytic Gaussian prior N(mean render, 0.5^2 I): a smoke test of the whole path",
    "literal": "the literal diffusion loss through the denoiser (keeps the Jacobian SDS omits)",
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(copy.deepcopy(PRESETS[name]), preset=name)


# --- JSON -----------------------------------------------------------------------------------------
def to_dict(config: Any) -> Any:
    """A JSON-ready dict of a config tree; Ramps become {"start", "end", ...}."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: Any, data: Any) -> Any:
    """Rebuild a config dataclass tree from `to_dict` output, guided by the type hints."""
    return _convert(cls, data)


def _convert(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any or value is None:
        return value
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {
            f.name: _convert(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value
        }
        return typing.cast(Any, tp)(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if isinstance(value, dict) and "kind" in value and value["kind"] in GUIDANCE_KINDS:
            return _convert(GUIDANCE_KINDS[value["kind"]], value)
        if isinstance(value, dict) and Ramp in args:
            return Ramp(**value)
        for arg in args:
            if arg in (float, int) and isinstance(value, (int, float)):
                return arg(value)
        return value
    if origin is tuple:
        return tuple(value)
    if origin in (list, dict) or tp in (str, bool, dict):
        return value
    if tp is float:
        return float(value)
    if tp is int:
        return int(value)
    return value


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(to_dict(config), indent=2))


def load_config(path: Path) -> RunConfig:
    return from_dict(RunConfig, json.loads(path.read_text()))
