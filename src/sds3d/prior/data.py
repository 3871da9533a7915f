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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sds3d.cameras import CameraConfig, sample_cameras, view_labels
from sds3d.prompts import with_view
from sds3d.render.volume import Shading, VolumeRendererConfig, sample_lights
from sds3d.world.render import render_object
from sds3d.world.shapes import WorldObject, all_objects

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


@dataclass
class PriorDataset:
    images: torch.Tensor  # [N, 3, R, R] in [−1, 1]
    objects: list[WorldObject]  # [N]
    shading: torch.Tensor  # [N] index into SHADING_CODES
    elevation_deg: torch.Tensor  # [N]
    azimuth_deg: torch.Tensor  # [N]

    def __len__(self) -> int:
        return self.images.shape[0]


def training_objects() -> list[WorldObject]:
    return [o for o in all_objects() if o.prompt not in HELD_OUT]


@torch.no_grad()
def render_dataset(config: PriorDataConfig, objects: list[WorldObject], device: str = "cpu") -> PriorDataset:
    g = torch.Generator().manual_seed(config.seed)
    cam_config = CameraConfig(
        config.camera.elevation_deg, config.camera.azimuth_deg, config.camera.radius, config.camera.fovy_deg,
        config.resolution, config.resolution, config.views_per_object,
    )  # fmt: skip
    images, objs, shading, el, az = [], [], [], [], []
    for obj in objects:
        cams = sample_cameras(cam_config, g)
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
