"""The rules against analytic truth: exact Gaussian (and Gaussian-mixture) priors, where every
score is known in closed form, so each rule's fixed point can be derived (rules/*.py docstrings) and
the rule run to it.

Set-up: images are vectors x ∈ R^D (shape [B, D, 1, 1]), the prior's space is the render itself, and
a text's embedding is its mean μ: p_t = N(α_t μ, v_t I), v_t = α_t²s₀² + σ_t², ε*(x_t) = σ_t(x_t − α_tμ)/v_t.
A scene is one x rendered B times, so one step's gradient on x is the mean of B independent draws of
(t, ε): the noise of a step shrinks as 1/√B and plain gradient descent settles on the fixed point.
"""

from __future__ import annotations

import math

import pytest
import torch

from sds3d import diffusion
from sds3d.guidance.base import Prior
from sds3d.rules import with_rule
from sds3d.rules.sds import SDSRuleConfig

S0 = 0.5  # the prior's std s₀
D = 3


class ExactGaussianPrior(Prior):
    """N(μ_text, s₀²I) in the render's own space; the embedding of a text is its mean."""

    def __init__(self, means: dict[str, torch.Tensor]):
        super().__init__(diffusion.DDPM_SCHEDULER_CONFIG)
        self.means = means
        self.abar64 = self.alphas_cumprod.double()

    def encode_prompt(self, text: str) -> torch.Tensor:
        return self.means[text]

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb

    def predict_noise(self, x_t, t, embeddings, cameras):
        mu = torch.stack(list(embeddings)).reshape(x_t.shape).to(x_t)
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1).to(x_t)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return sigma * (x_t - alpha * mu) / (alpha**2 * S0**2 + sigma**2)


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(D, 1, 1)


MU_Y, MU_0, MU_NEG = vec(0.6, -0.2, 0.3), vec(-0.1, 0.1, 0.0), vec(0.2, 0.5, -0.4)


def descend(rule, prior, x0: torch.Tensor, cond, uncond, steps: int, lr: float, copies: int = 256,
            average_last: int = 0, cameras=None, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Gradient descent on one x rendered `copies` times; the mean of the last iterates if asked."""
    x = x0.clone().reshape(1, D, 1, 1).requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    kept = []
    for i in range(steps):
        out = rule(prior, x.expand(copies, -1, -1, -1), [cond] * copies, [uncond] * copies, 0.5,
                   cameras=cameras, generator=g)  # fmt: skip
        (grad,) = torch.autograd.grad(sum(out.losses.values()), x)
        with torch.no_grad():
            x -= lr * grad  # the loss is a batch mean, so this is the mean of the copies' gradients
        if i >= steps - average_last:
            kept.append(x.detach().clone())
    return torch.stack(kept).mean(0).reshape(D, 1, 1) if kept else x.detach().reshape(D, 1, 1)


def scalars(prior: ExactGaussianPrior, t: int) -> tuple[float, float, float]:
    """(α_t, σ_t, v_t) in float64."""
    a = float(prior.abar64[t])
    return math.sqrt(a), math.sqrt(1 - a), a * S0**2 + (1 - a)


def fixed_t(rule_name: str, t: int, scale: float, **fields) -> SDSRuleConfig:
    base = SDSRuleConfig(guidance_scale=scale, weighting="uniform", t_min=t / 1000, t_max=t / 1000)
    config = with_rule(base, rule_name)
    for k, v in fields.items():
        setattr(config, k, v)
    return config


@pytest.mark.parametrize("name", ["sds", "sjc"])
def test_sds_and_sjc_settle_on_the_cfg_mean(name):
    """SDS (and SJC, whose PAAS score has SDS's expectation): x* = m = μ_∅ + s(μ_y − μ_∅)."""
    prior, scale = ExactGaussianPrior({"y": MU_Y, "": MU_0}), 1.5
    rule = fixed_t(name, 300, scale).build()
    x = descend(rule, prior, torch.zeros(D), MU_Y, MU_0, steps=150, lr=0.5 if name == "sjc" else 1.0,
                average_last=50)  # fmt: skip
    assert torch.allclose(x, MU_0 + scale * (MU_Y - MU_0), atol=0.02)


def test_nfsd_settles_on_the_cfg_mean_below_the_threshold_and_is_a_constant_push_above():
    prior, scale = ExactGaussianPrior({"y": MU_Y, "": MU_0, "neg": MU_NEG}), 2.0
    below = fixed_t("nfsd", 100, scale).build()
    below.negative = MU_NEG
    x = descend(below, prior, torch.zeros(D), MU_Y, MU_0, steps=150, lr=1.0, average_last=50)
    assert torch.allclose(x, MU_0 + scale * (MU_Y - MU_0), atol=0.02)
    # Above it: g = k(μ_neg − μ_∅) − s·k(μ_y − μ_∅) whatever x is (no noise term either).
    above = fixed_t("nfsd", 500, scale).build()
    above.negative = MU_NEG
    grads = []
    for start in (torch.zeros(D), torch.ones(D)):
        x = start.reshape(1, D, 1, 1).requires_grad_(True)
        out = above(prior, x, [MU_Y], [MU_0], 0.5, generator=torch.Generator().manual_seed(1))
        grads.append(torch.autograd.grad(out.losses["nfsd"], x)[0].reshape(D, 1, 1))
    a, s, v = scalars(prior, 500)
    k = s * a / v
    expected = k * (MU_NEG - MU_0) - scale * k * (MU_Y - MU_0)
    assert torch.allclose(grads[0], expected, atol=1e-5) and torch.allclose(grads[1], expected, atol=1e-5)


def test_nfsd_over_a_t_range_crossing_the_threshold_lands_on_the_derived_point():
    """x* = μ_∅ + [s·E[wk](μ_y − μ_∅) − E[wk·1{t≥thr}](μ_neg − μ_∅)] / E[wk·1{t<thr}] (rules/guided.py)."""
    prior, scale = ExactGaussianPrior({"y": MU_Y, "": MU_0}), 2.0
    config = with_rule(SDSRuleConfig(guidance_scale=scale, weighting="uniform", t_min=0.1, t_max=0.3), "nfsd")
    rule = config.build()
    rule.negative = MU_NEG
    ks = [(lambda a, s, v: s * a / v)(*scalars(prior, t)) for t in range(100, 301)]
    below = sum(k for t, k in zip(range(100, 301), ks, strict=True) if t < 200) / len(ks)
    above = sum(k for t, k in zip(range(100, 301), ks, strict=True) if t >= 200) / len(ks)
    expected = MU_0 + (scale * (below + above) * (MU_Y - MU_0) - above * (MU_NEG - MU_0)) / below
    x = descend(rule, prior, torch.zeros(D), MU_Y, MU_0, steps=400, lr=0.5, copies=512, average_last=200)
    assert torch.allclose(x, expected, atol=0.04), (x.flatten(), expected.flatten())
    assert not torch.allclose(x, MU_0 + scale * (MU_Y - MU_0), atol=0.1)  # not SDS's point


def ddim_factor(prior: ExactGaussianPrior, steps: list[int]) -> float:
    """c: u ↦ c·u along DDIM steps t_0 → t_1 → … for N(μ, s₀²I), r = (α'αs₀² + σ'σ)/v (inversion.py)."""
    c = 1.0
    for k, k2 in zip(steps, steps[1:], strict=False):
        a, s, v = scalars(prior, k)
        a2, s2, _ = scalars(prior, k2)
        c *= (a2 * a * S0**2 + s2 * s) / v
    return c


@pytest.mark.parametrize("t", [100, 300])
def test_ism_lands_on_its_derived_point_beyond_the_cfg_mean(t):
    """x* = α_0μ_∅ + σ_tα_t(m − μ_∅)/(v_t C), C = c_tσ_t/v_t − c_sσ_s/v_s: on the line μ_∅ → m, k/C times
    as far (1.32 at t = 100 and 6.2 at t = 300 for δ_T = 80, s₀ = 0.5): ISM over-shoots SDS's point."""
    prior, scale, n = ExactGaussianPrior({"y": MU_Y, "": MU_0}), 1.5, 5
    rule = fixed_t("ism", t, scale, interval=0.08, inversion_steps=n).build()
    s = t - 80
    grid = [s * j // n for j in range(n + 1)]
    c_s = ddim_factor(prior, grid)
    c_t = c_s * ddim_factor(prior, [s, t])
    a_t, s_t, v_t = scalars(prior, t)
    a_s, s_s, v_s = scalars(prior, s)
    C = c_t * s_t / v_t - c_s * s_s / v_s
    m = MU_0 + scale * (MU_Y - MU_0)
    expected = math.sqrt(float(prior.abar64[0])) * MU_0 + (s_t * a_t / (v_t * C)) * (m - MU_0)
    lr = 0.9 / (C * (1 - 0))  # uniform w: g = C(x − x*)
    x = descend(rule, prior, torch.zeros(D), MU_Y, MU_0, steps=60, lr=lr, copies=1)
    assert torch.allclose(x, expected, atol=1e-3), (x.flatten(), expected.flatten())
    assert (expected - m).abs().max() > 0.05  # a point distinct from SDS's


def test_sdi_without_fresh_noise_lands_on_its_derived_point():
    """η = 0: g = A·x + B (rules/inversion.py), x* = −B/A; the inversion follows m_inv = μ_∅ + s_inv(μ_y − μ_∅)."""
    prior, scale, s_inv, n, t = ExactGaussianPrior({"y": MU_Y, "": MU_0}), 1.5, -2.0, 10, 300
    rule = fixed_t(
        "sdi", t, scale, inversion_guidance_scale=s_inv, inversion_steps=n, inversion_eta=0.0
    ).build()
    c_t = ddim_factor(prior, [t * j // n for j in range(n + 1)])
    a, s, v = scalars(prior, t)
    a0 = math.sqrt(float(prior.abar64[0]))
    m, m_inv = MU_0 + scale * (MU_Y - MU_0), MU_0 + s_inv * (MU_Y - MU_0)
    A = c_t * s / v - c_t / s + a / s
    B = (s / v - 1 / s) * (a - c_t * a0) * m_inv - s * a * m / v
    expected = -B / A
    x = descend(rule, prior, torch.zeros(D), MU_Y, MU_0, steps=80, lr=0.9 / A, copies=1)
    assert A > 0 and torch.allclose(x, expected, atol=1e-3), (x.flatten(), expected.flatten())


def test_perp_neg_lands_on_the_cfg_mean_minus_the_perpendicular_negatives():
    """x* = μ_∅ + s(d_pos − λΣ_i perp(d_i, d_pos)), d = μ − μ_∅, for a front camera (negatives: side, back)."""
    from sds3d.cameras import orbit_cameras
    from sds3d.prompts import PromptConfig, PromptProcessor
    from sds3d.rules.guided import perpendicular_component

    views = {"front": vec(0.6, -0.2, 0.3), "side": vec(0.1, 0.4, 0.2), "back": vec(-0.3, 0.3, 0.5)}
    means = {f"a red cube, {k} view": v for k, v in views.items()} | {"": MU_0}
    prior, scale, lam = ExactGaussianPrior(means), 1.5, 0.7
    rule = fixed_t("perp-neg", 300, scale, negative_weight=lam).build()
    rule.prepare(prior, PromptProcessor("a red cube", PromptConfig(), prior.encode_prompt))
    copies = 256
    one = lambda v: torch.full((copies,), float(v))  # noqa: E731
    cams = orbit_cameras(one(10.0), one(5.0), one(2.5), one(40.0), 8, 8)  # a front view
    d = {k: (v - MU_0).reshape(1, D) for k, v in views.items()}
    removed = sum(perpendicular_component(d[k], d["front"]) for k in ("side", "back"))
    expected = MU_0 + scale * (d["front"] - lam * removed).reshape(D, 1, 1)
    x = descend(rule, prior, torch.zeros(D), views["front"], MU_0, steps=150, lr=1.0, average_last=50,
                cameras=cams)  # fmt: skip
    assert torch.allclose(x, expected, atol=0.02), (x.flatten(), expected.flatten())
    assert (expected - (MU_0 + scale * (views["front"] - MU_0))).abs().max() > 0.1  # the negatives matter


class GaussianParticleScore(torch.nn.Module):
    """h = ε_q(x_t) − ε_y(x_t) with q = N(m_q, S_q) fitted to the current particles, per dimension:
    VSD with the exact score of its own particle distribution."""

    def __init__(self, prior: ExactGaussianPrior, mu: torch.Tensor):
        super().__init__()
        self.prior, self.mu = prior, mu.reshape(1, D, 1, 1)
        self.m_q = torch.zeros(1, D, 1, 1)
        self.var_q = torch.ones(1, D, 1, 1)

    def forward(self, x_t, t_frac, camera):
        t = (t_frac * self.prior.num_train_timesteps).round().long()
        abar = self.prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps_q = s * (x_t - a * self.m_q) / (a**2 * self.var_q + s**2)
        eps_p = s * (x_t - a * self.mu) / (a**2 * S0**2 + s**2)
        return eps_q - eps_p


def run_particles(name: str, n: int = 512, draws: int = 16) -> torch.Tensor:
    """n particles of one shared distribution, started in a tight cloud away from μ_y, each rendered
    `draws` times a step (its gradient is the mean of as many (t, ε) draws); t ~ U[0.05, 0.5],
    w = 1, learning rate 0.5 for 300 steps and 0.05 for 200."""
    prior = ExactGaussianPrior({"y": MU_Y, "": MU_0})
    config = with_rule(SDSRuleConfig(guidance_scale=1.0, weighting="uniform", t_min=0.05, t_max=0.5), name)
    rule = config.build()
    oracle = GaussianParticleScore(prior, MU_Y)
    if name == "vsd":
        rule.particle = oracle
    g = torch.Generator().manual_seed(0)
    x = (0.05 * torch.randn(n, D, 1, 1, generator=g) - 0.5).requires_grad_(True)
    for i in range(500):
        oracle.m_q, oracle.var_q = x.detach().mean(0, keepdim=True), x.detach().var(0, keepdim=True)
        rendered = x.repeat_interleave(draws, 0)
        out = rule(prior, rendered, [MU_Y] * n * draws, [MU_0] * n * draws, 0.5, generator=g)
        (grad,) = torch.autograd.grad(out.losses[name], x)
        with torch.no_grad():
            x -= (0.5 if i < 300 else 0.05) * grad * n  # each particle: the mean over its draws
    return x.detach()


def test_vsd_particles_spread_over_the_prior_while_sds_particles_collapse():
    """With the exact score of its own particles VSD's fixed point is q = p = N(μ_y, s₀²I): 512
    particles reach mean μ_y and std s₀. Tolerances: the std of a sample mean of 512 draws of
    N(·, 0.25) is 0.022 and of a sample std 0.016; the step noise adds a little, so mean within
    0.08 and std within 0.06 (about 3.5σ). SDS drives every particle to μ_y: std < 0.1·s₀."""
    vsd, sds = run_particles("vsd"), run_particles("sds")
    for x in (vsd, sds):
        assert torch.allclose(x.mean(0), MU_Y, atol=0.08), x.mean(0).flatten()
    assert torch.allclose(vsd.std(0), torch.full((D, 1, 1), S0), atol=0.06), vsd.std(0).flatten()
    assert float(sds.std(0).max()) < 0.1 * S0, sds.std(0).flatten()


class MixturePrior(Prior):
    """p = ½N(a, s²I) + ½N(b, s²I) in 2-D: ε*(x_t) = σ Σ_k r_k(x_t)(x_t − α μ_k)/v_t."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, std: float):
        super().__init__(diffusion.DDPM_SCHEDULER_CONFIG)
        self.modes, self.std = torch.stack([a, b]), std

    def encode_prompt(self, text):
        return None

    def encode_images(self, rgb):
        return rgb

    def predict_noise(self, x_t, t, embeddings, cameras):
        abar = self.alphas_cumprod[t].reshape(-1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        v = a**2 * self.std**2 + s**2
        x = x_t.reshape(len(t), 1, 2)
        diff = x - a[:, :, None] * self.modes[None]  # [B, 2 modes, 2]
        r = torch.softmax(-(diff**2).sum(-1) / (2 * v), dim=1)  # [B, 2]
        return (s * (r[:, :, None] * diff).sum(1) / v).reshape(x_t.shape)


def mixture_particles(t_min: float, t_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.5])
    prior = MixturePrior(a, b, 0.2)
    rule = SDSRuleConfig(guidance_scale=1.0, weighting="dreamfusion", t_min=t_min, t_max=t_max).build()
    g = torch.Generator().manual_seed(0)
    mid = (a + b) / 2
    starts = mid + torch.tensor([[0.3, -0.1], [-0.3, 0.1]]).repeat_interleave(32, 0)
    x = (starts + 0.02 * torch.randn(64, 2, generator=g)).reshape(64, 2, 1, 1).requires_grad_(True)
    for i in range(600):
        out = rule(prior, x, [None] * 64, [None] * 64, 0.5, generator=g)
        (grad,) = torch.autograd.grad(out.losses["sds"], x)
        with torch.no_grad():
            x -= (0.1 if i < 500 else 0.02) * grad * 64
    return x.detach().reshape(64, 2), a, b


def test_sds_seeks_the_mode_nearest_each_start_in_a_two_mode_mixture():
    """SDS is mode seeking: particles started on either side of the midpoint of ½N(a) + ½N(b) end at
    the mode on their side (each within 0.05), none at the mixture's mean (a + b)/2, and the
    particles do not spread over the modes' width (std ≪ the modes' std 0.2). That holds for small t
    (here t ≤ 0.15T, where p_t still has two modes); with only large t (≥ 0.5T, p_t one blurred
    mode) the same particles end at the mixture's mean instead, within 0.1."""
    x, a, b = mixture_particles(0.02, 0.15)
    mid = (a + b) / 2
    assert torch.allclose(x[:32].mean(0), a, atol=0.05) and torch.allclose(x[32:].mean(0), b, atol=0.05)
    assert float((x - mid).norm(dim=1).min()) > 0.5  # nobody at the mean of the mixture
    assert float(x[:32].std(0).max()) < 0.05 and float(x[32:].std(0).max()) < 0.05
    late, _, _ = mixture_particles(0.5, 0.6)
    assert float((late - mid).norm(dim=1).max()) < 0.1, late.mean(0)
