"""A z-buffer rasteriser for triangle meshes in plain PyTorch (no OpenGL, no compiled extension):
the turntable of the exported mesh, i.e. of what a user downloads.

For each camera: vertices are projected with `cameras.project` (pixel centres at (j + ½, i + ½),
as `camera_rays`); every triangle tests the pixel centres of its bounding box with edge functions
(triangles are grouped by box size, so a mesh of tiny marching-cubes triangles costs a few
candidates each); the nearest candidate per pixel wins (a `scatter_reduce` min over the camera
distance, linearly interpolated in screen space — exact enough for triangles a few pixels wide).
Colour and normal are interpolated from the vertices with the winner's barycentric weights.
Not differentiable: it shows a mesh, it does not train one.
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


def _rasterize_one(
    vertices: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor, normals: torch.Tensor, camera: Cameras
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel [H·W]: the winning face (−1: none), its barycentric weights [H·W, 3], the depth,
    and the world point under the pixel centre [H·W, 3]."""
    h, w = camera.height, camera.width
    cam = camera.c2w[0].float()
    xy = project(camera, vertices[None].float())[0]  # [V, 2] (column, row)
    z = ((vertices - cam[:3, 3]) @ -cam[:3, 2]).float()  # distance in front of the camera
    tri, tz = xy[faces], z[faces]  # [F, 3, 2], [F, 3]
    visible = (tz > 1e-4).all(1)
    lo = (tri.amin(1) - 0.5).ceil().clamp(min=0)  # first pixel whose centre may be inside
    hi = (tri.amax(1) - 0.5).floor()
    hi = torch.minimum(hi, torch.tensor([w - 1.0, h - 1.0]))
    size = (hi - lo + 1).clamp(min=0)  # [F, 2] pixels in the box
    keep = visible & (size > 0).all(1)
    depth_buf = torch.full((h * w,), float("inf"))
    cand_pix, cand_face, cand_bary, cand_depth = [], [], [], []
    # Boxes grouped by their larger side rounded up to a power of two: k² candidates per triangle.
    side = size.amax(1)
    level = torch.ceil(torch.log2(side.clamp(min=1))).long()
    for g in level[keep].unique().tolist():
        k = 2**g
        idx = (keep & (level == g)).nonzero().squeeze(1)
        off = torch.stack(torch.meshgrid(torch.arange(k), torch.arange(k), indexing="xy"), -1).reshape(-1, 2)
        pix = lo[idx, None, :] + off[None].float()  # [G, k², 2] (column, row)
        bary = _barycentric(tri[idx], pix + 0.5)  # [G, k², 3] at the pixel centres
        inside = (pix <= hi[idx, None, :]).all(-1) & (bary >= -1e-6).all(-1)
        g_idx, c_idx = inside.nonzero(as_tuple=True)
        b, p = bary[g_idx, c_idx], pix[g_idx, c_idx].long()
        cand_pix.append(p[:, 1] * w + p[:, 0])
        cand_face.append(idx[g_idx])
        cand_bary.append(b)
        cand_depth.append((b * tz[idx[g_idx]]).sum(-1))
    face_buf = torch.full((h * w,), -1, dtype=torch.long)
    bary_buf = torch.zeros(h * w, 3)
    if cand_pix:
        pix_all, face_all = torch.cat(cand_pix), torch.cat(cand_face)
        bary_all, depth_all = torch.cat(cand_bary), torch.cat(cand_depth)
        depth_buf.scatter_reduce_(0, pix_all, depth_all, reduce="amin")
        win = depth_all <= depth_buf[pix_all]
        order = torch.arange(len(pix_all))
        best = torch.full((h * w,), -1, dtype=torch.long).scatter_reduce_(
            0, pix_all[win], order[win], reduce="amax"
        )  # one winner per pixel among equal depths
        hit = best >= 0
        face_buf[hit] = face_all[best[hit]]
        bary_buf[hit] = bary_all[best[hit]]
    # World points under the pixel centres (for the light direction): along the pixel's ray at its depth.
    jj, ii = torch.meshgrid(torch.arange(w) + 0.5, torch.arange(h) + 0.5, indexing="xy")
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
