"""A z-buffer rasteriser for triangle meshes in plain PyTorch (no OpenGL, no compiled extension):
the turntable of the exported mesh, i.e. of what a user downloads.

For each camera: vertices are projected with `cameras.project` (pixel centres at (j + ½, i + ½),
as `camera_rays`); every triangle tests the pixel centres of its bounding box with edge functions
(triangles are grouped by box size, so a mesh of tiny marching-cubes triangles costs a few
candidates each); the nearest candidate per pixel wins (a `scatter_reduce` min over the camera
distance, linearly interpolated in screen space — exact enough for triangles a few pixels wide).
Colour and normal are interpolated from the vertices with the winner's barycentric weights.
`rasterize_mesh` is not differentiable: it shows a mesh.

`render_mesh` trains one (the mesh refinement stage, representations/mesh.py), as nvdiffrast does
without its antialiasing pass: which face covers which pixel is decided without gradients, then
the winner's barycentric weights are computed again from the projected vertices with autograd on,
so colours and shading are differentiable in vertex colours *and* positions (through the weights,
the interpolated surface point and the normals). Where a silhouette lies is not differentiable.
With `supersample` k the image is rendered at k× the size and average-pooled: soft edges, as
the prior saw in its training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sds3d.cameras import Cameras, project


@dataclass
class MeshRenderOutput:
    rgb: torch.Tensor  # [B, 3, H, W] in [0, 1], over the background
    mask: torch.Tensor  # [B, 1, H, W] bool: a triangle covers the pixel centre
    depth: torch.Tensor  # [B, 1, H, W] distance along the camera's −Z (inf where uncovered)


@torch.no_grad()
def rasterize_mesh(
    vertices: torch.Tensor,  # [V, 3] world, +Z up
    faces: torch.Tensor,  # [F, 3] long
    colors: torch.Tensor,  # [V, 3] in [0, 1]
    normals: torch.Tensor,  # [V, 3] unit, outward
    cameras: Cameras,
    light_positions: torch.Tensor | None = None,  # [B, 3]; None: unlit (albedo)
    ambient: float = 0.35,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> MeshRenderOutput:
    """Lambertian c = ρ(a + (1 − a)·max(0, n·l)) with l towards the light, as `render.volume.shade`."""
    frames = [_rasterize_one(vertices, faces, colors, normals, cameras[i]) for i in range(len(cameras))]
    h, w = cameras.height, cameras.width
    rgb = torch.empty(len(cameras), 3, h, w)
    for b, (face, bary, _depth, points) in enumerate(frames):
        covered = face >= 0
        f = faces[face[covered]]  # [P, 3]
        wts = bary[covered][..., None]  # [P, 3, 1]
        albedo = (colors[f] * wts).sum(1)
        color = albedo
        if light_positions is not None:
            n = F.normalize((normals[f] * wts).sum(1), dim=-1)
            to_light = F.normalize(light_positions[b] - points[covered], dim=-1)
            color = albedo * (ambient + (1 - ambient) * (n * to_light).sum(-1, keepdim=True).clamp_min(0))
        image = torch.tensor(background, dtype=rgb.dtype).view(1, 3).repeat(h * w, 1)
        image[covered] = color.clamp(0, 1)
        rgb[b] = image.T.reshape(3, h, w)
    mask = torch.stack([fr[0] >= 0 for fr in frames]).reshape(-1, 1, h, w)
    depth = torch.stack([fr[2] for fr in frames]).reshape(-1, 1, h, w)
    return MeshRenderOutput(rgb=rgb, mask=mask, depth=depth)


def _soft_silhouette(
    image: torch.Tensor,  # [H·W, 3] the hard render
    face: torch.Tensor,  # [H, W] winning face per pixel (−1: none)
    xy: torch.Tensor,  # [V, 2] projected vertices (with autograd)
    faces: torch.Tensor,  # [F, 3]
    background: torch.Tensor,  # [3]
    softness: float,
) -> torch.Tensor:
    """Background pixels next to the mesh take α = sigmoid((½ − d)/softness) of their nearest
    neighbour's colour, d the distance (pixels) from their centre to the nearest triangle among
    those that win the 8 neighbouring pixels: α is ½ where a triangle edge reaches half-way to the
    pixel's centre, as a box filter would make it. d moves with the vertices, so the silhouette
    gets a gradient (SoftRas' idea, Liu et al. 2019, kept to one ring of pixels)."""
    h, w = face.shape
    padded = F.pad(face, (1, 1, 1, 1), value=-1)
    shifts = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]
    neighbours = torch.stack([padded[1 + di : 1 + di + h, 1 + dj : 1 + dj + w] for di, dj in shifts], -1)
    ring = (face < 0) & (neighbours >= 0).any(-1)  # [H, W]
    q = ring.flatten().nonzero().squeeze(1)  # [Q]
    if len(q) == 0:
        return image
    cand = neighbours.view(-1, 8)[q]  # [Q, 8] face ids, −1: none
    valid = cand >= 0
    tri = xy[faces[cand.clamp_min(0)]]  # [Q, 8, 3, 2]
    centre = torch.stack([q % w, torch.div(q, w, rounding_mode="floor")], -1).to(xy) + 0.5  # [Q, 2]
    a, b = tri, tri.roll(-1, dims=2)  # the three edges a→b
    p = centre[:, None, None, :]
    ab = b - a
    t = (((p - a) * ab).sum(-1) / ab.square().sum(-1).clamp_min(1e-12)).clamp(0, 1)
    dist = (a + t[..., None] * ab - p).norm(dim=-1).amin(-1)  # [Q, 8] to each triangle (outside it)
    dist = torch.where(valid, dist, torch.full_like(dist, float("inf")))
    d, nearest = dist.min(-1)
    di = torch.tensor([s[0] for s in shifts], device=q.device)[nearest]
    dj = torch.tensor([s[1] for s in shifts], device=q.device)[nearest]
    source = (torch.div(q, w, rounding_mode="floor") + di) * w + (q % w + dj)
    alpha = torch.sigmoid((0.5 - d) / softness)[:, None]
    soft = alpha * image[source] + (1 - alpha) * background.view(1, 3)
    return image.index_copy(0, q, soft.to(image.dtype))


def vertex_normals_torch(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals [V, 3] (differentiable); counter-clockwise faces point outward."""
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    face_n = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)  # length = 2 × area
    n = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), face_n.repeat_interleave(3, dim=0))
    return F.normalize(n, dim=-1, eps=1e-12)


def render_mesh(
    vertices: torch.Tensor,  # [V, 3] world, +Z up; gradients flow to it
    faces: torch.Tensor,  # [F, 3] long, counter-clockwise seen from outside
    colors: torch.Tensor,  # [V, 3] albedo in [0, 1]; gradients flow to it
    cameras: Cameras,
    shading: str = "albedo",  # albedo | lambertian | textureless (render.volume.shade)
    light_positions: torch.Tensor | None = None,  # [B, 3], for lambertian and textureless
    ambient: float = 0.1,
    background: torch.Tensor | None = None,  # [3]; white if None
    supersample: int = 1,
    edge_softness: float = 0.0,  # pixels (of the supersampled image); 0: hard silhouettes, no gradient there
) -> MeshRenderOutput:
    """Differentiable renders [B, 3, H, W] of a vertex-coloured mesh (see the module docstring)."""
    from sds3d.render.volume import shade

    k = supersample
    h, w = cameras.height * k, cameras.width * k
    big = Cameras(
        cameras.c2w, cameras.fovy_deg, cameras.elevation_deg, cameras.azimuth_deg, cameras.radius, w, h
    )
    bg = vertices.new_ones(3) if background is None else background.to(vertices)
    normals = vertex_normals_torch(vertices, faces) if shading != "albedo" else None
    images, masks, depths = [], [], []
    for b in range(len(big)):
        cam = big[b]
        face, _, depth, _ = _rasterize_one(vertices.detach(), faces, colors, colors, cam)
        pix = (face >= 0).nonzero().squeeze(1)  # covered pixels [P]
        f = faces[face[pix]]  # [P, 3]
        centre = torch.stack([pix % w, torch.div(pix, w, rounding_mode="floor")], -1).to(vertices) + 0.5
        xy = project(cam, vertices[None])[0]  # [V, 2], with autograd
        wts = _barycentric(xy[f], centre[:, None])[:, 0]  # [P, 3]: the same weights, now differentiable
        albedo = (colors[f] * wts[..., None]).sum(1)
        if shading == "albedo":
            color = albedo
        else:
            assert normals is not None and light_positions is not None, f"{shading} shading needs a light"
            n = F.normalize((normals[f] * wts[..., None]).sum(1), dim=-1, eps=1e-12)
            points = (vertices[f] * wts[..., None]).sum(1)
            color = shade(albedo, n, points, light_positions[b], shading, ambient)  # type: ignore[arg-type]
        image = bg.view(1, 3).expand(h * w, 3).index_copy(0, pix, color.to(bg.dtype))
        if edge_softness > 0:
            image = _soft_silhouette(image, face.view(h, w), xy, faces, bg, edge_softness)
        images.append(image.T.reshape(3, h, w))
        masks.append((face >= 0).reshape(1, h, w))
        depths.append(depth.reshape(1, h, w))
    rgb, mask, depth = torch.stack(images), torch.stack(masks), torch.stack(depths)
    if k > 1:
        rgb = F.avg_pool2d(rgb, k)
        mask = F.avg_pool2d(mask.float(), k) > 0
        depth = -F.max_pool2d(-depth, k)  # the nearest covered sub-pixel (inf where none)
    return MeshRenderOutput(rgb=rgb, mask=mask, depth=depth)


def _rasterize_one(
    vertices: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor, normals: torch.Tensor, camera: Cameras
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel [H·W]: the winning face (−1: none), its barycentric weights [H·W, 3], the depth,
    and the world point under the pixel centre [H·W, 3]."""
    h, w = camera.height, camera.width
    dev = vertices.device
    cam = camera.c2w[0].float()
    xy = project(camera, vertices[None].to(camera.c2w.dtype))[0].float()  # [V, 2] (column, row)
    z = (vertices.float() - cam[:3, 3]) @ -cam[:3, 2]  # distance in front of the camera
    tri, tz = xy[faces], z[faces]  # [F, 3, 2], [F, 3]
    visible = (tz > 1e-4).all(1)
    lo = (tri.amin(1) - 0.5).ceil().clamp(min=0)  # first pixel whose centre may be inside
    hi = (tri.amax(1) - 0.5).floor()
    hi = torch.minimum(hi, torch.tensor([w - 1.0, h - 1.0], device=dev))
    size = (hi - lo + 1).clamp(min=0)  # [F, 2] pixels in the box
    keep = visible & (size > 0).all(1)
    depth_buf = torch.full((h * w,), float("inf"), device=dev)
    cand_pix, cand_face, cand_bary, cand_depth = [], [], [], []
    # Boxes grouped by their larger side rounded up to a power of two: k² candidates per triangle.
    side = size.amax(1)
    level = torch.ceil(torch.log2(side.clamp(min=1))).long()
    for g in level[keep].unique().tolist():
        k = 2**g
        idx = (keep & (level == g)).nonzero().squeeze(1)
        off = torch.stack(
            torch.meshgrid(torch.arange(k, device=dev), torch.arange(k, device=dev), indexing="xy"), -1
        ).reshape(-1, 2)
        pix = lo[idx, None, :] + off[None].float()  # [G, k², 2] (column, row)
        bary = _barycentric(tri[idx], pix + 0.5)  # [G, k², 3] at the pixel centres
        inside = (pix <= hi[idx, None, :]).all(-1) & (bary >= -1e-6).all(-1)
        g_idx, c_idx = inside.nonzero(as_tuple=True)
        b, p = bary[g_idx, c_idx], pix[g_idx, c_idx].long()
        cand_pix.append(p[:, 1] * w + p[:, 0])
        cand_face.append(idx[g_idx])
        cand_bary.append(b)
        cand_depth.append((b * tz[idx[g_idx]]).sum(-1))
    face_buf = torch.full((h * w,), -1, dtype=torch.long, device=dev)
    bary_buf = torch.zeros(h * w, 3, device=dev)
    if cand_pix:
        pix_all, face_all = torch.cat(cand_pix), torch.cat(cand_face)
        bary_all, depth_all = torch.cat(cand_bary), torch.cat(cand_depth)
        depth_buf.scatter_reduce_(0, pix_all, depth_all, reduce="amin")
        win = depth_all <= depth_buf[pix_all]
        order = torch.arange(len(pix_all), device=dev)
        best = torch.full((h * w,), -1, dtype=torch.long, device=dev).scatter_reduce_(
            0, pix_all[win], order[win], reduce="amax"
        )  # one winner per pixel among equal depths
        hit = best >= 0
        face_buf[hit] = face_all[best[hit]]
        bary_buf[hit] = bary_all[best[hit]]
    # World points under the pixel centres (for the light direction): along the pixel's ray at its depth.
    jj, ii = torch.meshgrid(
        torch.arange(w, device=dev) + 0.5, torch.arange(h, device=dev) + 0.5, indexing="xy"
    )
    focal = 0.5 * h / torch.tan(0.5 * torch.deg2rad(camera.fovy_deg[0].float()))
    dirs_cam = torch.stack([(jj - 0.5 * w) / focal, -(ii - 0.5 * h) / focal, -torch.ones_like(jj)], -1)
    depth_safe = torch.where(torch.isfinite(depth_buf), depth_buf, torch.zeros_like(depth_buf))
    points = cam[:3, 3] + (dirs_cam.reshape(-1, 3) @ cam[:3, :3].T) * depth_safe[:, None]
    return face_buf, bary_buf, depth_buf, points


def _barycentric(tri: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Barycentric weights [G, K, 3] of points p [G, K, 2] in triangles tri [G, 3, 2] (either winding)."""
    a, b, c = tri[:, None, 0], tri[:, None, 1], tri[:, None, 2]
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
    den = torch.where(den.abs() < 1e-12, torch.full_like(den, 1e-12), den)
    wb = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / den
    wc = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / den
    return torch.stack([1 - wb - wc, wb, wc], dim=-1)
