"""Regularisers and scheduled values against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from sds3d import losses
from sds3d.ramp import Ramp, value_at
from sds3d.representations.nerf import BackgroundConfig


def test_orientation_loss_penalises_only_normals_facing_away():
    dirs = torch.tensor([[0.0, 0.0, -1.0]])  # the ray travels along −Z
    weights = torch.tensor([[0.5, 0.5]])
    toward = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])  # facing the camera: no penalty
    away = torch.tensor([[[0.0, 0.0, -1.0], [0.0, 0.6, -0.8]]])
    opacity = torch.tensor([1.0])
    assert losses.orientation_loss(weights, toward, dirs, opacity).item() == 0.0
    assert losses.orientation_loss(weights, away, dirs, opacity).item() == pytest.approx(
        0.5 * 1.0 + 0.5 * 0.64
    )


def test_orientation_loss_does_not_train_the_weights():
    weights = torch.tensor([[0.5]], requires_grad=True)
    normals = torch.tensor([[[0.0, 0.0, -1.0]]], requires_grad=True)
    losses.orientation_loss(
        weights, normals, torch.tensor([[0.0, 0.0, -1.0]]), torch.tensor([1.0])
    ).backward()
    assert weights.grad is None and normals.grad is not None


def test_sparsity_and_entropy_formulas():
    o = torch.tensor([0.0, 0.5, 1.0])
    assert losses.sparsity_loss(o).item() == pytest.approx((0.1 + math.sqrt(0.26) + math.sqrt(1.01)) / 3)
    assert losses.entropy_loss(torch.tensor([0.5])).item() == pytest.approx(math.log(2), rel=1e-4)
    assert losses.entropy_loss(torch.tensor([0.0, 1.0])).item() < 1e-3  # decided pixels cost nothing


def test_ramp_values():
    r = Ramp(10.0, 1000.0, 0.0, 0.5)  # threestudio's orientation ramp, over the first half
    assert (
        value_at(r, 0.0) == 10.0 and value_at(r, 0.25) == pytest.approx(505.0) and value_at(r, 0.9) == 1000.0
    )
    assert value_at(3.0, 0.7) == 3.0
    assert value_at(Ramp(0.0, 1.0, 0.5, 0.5), 0.49) == 0.0 and value_at(Ramp(0.0, 1.0, 0.5, 0.5), 0.5) == 1.0


@pytest.mark.parametrize("kind", ["solid", "random", "learned"])
def test_backgrounds(kind):
    bg = BackgroundConfig(kind=kind, color=(0.1, 0.2, 0.3)).build()
    dirs = torch.nn.functional.normalize(torch.randn(2, 4, 4, 3), dim=-1)
    out = bg(dirs, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 4, 3) and bool(((out >= 0) & (out <= 1)).all())
    if kind == "solid":
        assert torch.equal(out[0, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    if kind == "random":  # one colour per image, different between images
        assert torch.equal(out[0, 0, 0], out[0, 3, 3]) and not torch.equal(out[0, 0, 0], out[1, 0, 0])
        assert torch.equal(bg(dirs, random=False)[0, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    if kind == "learned":
        assert sum(p.numel() for p in bg.parameters()) > 0 and not torch.equal(out[0, 0, 0], out[0, 3, 3])
