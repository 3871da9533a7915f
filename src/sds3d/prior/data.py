"""Training data for the built-in prior: ground-truth renders of the synthetic world, rendered once.

Cameras cover the default SDS preset's range (all azimuths, elevation −10°…85°, its radius and
field of view). Shading: albedo, lambertian (light near the camera) and textureless, as SDS
renders them. Backgrounds: white (the default preset's) or a random solid colour.

Captions are drawn per sample, so the same render serves every form of its caption:
- "a {colour} {shape}", with the view suffix (", front view", …, by the view-dependent prompting
  rule of prompts.py) for a fraction `view_suffix_prob`;
- textureless renders carry no colour, so their caption is "a {shape}" (with the same suffix rule):
  the prior learns shape words alone from them and never pairs a colour with a white object;
- "" for a fraction `empty_caption_prob`, for classifier-free guidance.
Five objects (one per shape) are held out of training to measure generalisation.

World v2's fronted objects ("a blue cube with a red front") train beside the 30 (`fronted`), with a
front-biased share of their views (`front_view_share` from |azimuth| < FRONT_VIEW_DEG) as photos of
things with a front are: the bias that makes an unconditioned prior paint the front everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sds3d.cameras import CameraConfig, concat_cameras, sample_cameras, view_labels
from sds3d.errors import UserError
from sds3d.guidance.analytic import FRONT_VIEW_DEG
from sds3d.prompts import with_view
from sds3d.render.volume import Shading, VolumeRendererConfig, sample_lights
from sds3d.world.render import render_object
from sds3d.world.shapes import WorldObject, all_objects, fronted_objects

HELD_OUT = ("a red torus", "a green cube", "a blue cone", "a yellow cylinder", "a purple sphere")
SHADING_CODES: tuple[Shading, ...] = ("albedo", "lambertian", "textureless")


@dataclass
class PriorDataConfig:
    resolution: int = 32
    views_per_object: int = 2048
    camera: CameraConfig = field(
        default_factory=lambda: CameraConfig(
            elevation_deg=(-10.0, 85.0), radius=(2.5, 2.5), fovy_deg=(40.0, 40.0)
        )
    )
    lambertian_prob: float = 0.25
    textureless_prob: float = 0.15
    random_background_prob: float = 0.3
    view_suffix_prob: float = 0.5
    empty_caption_prob: float = 0.1
    seed: int = 0
    # World v2: train on the fronted objects too, with `fronted_view_multiplier` × views_per_object
    # views each (the one thing the shipped prior must learn anew: where on the object the front is,
    # from the camera's azimuth), this share of their views from the front range.
    fronted: bool = True
    fronted_view_multiplier: int = 4
    front_view_share: float = 0.5


@dataclass
class PriorDataset:
    images: torch.Tensor  # [N, 3, R, R] in [−1, 1]
    objects: list[WorldObject]  # [N]
    shading: torch.Tensor  # [N] index into SHADING_CODES
    elevation_deg: torch.Tensor  # [N]
    azimuth_deg: torch.Tensor  # [N]

    def __len__(self) -> int:
        return self.images.shape[0]


def training_objects(fronted: bool = True) -> list[WorldObject]:
    """The 30 one-colour objects less the held-out five, and world v2's fronted objects."""
    return [o for o in all_objects() if o.prompt not in HELD_OUT] + (fronted_objects() if fronted else [])


def _object_cameras(config: PriorDataConfig, obj: WorldObject, g: torch.Generator):
    """One object's cameras: `views_per_object` from the whole range, or for a fronted object
    `fronted_view_multiplier` times as many, a share `front_view_share` of them from |azimuth| <
    FRONT_VIEW_DEG."""
    cam = config.camera
    n = config.views_per_object * (config.fronted_view_multiplier if obj.front is not None else 1)
    n_front = round(config.front_view_share * n) if obj.front is not None else 0

    def draw(n: int, azimuth: tuple[float, float]):
        return sample_cameras(CameraConfig(cam.elevation_deg, azimuth, cam.radius, cam.fovy_deg,
                                           config.resolution, config.resolution, n), g)  # fmt: skip

    cams = draw(n - n_front, cam.azimuth_deg)
    return concat_cameras(cams, draw(n_front, (-FRONT_VIEW_DEG, FRONT_VIEW_DEG))) if n_front else cams


@torch.no_grad()
def render_dataset(config: PriorDataConfig, objects: list[WorldObject], device: str = "cpu") -> PriorDataset:
    if not 0.0 <= config.front_view_share <= 1.0:
        raise UserError(f"front_view_share must be in [0, 1], not {config.front_view_share}")
    g = torch.Generator().manual_seed(config.seed)
    images, objs, shading, el, az = [], [], [], [], []
    for obj in objects:
        cams = _object_cameras(config, obj, g)
        u = torch.rand(len(cams), generator=g)
        codes = torch.where(
            u < config.textureless_prob,
            2,
            torch.where(u < config.textureless_prob + config.lambertian_prob, 1, 0),
        )
        random_bg = torch.rand(len(cams), generator=g) < config.random_background_prob
        bg = torch.where(random_bg[:, None], torch.rand(len(cams), 3, generator=g), torch.ones(len(cams), 3))
        lights = sample_lights(cams, VolumeRendererConfig(), g)
        out = torch.empty(len(cams), 3, config.resolution, config.resolution)
        for code, mode in enumerate(SHADING_CODES):
            keep = codes == code
            if keep.any():
                idx = keep.nonzero().flatten()
                rgb = render_object(
                    obj, cams[idx].to(device), mode, lights[idx].to(device), bg[idx].to(device)
                ).rgb
                out[idx] = rgb.cpu()
        images.append(out * 2 - 1)
        objs += [obj] * len(cams)
        shading.append(codes)
        el.append(cams.elevation_deg)
        az.append(cams.azimuth_deg)
    return PriorDataset(torch.cat(images), objs, torch.cat(shading), torch.cat(el), torch.cat(az))


def sample_captions(
    dataset: PriorDataset, index: torch.Tensor, config: PriorDataConfig, g: torch.Generator
) -> list[str]:
    """One caption per sample by the rules in the module docstring."""
    labels = view_labels(dataset.elevation_deg[index], dataset.azimuth_deg[index])
    u = torch.rand(len(index), 2, generator=g).tolist()
    captions = []
    for i, label, (u_empty, u_view) in zip(index.tolist(), labels, u, strict=True):
        if u_empty < config.empty_caption_prob:
            captions.append("")
            continue
        obj = dataset.objects[i]
        text = f"a {obj.shape}" if SHADING_CODES[int(dataset.shading[i])] == "textureless" else obj.prompt
        captions.append(with_view(text, label) if u_view < config.view_suffix_prob else text)
    return captions
