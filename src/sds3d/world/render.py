"""Analytic renderer of the synthetic world by sphere tracing its exact SDFs.

Same cameras, outputs and shading modes as the NeRF volume renderer (`render/volume.py`), so
ground-truth images and NeRF renders are directly comparable. Normals are the normalised
central-difference gradient of the SDF. Batched over cameras and rays in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sds3d.cameras import Cameras, camera_rays
from sds3d.render.volume import RenderOutput, Shading, ray_box_intersection, shade
from sds3d.world.shapes import WorldObject

SPHERE_TRACE_STEPS = 128
HIT_EPSILON = 1e-4
NORMAL_EPSILON = 1e-4


def render_object(
    obj: WorldObject,
    cameras: Cameras,
    shading: Shading = "albedo",
    light_positions: torch.Tensor | None = None,  # [B, 3]
    background: tuple[float, float, float] | torch.Tensor = (1.0, 1.0, 1.0),  # or [B, 3]
    ambient: float = 0.1,
) -> RenderOutput:
    b, h, w = len(cameras), cameras.height, cameras.width
    origins, dirs = camera_rays(cameras)
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    near, far = ray_box_intersection(o, d, 1.0)
    t = near.clone()
    hit = torch.zeros_like(t, dtype=torch.bool)
    active = far > near
    for _ in range(SPHERE_TRACE_STEPS):
        dist = obj.sdf(o + t[:, None] * d)
        newly = active & (dist < HIT_EPSILON)
        hit |= newly
        active &= ~newly
        t = torch.where(active, t + dist, t)
        active &= t < far
        if not bool(active.any()):
            break
    p = o + t[:, None] * d
    eye = torch.eye(3, dtype=p.dtype, device=p.device) * NORMAL_EPSILON
    grad = torch.stack([obj.sdf(p + eye[i]) - obj.sdf(p - eye[i]) for i in range(3)], dim=-1)
    normals = F.normalize(grad, dim=-1)
    albedo = obj.albedo_at(p)
    lights = None if light_positions is None else light_positions.repeat_interleave(h * w, dim=0)
    color = shade(albedo, normals, p, lights, shading, ambient) if shading != "albedo" else albedo
    bg = torch.as_tensor(background, dtype=p.dtype, device=p.device)
    bg = (
        bg.expand(b, 3).repeat_interleave(h * w, dim=0)
        if bg.ndim == 1
        else bg.repeat_interleave(h * w, dim=0)
    )
    mask = hit[:, None].to(p.dtype)
    rgb = mask * color + (1 - mask) * bg

    def image(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    return RenderOutput(
        rgb=image(rgb), opacity=image(mask), depth=image(t[:, None] * mask), normal=image(normals * mask),
        weights=mask, sample_normals=None, ray_dirs=d, sample_density=mask,
    )  # fmt: skip


def object_views(
    obj: WorldObject,
    num_views: int,
    elevation_deg: tuple[float, float],
    azimuth_deg: tuple[float, float],
    radius: tuple[float, float],
    fovy_deg: tuple[float, float],
    resolution: int,
    seed: int,
    shading: Shading = "albedo",
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, Cameras]:
    """Ground-truth renders [N, 3, R, R] in [0, 1] of one object from N random cameras drawn (with
    a fixed seed) from the given ranges; lambertian views are lit from near the camera."""
    from sds3d.cameras import CameraConfig, sample_cameras
    from sds3d.render.volume import VolumeRendererConfig, sample_lights

    generator = torch.Generator().manual_seed(seed)
    config = CameraConfig(elevation_deg, azimuth_deg, radius, fovy_deg, resolution, resolution, num_views)
    cameras = sample_cameras(config, generator)
    lights = sample_lights(cameras, VolumeRendererConfig(), generator) if shading != "albedo" else None
    return render_object(obj, cameras, shading, lights, background).rgb, cameras
