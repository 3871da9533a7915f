"""Regularisers on a volume render, as pure functions (weights are config fields in `config.py`).

- orientation (DreamFusion, from Ref-NeRF): Σ_i sg(w_i)·max(0, n_i·d)², normals facing away from
  the camera are penalised; normalised by the number of rays with opacity > 0 (threestudio).
- sparsity: mean sqrt(opacity² + 0.01) (threestudio `lambda_sparsity`), fewer occupied pixels.
- entropy: mean binary entropy of the opacity, −o log o − (1 − o) log(1 − o), pushes every pixel to
  be either empty or opaque, which removes semi-transparent haze.
"""

from __future__ import annotations

import torch


def orientation_loss(
    weights: torch.Tensor, normals: torch.Tensor, ray_dirs: torch.Tensor, opacity: torch.Tensor
) -> torch.Tensor:
    """weights [R, N], normals [R, N, 3], ray_dirs [R, 3], opacity [R] → scalar."""
    facing = (normals * ray_dirs[:, None, :]).sum(dim=-1).clamp_min(0.0)
    return (weights.detach() * facing**2).sum() / (opacity > 0).sum().clamp_min(1)


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(opacity**2 + 0.01).mean()


def entropy_loss(opacity: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    o = opacity.clamp(eps, 1 - eps)
    return (-o * torch.log(o) - (1 - o) * torch.log(1 - o)).mean()
