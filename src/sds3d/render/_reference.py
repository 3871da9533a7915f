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
