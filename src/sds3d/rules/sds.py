"""Score distillation (DreamFusion), the literal diffusion loss it simplifies, and classifier score
distillation (CSD), which keeps only SDS's guidance term.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sds3d import diffusion
from sds3d.cameras import Cameras, concat_cameras
from sds3d.devices import device_generator
from sds3d.guidance.base import Prior
from sds3d.ramp import Scheduled, value_at
from sds3d.rules.base import Rule, RuleOutput


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

    def build(self) -> SDSRule:
        return SDSRule(self)


class SDSRule(Rule):
    def __init__(self, config: SDSRuleConfig):
        super().__init__()
        self.config = config

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
        bounds = diffusion.timestep_bounds(
            c.t_schedule, step_ratio, c.t_min, c.t_max, c.t_max_end, c.t_drop_at
        )
        # On a GPU drawn there from a seed of the run's generator (no host copy, no sync); the run's
        # generator itself on the CPU.
        g = device_generator(generator, x.device)
        t = diffusion.sample_timesteps(b, bounds, prior.num_train_timesteps, g, x.device)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32, device=x.device).to(x)
        abar_t = prior.alphas_cumprod[t]
        literal = c.kind == "literal"
        # 2. ε̂ with CFG, conditional and unconditional in one batch (skipped when s = 1, except by CSD).
        with torch.set_grad_enabled(literal and torch.is_grad_enabled()):
            x_t = diffusion.add_noise(x if literal else x.detach(), noise, t, prior.alphas_cumprod)
            if c.guidance_scale == 1.0 and c.kind != "csd":
                eps = prior.predict_noise(x_t, t, list(cond), cameras)
            else:
                both_cams = None if cameras is None else concat_cameras(cameras, cameras)
                eps_both = prior.predict_noise(
                    torch.cat([x_t, x_t]), torch.cat([t, t]), list(uncond) + list(cond), both_cams
                )
                eps_uncond, eps_cond = eps_both.chunk(2)
                eps = diffusion.classifier_free_guidance(eps_uncond, eps_cond, c.guidance_scale)
        # 3. w(t)(ε̂ − ε) (CSD: w(t)·s(ε_y − ε_∅)), guarded and clipped, injected as a gradient.
        weight = diffusion.sds_weight(abar_t, c.weighting)
        if c.kind == "csd":
            grad = diffusion.sds_gradient(
                c.guidance_scale * eps_cond.detach(), c.guidance_scale * eps_uncond, weight
            )
        else:
            grad = diffusion.sds_gradient(eps.detach(), noise, weight)
        grad = diffusion.nan_guard(grad)
        if c.grad_clip is not None:
            grad = diffusion.clip_gradient(grad, value_at(c.grad_clip, step_ratio))
        if literal:
            loss = diffusion.literal_loss(eps, noise, weight) / b
        else:
            loss = diffusion.reparameterised_loss(x, grad) / b
        grad_norm = grad.flatten(1).norm(dim=1).mean()
        return RuleOutput(losses={c.kind: loss}, grad_norm=grad_norm, timesteps=t, noise=noise)
