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
from tqdm.auto import tqdm

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
    # turntable.gif/.mp4: the exported mesh (what the user downloads), rasterised (render/mesh.py).
    turntable_frames: int = 24
    turntable_resolution: int = 256
    turntable_supersample: int = 2  # rendered at 2x and averaged down: smooth edges
    turntable_elevation_deg: float = 25.0  # shows the top (a torus' hole) and the sides
    turntable_lit: bool = True  # lambertian, a light above the camera; False: the albedo alone
    turntable_ambient: float = 0.35
    turntable_fps: int = 12
    turntable_fill: float = 0.8  # the mesh's bounding sphere spans this fraction of the frame's height
    # `sds3d render`: turntables of the NeRF itself (volume rendering: slower, so smaller).
    nerf_turntable_resolution: int = 96
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
    silhouette_iou: float | None  # agreement of the mesh's silhouettes with the rendered opacity (NeRF only)


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


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """The sRGB transfer function inverted (IEC 61966-2-1), for c in [0, 1]."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Smooth unit normals [V, 3] (trimesh's, weighted by the faces' angles); +Y where undefined."""
    import trimesh

    n = np.array(trimesh.Trimesh(vertices, faces, process=False).vertex_normals, dtype=np.float64)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    ok = np.isfinite(norm[:, 0]) & (norm[:, 0] > 1e-8)
    n[ok] /= norm[ok]
    n[~ok] = (0.0, 1.0, 0.0)
    return n.astype(np.float32)


# glTF 2.0 constants (§5): component types, buffer targets, and the GLB container.
_FLOAT, _UINT = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_GLB_MAGIC, _GLB_JSON, _GLB_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942
# A matte, non-metallic material that shows the vertex colours (glTF multiplies baseColor by COLOR_0);
# without one, viewers fall back to their defaults (Blender: grey; model-viewer: metallic).
MATERIAL = {
    "name": "sds3d-vertex-colour",
    "pbrMetallicRoughness": {
        "baseColorFactor": [1.0, 1.0, 1.0, 1.0],
        "metallicFactor": 0.0,
        "roughnessFactor": 0.9,
    },
}


def write_glb(path: Path, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> Path:
    """A glTF 2.0 binary: POSITION, smooth NORMAL, COLOR_0 (linear, as glTF defines it; `colors` are
    sRGB uint8), uint32 indices and one matte PBR material. `vertices` are already +Y up."""
    import json
    import struct

    positions = np.ascontiguousarray(vertices, dtype=np.float32)
    arrays = [
        positions,
        vertex_normals(positions, faces),
        srgb_to_linear(colors[:, :3] / 255.0).astype(np.float32),
        np.ascontiguousarray(faces, dtype=np.uint32).reshape(-1),
    ]
    views, accessors, blob = [], [], b""
    for i, array in enumerate(arrays):
        data = array.tobytes()
        views.append({"buffer": 0, "byteOffset": len(blob), "byteLength": len(data),
                      "target": _ELEMENT_ARRAY_BUFFER if i == 3 else _ARRAY_BUFFER})  # fmt: skip
        blob += data + b"\0" * (-len(data) % 4)
        accessor: dict = {"bufferView": i, "byteOffset": 0}
        if i == 3:
            accessor |= {"componentType": _UINT, "count": int(array.size), "type": "SCALAR"}
        else:
            accessor |= {"componentType": _FLOAT, "count": int(len(array)), "type": "VEC3"}
        if i == 0:  # POSITION must carry its bounds (§3.7.2.1)
            accessor |= {"min": positions.min(0).tolist(), "max": positions.max(0).tolist()}
        accessors.append(accessor)
    gltf = {
        "asset": {"version": "2.0", "generator": "sds3d"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": "sds3d"}],
        "meshes": [{"name": "sds3d", "primitives": [
            {"attributes": {"POSITION": 0, "NORMAL": 1, "COLOR_0": 2}, "indices": 3, "material": 0, "mode": 4}
        ]}],
        "materials": [MATERIAL], "accessors": accessors, "bufferViews": views,
        "buffers": [{"byteLength": len(blob)}],
    }  # fmt: skip
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    chunks = struct.pack("<II", len(text), _GLB_JSON) + text + struct.pack("<II", len(blob), _GLB_BIN) + blob
    path.write_bytes(struct.pack("<III", _GLB_MAGIC, 2, 12 + len(chunks)) + chunks)
    return path


MTL = """# sds3d: a matte material; the colour is in the vertices (v x y z r g b)
newmtl sds3d-vertex-colour
Ka 0 0 0
Kd 1 1 1
Ks 0 0 0
Ns 10
d 1
illum 1
"""


def write_mesh(mesh: MeshOutput, out_dir: Path) -> dict[str, Path]:
    """mesh.ply (+Z up, world), mesh.glb and mesh.obj + mesh.mtl (+Y up). Vertex colours in all."""
    import trimesh
    from trimesh.exchange.obj import export_obj

    rgba = np.concatenate([mesh.colors, np.full((len(mesh.colors), 1), 255, np.uint8)], axis=1)
    world = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=rgba, process=False)
    y_up_vertices = mesh.vertices @ Z_UP_TO_Y_UP.T
    y_up = trimesh.Trimesh(y_up_vertices, mesh.faces, vertex_colors=rgba, process=False)
    paths = {"ply": out_dir / "mesh.ply", "glb": out_dir / "mesh.glb", "obj": out_dir / "mesh.obj",
             "mtl": out_dir / "mesh.mtl"}  # fmt: skip
    world.export(paths["ply"])
    write_glb(paths["glb"], y_up_vertices, mesh.faces, mesh.colors)
    obj = export_obj(y_up, include_normals=True, include_color=True, header=None)
    paths["obj"].write_text(
        f"# sds3d mesh, +Y up\nmtllib {paths['mtl'].name}\nusemtl sds3d-vertex-colour\n{obj}"
    )
    paths["mtl"].write_text(MTL)
    return paths


# The turntable's light: beyond the camera and raised above it (world +Z), so tops read bright.
TURNTABLE_LIGHT_OFFSET = (0.0, 0.0, 2.0)


def _turntable_lights(cameras) -> torch.Tensor:  # [B, 3]
    return cameras.position * 1.2 + torch.tensor(TURNTABLE_LIGHT_OFFSET, device=cameras.position.device)


def framing_fovy_deg(vertices: np.ndarray, config: ExportConfig) -> float:
    """The field of view at which the mesh's bounding sphere about the origin (where objects sit)
    spans `turntable_fill` of the frame: tan(fovy/2) = tan(asin(r/d))/fill."""
    r = min(float(np.linalg.norm(vertices, axis=1).max()), 0.99 * config.view_radius)
    half = np.arctan(np.tan(np.arcsin(r / config.view_radius)) / config.turntable_fill)
    return float(np.degrees(2 * half))


@torch.no_grad()
def render_mesh_turntable(mesh: MeshOutput, config: ExportConfig) -> np.ndarray:
    """[N, R, R, 3] uint8 frames of the mesh on a fixed orbit (from the front, azimuth 0°), lit."""
    from sds3d.render.mesh import rasterize_mesh

    s, res = config.turntable_supersample, config.turntable_resolution
    cams = turntable_cameras(config.turntable_frames, config.turntable_elevation_deg, config.view_radius,
                             framing_fovy_deg(mesh.vertices, config), res * s, res * s)  # fmt: skip
    out = rasterize_mesh(
        torch.from_numpy(mesh.vertices).float(), torch.from_numpy(mesh.faces).long(),
        torch.from_numpy(mesh.colors[:, :3] / 255.0).float(),
        torch.from_numpy(vertex_normals(mesh.vertices, mesh.faces)), cams,
        light_positions=_turntable_lights(cams) if config.turntable_lit else None, ambient=config.turntable_ambient,
    )  # fmt: skip
    rgb = torch.nn.functional.avg_pool2d(out.rgb, s) if s > 1 else out.rgb
    return (rgb.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def render_turntable(
    nerf: HashGridNeRF,
    background: Background,
    config: ExportConfig,
    shading: Shading = "albedo",
    progress: bool = False,
) -> np.ndarray:
    """[N, H, W, 3] uint8 volume renders of the NeRF on a fixed orbit (from the front, azimuth 0°),
    shaded as `shading` (lit shadings use the mesh turntable's light)."""
    res = config.nerf_turntable_resolution
    cams = turntable_cameras(config.turntable_frames, config.turntable_elevation_deg, config.view_radius,
                             config.view_fovy_deg, res, res)  # fmt: skip
    dev = next(nerf.parameters()).device
    frames = []
    for i in tqdm(
        range(len(cams)), desc=f"render {shading}", unit="frame", disable=not progress, leave=False
    ):
        cam = cams[i].to(dev)
        lights = _turntable_lights(cam) if shading != "albedo" else None
        out = render(nerf, background, cam, config.num_samples, shading=shading, light_positions=lights,
                     ambient=config.turntable_ambient, random_background=False)  # fmt: skip
        frames.append((out.rgb[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
    return np.stack(frames)


def write_turntable(frames: np.ndarray, out_dir: Path, fps: int = 12) -> list[Path]:
    """turntable.gif (looping, 1/fps s a frame), and turntable.mp4 when imageio-ffmpeg is installed."""
    import imageio.v2 as imageio
    import imageio.v3 as iio

    paths = [out_dir / "turntable.gif"]
    # Pillow's GIF writer takes `duration` in milliseconds (imageio.v2's mimsave once took seconds).
    iio.imwrite(paths[0], frames, extension=".gif", duration=round(1000 / fps), loop=0)
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return paths
    paths.append(out_dir / "turntable.mp4")
    imageio.mimsave(paths[1], list(frames), fps=fps, macro_block_size=1)
    return paths
