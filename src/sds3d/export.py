"""From a trained NeRF to files a person can open: a mesh (glb/ply/obj) and a turntable.

Mesh extraction. The density is sampled on a grid over the scene cube and meshed by marching
cubes (scikit-image). The iso-level is chosen from what the cameras actually see. A ring of views
is rendered; S_r = {rays with opacity > 0.5} is the rendered silhouette, and for a level ℓ,
S_ℓ = {rays whose largest sampled density exceeds ℓ} is the silhouette of the level set. ℓ is the
candidate with the largest IoU(S_ℓ, S_r); the candidates are a geometric ladder and the median
density at which opaque rays pass opacity 0.5 (where they "hit" the surface). Low-density haze
never makes a pixel opaque by itself, so levels low enough to include it widen S_ℓ and lose; only
the largest connected component of {τ > ℓ} is kept, which drops floaters. An empty scene is an
error, never a silent empty file.

Axes. The world is +Z up. glTF is +Y up (glTF 2.0 §3.4), so `mesh.glb` and `mesh.obj` (read as
+Y up by Blender and most viewers) are rotated by −90° about X: (x, y, z) → (x, z, −y).
`mesh.ply` stays in world coordinates (+Z up), for analysis against the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sds3d.cameras import orbit_cameras, turntable_cameras
from sds3d.errors import UserError
from sds3d.render.volume import INFERENCE_CHUNK, Shading, render
from sds3d.representations.nerf import Background, HashGridNeRF

# (x, y, z) +Z up → (x, z, −y) +Y up.
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
OPAQUE = 0.5  # a pixel counts as seen when its opacity exceeds this
# The iso-level views alternate high and low so that tops and bottoms are both seen.
ISO_HIGH_ELEVATION_DEG, ISO_LOW_ELEVATION_DEG = 70.0, -5.0


@dataclass
class ExportConfig:
    grid_resolution: int = 96
    iso_views: int = 8
    iso_view_resolution: int = 64
    iso_candidates: int = 64
    keep_largest_component: bool = True
    turntable_frames: int = 24
    turntable_resolution: int = 96
    turntable_elevation_deg: float = 20.0
    view_radius: float = 2.5
    view_fovy_deg: float = 40.0
    num_samples: int = 64


class EmptySceneError(UserError):
    """The NeRF has no surface any camera sees: nothing to export."""


@dataclass
class MeshOutput:
    vertices: np.ndarray  # [V, 3] world units, +Z up
    faces: np.ndarray  # [F, 3]
    colors: np.ndarray  # [V, 3] uint8 albedo
    iso_level: float
    silhouette_iou: float  # agreement of the mesh's silhouettes with the rendered opacity


@torch.no_grad()
def density_grid(nerf: HashGridNeRF, resolution: int, chunk: int = INFERENCE_CHUNK) -> np.ndarray:
    """Density [R, R, R] (index order x, y, z) at the grid corners linspace(−bound, bound, R)."""
    b = nerf.config.bound
    c = torch.linspace(-b, b, resolution)
    pts = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1).reshape(-1, 3)
    dev = next(nerf.parameters()).device
    out = torch.cat([nerf.density(pts[i : i + chunk].to(dev)).cpu() for i in range(0, pts.shape[0], chunk)])
    return out.reshape(resolution, resolution, resolution).numpy()


@torch.no_grad()
def choose_iso_level(nerf: HashGridNeRF, background: Background, config: ExportConfig) -> tuple[float, float]:
    """The density at which the cameras' rays become opaque (module docstring). → (ℓ, silhouette IoU)."""
    n, res = config.iso_views, config.iso_view_resolution
    azimuth = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    elevation = torch.tensor([ISO_HIGH_ELEVATION_DEG, ISO_LOW_ELEVATION_DEG]).repeat((n + 1) // 2)[:n]
    full = lambda v: torch.full((n,), float(v))
    cams = orbit_cameras(elevation, azimuth, full(config.view_radius), full(config.view_fovy_deg), res, res)
    dev = next(nerf.parameters()).device
    out = render(nerf, background, cams.to(dev), config.num_samples, random_background=False)
    opacity = out.opacity.flatten().cpu()
    seen = opacity > OPAQUE
    if not bool(seen.any()):
        raise EmptySceneError(
            f"the scene is empty: no pixel of {n} views reaches opacity {OPAQUE} "
            f"(largest {opacity.max().item():.3f}); nothing to export"
        )
    weights, density = out.weights.cpu()[seen], out.sample_density.cpu()[seen]
    # The first sample at which each opaque ray's accumulated opacity passes one half.
    crossing = (weights.cumsum(dim=1) >= OPAQUE).float().argmax(dim=1)
    hit_level = float(density.gather(1, crossing[:, None]).median())
    ray_max = out.sample_density.amax(dim=1).cpu()
    lo, hi = max(hit_level / 100, 1e-3), max(float(ray_max[seen].max()), hit_level * 1.01)
    best, best_iou = hit_level, -1.0
    for level in [hit_level, *np.geomspace(lo, hi, config.iso_candidates).tolist()]:
        pred = ray_max > level
        iou = float((pred & seen).sum()) / max(float((pred | seen).sum()), 1.0)
        if iou > best_iou + 1e-9:
            best, best_iou = float(level), iou
    return best, best_iou


def axis_visibility(grid: np.ndarray, spacing: float) -> np.ndarray:
    """The largest transmittance [R, R, R] from outside the grid to each voxel along the six axis
    directions, exp(−Σ τ·δ) over the voxels in front of it (its own excluded)."""
    depth = grid.astype(np.float64) * spacing
    best = np.zeros_like(depth)
    for axis in range(3):
        forward = np.cumsum(depth, axis=axis) - depth
        backward = np.flip(np.cumsum(np.flip(depth, axis), axis=axis), axis) - depth
        best = np.maximum(best, np.exp(-np.minimum(forward, backward)))
    return best


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


@torch.no_grad()
def extract_mesh(nerf: HashGridNeRF, background: Background, config: ExportConfig) -> MeshOutput:
    from skimage.measure import marching_cubes

    level, sil_iou = choose_iso_level(nerf, background, config)
    grid = density_grid(nerf, config.grid_resolution)
    above = grid > level
    # Cameras never see inside an object, and training leaves its inside as it likes: often a
    # dense shell over low-density pockets. Voxels hidden from all six axis directions count as
    # solid, so the mesh is one closed surface and not a shell around hidden cavities.
    spacing = 2 * nerf.config.bound / (config.grid_resolution - 1)
    solid = above | (axis_visibility(grid, spacing) < OPAQUE)
    if config.keep_largest_component:
        solid = largest_component(solid)
    solid = ndimage.binary_fill_holes(solid)
    if not (solid & above).any():
        raise EmptySceneError(f"no density above the chosen iso-level {level:.3g}; nothing to export")
    field = grid.copy()
    field[solid & ~above] = 2 * level
    field[~solid] = np.minimum(field[~solid], 0.5 * level)  # discarded components
    field = np.pad(field, 1, constant_values=0.0)  # empty space all round closes every surface
    verts, faces, _, _ = marching_cubes(field, level=level)
    b, r = nerf.config.bound, config.grid_resolution
    verts = (verts - 1) * (2 * b / (r - 1)) - b
    dev = next(nerf.parameters()).device
    albedo = nerf(torch.from_numpy(verts).float().to(dev)).albedo.cpu().numpy()
    colors = np.clip(albedo * 255 + 0.5, 0, 255).astype(np.uint8)
    faces = faces.astype(np.int64)
    if _signed_volume(verts, faces) < 0:
        faces = faces[:, ::-1].copy()
    return MeshOutput(verts.astype(np.float32), faces, colors, level, sil_iou)


def _signed_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def write_mesh(mesh: MeshOutput, out_dir: Path) -> dict[str, Path]:
    """mesh.ply (+Z up, world), mesh.glb and mesh.obj (+Y up). Vertex colours in all three."""
    import trimesh

    rgba = np.concatenate([mesh.colors, np.full((len(mesh.colors), 1), 255, np.uint8)], axis=1)
    world = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=rgba, process=False)
    y_up = trimesh.Trimesh(mesh.vertices @ Z_UP_TO_Y_UP.T, mesh.faces, vertex_colors=rgba, process=False)
    paths = {"ply": out_dir / "mesh.ply", "glb": out_dir / "mesh.glb", "obj": out_dir / "mesh.obj"}
    world.export(paths["ply"])
    y_up.export(paths["glb"])
    y_up.export(paths["obj"])
    return paths


@torch.no_grad()
def render_turntable(
    nerf: HashGridNeRF, background: Background, config: ExportConfig, shading: Shading = "albedo"
) -> np.ndarray:
    """[N, H, W, 3] uint8 frames of a fixed orbit (starting at the front, azimuth 0°)."""
    res = config.turntable_resolution
    cams = turntable_cameras(config.turntable_frames, config.turntable_elevation_deg, config.view_radius,
                             config.view_fovy_deg, res, res)  # fmt: skip
    dev = next(nerf.parameters()).device
    frames = []
    for i in range(len(cams)):
        cam = cams[i].to(dev)
        lights = cam.position * 1.5 if shading != "albedo" else None
        out = render(nerf, background, cam, config.num_samples, shading=shading, light_positions=lights,
                     random_background=False)  # fmt: skip
        frames.append((out.rgb[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
    return np.stack(frames)


def write_turntable(frames: np.ndarray, out_dir: Path, fps: int = 12) -> list[Path]:
    """turntable.gif, and turntable.mp4 when imageio-ffmpeg is installed."""
    import imageio.v2 as imageio

    paths = [out_dir / "turntable.gif"]
    imageio.mimsave(paths[0], list(frames), duration=1.0 / fps, loop=0)
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return paths
    paths.append(out_dir / "turntable.mp4")
    imageio.mimsave(paths[1], list(frames), fps=fps, macro_block_size=1)
    return paths
