"""Orbit cameras around the origin.

Conventions, stated once for the whole package:
- World: right-handed, +Z up, world units; objects sit at the origin.
- Spherical camera position: elevation from the XY plane (+90° looks straight down), azimuth
  counter-clockwise from +X about +Z. Azimuth 0° is the "front" of an object (DreamFusion's
  view-dependent prompting, threestudio's thresholds).
- c2w is OpenGL/Blender style: the camera looks along its −Z axis, +Y is image up, +X image right.
- Images are [B, C, H, W]; pixel (row i, column j) has its centre at (j + 0.5, i + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sds3d.devices import to_device

# Elevation is kept this far from ±90° so that the look-at frame stays defined.
MAX_ABS_ELEVATION_DEG = 89.0


@dataclass
class CameraConfig:
    """Ranges of the random training cameras (threestudio's `random-camera` data module)."""

    elevation_deg: tuple[float, float] = (-10.0, 60.0)
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    radius: tuple[float, float] = (2.5, 2.5)
    fovy_deg: tuple[float, float] = (40.0, 40.0)
    width: int = 32
    height: int = 32
    batch_size: int = 1


@dataclass
class Cameras:
    """A batch of pinhole cameras looking at the origin."""

    c2w: torch.Tensor  # [B, 4, 4]
    fovy_deg: torch.Tensor  # [B]
    elevation_deg: torch.Tensor  # [B]
    azimuth_deg: torch.Tensor  # [B], in [-180, 180)
    radius: torch.Tensor  # [B]
    width: int
    height: int

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def position(self) -> torch.Tensor:  # [B, 3]
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(
            to_device(self.c2w, device), to_device(self.fovy_deg, device), to_device(self.elevation_deg, device),
            to_device(self.azimuth_deg, device), to_device(self.radius, device), self.width, self.height,
        )  # fmt: skip

    def __getitem__(self, index: slice | int | torch.Tensor) -> Cameras:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(
            self.c2w[index], self.fovy_deg[index], self.elevation_deg[index],
            self.azimuth_deg[index], self.radius[index], self.width, self.height,
        )  # fmt: skip


def look_at_c2w(position: torch.Tensor) -> torch.Tensor:
    """c2w [B, 4, 4] of cameras at `position` [B, 3] looking at the origin with +Z as world up."""
    forward = -position / position.norm(dim=-1, keepdim=True)  # the camera's viewing direction
    up_world = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype, device=position.device).expand_as(position)
    right = torch.linalg.cross(forward, up_world, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(position.shape[0], 4, 4, dtype=position.dtype, device=position.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward  # OpenGL: the camera looks along −Z
    c2w[:, :3, 3] = position
    c2w[:, 3, 3] = 1.0
    return c2w


def orbit_cameras(
    elevation_deg: torch.Tensor,  # [B]
    azimuth_deg: torch.Tensor,  # [B]
    radius: torch.Tensor,  # [B]
    fovy_deg: torch.Tensor,  # [B]
    width: int,
    height: int,
) -> Cameras:
    """Cameras on a sphere around the origin, looking at it."""
    elevation_deg = elevation_deg.clamp(-MAX_ABS_ELEVATION_DEG, MAX_ABS_ELEVATION_DEG)
    azimuth_deg = torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0
    el_rad, az_rad = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    position = torch.stack(
        [radius * el_rad.cos() * az_rad.cos(), radius * el_rad.cos() * az_rad.sin(), radius * el_rad.sin()],
        dim=-1,
    )
    return Cameras(look_at_c2w(position), fovy_deg, elevation_deg, azimuth_deg, radius, width, height)


def sample_cameras(
    config: CameraConfig, generator: torch.Generator | None = None, batch_size: int | None = None
) -> Cameras:
    """Random cameras, each quantity uniform in its configured range."""
    n = config.batch_size if batch_size is None else batch_size

    def uniform(bounds: tuple[float, float]) -> torch.Tensor:
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    return orbit_cameras(
        uniform(config.elevation_deg), uniform(config.azimuth_deg), uniform(config.radius),
        uniform(config.fovy_deg), config.width, config.height,
    )  # fmt: skip


def turntable_cameras(
    num_frames: int, elevation_deg: float, radius: float, fovy_deg: float, width: int, height: int
) -> Cameras:
    """A fixed orbit: `num_frames` azimuths evenly spaced over 360°, starting at the front."""
    azimuth = torch.arange(num_frames, dtype=torch.float32) * (360.0 / num_frames)
    full = lambda v: torch.full((num_frames,), float(v))
    return orbit_cameras(full(elevation_deg), azimuth, full(radius), full(fovy_deg), width, height)


def camera_rays(cameras: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins and unit directions through pixel centres, each [B, H, W, 3]."""
    b, h, w = len(cameras), cameras.height, cameras.width
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    focal = 0.5 * h / torch.tan(0.5 * torch.deg2rad(cameras.fovy_deg))  # [B], pixels
    j = torch.arange(w, device=device, dtype=dtype) + 0.5
    i = torch.arange(h, device=device, dtype=dtype) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    x = (jj - 0.5 * w)[None] / focal[:, None, None]
    y = -(ii - 0.5 * h)[None] / focal[:, None, None]  # image rows go down, camera +Y goes up
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B, H, W, 3]
    dirs = torch.einsum("bij,bhwj->bhwi", cameras.c2w[:, :3, :3], dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = cameras.position[:, None, None, :].expand(b, h, w, 3)
    return origins, dirs


def project(cameras: Cameras, points: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates (column, row) [B, N, 2] of world points [B, N, 3]; the inverse of `camera_rays`."""
    w2c = torch.linalg.inv(cameras.c2w)
    p = torch.einsum("bij,bnj->bni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3]
    focal = 0.5 * cameras.height / torch.tan(0.5 * torch.deg2rad(cameras.fovy_deg))
    col = focal[:, None] * p[..., 0] / -p[..., 2] + 0.5 * cameras.width
    row = -focal[:, None] * p[..., 1] / -p[..., 2] + 0.5 * cameras.height
    return torch.stack([col, row], dim=-1)


def view_labels(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, overhead_deg: float = 60.0,
                front_deg: float = 45.0, back_deg: float = 135.0) -> list[str]:  # fmt: skip
    """DreamFusion's view of each camera, by threestudio's thresholds: "overhead" above 60° elevation,
    else "front" for |azimuth| < 45°, "back" for |azimuth| > 135°, otherwise "side"."""
    labels = []
    for el, az in zip(elevation_deg.tolist(), azimuth_deg.tolist(), strict=True):
        if el > overhead_deg:
            labels.append("overhead")
        elif abs(az) < front_deg:
            labels.append("front")
        elif abs(az) > back_deg:
            labels.append("back")
        else:
            labels.append("side")
    return labels


def concat_cameras(a: Cameras, b: Cameras) -> Cameras:
    """Two batches of cameras (of one image size) as one."""
    return Cameras(
        torch.cat([a.c2w, b.c2w]), torch.cat([a.fovy_deg, b.fovy_deg]), torch.cat([a.elevation_deg, b.elevation_deg]),
        torch.cat([a.azimuth_deg, b.azimuth_deg]), torch.cat([a.radius, b.radius]), a.width, a.height,
    )  # fmt: skip
