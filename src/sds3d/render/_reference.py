"""Slow, obviously-correct twins of the fast paths, for tests only (gsplat's `_torch_impl.py`)."""

from __future__ import annotations

import torch

from sds3d.representations.encodings import HashGrid, corner_index


def composite_reference(
    density: torch.Tensor, color: torch.Tensor, deltas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back compositing one sample at a time: C += T·α_i·c_i; T *= (1 − α_i)."""
    r, n = density.shape
    out = torch.zeros(r, color.shape[-1], dtype=color.dtype)
    transmittance = torch.ones(r, dtype=color.dtype)
    weights = []
    for i in range(n):
        alpha = 1 - torch.exp(-density[:, i] * deltas[:, i])
        w = transmittance * alpha
        out = out + w[:, None] * color[:, i]
        weights.append(w)
        transmittance = transmittance * (1 - alpha + 1e-10)
    return out, torch.stack(weights, dim=1)


def hash_grid_encode_reference(grid: HashGrid, x: torch.Tensor) -> torch.Tensor:
    """Per point, per level, per corner: look up the table row and add it with its trilinear weight."""
    feats = []
    for level, res in enumerate(grid.resolutions):
        table = grid.tables[level * grid.table_size : (level + 1) * grid.table_size]
        level_out = torch.zeros(x.shape[0], table.shape[1], dtype=table.dtype)
        p = x.clamp(0, 1) * res
        p0 = p.floor().long()
        f = p - p0
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    c = p0 + torch.tensor([dx, dy, dz])
                    wx = f[:, 0] if dx else 1 - f[:, 0]
                    wy = f[:, 1] if dy else 1 - f[:, 1]
                    wz = f[:, 2] if dz else 1 - f[:, 2]
                    level_out = (
                        level_out + (wx * wy * wz)[:, None] * table[corner_index(c, res, grid.table_size)]
                    )
        feats.append(level_out)
    return torch.cat(feats, dim=1)


def splat_reference(means, covs, colors, opacities, cameras, background) -> torch.Tensor:
    """Gaussian splatting pixel by pixel, Gaussian by Gaussian, with each camera's projection done
    from first principles (a point's pixel by `cameras.project`, the 2D covariance by the Jacobian
    of that projection taken by autograd): [B, C, H, W]."""
    from torch.autograd.functional import jacobian

    from sds3d.cameras import project
    from sds3d.render.splat import LOW_PASS_PX2, MAX_ALPHA, MIN_ALPHA, NEAR

    b, h, w = len(cameras), cameras.height, cameras.width
    out = torch.zeros(b, colors.shape[1], h, w, dtype=colors.dtype)
    for k in range(b):
        cam = cameras[k : k + 1]
        w2c = torch.linalg.inv(cam.c2w[0])
        depth = -(means @ w2c[:3, :3].T + w2c[:3, 3])[:, 2]
        to_pixel = lambda x, cam=cam: project(cam, x[None])[0, 0]  # [3] → [2] (column, row)
        gaussians = []
        for i in torch.argsort(depth).tolist():
            if depth[i] <= NEAR:
                continue
            jac = jacobian(to_pixel, means[i : i + 1])[:, 0]  # [2, 3]
            cov2d = jac @ covs[i] @ jac.T + LOW_PASS_PX2 * torch.eye(2, dtype=covs.dtype)
            gaussians.append((to_pixel(means[i : i + 1]), torch.linalg.inv(cov2d), i))
        for row in range(h):
            for col in range(w):
                p = torch.tensor([col + 0.5, row + 0.5], dtype=means.dtype)
                transmittance, value = 1.0, torch.zeros(colors.shape[1], dtype=colors.dtype)
                for mean2d, conic, i in gaussians:
                    d = p - mean2d
                    alpha = min(MAX_ALPHA, float(opacities[i] * torch.exp(-0.5 * d @ conic @ d)))
                    if alpha < MIN_ALPHA:
                        continue
                    value = value + transmittance * alpha * colors[i]
                    transmittance *= 1 - alpha
                bg = background if background.dim() == 1 else background[k]
                out[k, :, row, col] = value + transmittance * bg
    return out
