"""Score distillation (DreamFusion), the literal diffusion loss it simplifies, classifier score
distillation (CSD), which keeps only SDS's guidance term, and score Jacobian chaining (SJC).

The step (DreamFusion eq. 3; `diffusion.py` has the derivation):
    x = E(render); t ~ schedule(step_ratio); ε ~ N(0, I); x_t = α_t x + σ_t ε
    ε̂ = ε_∅ + s(ε_y − ε_∅);  g = clip(guard(w(t)(ε̂ − ε)));  loss = 0.5‖x − sg(x − g)‖² / B
so that ∂loss/∂x = g/B (the batch mean, as threestudio). The `literal` rule's loss is
Σ w(t)‖ε̂ − ε‖²/B back-propagated through the denoiser (the Jacobian SDS omits). Debiased SDS
(Hong et al., arXiv:2303.15413) is `grad_clip`.

CSD (Yu et al., arXiv:2310.19415): SDS's ε̂ − ε = (ε_∅ − ε) + s(ε_y − ε_∅) split into a
generative and a classifier term; CSD keeps the second, g = w(t)·s·(ε_y − ε_∅), so the sampled noise
enters only through x_t. For two Gaussians N(μ_y, s_0²I), N(μ_∅, s_0²I) (guidance/analytic.py)
ε_y − ε_∅ = α_t σ_t (μ_∅ − μ_y)/v_t for every x: a constant push along μ_y − μ_∅, with no fixed point
(tests/test_rules.py).

SJC (Wang et al., arXiv:2212.00774, eq. 9-11): the score of the clean render is estimated by
perturb-and-average scoring (PAAS) in the variance-exploding view x̃ = x + σ̃n, σ̃ = σ_t/α_t, with
D(x̃) = x̃ − σ̃ε̂: score(x) ≈ E_n[(D(x̃) − x)/σ̃²] = E_n[(n − ε̂)/σ̃]. Descending −log p, the gradient on x
is E_n[(α_t/σ_t)(ε̂ − n)]: SDS with w(t) = α_t/σ_t (`weighting="sjc"`), averaged over `paas_samples`
draws of n. Its expected gradient under a Gaussian prior is that of SDS, so its fixed point is SDS's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sds3d import diffusion
from sds3d.cameras import Cameras
from sds3d.guidance.base import Prior
from sds3d.ramp import Scheduled
from sds3d.rules.base import Rule, RuleOutput, draw_timesteps, finish, gaussian_like, predict_guided


@dataclass
class SDSRuleConfig:
    guidance_scale: float = 1.0  # s in ε̂ = ε_∅ + s(ε_y − ε_∅); DreamFusion's ω = s − 1
    weighting: diffusion.Weighting = "dreamfusion"
    t_schedule: diffusion.TimestepSchedule = "constant"
    t_min: float = 0.02
    t_max: float = 0.98
    t_max_end: float = 0.5  # where `linear` and `step` schedules lower t_max to
    t_drop_at: float = 0.5  # step ratio of the `step` schedule's drop
    grad_clip: Scheduled | None = None  # Debiased SDS: clamp g to ±c(step_ratio)
    kind: Literal["sds", "literal", "csd"] = "sds"  # literal: through the denoiser; csd: classifier term only
    # Camera guidance s_c (a camera-conditioned prior): ε̂ += s_c(ε_y − ε_{y,no camera}), which
    # amplifies what the camera says about the view (where an object's front is). 0: off.
    camera_guidance_scale: float = 0.0

    def build(self) -> Rule:
        check_camera_guidance(self, supported=self.kind != "csd")
        return SDSRule(self)


def check_camera_guidance(config: SDSRuleConfig, supported: bool = True) -> None:
    if config.camera_guidance_scale < 0:
        raise ValueError(f"rule.camera_guidance_scale must be ≥ 0, not {config.camera_guidance_scale}")
    if config.camera_guidance_scale and not supported:
        raise ValueError(
            f"the {config.kind} rule has no camera guidance; leave rule.camera_guidance_scale at 0"
        )


@dataclass
class SJCRuleConfig(SDSRuleConfig):
    weighting: diffusion.Weighting = "sjc"  # α_t/σ_t: the PAAS score, not a choice
    paas_samples: int = 1  # draws of n averaged per step (the paper's k; 1 in its experiments)
    kind: Literal["sjc"] = "sjc"  # type: ignore[assignment]

    def build(self) -> Rule:
        if self.paas_samples < 1:
            raise ValueError(f"rule.paas_samples must be at least 1, not {self.paas_samples}")
        check_camera_guidance(self)
        return SDSRule(self)


class SDSRule(Rule):
    config: SDSRuleConfig

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
        x = prior.latents_from_render(rgb) if rgb_as_latents else prior.encode_images(rgb)
        b = x.shape[0]
        # 1. Timestep and noise.
        t, g = draw_timesteps(c, prior, step_ratio, b, generator, x.device)
        samples = c.paas_samples if isinstance(c, SJCRuleConfig) else 1
        weight = diffusion.sds_weight(prior.alphas_cumprod[t], c.weighting)
        literal = c.kind == "literal"
        grad = torch.zeros_like(x)
        for _ in range(samples):  # SJC's PAAS average; one pass for the other rules
            noise = gaussian_like(x, g)
            # 2. ε̂ with CFG, conditional and unconditional in one batch (skipped when s = 1, except by CSD).
            with torch.set_grad_enabled(literal and torch.is_grad_enabled()):
                x_t = diffusion.add_noise(x if literal else x.detach(), noise, t, prior.alphas_cumprod)
                eps, eps_uncond, eps_cond = predict_guided(
                    prior,
                    x_t,
                    t,
                    cond,
                    uncond,
                    cameras,
                    c.guidance_scale,
                    always_both=c.kind == "csd",
                    camera_scale=c.camera_guidance_scale,
                )
            # 3. w(t)(ε̂ − ε) (CSD: w(t)·s(ε_y − ε_∅)).
            if c.kind == "csd":
                assert eps_uncond is not None
                grad = grad + diffusion.sds_gradient(
                    c.guidance_scale * eps_cond.detach(), c.guidance_scale * eps_uncond, weight
                )
            else:
                grad = grad + diffusion.sds_gradient(eps.detach(), noise, weight)
        grad = grad / samples if samples > 1 else grad
        # 4. Guarded, clipped and injected as a gradient (literal: back-propagated through the denoiser).
        loss, grad_norm = finish(c, x, grad, step_ratio)
        if literal:
            loss = diffusion.literal_loss(eps, noise, weight) / b
        return RuleOutput(losses={c.kind: loss}, grad_norm=grad_norm, timesteps=t, noise=noise)
