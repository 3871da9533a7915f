"""3D Gaussians as one representation (DreamGaussian, Tang et al. 2023; 3DGS, Kerbl et al. 2023),
rendered by render/splat.py, densified and pruned on a schedule, meshed through a density grid.

Parameters, all [N, ·] and all optimised: `means` (world), `log_scales` (S = exp), `quats`
(w, x, y, z), `opacity_logits` (o = sigmoid) and `color_logits` (albedo = sigmoid). They start as
N points uniform in a ball with small isotropic scales and low opacity (DreamGaussian's random
init). Every `densify_every` steps in [densify_from, densify_until) of training, Gaussians whose
mean moved with a large average gradient are cloned (small ones) or split in two (large ones), and
nearly transparent or oversized ones are pruned; the optimiser's moments follow (`post_step`). 3DGS
averages the gradient of the *projected* mean; here it is the world mean's (no hook in the
renderer), so `grad_threshold` is on a different scale than the paper's 0.0002.

Only albedo shading: a Gaussian has no normal of its own (GaussianShader's shortest axis is a
later step), so `config.check_config` refuses lambertian and textureless shading, latent stages
and learned backgrounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from sds3d.cameras import Cameras, turntable_cameras
from sds3d.errors import UserError
from sds3d.ramp import Scheduled, value_at
from sds3d.render.splat import covariances, splat
from sds3d.render.volume import RenderOutput, Shading
from sds3d.representations.base import Representation

if TYPE_CHECKING:
    from sds3d.config import OptimConfig
    from sds3d.export import ExportConfig, MeshOutput

PARAMS = ("means", "log_scales", "quats", "opacity_logits", "color_logits")


@dataclass
class GaussiansConfig:
    num_init: int = 1000
    init_radius: float = 0.5  # the ball the first means are drawn in
    init_scale: float = 0.04
    init_opacity: float = 0.1
    bound: float = 1.0  # means are kept in [−bound, bound]³ (the NeRF's box, and the mesh grid's)
    # learning rates (DreamGaussian's: position 1e-3 → 2e-5 there, here constant)
    lr_means: float = 0.001
    lr_scales: float = 0.005
    lr_quats: float = 0.005
    lr_opacity: float = 0.05
    lr_color: float = 0.01
    # densify and prune
    densify_every: int = 50
    densify_from: float = 0.05  # fractions of training
    densify_until: float = 0.6
    grad_threshold: float = 0.002  # mean ‖∂L/∂μ‖ over the interval above which a Gaussian grows
    dense_scale: float = 0.02  # clone if the largest scale is below this, else split
    min_opacity: float = 0.01  # pruned below
    max_scale: float = 0.3  # pruned above
    max_gaussians: int = 2000
    # regularisers, each a float or a Ramp
    opacity_entropy: Scheduled = 0.0  # pushes each o to 0 or 1 (no haze)
    scale: Scheduled = 0.0  # mean largest scale (no needles across the scene)
    # the mesh: density Σ o_i exp(−½ dᵀΣ_i⁻¹d) on a grid, blurred, cut at this level (DreamGaussian
    # cuts the unblurred field at 1; 0.15 after a one-voxel blur closed a cube's surface: 0.92 IoU).
    # "relative": the level is a fraction of the blurred field's 90th percentile over voxels above
    # 0.05 (its interior density, which grows with the Gaussians' overlap): on the five quick
    # prompts and a second cube, 0.15 of it gave IoU 0.871 against 0.849 for the absolute 0.15,
    # the cubes 0.852 against 0.808 (their many overlapping Gaussians had inflated them).
    mesh_level: float = 0.15
    mesh_level_mode: Literal["absolute", "relative"] = "relative"
    mesh_blur_voxels: float = 1.0
    mesh_resolution: int = 64

    def build(self, background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> GaussianScene:
        return GaussianScene(self, background)


def _inverse_sigmoid(p: float) -> float:
    return math.log(p / (1 - p))


class GaussianScene(Representation):
    background: torch.Tensor  # [3], a buffer
    grad_sum: torch.Tensor  # [N], ‖∂L/∂μ‖ summed since the last densification (a buffer)
    steps_seen: torch.Tensor  # [], optimiser steps so far (a buffer: seeds the splits)

    def __init__(self, config: GaussiansConfig, background: tuple[float, float, float] = (1.0, 1.0, 1.0)):
        super().__init__()
        self.config = c = config
        n = c.num_init
        direction = nn.functional.normalize(torch.randn(n, 3), dim=-1)
        radius = c.init_radius * torch.rand(n, 1) ** (1 / 3)  # uniform in the ball
        self.means = nn.Parameter(direction * radius)
        self.log_scales = nn.Parameter(torch.full((n, 3), math.log(c.init_scale)))
        self.quats = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))
        self.opacity_logits = nn.Parameter(torch.full((n,), _inverse_sigmoid(c.init_opacity)))
        self.color_logits = nn.Parameter(torch.zeros(n, 3))
        self.register_buffer("background", torch.tensor(background, dtype=torch.float32))
        self.register_buffer("grad_sum", torch.zeros(n))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self._steps = 0

    def __len__(self) -> int:
        return self.means.shape[0]

    # --- what the renderer and the exporter read ------------------------------------------------
    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def albedo(self) -> torch.Tensor:
        return torch.sigmoid(self.color_logits)

    def covariances(self) -> torch.Tensor:
        return covariances(torch.exp(self.log_scales), self.quats)

    # --- the seam -----------------------------------------------------------------------------
    def render(self, cameras: Cameras, shading: Shading = "albedo", **options: Any) -> RenderOutput:
        if shading != "albedo" or options.get("latent"):
            raise UserError("Gaussians render albedo only (no lambertian or textureless shading, no latents)")
        background = options.get("solid_background")
        bg = self.background if background is None else torch.tensor(background).to(self.background)
        rgb, opacity, depth = splat(self.means, self.covariances(), self.albedo, self.opacities, cameras, bg)
        empty = rgb.new_zeros(0, 0)
        return RenderOutput(rgb=rgb, opacity=opacity, depth=depth, normal=None, weights=empty,
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
        return self.render(cameras, shading, latent=latent)

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        c = self.config
        lrs = (c.lr_means, c.lr_scales, c.lr_quats, c.lr_opacity, c.lr_color)
        return [
            {"params": [getattr(self, name)], "lr": lr, "name": name}
            for name, lr in zip(PARAMS, lrs, strict=True)
        ]

    def regularizers(self, out: RenderOutput, step_ratio: float) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if (w := value_at(self.config.opacity_entropy, step_ratio)) > 0:
            o = self.opacities.clamp(1e-5, 1 - 1e-5)
            terms["opacity_entropy"] = w * -(o * torch.log(o) + (1 - o) * torch.log(1 - o)).mean()
        if (w := value_at(self.config.scale, step_ratio)) > 0:
            terms["scale"] = w * torch.exp(self.log_scales).amax(dim=-1).mean()
        return terms

    @torch.no_grad()
    def post_step(self, step_ratio: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep means in the box; gather the gradient statistic; densify and prune on schedule."""
        c = self.config
        self.means.clamp_(-c.bound, c.bound)
        if self.means.grad is not None:
            self.grad_sum += self.means.grad.norm(dim=-1)
        self.steps_seen += 1
        self._steps += 1  # the host's count of steps_seen: no device sync in the training step
        if (
            optimizer is None
            or self._steps % c.densify_every
            or not c.densify_from <= step_ratio < c.densify_until
        ):
            return
        self.densify_and_prune(optimizer, self.grad_sum / c.densify_every)
        self.grad_sum = torch.zeros(len(self), device=self.means.device)

    @torch.no_grad()
    def densify_and_prune(self, optimizer: torch.optim.Optimizer, grad_mean: torch.Tensor) -> None:
        c = self.config
        largest = torch.exp(self.log_scales).amax(dim=-1)
        room = max(0, c.max_gaussians - len(self))
        grow = (grad_mean > c.grad_threshold).nonzero().flatten()
        grow = grow[torch.argsort(grad_mean[grow], descending=True)][:room]
        clone, split = grow[largest[grow] <= c.dense_scale], grow[largest[grow] > c.dense_scale]
        gen = torch.Generator().manual_seed(self._steps)
        new: dict[str, torch.Tensor] = {name: getattr(self, name)[clone] for name in PARAMS}
        if len(split):  # a large Gaussian becomes two, drawn from it, each 1/1.6 the size (3DGS)
            std = torch.exp(self.log_scales[split])
            offset = torch.randn(len(split), 3, generator=gen).to(std) * std
            rot = _rotation(self.quats[split])
            shifted = self.means[split] + (rot @ offset[..., None])[..., 0]
            self.means[split] = (self.means[split] * 2 - shifted).clamp(-c.bound, c.bound)  # the twin
            self.log_scales[split] -= math.log(1.6)
            for name in PARAMS:
                extra = shifted if name == "means" else getattr(self, name)[split]
                new[name] = torch.cat([new[name], extra])
        self._extend(optimizer, new)
        keep = (self.opacities >= c.min_opacity) & (torch.exp(self.log_scales).amax(dim=-1) <= c.max_scale)
        if not keep.all() and keep.any():
            self._keep(optimizer, keep)

    def _extend(self, optimizer: torch.optim.Optimizer, new: dict[str, torch.Tensor]) -> None:
        """Append Gaussians; their Adam moments start at zero."""
        for name in PARAMS:
            self._replace(optimizer, name, lambda x, name=name: torch.cat([x, x.new_zeros(new[name].shape)]),
                          torch.cat([getattr(self, name).data, new[name]]))  # fmt: skip
        self.grad_sum = torch.cat([self.grad_sum, self.grad_sum.new_zeros(len(new["means"]))])

    def _keep(self, optimizer: torch.optim.Optimizer, keep: torch.Tensor) -> None:
        for name in PARAMS:
            self._replace(optimizer, name, lambda x: x[keep], getattr(self, name).data[keep])
        self.grad_sum = self.grad_sum[keep]

    def _replace(self, optimizer: torch.optim.Optimizer, name: str, moments, data: torch.Tensor) -> None:
        """A new Parameter `name` holding `data`, put in the optimiser in place of the old one, whose
        Adam moments go through `moments` (3DGS's replace_tensor_to_optimizer). A new object, not a
        new `.data`: autograd keeps the old shape with the old parameter."""
        old, param = getattr(self, name), nn.Parameter(data)
        setattr(self, name, param)
        for group in optimizer.param_groups:
            group["params"] = [param if p is old else p for p in group["params"]]
        if old in optimizer.state:
            state = optimizer.state.pop(old)
            optimizer.state[param] = {k: v if k == "step" else moments(v) for k, v in state.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        """A checkpoint holds as many Gaussians as it had: resize to it (in place, so an optimiser
        built on these parameters still holds them), then load."""
        for name in (*PARAMS, "grad_sum"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                target = getattr(self, name)
                if isinstance(target, nn.Parameter):
                    target.data = state_dict[key].new_zeros(state_dict[key].shape).to(target.device)
                else:
                    setattr(self, name, state_dict[key].new_zeros(state_dict[key].shape).to(target.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "steps_seen" in state_dict:
            self._steps = int(state_dict[prefix + "steps_seen"])

    # --- outputs ------------------------------------------------------------------------------
    @torch.no_grad()
    def density_grid(self, resolution: int) -> tuple[np.ndarray, np.ndarray]:
        """Σ o_i exp(−½ dᵀΣ_i⁻¹d) [R, R, R] at the corners of linspace(−bound, bound, R) (index
        order x, y, z), and Σ o_i exp(…) albedo_i [R, R, R, 3]. Each Gaussian is added inside its
        own window of ±3 of its largest standard deviation (index_add, grouped by window size):
        the work is the Gaussians' footprints, not voxels × Gaussians."""
        b, r = self.config.bound, resolution
        voxel = 2 * b / (r - 1)
        dev = self.means.device
        dens = torch.zeros(r**3, device=dev)
        cols = torch.zeros(r**3, 3, device=dev)
        inv = torch.linalg.inv(self.covariances())
        o, albedo = self.opacities, self.albedo
        half = torch.ceil(3 * torch.exp(self.log_scales).amax(-1) / voxel).clamp(1, r).long()  # [N] voxels
        centre = torch.round((self.means + b) / voxel).long()
        for k in torch.unique(2 ** torch.ceil(torch.log2(half.float())).long()).tolist():
            group = (2 ** torch.ceil(torch.log2(half.float())).long() == k).nonzero().flatten()
            span = torch.arange(-k, k + 1, device=dev)
            offsets = torch.stack(torch.meshgrid(span, span, span, indexing="ij"), -1).view(-1, 3)  # [W, 3]
            for chunk in torch.split(group, max(1, 2**22 // len(offsets))):
                idx = centre[chunk, None] + offsets[None]  # [n, W, 3]
                inside = ((idx >= 0) & (idx < r)).all(-1)
                d = idx * voxel - b - self.means[chunk, None]
                w = o[chunk, None] * torch.exp(-0.5 * torch.einsum("nwi,nij,nwj->nw", d, inv[chunk], d))
                flat = (idx[..., 0] * r + idx[..., 1]) * r + idx[..., 2]
                dens.index_add_(0, flat[inside], w[inside])
                cols.index_add_(0, flat[inside], (w[..., None] * albedo[chunk, None])[inside])
        return dens.view(r, r, r).cpu().numpy(), cols.view(r, r, r, 3).cpu().numpy()

    def to_mesh(self, config: ExportConfig) -> MeshOutput:
        """Marching cubes of the density grid, blurred by `mesh_blur_voxels` (small Gaussians on a
        surface leave gaps between them) and cut at `mesh_level`; the largest component, its holes
        filled; vertex colours the density-weighted albedo around them."""
        from scipy import ndimage
        from skimage.measure import marching_cubes

        from sds3d.export import EmptySceneError, MeshOutput, _signed_volume, largest_component

        c, r = self.config, self.config.mesh_resolution
        density, colors = self.density_grid(r)
        if c.mesh_blur_voxels > 0:
            density = ndimage.gaussian_filter(density, c.mesh_blur_voxels)
            colors = np.stack(
                [ndimage.gaussian_filter(colors[..., i], c.mesh_blur_voxels) for i in range(3)], -1
            )
        level = c.mesh_level
        if c.mesh_level_mode == "relative":
            occupied = density[density > 0.05]
            level = c.mesh_level * float(np.percentile(occupied, 90)) if occupied.size else c.mesh_level
        solid = density > level
        if config.keep_largest_component:
            solid = largest_component(solid)
        solid = ndimage.binary_fill_holes(solid)
        if not solid.any():
            raise EmptySceneError(f"no Gaussian density above {level:g}; nothing to export")
        field = np.where(solid, np.maximum(density, 2 * level), np.minimum(density, 0.5 * level))
        verts, faces, _, _ = marching_cubes(np.pad(field, 1), level=level)
        verts = verts - 1  # grid index units
        i, j, k = np.clip(np.round(verts).astype(np.int64), 0, r - 1).T
        overall = (self.opacities[:, None] * self.albedo).sum(0) / self.opacities.sum().clamp_min(1e-8)
        albedo = np.where(density[i, j, k, None] > 1e-4, colors[i, j, k] / np.maximum(density[i, j, k, None], 1e-8),
                          overall.detach().cpu().numpy())  # fmt: skip
        verts = (verts * (2 * c.bound / (r - 1)) - c.bound).astype(np.float32)
        vertex_colors = np.clip(albedo * 255 + 0.5, 0, 255).astype(np.uint8)  # [V, 3]
        faces = faces.astype(np.int64)
        if _signed_volume(verts, faces) < 0:
            faces = faces[:, ::-1].copy()
        return MeshOutput(verts, faces, vertex_colors, c.mesh_level, None)

    def write_extras(self, run_dir: Path) -> dict[str, Path]:
        """splats.ply: the 3DGS point-cloud layout that splat viewers read (SH degree 0)."""
        path = Path(run_dir) / "splats.ply"
        write_splat_ply(self, path)
        return {"splats": path}

    def render_turntable(self, config: ExportConfig, shading: Shading, progress: bool = False) -> np.ndarray:
        cams = turntable_cameras(config.turntable_frames, config.turntable_elevation_deg, config.view_radius,
                                 config.view_fovy_deg, config.nerf_turntable_resolution, config.nerf_turntable_resolution)  # fmt: skip
        with torch.no_grad():
            frames = [
                self.render(cams[i : i + 1].to(self.means.device), shading).rgb for i in range(len(cams))
            ]
        rgb = torch.cat(frames).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return (rgb * 255 + 0.5).astype(np.uint8)


def _rotation(quats: torch.Tensor) -> torch.Tensor:
    from sds3d.render.splat import quaternion_to_rotation

    return quaternion_to_rotation(quats)


SH_C0 = 0.28209479177387814  # the zeroth spherical-harmonic basis constant, 1 / (2√π)


@torch.no_grad()
def write_splat_ply(scene: GaussianScene, path: Path) -> None:
    """x y z nx ny nz f_dc_0..2 opacity scale_0..2 rot_0..3, float32, binary little-endian: the
    layout of the 3DGS reference code's point clouds (colour as the DC term, opacity as a logit,
    scales as logs), which SuperSplat, antimatter15/splat and gsplat's viewers open."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
    n = len(scene)
    data = torch.cat(
        [scene.means, torch.zeros(n, 3, device=scene.means.device), (scene.albedo - 0.5) / SH_C0,
         scene.opacity_logits[:, None], scene.log_scales, nn.functional.normalize(scene.quats, dim=-1)],
        dim=1,
    ).float().cpu().numpy()  # fmt: skip
    header = "ply\nformat binary_little_endian 1.0\nelement vertex {}\n{}end_header\n".format(
        n, "".join(f"property float {name}\n" for name in names)
    )
    Path(path).write_bytes(header.encode() + data.astype("<f4").tobytes())
