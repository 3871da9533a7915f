"""Volume rendering of a NeRF for a batch of cameras (Max 1995; NeRF, Mildenhall et al. 2020, eq. 3).

Along each ray, N stratified samples t_i fill the part of the ray inside the scene cube; with
spacing δ_i, α_i = 1 − exp(−τ_i δ_i), T_i = Π_{j<i}(1 − α_j), and weight w_i = α_i T_i:
    rgb = Σ w_i c_i + (1 − Σ w_i)·background,  opacity = Σ w_i,  depth = Σ w_i t_i.
Rays that miss the cube get no samples and show the background exactly.

Shading, per sample (DreamFusion §3.1): `albedo` (c = ρ), `lambertian`
(c = ρ·(a + (1 − a)·max(0, n·l))) and `textureless` (the same with ρ := white), with a point light
near the camera (threestudio's `dreamfusion` light sampling). Outputs are [B, C, H, W].
With `latent=True` the field's and background's latent heads are composited instead of the albedo
(Latent-NeRF warm-up; `albedo` shading only): `rgb` then holds C latent channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from sds3d.cameras import Cameras, camera_rays
from sds3d.devices import Generators, device_generator, draw_rows
from sds3d.representations.nerf import DensityAlbedo, HashGridNeRFConfig

Shading = Literal["albedo", "lambertian", "textureless"]


class RadianceField(Protocol):
    """What the renderer queries: HashGridNeRF, or some scenes of a stack (nerf_stack.SceneView)."""

    config: HashGridNeRFConfig

    def __call__(self, points: torch.Tensor, latent: bool = False) -> DensityAlbedo: ...

    def normals(
        self, points: torch.Tensor, create_graph: bool, latent: bool = False
    ) -> tuple[DensityAlbedo, torch.Tensor]: ...


class BackgroundField(Protocol):
    """What the renderer asks for the colour behind each ray: nerf.Background, or some scenes'
    learned backgrounds of a stack (nerf_stack.BackgroundView)."""

    def __call__(
        self, dirs: torch.Tensor, generator: Generators = None, random: bool = True, latent: bool = False
    ) -> torch.Tensor: ...


INFERENCE_CHUNK = 32768  # points per field query without autograd (measured fastest on a 2-core CPU)


@dataclass
class VolumeRendererConfig:
    num_samples: int = 48
    # Probabilities of each shading mode per training step (DreamFusion picks one at random).
    albedo_prob: float = 1.0
    textureless_prob: float = 0.0  # the rest is lambertian
    ambient: float = 0.1
    light_distance: tuple[float, float] = (0.8, 1.5)  # times the camera distance direction (threestudio)
    light_jitter: float = 1.0


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [B, 3, H, W] in [0, 1]; [B, C, H, W] latents when rendered with latent=True
    opacity: torch.Tensor  # [B, 1, H, W]
    depth: torch.Tensor  # [B, 1, H, W], expected ray distance Σ w_i t_i (0 where empty)
    normal: torch.Tensor | None  # [B, 3, H, W], composited world normals, or None
    weights: torch.Tensor  # [R, N] per ray sample, R = B·H·W
    sample_normals: torch.Tensor | None  # [R, N, 3]
    ray_dirs: torch.Tensor  # [R, 3]
    sample_density: torch.Tensor  # [R, N]


def ray_box_intersection(
    origins: torch.Tensor, dirs: torch.Tensor, bound: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances [R] of rays [R, 3] with the cube [−bound, bound]³ (slab method);
    near ≥ far marks a miss."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-bound - origins) / safe
    t1 = (bound - origins) / safe
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    return near, far


def composite(
    density: torch.Tensor, color: torch.Tensor, deltas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha compositing of N samples per ray: density [R, N], color [R, N, C], deltas [R, N]
    → (color [R, C], weights [R, N]). `_reference.composite_reference` is its loop twin."""
    tau = density * deltas
    alpha = 1 - torch.exp(-tau)
    # T_i = Π_{j<i}(1 − α_j) = exp(−Σ_{j<i} τ_j): an exclusive cumsum (cumprod's backward syncs the host).
    transmittance = torch.exp(-(torch.cumsum(tau, dim=1) - tau))
    weights = alpha * transmittance
    return (weights[..., None] * color).sum(dim=1), weights


def sample_lights(
    cameras: Cameras, config: VolumeRendererConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Point lights near each camera: direction normalize(camera + N(0, jitter²)), distance factor
    uniform in `light_distance` times the camera radius (threestudio `dreamfusion`). [B, 3]"""
    b = len(cameras)
    pos = cameras.position
    direction = F.normalize(
        pos + config.light_jitter * torch.randn(b, 3, generator=generator).to(pos), dim=-1
    )
    lo, hi = config.light_distance
    dist = (lo + (hi - lo) * torch.rand(b, generator=generator).to(pos)) * cameras.radius
    return direction * dist[:, None]


def choose_shading(config: VolumeRendererConfig, generator: torch.Generator | None = None) -> Shading:
    """One shading mode for a training step: albedo with `albedo_prob`, else textureless with
    `textureless_prob`, else lambertian (threestudio's order)."""
    u, v = torch.rand(2, generator=generator).tolist()
    if u < config.albedo_prob:
        return "albedo"
    return "textureless" if v < config.textureless_prob else "lambertian"


def shade(
    albedo: torch.Tensor,  # [..., 3]
    normals: torch.Tensor | None,  # [..., 3]
    points: torch.Tensor,  # [..., 3]
    light_position: torch.Tensor | None,  # broadcastable to points
    shading: Shading,
    ambient: float,
) -> torch.Tensor:
    """c = ρ (albedo) or ρ·(a + (1 − a)·max(0, n·l)) with l the unit vector to the light
    (lambertian); textureless uses ρ = 1."""
    if shading == "albedo":
        return albedo
    if normals is None or light_position is None:
        raise ValueError(f"{shading} shading needs normals and a light")
    to_light = F.normalize(light_position - points, dim=-1)
    diffuse = (normals * to_light).sum(dim=-1, keepdim=True).clamp_min(0.0)
    rho = torch.ones_like(albedo) if shading == "textureless" else albedo
    return rho * (ambient + (1 - ambient) * diffuse)


def _shade_and_composite(
    density: torch.Tensor,  # [R, N]
    albedo: torch.Tensor,  # [R, N, C]: C = 3, or the latent channels
    hit: torch.Tensor,  # [R]
    sample_normals: torch.Tensor | None,  # [R, N, 3]
    points: torch.Tensor,  # [R, N, 3]
    t: torch.Tensor,  # [R, N]
    deltas: torch.Tensor,  # [R, N]
    bg: torch.Tensor,  # [R, C]
    light_positions: torch.Tensor | None,  # [B, 3]
    pixels_per_image: int,
    shading: Shading,
    ambient: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Per-ray colour, opacity, depth and normal from the field's samples: shading, compositing
    and the background. (rgb [R, C], opacity [R, 1], depth [R, 1], normal [R, 3] or None,
    weights [R, N], density [R, N])."""
    density = density * hit[:, None]
    lights = (
        None
        if light_positions is None
        else light_positions.repeat_interleave(pixels_per_image, dim=0)[:, None, :]
    )
    color = shade(albedo, sample_normals, points, lights, shading, ambient)
    extras = [t[..., None]] + ([sample_normals] if sample_normals is not None else [])
    feats, weights = composite(density, torch.cat([color] + extras, dim=-1), deltas)
    c = color.shape[-1]
    rgb_fg, depth = feats[:, :c], feats[:, c : c + 1]
    normal = feats[:, c + 1 : c + 4] if sample_normals is not None else None
    opacity = weights.sum(dim=1, keepdim=True)
    return rgb_fg + (1 - opacity) * bg, opacity, depth, normal, weights, density


# The training render's tail as fused kernels (the eager one launches ~100 small kernels forward
# and backward); compiled lazily, on the first call, only for a compiled NeRF.
_shade_and_composite_compiled = torch.compile(_shade_and_composite)


def render(
    nerf: RadianceField,
    background: BackgroundField,
    cameras: Cameras,
    num_samples: int,
    shading: Shading = "albedo",
    light_positions: torch.Tensor | None = None,  # [B, 3]
    ambient: float = 0.1,
    stratified: bool = False,
    need_normals: bool = False,
    normals_create_graph: bool = False,
    random_background: bool = True,
    generator: Generators = None,  # SceneGenerators: the cameras are K scenes' (batch.py)
    latent: bool = False,
) -> RenderOutput:
    if latent and shading != "albedo":
        raise ValueError("latents are rendered unshaded (albedo shading)")
    b, h, w = len(cameras), cameras.height, cameras.width
    origins, dirs = camera_rays(cameras)
    rays_o, rays_d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    r = rays_o.shape[0]
    near, far = ray_box_intersection(rays_o, rays_d, nerf.config.bound)
    hit = far > near
    far = torch.where(hit, far, near)
    # 1. Stratified sample positions inside the cube.
    u = (
        draw_rows(
            device_generator(generator, rays_o.device),
            r,
            lambda n, gk: torch.rand(n, num_samples, generator=gk, device=rays_o.device),
        )  # fmt: skip
        if stratified
        else torch.full((r, num_samples), 0.5, device=rays_o.device)
    ).to(rays_o.dtype)
    bins = (torch.arange(num_samples, device=rays_o.device, dtype=rays_o.dtype)[None] + u) / num_samples
    span = (far - near)[:, None]
    t = near[:, None] + span * bins  # [R, N]
    deltas = (span / num_samples).expand(r, num_samples)
    points = rays_o[:, None] + t[..., None] * rays_d[:, None]  # [R, N, 3]
    # 2. Query the field (with normals where shading or a loss needs them).
    flat = points.reshape(-1, 3)
    sample_normals = None
    normals_needed = need_normals or shading != "albedo"
    if torch.is_grad_enabled():
        if normals_needed:
            # Shading trains the geometry through its normals (DreamFusion), so it keeps their graph.
            field, n = nerf.normals(
                flat, create_graph=normals_create_graph or shading != "albedo", latent=latent
            )
            sample_normals = n.reshape(r, num_samples, 3)
        else:
            field = nerf(flat, latent)
    else:  # inference: chunks that stay in cache are about twice as fast on a CPU
        fields, normals = [], []
        for i in range(0, flat.shape[0], INFERENCE_CHUNK):
            chunk = flat[i : i + INFERENCE_CHUNK]
            if normals_needed:  # autograd of the density, chunk by chunk, nothing kept
                part, n = nerf.normals(chunk, create_graph=False, latent=latent)
                fields.append(DensityAlbedo(part.density.detach(), part.albedo.detach()))
                normals.append(n.detach())
            else:
                fields.append(nerf(chunk, latent))
        field = DensityAlbedo(torch.cat([f.density for f in fields]), torch.cat([f.albedo for f in fields]))
        if normals_needed:
            sample_normals = torch.cat(normals).reshape(r, num_samples, 3)
    bg = background(dirs, generator=generator, random=random_background, latent=latent).reshape(r, -1)
    # 3. Shade and composite: one fused region fore and aft when the NeRF is compiled (training).
    tail = (
        _shade_and_composite_compiled
        if getattr(nerf.config, "compile", False) and torch.is_grad_enabled()
        else _shade_and_composite
    )
    rgb, opacity, depth, normal, weights, density = tail(
        field.density.reshape(r, num_samples), field.albedo.reshape(r, num_samples, -1), hit, sample_normals,
        points, t, deltas, bg, light_positions, h * w, shading, ambient,
    )  # fmt: skip

    def image(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    return RenderOutput(
        rgb=image(rgb), opacity=image(opacity), depth=image(depth),
        normal=None if normal is None else image(normal), weights=weights,
        sample_normals=sample_normals, ray_dirs=rays_d, sample_density=density,
    )  # fmt: skip
