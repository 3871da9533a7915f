"""A triangle mesh as a representation: the refinement stage after a NeRF or Gaussians (Magic3D's
second stage, DreamGaussian's mesh stage), trained by SDS through render/mesh.py's differentiable
rasteriser (plain PyTorch: no nvdiffrast).

The run starts from the mesh that a finished run exports (`MeshRefineConfig.from_previous`, a run
folder: the same marching cubes as `sds3d export`). Parameters: `offsets` [V, 3] added to the
starting vertices, and `color_logits` [V, 3] (albedo = sigmoid), from the mesh's vertex colours.
Faces stay as they are. Regularisers, each a float or a Ramp:
- `laplacian`: mean ‖L·offsets‖² with the uniform graph Laplacian (Lv)_i = v_i − mean of i's
  neighbours. On the offsets, not the positions: a smooth *change*, so a cube's sharp edges are
  not rounded off as a Laplacian of the positions would (Nealen et al. 2006, "Laplacian mesh
  optimization"; threestudio's mesh stage penalises the positions');
- `normal_consistency`: mean 1 − cos between the normals of faces that share an edge (PyTorch3D's
  `mesh_normal_consistency`);
- `offset`: mean ‖offset‖², a leash to the starting surface;
- `color_laplacian`: mean ‖L·albedo‖²: neighbouring vertices keep similar colours (Adam moves every
  vertex's colour by about its learning rate whatever the size of its noisy SDS gradient, which
  otherwise leaves speckle on meshes of sub-pixel triangles).
Only the colours and the lit shading see the vertex positions (see render/mesh.py), so geometry
moves little; what the stage mostly sharpens is colour, which a NeRF's marching-cubes vertices
sample from a blurred field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sds3d.cameras import Cameras, turntable_cameras
from sds3d.errors import UserError
from sds3d.ramp import Scheduled, value_at
from sds3d.render.mesh import render_mesh
from sds3d.render.volume import RenderOutput, Shading
from sds3d.representations.base import Representation

if TYPE_CHECKING:
    from sds3d.config import OptimConfig
    from sds3d.export import ExportConfig, MeshOutput


@dataclass
class MeshRefineConfig:
    from_previous: str = ""  # the run folder whose exported mesh this stage starts from
    # tuned on a cube and a torus of the default preset (benchmarks/quality_refine.md): faster vertices
    # roughen the surface, slower colours change nothing in 200 steps
    lr_vertices: float = 0.0002  # world units (the scene is [−1, 1]³)
    lr_colors: float = 0.02
    laplacian: Scheduled = 10.0
    normal_consistency: Scheduled = 0.01
    offset: Scheduled = 0.0
    color_laplacian: Scheduled = 1.0
    supersample: int = 2  # render at k× and average-pool: antialiased edges
    edge_softness: float = (
        0.3  # pixels of the supersampled render: silhouettes with a gradient (render/mesh.py)
    )
    ambient: float = 0.1

    def build(self, background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> MeshScene:
        return MeshScene(self, background)


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-3, 1 - 1e-3)
    return torch.log(p / (1 - p))


class MeshScene(Representation):
    faces: torch.Tensor  # [F, 3] long (a buffer)
    base_vertices: torch.Tensor  # [V, 3] the starting positions (a buffer)
    edges: torch.Tensor  # [E, 2] unique undirected edges (a buffer)
    face_pairs: torch.Tensor  # [P, 2] faces that share an edge (a buffer)
    background: torch.Tensor  # [3]

    def __init__(self, config: MeshRefineConfig, background: tuple[float, float, float] = (1.0, 1.0, 1.0)):
        super().__init__()
        self.config = config
        self.offsets = nn.Parameter(torch.zeros(0, 3))
        self.color_logits = nn.Parameter(torch.zeros(0, 3))
        for name, shape, dtype in (("faces", (0, 3), torch.long), ("base_vertices", (0, 3), torch.float32),
                                   ("edges", (0, 2), torch.long), ("face_pairs", (0, 2), torch.long)):  # fmt: skip
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self.register_buffer("background", torch.tensor(background, dtype=torch.float32))

    # --- the starting mesh ----------------------------------------------------------------------
    @torch.no_grad()
    def set_mesh(self, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> None:
        """Start from a mesh (colours uint8 [V, 3] or floats in [0, 1]); in place, so an optimiser
        built on the parameters keeps them."""
        dev = self.background.device
        v = torch.as_tensor(np.asarray(vertices, dtype=np.float32), device=dev)
        f = torch.as_tensor(np.asarray(faces, dtype=np.int64), device=dev)
        c = torch.as_tensor(np.asarray(colors), device=dev).float()
        c = c / 255.0 if np.asarray(colors).dtype == np.uint8 else c
        self.base_vertices, self.faces = v, f
        self.offsets.data = torch.zeros_like(v)
        self.color_logits.data = _logit(c)
        self.edges, self.face_pairs = _adjacency(f)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        """A checkpoint holds its own mesh: take its sizes (in place for the parameters), then load."""
        for name in ("offsets", "color_logits", "faces", "base_vertices", "edges", "face_pairs"):
            key, target = prefix + name, getattr(self, name)
            if key in state_dict and state_dict[key].shape != target.shape:
                new = state_dict[key].new_zeros(state_dict[key].shape).to(target.device)
                if isinstance(target, nn.Parameter):
                    target.data = new
                else:
                    setattr(self, name, new)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __len__(self) -> int:
        return self.base_vertices.shape[0]

    @property
    def vertices(self) -> torch.Tensor:  # [V, 3]
        return self.base_vertices + self.offsets

    @property
    def albedo(self) -> torch.Tensor:  # [V, 3]
        return torch.sigmoid(self.color_logits)

    # --- the seam -------------------------------------------------------------------------------
    def render(self, cameras: Cameras, shading: Shading = "albedo", **options: Any) -> RenderOutput:
        if options.get("latent"):
            raise UserError("a mesh renders RGB only (no latent stages)")
        if len(self) == 0:
            raise UserError("the mesh stage has no mesh yet (start it from a finished run: from_previous)")
        background = options.get("solid_background")
        bg = self.background if background is None else torch.tensor(background).to(self.background)
        out = render_mesh(self.vertices, self.faces, self.albedo, cameras, shading, options.get("light_positions"),
                          self.config.ambient, bg, self.config.supersample, self.config.edge_softness)  # fmt: skip
        empty = out.rgb.new_zeros(0, 0)
        depth = torch.where(torch.isfinite(out.depth), out.depth, torch.zeros_like(out.depth))
        return RenderOutput(rgb=out.rgb, opacity=out.mask.float(), depth=depth, normal=None, weights=empty,
                            sample_normals=None, ray_dirs=empty, sample_density=empty)  # fmt: skip

    def render_train(
        self,
        cameras: Cameras,
        shading: Shading,
        light_positions: torch.Tensor | None,
        step_ratio: float,
        generator: torch.Generator | None,
        latent: bool = False,
    ) -> RenderOutput:
        return self.render(cameras, shading, latent=latent, light_positions=light_positions)

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        c = self.config
        return [
            {"params": [self.offsets], "lr": c.lr_vertices, "name": "offsets"},
            {"params": [self.color_logits], "lr": c.lr_colors, "name": "color_logits"},
        ]

    def regularizers(self, out: RenderOutput, step_ratio: float) -> dict[str, torch.Tensor]:
        c, terms = self.config, {}
        if (w := value_at(c.laplacian, step_ratio)) > 0:
            terms["laplacian"] = w * uniform_laplacian(self.offsets, self.edges).square().sum(-1).mean()
        if (w := value_at(c.normal_consistency, step_ratio)) > 0:
            terms["normal_consistency"] = w * normal_consistency(self.vertices, self.faces, self.face_pairs)
        if (w := value_at(c.color_laplacian, step_ratio)) > 0:
            terms["color_laplacian"] = w * uniform_laplacian(self.albedo, self.edges).square().sum(-1).mean()
        if (w := value_at(c.offset, step_ratio)) > 0:
            terms["offset"] = w * self.offsets.square().sum(-1).mean()
        return terms

    # --- outputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def to_mesh(self, config: ExportConfig) -> MeshOutput:
        from sds3d.export import MeshOutput

        verts = self.vertices.float().cpu().numpy()
        colors = np.clip(self.albedo.float().cpu().numpy() * 255 + 0.5, 0, 255).astype(np.uint8)
        return MeshOutput(verts, self.faces.cpu().numpy(), colors, 0.0, None)

    def render_turntable(self, config: ExportConfig, shading: Shading, progress: bool = False) -> np.ndarray:
        from sds3d.export import _turntable_lights

        res = config.nerf_turntable_resolution
        cams = turntable_cameras(config.turntable_frames, config.turntable_elevation_deg, config.view_radius,
                                 config.view_fovy_deg, res, res)  # fmt: skip
        lights = _turntable_lights(cams).to(self.base_vertices.device) if shading != "albedo" else None
        with torch.no_grad():
            frames = [
                self.render(cams[i : i + 1].to(self.base_vertices.device), shading,
                            light_positions=None if lights is None else lights[i : i + 1]).rgb
                for i in range(len(cams))
            ]  # fmt: skip
        rgb = torch.cat(frames).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return (rgb * 255 + 0.5).astype(np.uint8)


# --- mesh regularisers (pure functions) -----------------------------------------------------------
def _adjacency(faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique undirected edges [E, 2] and the pairs of faces [P, 2] that share an edge."""
    if len(faces) == 0:
        return faces.new_zeros(0, 2), faces.new_zeros(0, 2)
    half = torch.cat(
        [faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]
    )  # [3F, 2], face i at i, F+i, 2F+i
    sorted_edges = half.sort(dim=1).values
    edges, inverse = torch.unique(sorted_edges, dim=0, return_inverse=True)
    face_of = torch.arange(len(faces), device=faces.device).repeat(3)
    order = torch.argsort(inverse, stable=True)
    inv, fo = inverse[order], face_of[order]
    same = inv[1:] == inv[:-1]  # consecutive half-edges of one edge (manifold: two per edge)
    pairs = torch.stack([fo[:-1][same], fo[1:][same]], -1)
    return edges, pairs


def uniform_laplacian(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(L x)_i = x_i − mean of x over i's neighbours, [V, C]; isolated vertices give 0."""
    i, j = edges[:, 0], edges[:, 1]
    total = torch.zeros_like(values).index_add(0, i, values[j]).index_add(0, j, values[i])
    count = torch.zeros(len(values), device=values.device).index_add(
        0, torch.cat([i, j]), torch.ones(2 * len(edges), device=values.device)
    )
    mean = total / count.clamp_min(1)[:, None]
    return torch.where(count[:, None] > 0, values - mean, torch.zeros_like(values))


def normal_consistency(vertices: torch.Tensor, faces: torch.Tensor, face_pairs: torch.Tensor) -> torch.Tensor:
    """Mean 1 − cos of the angle between the normals of adjacent faces (0 for a plane)."""
    if len(face_pairs) == 0:
        return vertices.new_zeros(())
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    n = nn.functional.normalize(torch.linalg.cross(v1 - v0, v2 - v0, dim=-1), dim=-1, eps=1e-12)
    return (1 - (n[face_pairs[:, 0]] * n[face_pairs[:, 1]]).sum(-1)).mean()


def load_previous_mesh(run_dir: Path | str) -> MeshOutput:
    """The mesh of a finished run folder (its last checkpoint, exported as `sds3d export` does)."""
    from sds3d.train import load_scene

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"from_previous {run_dir} is not a run folder")
    config, scene, _ = load_scene(run_dir, "cpu")
    return scene.to_mesh(config.export)
