"""The synthetic world's objects: exact signed distance functions and ground-truth meshes.

Objects are centred at the origin, right-handed, +Z up, in world units:
- sphere: radius 0.5
- cube: axis-aligned, half-extent 0.4
- cylinder: axis z, radius 0.4, z from −0.45 to 0.45
- cone: axis z, base radius 0.5 at z = −0.45, apex at z = +0.45
- torus: axis z, major radius 0.42, minor radius 0.16
Colours are sRGB albedos. Prompts read "a {colour} {shape}" (30 objects).

World v2 adds objects with a front (`fronted_objects`): a primitive of one colour whose front — the
surface within ±FRONT_HALF_WIDTH_DEG of azimuth 0° about +Z, i.e. facing +X, where the cameras'
"front view" looks from — has another colour. Prompts read "a {colour} {shape} with a {colour} front".
They measure the Janus problem (`world.metrics.janus`): a front seen on more than one side.
SDFs follow Inigo Quilez's exact distance functions (iquilezles.org/articles/distfunctions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.10, 0.30, 0.95),
    "purple": (0.60, 0.15, 0.80),
}
SPHERE_RADIUS = 0.5
CUBE_HALF_EXTENT = 0.4
CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT = 0.4, 0.45
CONE_BASE_RADIUS, CONE_HALF_HEIGHT = 0.5, 0.45
TORUS_MAJOR, TORUS_MINOR = 0.42, 0.16
# The front marker: the wedge of azimuths |atan2(y, x)| < this (all heights).
FRONT_HALF_WIDTH_DEG = 30.0
# World v2's fronted objects (shape, body colour, front colour): hues far apart, no two alike.
FRONTED: tuple[tuple[str, str, str], ...] = (
    ("cube", "blue", "red"),
    ("cylinder", "green", "purple"),
    ("sphere", "purple", "yellow"),
    ("cone", "yellow", "blue"),
)


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    front: str | None = None  # the front's colour (world v2), or None: one colour all round

    @property
    def prompt(self) -> str:
        base = f"a {self.color} {self.shape}"
        return base if self.front is None else f"{base} with a {self.front} front"

    @property
    def albedo(self) -> tuple[float, float, float]:
        """The body's albedo (the front's is COLORS[front])."""
        return COLORS[self.color]

    def albedo_at(self, points: torch.Tensor) -> torch.Tensor:
        """Albedo [..., 3] of surface points [..., 3]: the front's colour on the front wedge."""
        body = torch.tensor(self.albedo, dtype=points.dtype, device=points.device).expand_as(points)
        if self.front is None:
            return body
        front = torch.tensor(COLORS[self.front], dtype=points.dtype, device=points.device).expand_as(points)
        return torch.where(in_front(points)[..., None], front, body)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return shape_sdf(self.shape, points)


def all_objects() -> list[WorldObject]:
    """The 30 objects of one colour (what the built-in prior was trained on)."""
    return [WorldObject(shape, color) for color in COLORS for shape in SHAPES]


def fronted_objects() -> list[WorldObject]:
    """World v2's objects with a front of another colour."""
    return [WorldObject(shape, color, front) for shape, color, front in FRONTED]


def in_front(points: torch.Tensor) -> torch.Tensor:
    """[...] whether points [..., 3] lie in the front wedge (|azimuth| < FRONT_HALF_WIDTH_DEG)."""
    azimuth = torch.rad2deg(torch.atan2(points[..., 1], points[..., 0]))
    return azimuth.abs() < FRONT_HALF_WIDTH_DEG


_PROMPT_RE = re.compile(
    r"^\s*an?\s+(\w+)\s+(\w+)(?:\s+with\s+an?\s+(\w+)\s+front)?\s*(?:,.*)?$", re.IGNORECASE
)


def parse_prompt(prompt: str) -> WorldObject | None:
    """The world object a prompt names ("a blue torus", "a blue cube with a red front"), optionally
    with a view suffix (", side view")."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        return None
    color, shape = m.group(1).lower(), m.group(2).lower()
    front = m.group(3).lower() if m.group(3) else None
    if (
        shape not in SHAPES
        or color not in COLORS
        or (front is not None and (front not in COLORS or front == color))
    ):
        return None
    return WorldObject(shape, color, front)


def shape_sdf(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Exact signed distance [...] of points [..., 3] to the shape (negative inside)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    if shape == "sphere":
        return p.norm(dim=-1) - SPHERE_RADIUS
    if shape == "cube":
        q = p.abs() - CUBE_HALF_EXTENT
        return q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0)
    if shape == "cylinder":
        d = torch.stack([torch.hypot(x, y) - CYLINDER_RADIUS, z.abs() - CYLINDER_HALF_HEIGHT], dim=-1)
        return d.amax(dim=-1).clamp_max(0) + d.clamp_min(0).norm(dim=-1)
    if shape == "cone":
        return _capped_cone_sdf(torch.hypot(x, y), z, CONE_HALF_HEIGHT, CONE_BASE_RADIUS, 0.0)
    if shape == "torus":
        return torch.hypot(torch.hypot(x, y) - TORUS_MAJOR, z) - TORUS_MINOR
    raise ValueError(f"unknown shape {shape!r}")


def _capped_cone_sdf(q_x: torch.Tensor, q_y: torch.Tensor, h: float, r1: float, r2: float) -> torch.Tensor:
    """iq's sdCappedCone in the (radial, axial) plane: base radius r1 at −h, top radius r2 at +h."""
    k1 = torch.tensor([r2, h], dtype=q_x.dtype, device=q_x.device)
    k2 = torch.tensor([r2 - r1, 2 * h], dtype=q_x.dtype, device=q_x.device)
    ca_x = q_x - torch.minimum(q_x, torch.where(q_y < 0, torch.full_like(q_x, r1), torch.full_like(q_x, r2)))
    ca_y = q_y.abs() - h
    q = torch.stack([q_x, q_y], dim=-1)
    t = (((k1 - q) * k2).sum(-1) / (k2 * k2).sum()).clamp(0.0, 1.0)
    cb = q - k1 + k2 * t[..., None]
    s = torch.where((cb[..., 0] < 0) & (ca_y < 0), -1.0, 1.0)
    d2 = torch.minimum(ca_x**2 + ca_y**2, (cb**2).sum(-1))
    return s * d2.sqrt()


def ground_truth_mesh(shape: str):
    """The exact primitive as a trimesh.Trimesh (world units, +Z up)."""
    import trimesh

    if shape == "sphere":
        return trimesh.creation.icosphere(subdivisions=4, radius=SPHERE_RADIUS)
    if shape == "cube":
        return trimesh.creation.box(extents=[2 * CUBE_HALF_EXTENT] * 3)
    if shape == "cylinder":
        return trimesh.creation.cylinder(radius=CYLINDER_RADIUS, height=2 * CYLINDER_HALF_HEIGHT, sections=64)
    if shape == "cone":
        mesh = trimesh.creation.cone(radius=CONE_BASE_RADIUS, height=2 * CONE_HALF_HEIGHT, sections=64)
        mesh.apply_translation([0, 0, -CONE_HALF_HEIGHT])
        return mesh
    if shape == "torus":
        return trimesh.creation.torus(
            major_radius=TORUS_MAJOR, minor_radius=TORUS_MINOR, major_sections=64, minor_sections=32
        )
    raise ValueError(f"unknown shape {shape!r}")


def occupancy_grid(shape: str, resolution: int, bound: float = 1.0) -> np.ndarray:
    """Boolean [R, R, R] occupancy (index order x, y, z) at voxel centres of [−bound, bound]³."""
    centres = voxel_centres(resolution, bound)
    return (shape_sdf(shape, centres.reshape(-1, 3)) < 0).reshape(resolution, resolution, resolution).numpy()


def voxel_centres(resolution: int, bound: float = 1.0) -> torch.Tensor:
    """[R, R, R, 3] world positions of the voxel centres of [−bound, bound]³ (index order x, y, z)."""
    c = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 * bound - bound
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1)
