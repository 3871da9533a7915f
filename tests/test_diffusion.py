"""Analytic checks of diffusion.py: every function against its formula or diffusers itself."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sds3d import diffusion


@pytest.fixture(scope="module")
def abar() -> torch.Tensor:
    return diffusion.alphas_cumprod_from_config(diffusion.SD_SCHEDULER_CONFIG)


def test_alphas_cumprod_matches_the_scheduler_product_of_betas(abar):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    assert torch.allclose(abar.double(), torch.cumprod(1 - betas, 0), atol=1e-6)


def test_add_noise_equals_diffusers():
    sched = DDPMScheduler.from_config(diffusion.DDPM_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ours = diffusion.add_noise(
        x, eps, t, diffusion.alphas_cumprod_from_config(diffusion.DDPM_SCHEDULER_CONFIG)
    )
    assert torch.allclose(ours, sched.add_noise(x, eps, t), atol=1e-6)


def test_reparameterised_loss_has_gradient_exactly_g():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True)
    grad = torch.randn(2, 3, 5, 5, generator=g)
    loss = diffusion.reparameterised_loss(x, grad)
    loss.backward()
    # x − (x − g) = g up to one float32 rounding of x − g.
    assert torch.allclose(
        x.grad, grad, rtol=0, atol=4 * torch.finfo(torch.float32).eps * x.abs().max().item()
    )
    assert loss.item() == pytest.approx(0.5 * (grad**2).sum().item(), rel=1e-5)


def test_cfg_conventions():
    g = torch.Generator().manual_seed(2)
    eu, ec = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert torch.allclose(diffusion.classifier_free_guidance(eu, ec, 1.0), ec, rtol=0, atol=1e-6)
    assert torch.equal(diffusion.classifier_free_guidance(eu, ec, 0.0), eu)
    omega = 100.0  # DreamFusion's ω = 100 is s = 101
    dreamfusion = ec + omega * (ec - eu)
    assert torch.allclose(diffusion.classifier_free_guidance(eu, ec, omega + 1), dreamfusion, atol=1e-4)


@pytest.mark.parametrize(
    "name,formula",
    [
        ("dreamfusion", lambda a: 1 - a),
        ("seed", lambda a: 1 / math.sqrt(1 - a)),
        ("uniform", lambda a: 1.0),
        ("fantasia3d", lambda a: math.sqrt(a) * (1 - a)),
        ("ism", lambda a: math.sqrt((1 - a) / a)),
    ],
)
def test_weightings_match_their_formulas_and_stay_positive(abar, name, formula):
    w = diffusion.sds_weight(abar, name)
    for t in (1, 20, 500, 980, 999):
        assert w[t].item() == pytest.approx(formula(abar[t].item()), rel=1e-5)
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all())


def test_unknown_weighting_is_an_error(abar):
    with pytest.raises(ValueError, match="unknown weighting"):
        diffusion.sds_weight(abar, "nope")  # type: ignore[arg-type]


def test_timestep_schedules_match_their_formulas():
    tb = diffusion.timestep_bounds
    assert tb("constant", 0.7, 0.02, 0.98) == (0.02, 0.98)
    assert tb("linear", 0.0, 0.02, 0.98, t_max_end=0.5) == (0.02, 0.98)
    assert tb("linear", 0.5, 0.02, 0.98, t_max_end=0.5)[1] == pytest.approx(0.74)
    assert tb("linear", 1.0, 0.02, 0.98, t_max_end=0.5)[1] == pytest.approx(0.5)
    assert tb("step", 0.19, 0.02, 0.98, t_max_end=0.5, drop_at=0.2) == (0.02, 0.98)
    assert tb("step", 0.2, 0.02, 0.98, t_max_end=0.5, drop_at=0.2) == (0.02, 0.5)
    for r in (0.0, 0.25, 1.0):  # HiFA: t = t_min + (t_max − t_min)(1 − sqrt(r))
        lo, hi = tb("sqrt", r, 0.3, 0.98)
        assert lo == hi == pytest.approx(0.3 + 0.68 * (1 - math.sqrt(r)))
    with pytest.raises(ValueError):
        tb("nope", 0.5, 0.02, 0.98)  # type: ignore[arg-type]


def test_dreamtime_is_monotone_from_t_max_to_t_min():
    ts = [diffusion.timestep_bounds("dreamtime", r / 20, 0.02, 0.98)[0] for r in range(21)]
    assert all(a >= b for a, b in zip(ts, ts[1:], strict=False))
    assert ts[0] == pytest.approx(0.98, abs=0.01) and ts[-1] == pytest.approx(0.02, abs=0.01)
    # W_p is flat on [500, 800]: the middle of training spends equal time per timestep there.
    mid = [diffusion.dreamtime_timestep(r, 0.02, 0.98) for r in (0.3, 0.4, 0.5)]
    assert mid[0] - mid[1] == pytest.approx(mid[1] - mid[2], abs=0.01)
    assert diffusion.dreamtime_prior(torch.tensor([650.0])).item() == 1.0


def test_sampled_timesteps_stay_in_range():
    g = torch.Generator().manual_seed(3)
    t = diffusion.sample_timesteps(10_000, (0.02, 0.5), 1000, g)
    assert int(t.min()) == 20 and int(t.max()) == 500


def test_clip_and_nan_guard():
    grad = torch.tensor([-5.0, -0.5, 0.5, 5.0, float("nan"), float("inf")])
    clean = diffusion.nan_guard(grad)
    assert torch.equal(clean, torch.tensor([-5.0, -0.5, 0.5, 5.0, 0.0, 0.0]))
    assert torch.equal(diffusion.clip_gradient(clean, 2.0), torch.tensor([-2.0, -0.5, 0.5, 2.0, 0.0, 0.0]))
    assert torch.equal(diffusion.clip_gradient(clean, None), clean)


def test_literal_loss_keeps_the_denoiser_jacobian():
    """For a linear denoiser ε̂ = A·x_t the literal gradient is 2w·Aᵀ(ε̂ − ε)·α, SDS's is w(ε̂ − ε)."""
    g = torch.Generator().manual_seed(4)
    a_mat = torch.randn(6, 6, generator=g)
    x = torch.randn(1, 6, generator=g, requires_grad=True)
    eps = torch.randn(1, 6, generator=g)
    abar_t, w = torch.tensor([0.64]), torch.tensor([0.36])
    x_t = 0.8 * x + 0.6 * eps
    eps_pred = x_t @ a_mat.T
    diffusion.literal_loss(eps_pred, eps, w).backward()
    expected = 2 * w * ((eps_pred - eps) @ a_mat) * abar_t.sqrt()
    assert torch.allclose(x.grad, expected.detach(), atol=1e-5)
    sds = diffusion.sds_gradient(eps_pred.detach(), eps, w)
    assert not torch.allclose(sds, expected.detach(), atol=1e-3)
