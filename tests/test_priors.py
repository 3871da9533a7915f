"""The analytic priors: SDS under a Gaussian prior lands on its closed-form fixed point; the
empirical prior is the exact posterior-mean denoiser of its image set."""

from __future__ import annotations

import pytest
import torch

from sds3d.cameras import CameraConfig, orbit_cameras
from sds3d.diffusion import sds_weight
from sds3d.guidance.analytic import (
    EmpiricalPriorGuidanceConfig,
    GaussianPriorGuidanceConfig,
    ImageSet,
    WorldViewsConfig,
)
from sds3d.rules import SDSRuleConfig
from sds3d.world import parse_prompt

RES, PARTICLES = 4, 64


def _gaussian_sds(weighting: str, scale: float, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu_y = torch.rand(3, RES, RES, generator=g) - 0.5
    mu_0 = torch.rand(3, RES, RES, generator=g) - 0.5
    config = GaussianPriorGuidanceConfig(std=0.5, views=WorldViewsConfig(resolution=RES))
    guidance = config.build(CameraConfig(), means={"y": mu_y, "": mu_0})
    rule = SDSRuleConfig(guidance_scale=scale, weighting=weighting).build()
    # The free "image" is the render itself, in [0, 1]; the prior works in [−1, 1].
    fixed_point = (mu_y + (scale - 1) * (mu_y - mu_0) + 1) / 2
    x = torch.rand(PARTICLES, 3, RES, RES, generator=g).requires_grad_(True)
    initial_spread = x.detach().std(0).mean().item()
    cond, uncond = [guidance.encode_prompt("y")] * PARTICLES, [guidance.encode_prompt("")] * PARTICLES
    w_mean = sds_weight(guidance.alphas_cumprod[20:981], weighting).mean().item()
    average = torch.zeros_like(fixed_point)
    for k in range(steps):
        out = rule(guidance, x, cond, uncond, k / steps, generator=g)
        (grad,) = torch.autograd.grad(out.losses["sds"], x)
        with torch.no_grad():  # SGD with a decaying step; the loss is a batch mean, hence × PARTICLES
            x -= PARTICLES * 0.5 / (1 + k / 20) / w_mean * grad
        if k >= steps // 2:  # Polyak averaging of the particle mean over the second half
            average += x.detach().mean(0) / (steps - steps // 2)
    return average, fixed_point, initial_spread, x.detach().std(0).mean().item()


@pytest.mark.parametrize("weighting", ["dreamfusion", "seed", "uniform", "fantasia3d", "ism"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_gaussian_prior_sds_converges_to_the_closed_form_fixed_point(weighting, scale):
    average, fixed_point, _, _ = _gaussian_sds(weighting, scale, steps=4000)
    assert ((average - fixed_point).norm() / fixed_point.norm()).item() < 0.01


def test_independent_particles_collapse_to_one_point():
    _, _, initial, final = _gaussian_sds("dreamfusion", 7.5, steps=2000, seed=1)
    assert final < initial / 20


def test_fixed_point_moves_linearly_with_the_guidance_scale():
    """‖m − μ_y‖ grows linearly with ω = s − 1: the analytic over-saturation of large CFG."""
    a2, _, _, _ = _gaussian_sds("dreamfusion", 2.0, steps=2000)
    a3, _, _, _ = _gaussian_sds("dreamfusion", 3.0, steps=2000)
    a1, _, _, _ = _gaussian_sds("dreamfusion", 1.0, steps=2000)
    assert ((a3 - a1).norm() / (a2 - a1).norm()).item() == pytest.approx(2.0, rel=0.05)


def _tiny_empirical(kernel=None):
    config = EmpiricalPriorGuidanceConfig(
        views=WorldViewsConfig(resolution=8, views_per_object=12), camera_kernel_deg=kernel
    )
    return config.build(CameraConfig())


def test_empirical_prior_is_the_posterior_mean_of_its_set():
    guidance = _tiny_empirical()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3 * 8 * 8, generator=g) * 2 - 1
    image_set = ImageSet(images, torch.eye(3)[:2], ["front", "side"])
    t = torch.tensor([400])
    abar = guidance.alphas_cumprod[400]
    x_t = torch.randn(1, 3, 8, 8, generator=g)
    eps = guidance.predict_noise(x_t, t, [image_set], None)
    # By hand: posterior weights ∝ exp(−‖x_t − α x_i‖²/2σ²).
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    d = ((x_t.reshape(1, -1) - alpha * images) ** 2).sum(1)
    w = torch.exp(-(d - d.min()) / (2 * sigma**2))
    x0 = (w[:, None] * images).sum(0) / w.sum()
    assert torch.allclose(eps.reshape(-1), (x_t.reshape(-1) - alpha * x0) / sigma, atol=1e-4)


def test_empirical_prior_at_low_noise_denoises_to_the_nearest_image():
    guidance = _tiny_empirical()
    image_set = guidance.encode_prompt("a green cone")
    target = image_set.images[5].reshape(1, 3, 8, 8)
    t = torch.tensor([5])
    abar = guidance.alphas_cumprod[t]
    noise = 0.5 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x_t = abar.sqrt() * target + (1 - abar).sqrt() * noise
    eps = guidance.predict_noise(x_t, t, [image_set], None)
    assert torch.allclose(eps, noise, atol=1e-3)  # ε̂ recovers the noise exactly: x̂_0 is the image


def test_view_suffix_selects_the_views_and_camera_kernel_prefers_near_images():
    guidance = _tiny_empirical(kernel=5.0)
    every = guidance.encode_prompt("a red cube")
    front = guidance.encode_prompt("a red cube, front view")
    assert 0 < len(front.labels) < len(every.labels) and set(front.labels) == {"front"}
    # At huge noise the images barely differ in likelihood, so the camera kernel decides.
    i = 3
    el, az = (
        torch.rad2deg(torch.asin(every.directions[i, 2:3])),
        torch.rad2deg(torch.atan2(every.directions[i, 1:2], every.directions[i, 0:1])),
    )
    cam = orbit_cameras(el, az, torch.tensor([2.5]), torch.tensor([40.0]), 8, 8)
    t = torch.tensor([999])
    x_t = torch.zeros(1, 3, 8, 8)
    eps = guidance.predict_noise(x_t, t, [every], cam)
    abar = guidance.alphas_cumprod[999]
    x0 = (x_t.reshape(-1) - (1 - abar).sqrt() * eps.reshape(-1)) / abar.sqrt()
    assert torch.allclose(x0, every.images[i], atol=1e-2)


def test_unknown_world_prompt_is_a_user_error():
    from sds3d.errors import UserError

    with pytest.raises(UserError, match="synthetic-world"):
        _tiny_empirical().encode_prompt("a photo of a dog")
    assert parse_prompt("A Blue Torus, side view").shape == "torus"


@pytest.mark.parametrize("t", [100, 500, 900])
def test_gaussian_prior_predicts_the_exact_noise_of_its_marginal(t):
    """p_t = N(α_t μ, v_t I) with v_t = α_t² s² + σ_t²: ε* = σ_t (x_t − α_t μ)/v_t, computed here from
    ᾱ_t alone (the fixed-point test cannot see v_t: it only scales the step)."""
    g = torch.Generator().manual_seed(t)
    mu = torch.rand(3, RES, RES, generator=g) * 2 - 1
    std = 0.3
    config = GaussianPriorGuidanceConfig(std=std, views=WorldViewsConfig(resolution=RES))
    guidance = config.build(CameraConfig(), means={"y": mu})
    x_t = torch.randn(2, 3, RES, RES, generator=g)
    abar = float(guidance.alphas_cumprod[t])
    expected = (1 - abar) ** 0.5 * (x_t - abar**0.5 * mu) / (abar * std**2 + (1 - abar))
    eps = guidance.predict_noise(x_t, torch.tensor([t, t]), [mu, mu], None)
    assert torch.allclose(eps, expected, atol=1e-5)
