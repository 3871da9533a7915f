"""Rules that replace SDS's random noise by DDIM inversion of the render: interval score matching
(ISM, LucidDreamer) and score distillation via inversion (SDI).

DDIM inversion (`diffusion.ddim_step` upwards in t) maps the render x, taken as x at t = 0, along the
deterministic sampler's trajectory: x_{k'} = α_{k'}·x̂_0(x_k) + σ_{k'}·ε̂(x_k, k), over n steps at
t_j = ⌊j·t_end/n⌋.

ISM (Liang et al., arXiv:2311.11284, eq. 14-17). With s = t − δ_T: invert x to x_s with the
unconditional ε_∅ (`inversion_steps` steps), take one more DDIM step s → t with ε_∅(x_s, s), and use
    g = w(t)(ε̂(x_t; y, t) − ε_∅(x_s; s)),  w(t) = σ_t/α_t by default (`weighting="ism"`),
so the two scores compared lie on one trajectory instead of on x and a random ε.

SDI (Lukoianov et al., arXiv:2405.15891, eq. 10-12). Invert x to x_t in `inversion_steps` steps with
ε_∅ + s_inv(ε_y − ε_∅) (the authors' configuration: s_inv = −7.5, 10 steps), read off the noise
κ = (x_t − α_t x)/σ_t that DDIM would have used, blend fresh noise into it, κ ← √(1−η²)κ + ηε
(η = `inversion_eta`, 0.3 as the authors' code; 0 is the paper's equation), and take SDS's step with κ
for ε: x_t = α_t x + σ_t κ, g = w(t)(ε̂(x_t; y, t) − κ).

Fixed points under Gaussian texts N(μ_k, s₀²I) with exact scores (guidance/analytic.py), one t. Every
map is affine: with u_k = x_k − α_k μ (μ the mean the inversion follows) one DDIM step is
u_{k'} = r(k, k')·u_k, r = (α_{k'}α_k s₀² + σ_{k'}σ_k)/v_k, v_k = α_k²s₀² + σ_k², so u_t = c_t(x − α_0 μ)
with c_t the product of the r along the steps. With m = μ_∅ + s(μ_y − μ_∅) (CFG's mean):
- ISM (μ = μ_∅): g = C(x − α_0μ_∅) − (σ_tα_t/v_t)(m − μ_∅), C = c_tσ_t/v_t − c_sσ_s/v_s, so
  x* = α_0μ_∅ + σ_tα_t(m − μ_∅)/(v_t·C): on the line from μ_∅ through m, but not at m.
- SDI (η = 0, μ = m_inv = μ_∅ + s_inv(μ_y − μ_∅)): x_t = α_t m_inv + c_t(x − α_0 m_inv) and
  g = σ_t(x_t − α_t m)/v_t − (x_t − α_t x)/σ_t = A·x + B with A = c_tσ_t/v_t − c_t/σ_t + α_t/σ_t,
  B = (σ_t/v_t − 1/σ_t)(α_t − c_tα_0)m_inv − σ_tα_t m/v_t; x* = −B/A.
tests/test_rules.py runs both rules to these points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sds3d import diffusion
from sds3d.cameras import Cameras
from sds3d.guidance.base import Prior
from sds3d.rules.base import (
    Rule,
    RuleOutput,
    draw_timesteps,
    finish,
    gaussian_like,
    predict_guided,
    to_model_space,
)
from sds3d.rules.sds import SDSRuleConfig, check_camera_guidance


def ddim_invert(
    prior: Prior,
    x: torch.Tensor,  # [B, ...] the clean render in the model's space, taken as x at t = 0
    t_end: torch.Tensor,  # [B] long
    steps: int,
    cond: Sequence[Any],
    uncond: Sequence[Any],
    cameras: Cameras | None,
    scale: float,
) -> torch.Tensor:
    """x at t_end along DDIM's deterministic trajectory, ε̂ = ε_∅ + s(ε_y − ε_∅) (only ε_∅ when
    s = 0, only ε_y when s = 1), `steps` steps at t_j = ⌊j·t_end/steps⌋."""
    abar = prior.alphas_cumprod
    for j in range(steps):
        k_from, k_to = t_end * j // steps, t_end * (j + 1) // steps
        if scale == 0.0:
            eps = prior.predict_noise(x, k_from, list(uncond), cameras)
        else:
            eps = predict_guided(prior, x, k_from, cond, uncond, cameras, scale)[0]
        x = diffusion.ddim_step(x, eps, abar[k_from], abar[k_to])
    return x


@dataclass
class ISMRuleConfig(SDSRuleConfig):
    weighting: diffusion.Weighting = "ism"
    interval: float = 0.08  # δ_T as a fraction of T: s = t − δ_T
    inversion_steps: int = 5  # DDIM steps from 0 to s
    kind: Literal["ism"] = "ism"  # type: ignore[assignment]

    def build(self) -> Rule:
        if self.inversion_steps < 1 or not 0 <= self.interval < 1:
            raise ValueError("rule.inversion_steps must be ≥ 1 and rule.interval in [0, 1)")
        check_camera_guidance(self)
        return ISMRule(self)


class ISMRule(Rule):
    config: ISMRuleConfig

    def forward(
        self,
        prior: Prior,
        rgb: torch.Tensor,
        cond: Sequence[Any],
        uncond: Sequence[Any],
        step_ratio: float,
        cameras: Cameras | None = None,
        generator: torch.Generator | None = None,
        rgb_as_latents: bool = False,
    ) -> RuleOutput:
        c = self.config
        x = to_model_space(prior, rgb, rgb_as_latents)
        t, _ = draw_timesteps(c, prior, step_ratio, x.shape[0], generator, x.device)
        s = (t - round(c.interval * prior.num_train_timesteps)).clamp_min(0)
        abar = prior.alphas_cumprod
        with torch.no_grad():
            x_s = ddim_invert(prior, x.detach(), s, c.inversion_steps, cond, uncond, cameras, 0.0)
            eps_s = prior.predict_noise(x_s, s, list(uncond), cameras)
            x_t = diffusion.ddim_step(x_s, eps_s, abar[s], abar[t])
            eps = predict_guided(
                prior, x_t, t, cond, uncond, cameras, c.guidance_scale, camera_scale=c.camera_guidance_scale
            )[0]
        weight = diffusion.sds_weight(abar[t], c.weighting)
        loss, grad_norm = finish(c, x, diffusion.sds_gradient(eps, eps_s, weight), step_ratio)
        return RuleOutput(losses={"ism": loss}, grad_norm=grad_norm, timesteps=t, noise=eps_s)


@dataclass
class SDIRuleConfig(SDSRuleConfig):
    inversion_guidance_scale: float = -7.5  # s_inv
    inversion_steps: int = 10
    inversion_eta: float = 0.3  # η: fresh noise blended into the inverted noise
    kind: Literal["sdi"] = "sdi"  # type: ignore[assignment]

    def build(self) -> Rule:
        if self.inversion_steps < 1 or not 0 <= self.inversion_eta <= 1:
            raise ValueError("rule.inversion_steps must be ≥ 1 and rule.inversion_eta in [0, 1]")
        check_camera_guidance(self)
        return SDIRule(self)


class SDIRule(Rule):
    config: SDIRuleConfig

    def forward(
        self,
        prior: Prior,
        rgb: torch.Tensor,
        cond: Sequence[Any],
        uncond: Sequence[Any],
        step_ratio: float,
        cameras: Cameras | None = None,
        generator: torch.Generator | None = None,
        rgb_as_latents: bool = False,
    ) -> RuleOutput:
        c = self.config
        x = to_model_space(prior, rgb, rgb_as_latents)
        t, g = draw_timesteps(c, prior, step_ratio, x.shape[0], generator, x.device)
        abar_t = prior.alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1))).to(x)
        alpha, sigma = abar_t.sqrt(), (1 - abar_t).sqrt()
        with torch.no_grad():
            x_inv = ddim_invert(prior, x.detach(), t, c.inversion_steps, cond, uncond, cameras,
                                c.inversion_guidance_scale)  # fmt: skip
            kappa = (x_inv - alpha * x.detach()) / sigma
            if c.inversion_eta > 0:
                kappa = math.sqrt(1 - c.inversion_eta**2) * kappa + c.inversion_eta * gaussian_like(x, g)
            x_t = alpha * x.detach() + sigma * kappa
            eps = predict_guided(
                prior, x_t, t, cond, uncond, cameras, c.guidance_scale, camera_scale=c.camera_guidance_scale
            )[0]
        weight = diffusion.sds_weight(prior.alphas_cumprod[t], c.weighting)
        loss, grad_norm = finish(c, x, diffusion.sds_gradient(eps, kappa, weight), step_ratio)
        return RuleOutput(losses={"sdi": loss}, grad_norm=grad_norm, timesteps=t, noise=kappa)
