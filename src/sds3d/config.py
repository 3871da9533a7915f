"""Run configuration: one dataclass tree, presets as plain Python, JSON in and out.

Each component's config lives beside its class (`CameraConfig` in cameras.py, …); `RunConfig`
only composes them. The typed unions `GuidanceConfig` and `rules.RuleConfig` are the registries
of priors and rules, told apart by their `kind` field. Presets are `RunConfig`s built with `dataclasses.replace`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from sds3d.cameras import CameraConfig
from sds3d.errors import UserError
from sds3d.export import ExportConfig
from sds3d.guidance.analytic import (
    EmpiricalPriorGuidanceConfig,
    GaussianPriorGuidanceConfig,
    WorldViewsConfig,
)
from sds3d.guidance.diffusers_prior import BUILTIN_PRIOR, FRONTS_PRIOR, DiffusersGuidanceConfig
from sds3d.prompts import PromptConfig
from sds3d.ramp import Ramp
from sds3d.render.volume import VolumeRendererConfig
from sds3d.representations.encodings import HashGridConfig
from sds3d.representations.gaussians import GaussiansConfig
from sds3d.representations.mesh import MeshRefineConfig
from sds3d.representations.nerf import BackgroundConfig, HashGridNeRFConfig
from sds3d.representations.nerf_scene import RegularizerConfig
from sds3d.rules import RULE_CONFIGS, RuleConfig, SDSRuleConfig
from sds3d.runs import write_atomic
from sds3d.stages import StageConfig, check_stages

GuidanceConfig = Union[EmpiricalPriorGuidanceConfig, GaussianPriorGuidanceConfig, DiffusersGuidanceConfig]
GUIDANCE_KINDS: dict[str, type] = {
    "empirical": EmpiricalPriorGuidanceConfig,
    "gaussian": GaussianPriorGuidanceConfig,
    "diffusers": DiffusersGuidanceConfig,
}


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
    representation: Literal["nerf", "gaussians", "mesh"] = "nerf"  # what is trained (mesh: a refine stage)
    nerf: HashGridNeRFConfig = field(default_factory=HashGridNeRFConfig)
    gaussians: GaussiansConfig = field(default_factory=GaussiansConfig)
    mesh: MeshRefineConfig = field(default_factory=MeshRefineConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    renderer: VolumeRendererConfig = field(default_factory=VolumeRendererConfig)
    guidance: GuidanceConfig = field(default_factory=EmpiricalPriorGuidanceConfig)
    rule: RuleConfig = field(default_factory=SDSRuleConfig)
    stages: list[StageConfig] = field(default_factory=list)  # stages.py: run before the last, RGB, stage
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --- presets ------------------------------------------------------------------------------------
# The CPU default: sds3d's own learned prior (sds3d/world-prior-32-fronts, a 32×32 pixel diffusers
# model of the synthetic world, camera-conditioned, fine-tuned so that it knows where a front is) with
# camera guidance s_c = 5 (issue 15: Janus 8% → 0%, benchmarks/janus_default_fronts.md; the 30
# one-colour objects 30/30 shapes and colours, IoU 0.858, 26.3 dB on 2 CPU cores,
# benchmarks/quality_fronts.md) at 32×32 renders, CFG s = 3 (diffusers convention; s = 20
# until the default_check study: 100% shapes at both over 3 seeds × 30 prompts, IoU 0.884 against
# 0.846, benchmarks/study_default_check.md), w = 1 − ᾱ_t,
# t ~ U[0.02, t_max] with t_max annealed linearly 0.98 → 0.3; an entropy penalty on opacity that grows over the second part of training
# removes semi-transparent haze. Cameras reach 85° elevation so that the torus hole is seen.
_DEFAULT = RunConfig(
    # 800 steps: all 30 world prompts get their shape right (400 steps: 83%, cubes came out as
    # spheres; benchmarks/quality.md, quality_400_steps.md). Validation renders every 400 steps only:
    # each costs about as much as ten training steps on a 2-core CPU.
    steps=800,
    validate_every=400,
    camera=CameraConfig(
        elevation_deg=(-10.0, 85.0), radius=(2.5, 2.5), fovy_deg=(40.0, 40.0), width=32, height=32
    ),
    nerf=HashGridNeRFConfig(grid=HashGridConfig(num_levels=8, max_resolution=128)),
    renderer=VolumeRendererConfig(num_samples=40),
    guidance=DiffusersGuidanceConfig(model=FRONTS_PRIOR),
    rule=SDSRuleConfig(guidance_scale=3.0, t_schedule="linear", t_max_end=0.3, camera_guidance_scale=5.0),
    regularizers=RegularizerConfig(entropy=Ramp(0.0, 0.05, 0.3, 1.0)),
)
# The presets measured with the first built-in prior keep it, without camera guidance.
_FIRST_PRIOR_RULE = dataclasses.replace(_DEFAULT.rule, camera_guidance_scale=0.0)
# The empirical prior of the synthetic world (the exact denoiser of 256 ground-truth renders per
# object, camera-conditioned with a 10° kernel): no learned weights at all; s = 1 (no CFG;
# DreamFusion ω = 0); t_max annealed linearly 0.98 → 0.3.
_EMPIRICAL = dataclasses.replace(
    _DEFAULT, preset="empirical", steps=400, validate_every=100,
    guidance=EmpiricalPriorGuidanceConfig(
        views=WorldViewsConfig(resolution=32, views_per_object=256),
        camera_kernel_deg=10.0,
    ),
    rule=SDSRuleConfig(guidance_scale=1.0, t_schedule="linear", t_max_end=0.3),
)  # fmt: skip

# --- Stable Diffusion and DeepFloyd IF (GPU; weights by hub id, fetched once where the hub is reachable)
# threestudio's dreamfusion-sd.yaml / dreamfusion-if.yaml in this codebase's units: guidance scale in
# the diffusers convention s, ε̂ = ε_∅ + s(ε_y − ε_∅). threestudio computes ε_y + g(ε_y − ε_∅), so its
# `guidance_scale: 100` (SD) and `20` (IF) are s = 101 and 21 here (DreamFusion's ω = s − 1 = 100
# and 20), t ~ U[0.02, 0.98], w = 1 − ᾱ_t, 64×64 renders, 10k steps,
# orientation loss ramped 10 → 1000 over the first half, sparsity 1, a learned (environment-map)
# background, DreamFusion's shading mix (albedo 0.2, textureless 0.5, lambertian 0.3). Cameras keep
# this world's radius 2.5 and field of view 40° (threestudio: 1.5–2.0 and 40–70° for its radius-2 box).
_SD_CAMERA = CameraConfig(
    elevation_deg=(-10.0, 85.0), radius=(2.5, 2.5), fovy_deg=(40.0, 40.0), width=64, height=64
)
_DREAMFUSION = dataclasses.replace(
    _DEFAULT, steps=10_000, device="cuda", validate_every=1000, checkpoint_every=1000, camera=_SD_CAMERA,
    nerf=HashGridNeRFConfig(grid=HashGridConfig(num_levels=16, log2_table_size=19, max_resolution=2048)),
    background=BackgroundConfig(kind="learned"),
    renderer=VolumeRendererConfig(num_samples=64, albedo_prob=0.2, textureless_prob=0.5),
    regularizers=RegularizerConfig(orientation=Ramp(10.0, 1000.0, 0.0, 0.5), sparsity=1.0),
    guidance=DiffusersGuidanceConfig(model="stabilityai/stable-diffusion-2-1-base", dtype="bfloat16"),
    rule=SDSRuleConfig(guidance_scale=101.0, weighting="dreamfusion", t_min=0.02, t_max=0.98),
)  # fmt: skip

PRESETS: dict[str, RunConfig] = {
    "default": _DEFAULT,
    # A few hundred steps: a first look in about a minute.
    "fast": dataclasses.replace(_DEFAULT, preset="fast", steps=200, validate_every=50, checkpoint_every=50),
    "empirical": _EMPIRICAL,
    # The analytic Gaussian prior: N(mean render, 0.5²I) per prompt. A smoke test of the whole path.
    "gaussian": dataclasses.replace(
        _DEFAULT, preset="gaussian", steps=200,
        guidance=GaussianPriorGuidanceConfig(views=WorldViewsConfig(resolution=32)), rule=SDSRuleConfig(guidance_scale=1.0),
    ),
    # The literal diffusion loss, back-propagated through the denoiser (the Jacobian SDS omits).
    "literal": dataclasses.replace(
        _EMPIRICAL, preset="literal",
        rule=dataclasses.replace(_EMPIRICAL.rule, kind="literal"),
    ),
    # 3D Gaussians (DreamGaussian's representation) with the built-in prior: albedo renders only.
    "gaussians": dataclasses.replace(
        _DEFAULT, preset="gaussians", representation="gaussians", steps=300, validate_every=100,
        guidance=DiffusersGuidanceConfig(model=BUILTIN_PRIOR), rule=_FIRST_PRIOR_RULE,  # as measured
        gaussians=GaussiansConfig(opacity_entropy=Ramp(0.0, 0.01, 0.5, 1.0)),
    ),
    # The mesh refinement stage after any coarse run (`sds3d generate --preset refine --from RUN`):
    # its exported mesh, vertex colours and positions trained by SDS through the differentiable
    # rasteriser, half the steps lit (the positions' gradient comes through the shading), at lower
    # noise (t_max 0.5 → 0.2: details, not layout).
    "refine": dataclasses.replace(
        _DEFAULT, preset="refine", representation="mesh", steps=200, validate_every=100,
        guidance=DiffusersGuidanceConfig(model=BUILTIN_PRIOR),  # as measured (benchmarks/quality_refine.md)
        renderer=VolumeRendererConfig(albedo_prob=0.5),
        rule=SDSRuleConfig(guidance_scale=3.0, t_schedule="linear", t_max=0.5, t_max_end=0.2),
    ),
    "dreamfusion-sd": dataclasses.replace(_DREAMFUSION, preset="dreamfusion-sd"),
    "dreamfusion-if": dataclasses.replace(
        _DREAMFUSION, preset="dreamfusion-if",
        guidance=DiffusersGuidanceConfig(model="DeepFloyd/IF-I-XL-v1.0", dtype="bfloat16"),
        rule=SDSRuleConfig(guidance_scale=21.0, t_min=0.02, t_max=0.98),
    ),
    # Ours: the dreamfusion-sd recipe in 3,000 steps with t_max annealed 0.98 → 0.5 (HiFA's sqrt
    # schedule); U-Net and VAE encoder compiled and replayed as CUDA graphs; the NeRF's field query
    # compiled, with closed-form normals (exact, no second backward); no orientation loss. Speed is
    # measured (benchmarks/speed_*.md); quality is not, here, where no SD weights can be downloaded.
    "fast-sd": dataclasses.replace(
        _DREAMFUSION, preset="fast-sd", steps=3000, validate_every=500, checkpoint_every=500,
        nerf=dataclasses.replace(_DREAMFUSION.nerf, compile=True, normal_type="closed_form"),
        regularizers=RegularizerConfig(sparsity=1.0),
        guidance=DiffusersGuidanceConfig(
            model="stabilityai/stable-diffusion-2-1-base", dtype="bfloat16", compile=True,
            compile_mode="reduce-overhead", channels_last=True,
        ),
        rule=SDSRuleConfig(guidance_scale=101.0, t_schedule="sqrt", t_min=0.02, t_max=0.98, t_max_end=0.5),
    ),
    # DreamGaussian's text-to-3D stage (Tang et al. 2023, configs/text.yaml) with SD 1.5: 5,000
    # Gaussians at first, its learning rates (ours' defaults), densified every 100 steps, 500 steps,
    # s = 100 (its CFG is already the diffusers form), t's upper end annealed 0.98 → 0.02 (it steps t
    # down deterministically; here t ~ U[0.02, t_max(step)]), elevations −30…30°, fov 49°, albedo
    # renders on white. 64×64 renders (it grows them to 512²: the dense splat here is sized for 64²–128²).
    "dreamgaussian-sd": dataclasses.replace(
        _DEFAULT, preset="dreamgaussian-sd", representation="gaussians", steps=500, device="cuda",
        validate_every=100, checkpoint_every=100,
        camera=CameraConfig(elevation_deg=(-30.0, 30.0), radius=(2.5, 2.5), fovy_deg=(49.1, 49.1), width=64, height=64),
        gaussians=GaussiansConfig(num_init=5000, max_gaussians=20000, densify_every=100, densify_from=0.2,
                                  densify_until=1.0),
        guidance=DiffusersGuidanceConfig(model="runwayml/stable-diffusion-v1-5", dtype="bfloat16"),
        rule=SDSRuleConfig(guidance_scale=100.0, t_schedule="linear", t_min=0.02, t_max=0.98, t_max_end=0.02),
        regularizers=RegularizerConfig(),
    ),
}  # fmt: skip


PRESET_NOTES: dict[str, str] = {
    "default": "sds3d's learned prior of the synthetic world (sds3d/world-prior-32-fronts), camera-conditioned, camera guidance 5, 32x32, s=3",
    "fast": "the default, fewer steps: a first look",
    "empirical": "the exact (empirical) denoiser of ground-truth renders: no learned weights, s=1, 32x32",
    "gaussian": "analytic Gaussian prior N(mean render, 0.5^2 I): a smoke test of the whole path",
    "literal": "the literal diffusion loss through the empirical denoiser (keeps the Jacobian SDS omits)",
    "gaussians": "3D Gaussians splatted in plain PyTorch with the built-in prior (albedo only), 300 steps",
    "refine": "a mesh stage after any run (--from RUN): vertex colours and positions by SDS, 200 steps",
    "dreamfusion-sd": "threestudio's dreamfusion-sd: SD 2.1-base, s=101 (threestudio's 100), w=1-abar, 64x64, 10k steps (GPU)",
    "dreamfusion-if": "threestudio's dreamfusion-if: DeepFloyd IF-I-XL, s=21 (threestudio's 20), 64x64, 10k steps (GPU)",
    "fast-sd": "ours: SD 2.1-base in 3k steps, t annealed, compiled + CUDA graphs (GPU)",
    "dreamgaussian-sd": "DreamGaussian's text stage: 3D Gaussians with SD 1.5, s=100, 500 steps, 64x64 (GPU)",
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
    """Rebuild a config dataclass tree from `to_dict` output, guided by the type hints. A value of
    the wrong type is a `ConfigError` naming its field; missing fields keep their defaults, and
    unknown ones are refused (a typo would otherwise be ignored)."""
    return _convert(cls, data, "config")


class ConfigError(UserError):
    """A config.json field with a value of the wrong type."""


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, not {_show(value)}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"{where} has an unknown field {unknown[0]!r}")
        kwargs = {
            name: _convert(hints[name], value[name], f"{where}.{name}") for name in names if name in value
        }
        return typing.cast(Any, tp)(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for kinds in (GUIDANCE_KINDS, RULE_CONFIGS):  # the unions told apart by `kind`
            if isinstance(value, dict) and "kind" in value and any(a in kinds.values() for a in args):
                if value["kind"] not in kinds:
                    raise ConfigError(
                        f"{where}.kind must be one of {', '.join(kinds)}, not {_show(value['kind'])}"
                    )
                return _convert(kinds[value["kind"]], value, where)
        if isinstance(value, dict) and Ramp in args:
            return _convert(Ramp, value, where)
        for arg in args:
            if arg is not type(None) and not dataclasses.is_dataclass(arg):
                with contextlib.suppress(ConfigError):
                    return _convert(arg, value, where)
        raise ConfigError(f"{where} has the wrong type: {_show(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"{where} must be one of {', '.join(map(str, typing.get_args(tp)))}, not {_show(value)}"
            )
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list) or (Ellipsis not in args and len(value) != len(args)):
            raise ConfigError(f"{where} must be a list of {len(args)} values, not {_show(value)}")
        items = [args[0]] * len(value) if Ellipsis in args else list(args)
        return tuple(
            _convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(items, value, strict=True))
        )
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, not {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, not {_show(value)}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, not {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {_show(value)}")
        return value
    raise TypeError(f"config type {tp!r} at {where} has no JSON conversion")  # a bug in a config class


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def upgrade(data: Any) -> Any:
    """A config.json of an earlier sds3d in today's form: before the Rule seam the SDS settings
    were `guidance.sds` with `mode` "sds"/"literal"; they are `rule` with that `kind` now. Before
    stages (stages.py) the latent warm-up was `latent_warmup`; it is a first stage now."""
    if isinstance(data, dict) and isinstance(data.get("guidance"), dict) and "sds" in data["guidance"]:
        data = {**data, "guidance": dict(data["guidance"])}
        sds = data["guidance"].pop("sds")
        if isinstance(sds, dict) and "rule" not in data:
            sds = dict(sds)
            sds["kind"] = sds.pop("mode", "sds")
            data["rule"] = sds
    if isinstance(data, dict) and isinstance(data.get("latent_warmup"), dict) and "stages" not in data:
        # Before stages the latent warm-up was a flag: {"steps": N, "channels": C}; it is a first stage now.
        data = dict(data)
        warmup = data.pop("latent_warmup")
        steps = warmup.get("steps", 0)
        data["stages"] = (
            [{"steps": steps, "render": "latent", "latent_channels": warmup.get("channels", 4)}]
            if steps
            else []
        )
    return data


def check_config(config: RunConfig, where: str = "config") -> RunConfig:
    """Values no run can use, found before anything is built."""
    for name in ("steps", "checkpoint_every"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{where}.{name} must be positive, not {getattr(config, name)}")
    if config.validate_every < 0:
        raise ConfigError(
            f"{where}.validate_every must be 0 (never) or positive, not {config.validate_every}"
        )
    if not 0 <= config.seed <= MAX_SEED:
        raise ConfigError(f"{where}.seed must be in 0…2^64−1, not {config.seed}")
    if problems := check_stages(config.stages, config.steps, f"{where}.stages"):
        raise ConfigError(problems[0])
    if config.representation == "gaussians":
        if config.renderer.albedo_prob < 1.0:
            raise ConfigError(
                f"{where}.renderer.albedo_prob must be 1 with Gaussians (they render albedo only)"
            )
        if config.stages:
            raise ConfigError(f"{where}.stages: Gaussians have no latent warm-up")
        if config.background.kind != "solid":
            raise ConfigError(f"{where}.background.kind must be solid with Gaussians")
    if config.representation == "mesh":
        if config.stages:
            raise ConfigError(f"{where}.stages: a mesh has no latent warm-up")
        if config.background.kind != "solid":
            raise ConfigError(f"{where}.background.kind must be solid with a mesh")
        if config.mesh.supersample < 1:
            raise ConfigError(f"{where}.mesh.supersample must be 1 or more, not {config.mesh.supersample}")
    try:  # the rule's own checks (its build refuses values it cannot use)
        config.rule.build()
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit unsigned seed


def save_config(config: RunConfig, path: Path) -> None:
    """Written beside and renamed over, so a crash never leaves half a config.json."""
    write_atomic(path, json.dumps(to_dict(config), indent=2))


def load_config(path: Path) -> RunConfig:
    """A run's config.json, or one line on what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    try:
        return check_config(from_dict(RunConfig, upgrade(data)))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
