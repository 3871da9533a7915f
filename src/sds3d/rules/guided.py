"""Rules that rewrite SDS's classifier-free-guidance score: noise-free score distillation (NFSD) and
Perp-Neg. Both keep SDS's step (t, ε, x_t = α_t x + σ_t ε) and change only what replaces ε̂ − ε.

NFSD (Katzir et al., arXiv:2310.17590, eq. 9-11). SDS's residual is split as
    ε̂ − ε = δ_D + s·δ_C + (δ_N := ε_∅ − ε − δ_D),  δ_C = ε_y − ε_∅,
and NFSD drops the noise term δ_N: g = w(t)(δ_D + s·δ_C) with the domain term
    δ_D = ε_∅(x_t)                          for t < 200 (of 1000; `t_threshold`),
    δ_D = ε_∅(x_t) − ε_neg(x_t)             otherwise, ε_neg from the paper's negative prompt.
Under Gaussian texts N(μ_k, s₀²I) (guidance/analytic.py), with k_t = α_tσ_t/v_t:
E[ε_∅] = k_t(x − μ_∅), δ_C = −k_t(μ_y − μ_∅), ε_∅ − ε_neg = k_t(μ_neg − μ_∅) for every x. For t below
the threshold g = k_t w(t)(x − m), m = μ_∅ + s(μ_y − μ_∅): SDS's fixed point. Above it g is a
constant push (no fixed point); over a t range crossing the threshold
    x* = μ_∅ + [s·E[wk](μ_y − μ_∅) − E[wk·1{t≥thr}](μ_neg − μ_∅)] / E[wk·1{t<thr}].
A prior that cannot encode the negative prompt (the world priors know only the world's words) gets
ε_neg = ε_∅, which makes δ_D = 0 above the threshold; sds3d says so once.

Perp-Neg (Armandpour et al., arXiv:2304.04968, eq. 8). With view-dependent prompts, the other views'
texts are negatives, and only the part of their direction perpendicular to the positive one is
removed, so the positive prompt is not weakened:
    e_pos = ε_pos − ε_∅,  e_i = ε_neg,i − ε_∅,
    ε̂ = ε_∅ + s(e_pos − λ Σ_i perp(e_i, e_pos)),  perp(a, b) = a − (⟨a, b⟩/‖b‖²)b (per image),
and g = w(t)(ε̂ − ε). The negatives of a front view are the side and back views, and so on; an
overhead view has none (plain CFG). threestudio also interpolates the positive embedding between
views and shapes λ by azimuth; sds3d keeps one λ (`negative_weight`) and whole texts, because a
prior's embeddings need not be tensors (the empirical prior's are image sets). Under Gaussian texts
every e is constant, so x* = μ_∅ + s(d_pos − λΣ perp(d_i, d_pos)), d = μ − μ_∅ (tests/test_rules.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from sds3d import diffusion
from sds3d.cameras import Cameras, concat_cameras, view_labels
from sds3d.errors import UserError
from sds3d.guidance.base import Prior
from sds3d.rules.base import Rule, RuleOutput, draw_timesteps, finish, gaussian_like, to_model_space
from sds3d.rules.sds import SDSRuleConfig, check_camera_guidance

if TYPE_CHECKING:
    from sds3d.prompts import PromptProcessor

# NFSD §4: the negative prompt whose score is subtracted at large t.
NFSD_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)


@dataclass
class NFSDRuleConfig(SDSRuleConfig):
    negative_prompt: str = NFSD_NEGATIVE_PROMPT
    t_threshold: float = 0.2  # below it δ_D = ε_∅ (the paper's t = 200 of 1000)
    kind: Literal["nfsd"] = "nfsd"  # type: ignore[assignment]

    def build(self) -> Rule:
        check_camera_guidance(self, supported=False)
        return NFSDRule(self)


class NFSDRule(Rule):
    config: NFSDRuleConfig

    def __init__(self, config: NFSDRuleConfig):
        super().__init__(config)
        self.negative: Any = None  # the negative prompt's embedding; None: ε_neg = ε_∅

    def prepare(self, prior: Prior, prompts: PromptProcessor) -> None:
        text = self.config.negative_prompt
        if not text:
            return
        try:
            self.negative = prompts.embedding(text)
        except UserError:
            print("sds3d: note: this prior cannot encode NFSD's negative prompt; ε_neg = ε_∅ (δ_D = 0 "
                  "above the threshold)", file=sys.stderr)  # fmt: skip

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
        b = x.shape[0]
        t, g = draw_timesteps(c, prior, step_ratio, b, generator, x.device)
        noise = gaussian_like(x, g)
        with torch.no_grad():
            x_t = diffusion.add_noise(x.detach(), noise, t, prior.alphas_cumprod)
            texts = list(uncond) + list(cond) + ([self.negative] * b if self.negative is not None else [])
            parts = len(texts) // b
            cams = None if cameras is None else _repeat_cameras(cameras, parts)
            eps = prior.predict_noise(torch.cat([x_t] * parts), t.repeat(parts), texts, cams).chunk(parts)
            eps_uncond, eps_cond = eps[0], eps[1]
            eps_neg = eps[2] if parts == 3 else eps_uncond
            below = (t < round(c.t_threshold * prior.num_train_timesteps)).reshape(-1, *([1] * (x.ndim - 1)))
            delta_d = torch.where(below, eps_uncond, eps_uncond - eps_neg)
            residual = delta_d + c.guidance_scale * (eps_cond - eps_uncond)
        weight = diffusion.sds_weight(prior.alphas_cumprod[t], c.weighting)
        grad = weight.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) * residual
        loss, grad_norm = finish(c, x, grad, step_ratio)
        return RuleOutput(losses={"nfsd": loss}, grad_norm=grad_norm, timesteps=t, noise=noise)


@dataclass
class PerpNegRuleConfig(SDSRuleConfig):
    negative_weight: float = 1.0  # λ: how much of each other view's perpendicular direction is removed
    kind: Literal["perp-neg"] = "perp-neg"  # type: ignore[assignment]

    def build(self) -> Rule:
        check_camera_guidance(self, supported=False)
        return PerpNegRule(self)


HORIZONTAL_VIEWS = ("front", "side", "back")


def perpendicular_component(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a − (⟨a, b⟩/‖b‖²)b per batch element [B, ...]; a itself where b = 0."""
    af, bf = a.flatten(1), b.flatten(1)
    norm2 = (bf * bf).sum(1, keepdim=True)
    coef = torch.where(norm2 > 0, (af * bf).sum(1, keepdim=True) / norm2.clamp_min(1e-30), 0.0)
    return (af - coef * bf).reshape(a.shape)


class PerpNegRule(Rule):
    config: PerpNegRuleConfig
    batchable = False  # the other views' texts come from the run's own prompt

    def __init__(self, config: PerpNegRuleConfig):
        super().__init__(config)
        self.views: dict[str, Any] = {}  # view label → embedding of "prompt, <label> view"
        self.thresholds: tuple[float, float, float] = (60.0, 45.0, 135.0)

    def prepare(self, prior: Prior, prompts: PromptProcessor) -> None:
        from sds3d.prompts import with_view

        self.views = {
            label: prompts.embedding(with_view(prompts.prompt, label)) for label in HORIZONTAL_VIEWS
        }
        p = prompts.config
        self.thresholds = (p.overhead_deg, p.front_deg, p.back_deg)

    def negatives(self, cameras: Cameras | None, b: int) -> tuple[list[list[Any]], torch.Tensor]:
        """Two negative texts per camera (the other horizontal views) and their on/off weights [B]."""
        if not self.views:
            raise RuntimeError("PerpNegRule.prepare(prompts) must run before the rule is used")
        if cameras is None:  # no views: no negatives
            return [[self.views["front"]] * b, [self.views["back"]] * b], torch.zeros(b)
        labels = view_labels(cameras.elevation_deg.cpu(), cameras.azimuth_deg.cpu(), *self.thresholds)
        others = [[v for v in HORIZONTAL_VIEWS if v != lab][:2] if lab != "overhead" else ["front", "back"]
                  for lab in labels]  # fmt: skip
        on = torch.tensor([0.0 if lab == "overhead" else 1.0 for lab in labels])
        return [[self.views[o[i]] for o in others] for i in (0, 1)], on

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
        b = x.shape[0]
        t, g = draw_timesteps(c, prior, step_ratio, b, generator, x.device)
        noise = gaussian_like(x, g)
        negatives, on = self.negatives(cameras, b)
        with torch.no_grad():
            x_t = diffusion.add_noise(x.detach(), noise, t, prior.alphas_cumprod)
            texts = list(uncond) + list(cond) + negatives[0] + negatives[1]
            cams = None if cameras is None else _repeat_cameras(cameras, 4)
            eps_uncond, eps_pos, eps_n1, eps_n2 = prior.predict_noise(
                torch.cat([x_t] * 4), t.repeat(4), texts, cams
            ).chunk(4)
            e_pos = eps_pos - eps_uncond
            removed = perpendicular_component(eps_n1 - eps_uncond, e_pos) + perpendicular_component(
                eps_n2 - eps_uncond, e_pos
            )
            lam = (c.negative_weight * on).to(x).reshape(-1, *([1] * (x.ndim - 1)))
            eps = eps_uncond + c.guidance_scale * (e_pos - lam * removed)
        weight = diffusion.sds_weight(prior.alphas_cumprod[t], c.weighting)
        loss, grad_norm = finish(c, x, diffusion.sds_gradient(eps, noise, weight), step_ratio)
        return RuleOutput(losses={"perp-neg": loss}, grad_norm=grad_norm, timesteps=t, noise=noise)


def _repeat_cameras(cameras: Cameras, times: int) -> Cameras:
    out = cameras
    for _ in range(times - 1):
        out = concat_cameras(out, cameras)
    return out
