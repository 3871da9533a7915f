"""The hash-grid encoding as two fused Triton kernels (GPU): a fast twin of `HashGrid`'s PyTorch path.

`HashGrid._corners` materialises, per point, 8 corners × L levels of indices, weights, weight
derivatives and gathered features, and its backward scatters from those saved tensors. Here one
kernel walks the levels and corners of a block of points in registers and writes only the outputs
(features [N, L·F] and, with `with_gradient`, their derivative with respect to x [N, L·F, 3]); the
backward kernel recomputes the corners and adds w_c·∂L/∂e + Σ_d (∂w_c/∂x_d)·∂L/∂(∂e/∂x_d) into the
table gradient with atomics. Same indexing as the PyTorch path (dense levels row-major, hashed levels
(x·π₁ ⊕ y·π₂ ⊕ z·π₃) mod T, T a power of two), so the two agree to float rounding;
tests/test_render.py compares them in values and table gradients where CUDA exists.

Points get no gradient here (they come from cameras, which are not optimised); `HashGrid` takes the
PyTorch path whenever x requires grad (autograd normals). Registered as `torch.library` custom ops,
so `torch.compile` treats each kernel as one opaque call.
"""

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU builds have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 128  # points per program

if triton is not None:

    @triton.jit
    def _point(x_ptr, offs, mask, AXIS: tl.constexpr):
        """One coordinate of a block of points, clamped to [0, 1] as the PyTorch path does."""
        return tl.minimum(tl.maximum(tl.load(x_ptr + offs * 3 + AXIS, mask=mask, other=0.0), 0.0), 1.0)

    @triton.jit
    def _block_points(x_ptr, n, BLOCK: tl.constexpr):
        """This program's block of points: offsets, mask, and the clamped x, y, z."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        return (
            offs,
            mask,
            _point(x_ptr, offs, mask, 0),
            _point(x_ptr, offs, mask, 1),
            _point(x_ptr, offs, mask, 2),
        )

    @triton.jit
    def _cell(p, res):
        """The lower cell index along one axis at resolution `res`, and the fraction inside the cell."""
        s = p * res
        b = tl.floor(s)
        return b.to(tl.int32), s - b

    @triton.jit
    def _weights(fx, fy, fz, res, OX: tl.constexpr, OY: tl.constexpr, OZ: tl.constexpr):
        """Trilinear weight w of corner (OX, OY, OZ) and ∂w/∂x: each axis factor is frac on the upper
        corner and 1 − frac on the lower one, its slope ±N_l; the other two factors stay."""
        wx = (1 - OX) + (2 * OX - 1) * fx
        wy = (1 - OY) + (2 * OY - 1) * fy
        wz = (1 - OZ) + (2 * OZ - 1) * fz
        sx, sy, sz = (2 * OX - 1) * res, (2 * OY - 1) * res, (2 * OZ - 1) * res
        return wx * wy * wz, sx * wy * wz, sy * wx * wz, sz * wx * wy

    @triton.jit
    def _corner(
        ix, iy, iz, level, side, T: tl.constexpr, OX: tl.constexpr, OY: tl.constexpr, OZ: tl.constexpr
    ):
        """Table row of corner (ix+OX, iy+OY, iz+OZ) of `level`: dense (side = N_l + 1) or hashed
        (side = 0)."""
        cx, cy, cz = ix + OX, iy + OY, iz + OZ
        dense = cx + side * (cy + side * cz)
        hashed = (cx.to(tl.int64) ^ (cy.to(tl.int64) * 2654435761) ^ (cz.to(tl.int64) * 805459861)) & (T - 1)
        return tl.where(side > 0, dense.to(tl.int64), hashed) + level * T

    @triton.jit
    def _level_cells(px, py, pz, res_ptr, stride_ptr, level):
        """Level `level`'s resolution N_l, dense side (N_l + 1, or 0 where hashed), and the points'
        cells and fractions along x, y, z."""
        res = tl.load(res_ptr + level)
        side = tl.load(stride_ptr + level)
        ix, fx = _cell(px, res)
        iy, fy = _cell(py, res)
        iz, fz = _cell(pz, res)
        return res, side, ix, iy, iz, fx, fy, fz

    @triton.jit
    def _corner_at(ix, iy, iz, fx, fy, fz, res, level, side, T: tl.constexpr, C: tl.constexpr):
        """Corner C = x_bit + 2·y_bit + 4·z_bit (CORNER_OFFSETS' order): its table row, its weight w
        and ∂w/∂x."""
        OX = C & 1
        OY = (C >> 1) & 1
        OZ = (C >> 2) & 1
        w, gx, gy, gz = _weights(fx, fy, fz, res, OX, OY, OZ)
        return _corner(ix, iy, iz, level, side, T, OX, OY, OZ), w, gx, gy, gz

    @triton.jit
    def _hash_grid_fwd(
        x_ptr, tables_ptr, res_ptr, stride_ptr, feat_ptr, dfeat_ptr, n,
        T: tl.constexpr, L: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs, mask, px, py, pz = _block_points(x_ptr, n, BLOCK)
        for level in tl.static_range(L):
            res, side, ix, iy, iz, fx, fy, fz = _level_cells(px, py, pz, res_ptr, stride_ptr, level)
            e0 = tl.zeros([BLOCK], dtype=tl.float32)
            e1 = tl.zeros([BLOCK], dtype=tl.float32)
            d0x = tl.zeros([BLOCK], dtype=tl.float32)
            d0y = tl.zeros([BLOCK], dtype=tl.float32)
            d0z = tl.zeros([BLOCK], dtype=tl.float32)
            d1x = tl.zeros([BLOCK], dtype=tl.float32)
            d1y = tl.zeros([BLOCK], dtype=tl.float32)
            d1z = tl.zeros([BLOCK], dtype=tl.float32)
            for c in tl.static_range(8):
                row, w, gx, gy, gz = _corner_at(ix, iy, iz, fx, fy, fz, res, level, side, T, c)
                f0 = tl.load(tables_ptr + row * 2 + 0, mask=mask, other=0.0)
                f1 = tl.load(tables_ptr + row * 2 + 1, mask=mask, other=0.0)
                e0 += w * f0
                e1 += w * f1
                if GRAD:
                    d0x += gx * f0
                    d0y += gy * f0
                    d0z += gz * f0
                    d1x += gx * f1
                    d1y += gy * f1
                    d1z += gz * f1
            tl.store(feat_ptr + offs * (2 * L) + 2 * level + 0, e0, mask=mask)
            tl.store(feat_ptr + offs * (2 * L) + 2 * level + 1, e1, mask=mask)
            if GRAD:
                base = dfeat_ptr + offs * (6 * L) + 6 * level
                tl.store(base + 0, d0x, mask=mask)
                tl.store(base + 1, d0y, mask=mask)
                tl.store(base + 2, d0z, mask=mask)
                tl.store(base + 3, d1x, mask=mask)
                tl.store(base + 4, d1y, mask=mask)
                tl.store(base + 5, d1z, mask=mask)

    @triton.jit
    def _hash_grid_bwd(
        x_ptr, res_ptr, stride_ptr, gfeat_ptr, gdfeat_ptr, gtables_ptr, n,
        T: tl.constexpr, L: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs, mask, px, py, pz = _block_points(x_ptr, n, BLOCK)
        for level in tl.static_range(L):
            res, side, ix, iy, iz, fx, fy, fz = _level_cells(px, py, pz, res_ptr, stride_ptr, level)
            g0 = tl.load(gfeat_ptr + offs * (2 * L) + 2 * level + 0, mask=mask, other=0.0)
            g1 = tl.load(gfeat_ptr + offs * (2 * L) + 2 * level + 1, mask=mask, other=0.0)
            if GRAD:
                base = gdfeat_ptr + offs * (6 * L) + 6 * level
                h0x = tl.load(base + 0, mask=mask, other=0.0)
                h0y = tl.load(base + 1, mask=mask, other=0.0)
                h0z = tl.load(base + 2, mask=mask, other=0.0)
                h1x = tl.load(base + 3, mask=mask, other=0.0)
                h1y = tl.load(base + 4, mask=mask, other=0.0)
                h1z = tl.load(base + 5, mask=mask, other=0.0)
            for c in tl.static_range(8):
                row, w, gx, gy, gz = _corner_at(ix, iy, iz, fx, fy, fz, res, level, side, T, c)
                v0 = w * g0
                v1 = w * g1
                if GRAD:
                    v0 += gx * h0x + gy * h0y + gz * h0z
                    v1 += gx * h1x + gy * h1y + gz * h1z
                tl.atomic_add(gtables_ptr + row * 2 + 0, v0, mask=mask, sem="relaxed")
                tl.atomic_add(gtables_ptr + row * 2 + 1, v1, mask=mask, sem="relaxed")


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


@torch.library.custom_op("sds3d::hash_grid_encode", mutates_args=())
def hash_grid_encode(
    x: torch.Tensor, tables: torch.Tensor, resolutions: torch.Tensor, strides: torch.Tensor,
    table_size: int, with_gradient: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Features [N, 2L] and (with `with_gradient`, else an empty tensor) ∂features/∂x [N, 2L, 3].
    x [N, 3] in [0, 1] (clamped), tables [L·T, 2] fp32, resolutions [L] fp32, strides [L] int32
    (N_l + 1 for dense levels, 0 for hashed)."""
    n, levels = x.shape[0], resolutions.shape[0]
    x = x.contiguous().float()
    feat = torch.empty(n, 2 * levels, device=x.device, dtype=torch.float32)
    dfeat = torch.empty((n, 2 * levels, 3) if with_gradient else (0,), device=x.device, dtype=torch.float32)
    if n > 0:
        _hash_grid_fwd[(triton.cdiv(n, BLOCK),)](
            x, tables.contiguous(), resolutions, strides, feat, dfeat, n,
            T=table_size, L=levels, GRAD=with_gradient, BLOCK=BLOCK,
        )  # fmt: skip
    return feat, dfeat


@hash_grid_encode.register_fake
def _(x, tables, resolutions, strides, table_size, with_gradient):
    n, levels = x.shape[0], resolutions.shape[0]
    dshape = (n, 2 * levels, 3) if with_gradient else (0,)
    return x.new_empty(n, 2 * levels, dtype=torch.float32), x.new_empty(dshape, dtype=torch.float32)


@torch.library.custom_op("sds3d::hash_grid_encode_backward", mutates_args=())
def hash_grid_encode_backward(
    x: torch.Tensor, grad_feat: torch.Tensor, grad_dfeat: torch.Tensor, resolutions: torch.Tensor,
    strides: torch.Tensor, table_rows: int, table_size: int,
) -> torch.Tensor:  # fmt: skip
    """∂L/∂tables [rows, 2] from ∂L/∂features and ∂L/∂(∂features/∂x) (empty: none)."""
    n, levels = x.shape[0], resolutions.shape[0]
    grad = torch.zeros(table_rows, 2, device=x.device, dtype=torch.float32)
    if n > 0:
        with_gradient = grad_dfeat.numel() > 0
        _hash_grid_bwd[(triton.cdiv(n, BLOCK),)](
            x.contiguous().float(), resolutions, strides, grad_feat.contiguous().float(),
            grad_dfeat.contiguous().float() if with_gradient else grad_feat, grad, n,
            T=table_size, L=levels, GRAD=with_gradient, BLOCK=BLOCK,
        )  # fmt: skip
    return grad


@hash_grid_encode_backward.register_fake
def _(x, grad_feat, grad_dfeat, resolutions, strides, table_rows, table_size):
    return x.new_empty(table_rows, 2, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, tables, resolutions, strides, table_size, with_gradient = inputs
    ctx.save_for_backward(x, resolutions, strides)
    ctx.table_rows, ctx.table_size, ctx.with_gradient = tables.shape[0], table_size, with_gradient


def _backward(ctx, grad_feat, grad_dfeat):
    x, resolutions, strides = ctx.saved_tensors
    if grad_feat is None:
        grad_feat = torch.zeros(x.shape[0], 2 * resolutions.shape[0], device=x.device)
    if grad_dfeat is None or not ctx.with_gradient:
        grad_dfeat = grad_feat.new_empty(0)
    grad = hash_grid_encode_backward(
        x, grad_feat, grad_dfeat, resolutions, strides, ctx.table_rows, ctx.table_size
    )
    return None, grad, None, None, None, None


hash_grid_encode.register_autograd(_backward, setup_context=_setup_context)
