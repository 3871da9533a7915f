"""Multi-resolution hash-grid encoding in pure PyTorch (Instant-NGP, Müller et al. 2022, §3).

For level l with resolution N_l = floor(N_min·b^l), b = exp((ln N_max − ln N_min)/(L − 1)), a point
x ∈ [0, 1]³ is scaled to x·N_l; the 8 corners of its voxel index a table of T feature vectors of
size F, directly where (N_l + 1)³ ≤ T, else by the spatial hash (⊕_i c_i·π_i) mod T with
π = (1, 2654435761, 805459861). Features are trilinearly interpolated and the L levels
concatenated: an output of L·F features per point. No CUDA extension: tiny-cuda-nn does this
fused; here it is one vectorised gather over all levels and corners, so it runs anywhere.
`_reference.hash_grid_encode_reference` is its slow, obvious twin. On a GPU, `hashgrid_triton`'s two
fused kernels replace the gather and its backward (`kernel`), with this PyTorch path as their twin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sds3d.representations import hashgrid_triton

# Instant-NGP's hash primes (π_1 = 1 keeps the first axis coherent in memory).
HASH_PRIMES = (1, 2654435761, 805459861)
# The 8 voxel corners as offsets, in the order (x, y, z) bits.
CORNER_OFFSETS = torch.tensor(
    [[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=torch.long
)


@dataclass
class HashGridConfig:
    num_levels: int = 8
    features_per_level: int = 2
    log2_table_size: int = 15
    base_resolution: int = 16
    max_resolution: int = 128
    init_scale: float = 1e-4  # Instant-NGP initialises the tables uniformly in ±1e-4
    # "triton": the fused Triton kernels (a GPU with Triton, 2 features per level, points without
    # autograd), an error elsewhere; "auto": Triton where it can run, else PyTorch; "torch": PyTorch.
    # PyTorch by default: on the H100 the kernels cut peak memory but not the step time
    # (benchmarks/speed_hash_grid_*.md).
    kernel: Literal["auto", "torch", "triton"] = "torch"

    def build(self, scenes: int = 1) -> HashGrid:
        return HashGrid(self, scenes)


def level_resolutions(config: HashGridConfig) -> list[int]:
    """N_l = floor(N_min · b^l) with b chosen so that the last level reaches N_max."""
    if config.num_levels == 1:
        return [config.base_resolution]
    growth = math.exp(
        (math.log(config.max_resolution) - math.log(config.base_resolution)) / (config.num_levels - 1)
    )
    # The 1e-6 keeps floor() from losing the last level to rounding (4·4³ must give 64, not 63).
    return [
        int(math.floor(config.base_resolution * growth**level + 1e-6)) for level in range(config.num_levels)
    ]


def corner_index(corner: torch.Tensor, resolution: int, table_size: int) -> torch.Tensor:
    """Table index of integer voxel corners [..., 3]: dense where the level fits, hashed otherwise."""
    side = resolution + 1
    if side**3 <= table_size:
        return corner[..., 0] + side * (corner[..., 1] + side * corner[..., 2])
    h = corner[..., 0] * HASH_PRIMES[0]
    h = torch.bitwise_xor(h, corner[..., 1] * HASH_PRIMES[1])
    h = torch.bitwise_xor(h, corner[..., 2] * HASH_PRIMES[2])
    return torch.remainder(h, table_size)


class HashGrid(nn.Module):
    """Points in [0, 1]³ → [N, L·F] features. With `scenes` = K > 1, K independent grids in one
    table (scene k's L·T rows after the k-th block), queried with each point's scene (`scene`, [N])."""

    _resolutions: torch.Tensor
    _corner_offsets: torch.Tensor

    def __init__(self, config: HashGridConfig, scenes: int = 1):
        super().__init__()
        self.config = config
        self.scenes = scenes
        self.table_size = 2**config.log2_table_size
        self.resolutions = level_resolutions(config)
        # One table of T rows per level, stored flat; dense levels use only their first (N+1)³ rows.
        self.tables = nn.Parameter(
            (torch.rand(scenes * config.num_levels * self.table_size, config.features_per_level) * 2 - 1)
            * config.init_scale
        )
        self.register_buffer(
            "_resolutions", torch.tensor(self.resolutions, dtype=torch.float32), persistent=False
        )
        self.register_buffer("_corner_offsets", CORNER_OFFSETS.clone(), persistent=False)
        # For the Triton kernels: N_l + 1 for dense levels, 0 for hashed ones.
        sides = [res + 1 if (res + 1) ** 3 <= self.table_size else 0 for res in self.resolutions]
        self.register_buffer("_dense_sides", torch.tensor(sides, dtype=torch.int32), persistent=False)

    @property
    def output_dim(self) -> int:
        return self.config.num_levels * self.config.features_per_level

    def _use_triton(self, x: torch.Tensor) -> bool:
        kernel = self.config.kernel
        if kernel == "torch" or self.scenes > 1:
            return False
        why = (
            "Triton is not installed or no CUDA device" if not hashgrid_triton.available()
            else "the points are not on a GPU" if not x.is_cuda
            else "the points require grad (autograd normals)" if x.requires_grad
            else "it needs 2 features per level" if self.config.features_per_level != 2
            else None
        )  # fmt: skip
        if why is not None and kernel == "triton":
            raise RuntimeError(f"hash-grid kernel 'triton' cannot run here: {why}")
        return why is None

    def forward(
        self, x: torch.Tensor, scene: torch.Tensor | None = None
    ) -> torch.Tensor:  # [N, 3] in [0, 1] -> [N, L·F]
        if scene is None and self._use_triton(x):
            features, _ = hashgrid_triton.hash_grid_encode(
                x, self.tables, self._resolutions, self._dense_sides, self.table_size, False
            )
            return features
        w, _, feats = self._corners(x, spatial_gradient=False, scene=scene)
        # Σ_c w·f as a broadcast product: an einsum here becomes N·L tiny fp32 matmuls on a GPU.
        return (w[..., None] * feats).sum(dim=2).reshape(x.shape[0], -1)

    def forward_with_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [N, L·F] and their derivative with respect to x, [N, L·F, 3], in closed form
        from the same corner lookups (tiny-cuda-nn's dy/dx): ∂(Σ_c w_c f_c)/∂x = Σ_c (∂w_c/∂x) f_c."""
        if self._use_triton(x):
            return hashgrid_triton.hash_grid_encode(
                x, self.tables, self._resolutions, self._dense_sides, self.table_size, True
            )
        w, dw, feats = self._corners(x, spatial_gradient=True)
        assert dw is not None
        n = x.shape[0]
        features = (w[..., None] * feats).sum(dim=2).reshape(n, -1)
        d_features = (dw[:, :, :, None, :] * feats[..., None]).sum(dim=2).reshape(n, -1, 3)
        return features, d_features

    def _corners(
        self, x: torch.Tensor, spatial_gradient: bool, scene: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Trilinear weights w [N, L, 8], optionally ∂w/∂x [N, L, 8, 3], and the 8 corner features
        [N, L, 8, F] of every level."""
        n, num_levels = x.shape[0], len(self.resolutions)
        scaled = x.clamp(0.0, 1.0)[:, None, :] * self._resolutions[None, :, None]  # [N, L, 3]
        base = scaled.floor()
        frac = scaled - base  # [N, L, 3]
        base = base.long()
        # Per axis, the two corner coordinates and their linear weights: [N, L, 3, 2].
        coords = torch.stack([base, base + 1], dim=-1)
        axis_w = torch.stack([1 - frac, frac], dim=-1)
        # Corner c = x_bit + 2·y_bit + 4·z_bit, laid out [z][y][x] so that it matches CORNER_OFFSETS.
        w = (
            axis_w[:, :, 2, :, None, None] * axis_w[:, :, 1, None, :, None] * axis_w[:, :, 0, None, None, :]
        ).reshape(n, num_levels, 8)
        # On a GPU int32 row indices (all levels' rows < 2^31): half the memory an int64 index keeps
        # for backward. On the CPU int64: index_add_ with int32 indices is 6× slower there.
        index_dtype = torch.int32 if x.is_cuda else torch.long
        index = torch.empty(n, num_levels, 8, dtype=index_dtype, device=x.device)
        for level, res in enumerate(self.resolutions):
            cx, cy, cz = coords[:, level, 0], coords[:, level, 1], coords[:, level, 2]  # [N, 2] each
            side = res + 1
            if side**3 <= self.table_size:
                idx = cx[:, None, None, :] + side * (cy[:, None, :, None] + side * cz[:, :, None, None])
            else:
                hx, hy, hz = cx * HASH_PRIMES[0], cy * HASH_PRIMES[1], cz * HASH_PRIMES[2]
                idx = torch.bitwise_xor(
                    torch.bitwise_xor(hx[:, None, None, :], hy[:, None, :, None]), hz[:, :, None, None]
                )
                idx = torch.remainder(idx, self.table_size)
            index[:, level] = idx.reshape(n, 8) + level * self.table_size
        if scene is not None:  # each point reads its own scene's block of rows
            index += (scene * (num_levels * self.table_size)).to(index_dtype)[:, None, None]
        # index_select: its backward (index_add_) is deterministic on the CPU, unlike indexing.
        feats = self.tables.index_select(0, index.reshape(-1)).reshape(n, num_levels, 8, -1)  # [N, L, 8, F]
        dw = None
        if spatial_gradient:
            # ∂/∂x_a of the axis-a factor is ∓N_l (its two corners), the other two factors stay.
            slope = (
                torch.tensor([-1.0, 1.0], device=x.device, dtype=x.dtype)[None, :]
                * self._resolutions[:, None]
            )
            ax, ay, az = axis_w[:, :, 0], axis_w[:, :, 1], axis_w[:, :, 2]  # [N, L, 2]
            dx = az[:, :, :, None, None] * ay[:, :, None, :, None] * slope[None, :, None, None, :]
            dy = az[:, :, :, None, None] * slope[None, :, None, :, None] * ax[:, :, None, None, :]
            dz = slope[None, :, :, None, None] * ay[:, :, None, :, None] * ax[:, :, None, None, :]
            dw = torch.stack(
                [d.expand(n, num_levels, 2, 2, 2).reshape(n, num_levels, 8) for d in (dx, dy, dz)], -1
            )
        return w, dw, feats
