"""3D Gaussian splatting in plain PyTorch: project, sort by depth, alpha-composite (Kerbl et al.
2023, "3D Gaussian Splatting", eqs. 2–5; the EWA projection of Zwicker et al. 2002).

Each Gaussian i has a mean μ_i [3], a covariance Σ_i = R S Sᵀ Rᵀ (a rotation from a unit
quaternion, S = diag(scales)), an opacity o_i and a colour c_i. Seen by a camera (cameras.py's
convention: c2w OpenGL, the camera looks down −Z, pixel centres at +0.5) its mean lands at pixel
μ'_i and its covariance at Σ'_i = J W Σ_i Wᵀ Jᵀ + 0.3 I (J the projection's Jacobian at μ_i, W the
world→camera rotation, 0.3 px² the low-pass filter of the paper). Pixel p then takes

    α_i(p) = min(0.99, o_i exp(−½ (p − μ'_i)ᵀ Σ'_i⁻¹ (p − μ'_i))),   zero below 1/255,
    C(p) = Σ_i c_i α_i Π_{j<i} (1 − α_j)  +  (1 − Σ_i α_i Π_{j<i} (1 − α_j)) · background,

with i running front to back by camera depth. This is the dense form: every pixel against every
Gaussian, [B, H·W, N] at once, chunked over pixels. It is exact, differentiable everywhere autograd
reaches, and fast enough at 32²–128² with a few thousand Gaussians on a CPU; the tiled CUDA
rasterisers (diff-gaussian-rasterization, gsplat) compute the same sum. `_reference.splat_reference`
is its per-pixel loop twin.
"""

from __future__ import annotations

import torch

from sds3d.cameras import Cameras

LOW_PASS_PX2 = 0.3  # the paper's screen-space dilation of every 2D covariance
MAX_ALPHA = 0.99  # the paper's clamp
MIN_ALPHA = 1.0 / 255.0  # smaller contributions are dropped (the paper's skip)
NEAR = 0.05  # Gaussians closer to (or behind) the camera are not drawn
PIXEL_CHUNK = 4096  # pixels per chunk of the dense [B, pixels, N] alpha


def quaternion_to_rotation(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [N, 3, 3] from quaternions [N, 4] (w, x, y, z; normalised here)."""
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).view(-1, 3, 3)  # fmt: skip


def covariances(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """Σ = R S Sᵀ Rᵀ [N, 3, 3] from scales [N, 3] (positive) and quaternions [N, 4]."""
    m = quaternion_to_rotation(quats) * scales[:, None, :]  # R S
    return m @ m.transpose(1, 2)


def project_gaussians(
    means: torch.Tensor,  # [N, 3] world
    covs: torch.Tensor,  # [N, 3, 3] world
    cameras: Cameras,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel means [B, N, 2] (column, row), 2D covariances [B, N, 2, 2] in px², depths [B, N]."""
    w2c = torch.linalg.inv(cameras.c2w)  # [B, 4, 4]
    rot, trans = w2c[:, :3, :3], w2c[:, :3, 3]
    p = torch.einsum("bij,nj->bni", rot, means) + trans[:, None, :]  # camera frame [B, N, 3]
    depth = -p[..., 2]  # in front of the camera: positive
    z = depth.clamp_min(NEAR)
    focal = (0.5 * cameras.height / torch.tan(0.5 * torch.deg2rad(cameras.fovy_deg)))[:, None]  # [B, 1]
    col = focal * p[..., 0] / z + 0.5 * cameras.width
    row = -focal * p[..., 1] / z + 0.5 * cameras.height
    # Jacobian of (col, row) by the camera-frame point: col = cx − f x / z_c, row = cy + f y / z_c
    zero = torch.zeros_like(z)
    jac = torch.stack(
        [focal / z, zero, focal * p[..., 0] / z**2, zero, -focal / z, -focal * p[..., 1] / z**2], dim=-1
    ).view(*z.shape, 2, 3)
    t = jac @ rot[:, None]  # J W, [B, N, 2, 3]
    cov2d = t @ covs[None] @ t.transpose(-1, -2)
    cov2d = cov2d + LOW_PASS_PX2 * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    return torch.stack([col, row], dim=-1), cov2d, depth


def splat(
    means: torch.Tensor,  # [N, 3]
    covs: torch.Tensor,  # [N, 3, 3]
    colors: torch.Tensor,  # [N, C]
    opacities: torch.Tensor,  # [N] in [0, 1]
    cameras: Cameras,
    background: torch.Tensor,  # [C] or [B, C]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render [B, C, H, W] colour, [B, 1, H, W] opacity and [B, 1, H, W] expected depth."""
    b, h, w = len(cameras), cameras.height, cameras.width
    mean2d, cov2d, depth = project_gaussians(means, covs, cameras)
    # Σ'⁻¹ in closed form (2×2), as the conic (a, b, c) of the paper's rasteriser
    det = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] ** 2  # > 0: the low-pass keeps it
    ca, cb, cc = cov2d[..., 1, 1] / det, -cov2d[..., 0, 1] / det, cov2d[..., 0, 0] / det  # [B, N]
    order = torch.argsort(depth.detach(), dim=1)  # front to back, per camera
    take = lambda x: torch.gather(x, 1, order)
    mean2d = torch.gather(mean2d, 1, order[..., None].expand(-1, -1, 2))
    ca, cb, cc, depth = take(ca), take(cb), take(cc), take(depth)
    visible = depth > NEAR
    opacity = opacities[order] * visible  # [B, N]
    color = colors[order]  # [B, N, C]

    jj = torch.arange(w, device=means.device, dtype=means.dtype) + 0.5
    ii = torch.arange(h, device=means.device, dtype=means.dtype) + 0.5
    pix = torch.stack(torch.meshgrid(jj, ii, indexing="xy"), dim=-1).view(-1, 2)  # [P, 2] (col, row)
    bg = background.expand(b, -1) if background.dim() == 1 else background  # [B, C]
    rgb, alpha_sum, depth_sum = [], [], []
    for start in range(0, h * w, PIXEL_CHUNK):
        d = pix[None, start : start + PIXEL_CHUNK, None, :] - mean2d[:, None]  # [B, P, N, 2]
        power = (
            -0.5 * (ca[:, None] * d[..., 0] ** 2 + cc[:, None] * d[..., 1] ** 2)
            - cb[:, None] * d[..., 0] * d[..., 1]
        )
        alpha = (opacity[:, None] * torch.exp(power.clamp_max(0.0))).clamp_max(MAX_ALPHA)
        alpha = torch.where(alpha < MIN_ALPHA, torch.zeros_like(alpha), alpha)
        # transmittance before each Gaussian: the exclusive cumulative product of (1 − α)
        trans = torch.cumprod(
            torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1]], dim=-1), dim=-1
        )
        weight = alpha * trans  # [B, P, N]
        acc = weight.sum(-1, keepdim=True)
        rgb.append(weight @ color + (1 - acc) * bg[:, None])
        alpha_sum.append(acc)
        depth_sum.append((weight * depth[:, None]).sum(-1, keepdim=True))
    to_image = lambda parts: torch.cat(parts, dim=1).view(b, h, w, -1).permute(0, 3, 1, 2)
    return to_image(rgb), to_image(alpha_sum), to_image(depth_sum)
