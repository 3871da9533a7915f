"""Diffusion math for score distillation, as pure functions of tensors.

Conventions (DDPM, Ho et al. 2020; DreamFusion, Poole et al. 2022, arXiv:2209.14988):
- ᾱ_t is the cumulative product of (1 − β_t) of a diffusers scheduler, t an integer in [0, T).
- Forward noising: x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε, ε ~ N(0, I); α_t := sqrt(ᾱ_t), σ_t := sqrt(1 − ᾱ_t).
- Classifier-free guidance uses the diffusers convention ε̂ = ε_∅ + s(ε_y − ε_∅). DreamFusion writes
  ε̂ = ε_y + ω(ε_y − ε_∅), so its ω = 100 is s = 101 here; threestudio's SD guidance (`guidance_scale`
  100, applied as ε_y + 100(ε_y − ε_∅)) behaves as s = 101 too. Every preset names its s.
- Timesteps are handled as fractions of T in configs (t_min = 0.02 means t = 20 of 1000).

The SDS gradient (DreamFusion eq. 3). The diffusion loss on a render x = g(θ) is
    L(θ) = E_{t,ε}[ w(t) ‖ε̂(α_t x + σ_t ε; y, t) − ε‖² ].
Its gradient is E[ w(t)(ε̂ − ε)(∂ε̂/∂x_t · α_t) ∂x/∂θ ] (constants folded into w). The U-Net Jacobian
∂ε̂/∂x_t is expensive and, DreamFusion shows, unnecessary; dropping it leaves
    ∇_θ L_SDS = E_{t,ε}[ w(t)(ε̂ − ε) ∂x/∂θ ],
which is injected into autograd with the reparameterised loss 0.5‖x − sg(x − g)‖², whose gradient
with respect to x is exactly g (`reparameterised_loss`). `literal_loss` keeps the Jacobian instead.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Weighting = Literal["dreamfusion", "seed", "uniform", "fantasia3d", "ism", "sjc"]
TimestepSchedule = Literal["constant", "linear", "sqrt", "step", "dreamtime"]

WEIGHTINGS: tuple[str, ...] = ("dreamfusion", "seed", "uniform", "fantasia3d", "ism", "sjc")
TIMESTEP_SCHEDULES: tuple[str, ...] = ("constant", "linear", "sqrt", "step", "dreamtime")

# Stable Diffusion's scheduler (runwayml/stable-diffusion-v1-5 scheduler_config.json).
SD_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
# DDPM's linear schedule (Ho et al. 2020), used by pixel-space priors. No clipping of the predicted
# x_0 when sampling: near t = T the ε-error is amplified ~100× in x_0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ, and
# clipping that to [−1, 1] (diffusers' default) paints saturated colours that DDIM then keeps — it
# cost the built-in prior's samples most of their shape accuracy (model card). SDS reads only ᾱ.
DDPM_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
}


def alphas_cumprod_from_config(scheduler_config: dict) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t}(1 − β_s) for t = 0..T−1, read from a diffusers scheduler config.

    The betas are computed by diffusers' `DDPMScheduler` itself, so any config that loads a
    scheduler (SD, DeepFloyd IF, our own prior) gives the same ᾱ_t as its sampler. [T] float32.
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    return scheduler.alphas_cumprod.to(torch.float32).clone()


def add_noise(
    x: torch.Tensor,  # [B, ...]
    noise: torch.Tensor,  # [B, ...]
    timesteps: torch.Tensor,  # [B] long
    alphas_cumprod: torch.Tensor,  # [T]
) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε, identical to `diffusers.DDPMScheduler.add_noise`."""
    abar = alphas_cumprod.to(device=x.device, dtype=x.dtype)[timesteps]
    abar = abar.reshape(-1, *([1] * (x.ndim - 1)))
    return abar.sqrt() * x + (1 - abar).sqrt() * noise


def timestep_bounds(
    schedule: TimestepSchedule,
    step_ratio: float,
    t_min: float,
    t_max: float,
    t_max_end: float = 0.5,
    drop_at: float = 0.5,
) -> tuple[float, float]:
    """The interval [lo, hi] (fractions of T) that t is drawn from at training progress `step_ratio`.

    - constant: [t_min, t_max].
    - linear (anneal): hi = t_max − (t_max − t_max_end)·r.
    - step (ProlificDreamer): hi = t_max before `drop_at`, t_max_end after (0.98 → 0.5 at 5k of 25k).
    - sqrt (HiFA): deterministic, t = t_min + (t_max − t_min)(1 − sqrt(r)); lo = hi = t.
    - dreamtime (TP-SDS): deterministic, t(r) = argmin_t' |Σ_{t ≥ t'} p(t) − r|, p ∝ W_p (see
      `dreamtime_timestep`); lo = hi = t.
    """
    r = min(max(float(step_ratio), 0.0), 1.0)
    if schedule == "constant":
        return t_min, t_max
    if schedule == "linear":
        return t_min, max(t_min, t_max - (t_max - t_max_end) * r)
    if schedule == "step":
        return t_min, (t_max if r < drop_at else max(t_min, t_max_end))
    if schedule == "sqrt":
        t = t_min + (t_max - t_min) * (1.0 - math.sqrt(r))
        return t, t
    if schedule == "dreamtime":
        t = dreamtime_timestep(r, t_min, t_max)
        return t, t
    raise ValueError(f"unknown timestep schedule {schedule!r}; choose from {', '.join(TIMESTEP_SCHEDULES)}")


# DreamTime's prior W_p(t) on T = 1000 steps (Huang et al., arXiv:2306.12422): m1 = 800, m2 = 500,
# s1 = 300, s2 = 100.
DREAMTIME_M1, DREAMTIME_M2, DREAMTIME_S1, DREAMTIME_S2 = 800.0, 500.0, 300.0, 100.0


def dreamtime_prior(t: torch.Tensor) -> torch.Tensor:
    """W_p(t) = exp(−(t−m1)²/2s1²) for t > m1; 1 for m2 ≤ t ≤ m1; exp(−(t−m2)²/2s2²) for t < m2 (t in 0..1000)."""
    high = torch.exp(-((t - DREAMTIME_M1) ** 2) / (2 * DREAMTIME_S1**2))
    low = torch.exp(-((t - DREAMTIME_M2) ** 2) / (2 * DREAMTIME_S2**2))
    return torch.where(t > DREAMTIME_M1, high, torch.where(t < DREAMTIME_M2, low, torch.ones_like(t)))


def dreamtime_timestep(
    step_ratio: float, t_min: float, t_max: float, num_train_timesteps: int = 1000
) -> float:
    """TP-SDS: the t whose upper tail mass Σ_{t ≥ t'} p(t) is closest to `step_ratio` (p ∝ W_p on
    [t_min, t_max]), so t falls monotonically from t_max to t_min as training progresses."""
    grid = torch.arange(
        round(t_min * num_train_timesteps), round(t_max * num_train_timesteps) + 1, dtype=torch.float64
    )
    p = dreamtime_prior(grid * 1000.0 / num_train_timesteps)
    p = p / p.sum()
    upper_tail = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])  # Σ_{t ≥ grid[i]} p(t)
    i = int(torch.argmin((upper_tail - step_ratio).abs()))
    return float(grid[i]) / num_train_timesteps


def sample_timesteps(
    batch_size: int,
    bounds: tuple[float, float],
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t ~ U{round(lo·T), …, round(hi·T)} as integers, one per batch element. [B] long."""
    lo = int(round(bounds[0] * num_train_timesteps))
    hi = int(round(bounds[1] * num_train_timesteps))
    lo, hi = max(0, min(lo, num_train_timesteps - 1)), max(0, min(hi, num_train_timesteps - 1))
    return torch.randint(lo, hi + 1, (batch_size,), generator=generator, device=device)


def sds_weight(alphas_cumprod_t: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """w(t) from ᾱ_t:
    - dreamfusion: 1 − ᾱ_t (= σ_t², DreamFusion's default)
    - seed:        1 / sqrt(1 − ᾱ_t)
    - uniform:     1
    - fantasia3d:  sqrt(ᾱ_t)(1 − ᾱ_t)
    - ism:         sqrt((1 − ᾱ_t)/ᾱ_t)  (LucidDreamer)
    - sjc:         sqrt(ᾱ_t/(1 − ᾱ_t)) = α_t/σ_t  (SJC's PAAS score, 1/σ̃ in the VE view)
    """
    a = alphas_cumprod_t
    if weighting == "dreamfusion":
        return 1 - a
    if weighting == "seed":
        return 1 / (1 - a).sqrt()
    if weighting == "uniform":
        return torch.ones_like(a)
    if weighting == "fantasia3d":
        return a.sqrt() * (1 - a)
    if weighting == "ism":
        return ((1 - a) / a).sqrt()
    if weighting == "sjc":
        return (a / (1 - a)).sqrt()
    raise ValueError(f"unknown weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̂ = ε_∅ + s(ε_y − ε_∅) (diffusers). DreamFusion's ω = s − 1; s = 1 gives ε_y exactly."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sds_gradient(eps_pred: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g = w(t)·(ε̂ − ε), broadcasting w [B] over the image dimensions."""
    return weight.reshape(-1, *([1] * (eps_pred.ndim - 1))).to(eps_pred.dtype) * (eps_pred - noise)


def clip_gradient(grad: torch.Tensor, clip_value: float | None) -> torch.Tensor:
    """Debiased SDS (Hong et al., arXiv:2303.15413): clamp g elementwise to [−c, c]; None leaves g."""
    if clip_value is None or clip_value <= 0:
        return grad
    return grad.clamp(-clip_value, clip_value)


def nan_guard(grad: torch.Tensor) -> torch.Tensor:
    """Replace NaN and ±Inf entries of g by 0 so one bad prediction cannot poison the scene."""
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def reparameterised_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """L = 0.5·‖x − sg(x − g)‖², summed, so that ∂L/∂x = g exactly (threestudio's trick).

    The value of L is 0.5‖g‖², a diagnostic only; what matters is the gradient.
    """
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).sum()


def literal_loss(eps_pred: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The diffusion loss itself, Σ w(t)‖ε̂ − ε‖², for back-propagation *through* the denoiser.

    Its gradient keeps the U-Net Jacobian that SDS omits; it costs a backward pass through the
    denoiser and, as DreamFusion reports, gives worse results. Kept so users can compare.
    """
    w = weight.reshape(-1, *([1] * (eps_pred.ndim - 1))).to(eps_pred.dtype)
    return (w * (eps_pred - noise) ** 2).sum()


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − σ_t ε̂)/α_t, the one-step denoised estimate (for samplers and rules that need it)."""
    a = alphas_cumprod_t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_step(
    x_t: torch.Tensor, eps: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM step (η = 0) from ᾱ_from to ᾱ_to, either direction (Song et al. 2021,
    eq. 12): x_to = α_to·x̂_0 + σ_to·ε̂ with x̂_0 = (x_t − σ_from ε̂)/α_from. Going up in t it is DDIM
    inversion. ᾱ's are [B] (or 0-d)."""
    x0 = predict_x0(x_t, eps, abar_from)
    a = abar_to.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps
