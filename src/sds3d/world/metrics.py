"""Scoring a 3D result against the synthetic world's ground truth.

3D IoU is measured on a voxel grid over [−bound, bound]³: ground-truth occupancy is sdf < 0 at the
voxel centres; a mesh's occupancy is found by ray parity along +Z through each column of centres
(a point is inside a closed mesh when a ray from it crosses the surface an odd number of times).
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import torch

from sds3d.world.shapes import COLORS, SHAPES, occupancy_grid, shape_sdf, voxel_centres

# Columns are nudged by this much (in voxels) so that no ray runs exactly through a mesh edge.
_JITTER = (1.3e-4, 2.7e-4)


def mesh_occupancy(
    vertices: np.ndarray, faces: np.ndarray, resolution: int, bound: float = 1.0
) -> np.ndarray:
    """Boolean [R, R, R] (index order x, y, z): which voxel centres lie inside the closed mesh."""
    pitch = 2 * bound / resolution
    centres = (np.arange(resolution) + 0.5) * pitch - bound
    tri = vertices[faces].astype(np.float64)  # [F, 3, 3]
    hits_col, hits_z = [], []
    for start in range(0, len(tri), 2048):
        t = tri[start : start + 2048]
        a, b, c = t[:, 0], t[:, 1], t[:, 2]
        # Columns under each triangle's xy bounding box.
        lo = np.floor((t[:, :, :2].min(1) + bound) / pitch - 0.5).astype(int) + 1
        hi = np.floor((t[:, :, :2].max(1) + bound) / pitch - 0.5).astype(int)
        for k in range(len(t)):
            (i0, j0), (i1, j1) = np.clip(lo[k], 0, resolution - 1), np.clip(hi[k], 0, resolution - 1)
            if i1 < i0 or j1 < j0 or hi[k][0] < 0 or hi[k][1] < 0:
                continue
            ii, jj = np.meshgrid(np.arange(i0, i1 + 1), np.arange(j0, j1 + 1), indexing="ij")
            px = centres[ii.ravel()] + _JITTER[0] * pitch
            py = centres[jj.ravel()] + _JITTER[1] * pitch
            # Barycentric coordinates of the column in the triangle's xy projection.
            v0, v1 = b[k, :2] - a[k, :2], c[k, :2] - a[k, :2]
            det = v0[0] * v1[1] - v0[1] * v1[0]
            if abs(det) < 1e-15:
                continue
            dx, dy = px - a[k, 0], py - a[k, 1]
            u = (dx * v1[1] - dy * v1[0]) / det
            v = (v0[0] * dy - v0[1] * dx) / det
            inside = (u >= 0) & (v >= 0) & (u + v <= 1)
            if not inside.any():
                continue
            z = a[k, 2] + u[inside] * (b[k, 2] - a[k, 2]) + v[inside] * (c[k, 2] - a[k, 2])
            hits_col.append(ii.ravel()[inside] * resolution + jj.ravel()[inside])
            hits_z.append(z)
    occ = np.zeros((resolution * resolution, resolution), dtype=np.int64)
    if hits_col:
        col, z = np.concatenate(hits_col), np.concatenate(hits_z)
        # For each hit, every voxel centre below it in its column sees one more crossing above.
        below = np.clip(np.floor((z + bound) / pitch + 0.5).astype(int), 0, resolution)  # centres k < below
        counts = np.zeros((resolution * resolution, resolution + 1), dtype=np.int64)
        np.add.at(counts, (col, below), 1)
        # crossings above centre k = Σ_{m > k} counts[:, m]
        occ = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    return (occ % 2 == 1).reshape(resolution, resolution, resolution)


def load_mesh_arrays(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vertices [V, 3], faces [F, 3], RGB colours [V, 3] uint8) of a mesh file."""
    import trimesh

    mesh: Any = trimesh.load(path, force="mesh")
    return np.asarray(mesh.vertices), np.asarray(mesh.faces), np.asarray(mesh.visual.vertex_colors)[:, :3]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def mesh_iou(
    vertices: np.ndarray, faces: np.ndarray, shape: str, resolution: int = 64, bound: float = 1.0
) -> float:
    """3D IoU of a closed mesh (world units, +Z up) with a ground-truth primitive."""
    return iou(mesh_occupancy(vertices, faces, resolution, bound), occupancy_grid(shape, resolution, bound))


def rotated_occupancy(shape: str, angle_deg: float, resolution: int = 64, bound: float = 1.0) -> np.ndarray:
    """Occupancy [R, R, R] of a primitive turned by `angle_deg` about +Z (voxel centres rotated back)."""
    a = np.deg2rad(angle_deg)
    c, s = float(np.cos(a)), float(np.sin(a))
    p = voxel_centres(resolution, bound).reshape(-1, 3)
    back = torch.stack([c * p[:, 0] + s * p[:, 1], -s * p[:, 0] + c * p[:, 1], p[:, 2]], dim=-1)
    return (shape_sdf(shape, back) < 0).reshape(resolution, resolution, resolution).numpy()


# The cube is symmetric under a quarter turn about z, the other primitives under any turn: only the
# cube needs its rotations tried.
CUBE_ROTATIONS_DEG = tuple(float(a) for a in range(0, 90, 5))


def shape_ious(
    vertices: np.ndarray, faces: np.ndarray, resolution: int = 64, bound: float = 1.0
) -> dict[str, float]:
    """Each primitive's 3D IoU with the mesh at its best rotation about z (5° steps over a quarter turn)."""
    occ = mesh_occupancy(vertices, faces, resolution, bound)
    angles = lambda shape: CUBE_ROTATIONS_DEG if shape == "cube" else (0.0,)  # noqa: E731
    return {
        shape: max(iou(occ, rotated_occupancy(shape, a, resolution, bound)) for a in angles(shape))
        for shape in SHAPES
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def area_weighted_color(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Mean vertex colour [3] in [0, 1], each face weighted by its area."""
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face_col = colors[faces].astype(np.float64).mean(axis=1) / 255.0
    return (face_col * area[:, None]).sum(0) / max(area.sum(), 1e-12)


def nearest_color(rgb: np.ndarray) -> str:
    """The world colour whose hue is closest to `rgb`'s (hue is what shading changes least)."""
    h = colorsys.rgb_to_hsv(*[float(v) for v in rgb])[0]

    def hue_distance(name: str) -> float:
        d = abs(colorsys.rgb_to_hsv(*COLORS[name])[0] - h)
        return min(d, 1 - d)

    return min(COLORS, key=hue_distance)


# The Janus metric: azimuth sectors of JANUS_SECTORS° about +Z, each centred on a multiple of it.
JANUS_SECTORS = 8
# A sector shows the front when at least this share of its surface area has the front's colour (the
# true front's sector has all of it, its neighbours under a fifth).
JANUS_FRONT_SHARE = 0.3
# Faces this close to the z axis (world units) have no meaningful azimuth and are left out.
JANUS_MIN_RADIUS = 0.1


def janus(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, obj: Any) -> dict:
    """How many fronts a mesh of a fronted world object shows, and where.

    Each face is coloured by its mean vertex colour and called front when that is nearer (RGB) the
    object's front colour than its body colour; its azimuth is its centroid's, atan2(y, x). Around
    +Z, JANUS_SECTORS sectors (the first centred on azimuth 0°, the true front) each get the share
    of their area that is front-coloured; a sector with a share ≥ JANUS_FRONT_SHARE shows the front.
    `fronts` is the number of circular runs of such sectors (0: no front; all sectors: `everywhere`,
    counted as a Janus). `janus`: a front seen on more than one side (fronts ≥ 2, or everywhere);
    `front_ok`: exactly one front, and it covers the true front's sector."""
    if obj.front is None:
        raise ValueError(f"{obj.prompt!r} has no front")
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    centroid = tri.mean(axis=1)
    face_col = colors[faces].astype(np.float64).mean(axis=1) / 255.0
    d_front = np.linalg.norm(face_col - np.asarray(COLORS[obj.front]), axis=1)
    d_body = np.linalg.norm(face_col - np.asarray(COLORS[obj.color]), axis=1)
    keep = np.hypot(centroid[:, 0], centroid[:, 1]) > JANUS_MIN_RADIUS
    width = 360.0 / JANUS_SECTORS
    azimuth = np.rad2deg(np.arctan2(centroid[:, 1], centroid[:, 0]))
    sector = np.floor(np.mod(azimuth + width / 2, 360.0) / width).astype(int) % JANUS_SECTORS
    total = np.bincount(sector[keep], weights=area[keep], minlength=JANUS_SECTORS)
    front = np.bincount(sector[keep], weights=(area * (d_front < d_body))[keep], minlength=JANUS_SECTORS)
    share = np.where(total > 0, front / np.maximum(total, 1e-12), 0.0)
    shows = share >= JANUS_FRONT_SHARE
    everywhere = bool(shows.all())
    # Runs around the circle: a sector that shows the front after one that does not starts a run.
    runs = 0 if everywhere else int(np.sum(shows & ~np.roll(shows, 1)))
    return {
        "fronts": runs, "everywhere": everywhere, "janus": everywhere or runs >= 2,
        "front_ok": runs == 1 and bool(shows[0]), "front_sectors": int(shows.sum()),
        "sector_share": [round(float(s), 3) for s in share],
    }  # fmt: skip


# An image "shows the front" when at least this share of its object pixels has the front's colour.
IMAGE_FRONT_SHARE = 0.1


def image_front_share(images: torch.Tensor, obj: Any, background=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """[N] the share of each image's object pixels (nearer, in RGB, the body or front colour than the
    background) that are nearer the front's colour than the body's. images: [N, 3, H, W] in [0, 1]."""
    if obj.front is None:
        raise ValueError(f"{obj.prompt!r} has no front")
    pix = images.permute(0, 2, 3, 1).float()

    def dist(rgb) -> torch.Tensor:
        return (pix - torch.tensor(rgb, dtype=pix.dtype, device=pix.device)).norm(dim=-1)

    d_front, d_body, d_bg = dist(COLORS[obj.front]), dist(COLORS[obj.color]), dist(background)
    on_object = torch.minimum(d_front, d_body) < d_bg
    front = on_object & (d_front < d_body)
    return front.flatten(1).sum(1) / on_object.flatten(1).sum(1).clamp(min=1)
