"""Variational score distillation (VSD, ProlificDreamer) and entropic score distillation (ESD).

VSD (Wang et al., arXiv:2305.16213, eq. 9). The scene is a particle of a distribution q, and its
gradient compares the prior's score with the score of the renders' own distribution:
    g = w(t)(ε̂_pretrained(x_t; y, t) − ε_φ(x_t; y, t, c)),
where ε_φ is trained on the renders themselves by the diffusion loss ‖ε_φ(x'_t'; y, t', c) − ε'‖²
(t' over the whole range, x' the render, detached). When ε_φ is the exact score of q, q = p is a fixed
point and particles spread over p instead of collapsing onto its mode as SDS's do: with p = N(μ, s₀²I)
and q = N(m_q, S_qI) exact, E_ε[g] = w(t)σ_tα_t[(x − μ)/v_p − (x − m_q)/v_q], v = α_t²(s₀² or S_q) + σ_t²,
vanishes for every particle x only at m_q = μ, S_q = s₀² (tests/test_rules.py runs particles with the
exact Gaussian score of their own cloud to N(μ, s₀²)).

ε_φ here (sds3d's, not the paper's LoRA): ε_φ = ε_y + h_φ(x_t, t, c), the prior's conditional
prediction plus a small camera-conditioned convolutional network whose last layer starts at zero,
so at step 0 ε_φ = ε_y, as a fresh LoRA equals its base. It works with every prior (the analytic
priors have no U-Net to adapt), costs one extra prior call of B rows per step (for its training;
ε_y at x_t is the conditional half of the CFG batch) and no backward through the prior.

ESD (Wang et al., arXiv:2401.00909, eq. 12, "CFG trick"): the entropy of the renders across views is
raised by mixing a camera-free particle score into ε_φ:
    ε_φ = λ·ε_φ(x_t; y, t, ∅) + (1 − λ)·ε_φ(x_t; y, t, c),
ε_φ(·, ∅) trained by dropping the camera on a share of samples (`camera_dropout`). λ = 0 is VSD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sds3d import diffusion
from sds3d.cameras import Cameras
from sds3d.devices import SceneGenerators
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

if TYPE_CHECKING:
    from sds3d.prompts import PromptProcessor

CAMERA_DIM = 5  # (sin az, cos az, sin el, cos el, present), as the built-in prior's camera input


@dataclass
class VSDRuleConfig(SDSRuleConfig):
    camera_free_weight: float = 0.0  # ESD's λ; 0 is VSD
    camera_dropout: float = 0.1  # share of ε_φ's training samples without a camera
    particle_channels: int = 32  # width of h_φ
    particle_lr: float = 1e-3  # Adam's lr for φ (ProlificDreamer's LoRA lr)
    particle_t_min: float = 0.02  # t' for φ's diffusion loss ~ U[t_min, t_max] (fractions of T)
    particle_t_max: float = 0.98
    kind: Literal["vsd"] = "vsd"  # type: ignore[assignment]

    def build(self) -> Rule:
        if not 0 <= self.camera_free_weight <= 1 or not 0 <= self.camera_dropout <= 1:
            raise ValueError("rule.camera_free_weight and rule.camera_dropout must be in [0, 1]")
        check_camera_guidance(self)
        return VSDRule(self)


@dataclass
class ESDRuleConfig(VSDRuleConfig):
    camera_free_weight: float = 0.5
    kind: Literal["esd"] = "esd"  # type: ignore[assignment]


class ParticleScoreNet(nn.Module):
    """h_φ(x_t, t, camera) [B, C, H, W]: two 3×3 convolutions with FiLM from (t, camera), and a last
    convolution initialised to zero."""

    def __init__(self, channels: int, hidden: int, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.embed = nn.Sequential(
            nn.Linear(time_dim + CAMERA_DIM, hidden), nn.SiLU(), nn.Linear(hidden, 2 * hidden)
        )
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)  # type: ignore[arg-type]

    def forward(self, x_t: torch.Tensor, t_frac: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=x_t.device) / half)
        angles = 1000.0 * t_frac.float()[:, None] * freqs[None]
        emb = self.embed(torch.cat([angles.sin(), angles.cos(), camera.float()], dim=1))
        scale, shift = emb[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.conv_in(x_t.float())) * (1 + scale) + shift
        return self.conv_out(F.silu(self.conv_mid(h))).to(x_t.dtype)


def camera_vectors(cameras: Cameras | None, batch: int, device: torch.device) -> torch.Tensor:
    """[B, 5] camera inputs of h_φ; zeros (no camera) when there are no cameras."""
    if cameras is None:
        return torch.zeros(batch, CAMERA_DIM, device=device)
    from sds3d.prior.model import camera_condition  # the built-in prior's camera input, the same vector

    return camera_condition(cameras.elevation_deg, cameras.azimuth_deg).to(device)


class VSDRule(Rule):
    config: VSDRuleConfig
    batchable = False  # a particle score trained on this run's renders

    def __init__(self, config: VSDRuleConfig):
        super().__init__(config)
        # Replaced in tests by the exact score of a known particle distribution.
        self.particle: nn.Module | None = None

    def prepare(self, prior: Prior, prompts: PromptProcessor) -> None:
        """h_φ for this prior's space (its channel count read from one encoded blank render), initialised
        from a fixed seed; its last layer is zero, so only the hidden layers' start depends on it."""
        if self.particle is None:
            with torch.no_grad():
                probe = prior.encode_images(torch.zeros(1, 3, 8, 8, device=prior.alphas_cumprod.device))
            device = prior.alphas_cumprod.device
            with torch.random.fork_rng(devices=[]):  # the same start in every run, whatever ran before
                torch.manual_seed(0)
                self.particle = ParticleScoreNet(probe.shape[1], self.config.particle_channels).to(device)

    def param_groups(self) -> list[dict[str, Any]]:
        params = [] if self.particle is None else list(self.particle.parameters())
        return [{"params": params, "lr": self.config.particle_lr}] if params else []

    def particle_residual(self, x_t: torch.Tensor, t: torch.Tensor, camera: torch.Tensor, prior: Prior):
        """h in ε_φ = ε_y + h, with ESD's mix of the camera-free and the camera-conditioned branch."""
        assert self.particle is not None, "VSDRule.prepare(prior, prompts) must run first"
        t_frac = t.float() / prior.num_train_timesteps
        lam = self.config.camera_free_weight
        h = self.particle(x_t, t_frac, camera)
        if lam > 0:
            h = lam * self.particle(x_t, t_frac, torch.zeros_like(camera)) + (1 - lam) * h
        return h

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
        # 1. The scene's gradient: g = w(t)(ε̂ − ε_φ), ε_φ = ε_y + h_φ.
        t, g = draw_timesteps(c, prior, step_ratio, b, generator, x.device)
        assert not isinstance(g, SceneGenerators), "VSD trains one particle score per run (batchable = False)"
        noise = gaussian_like(x, g)
        camera = camera_vectors(cameras, b, x.device)
        with torch.no_grad():
            x_t = diffusion.add_noise(x.detach(), noise, t, prior.alphas_cumprod)
            eps, _, eps_cond = predict_guided(
                prior, x_t, t, cond, uncond, cameras, c.guidance_scale, camera_scale=c.camera_guidance_scale
            )
            eps_phi = eps_cond + self.particle_residual(x_t, t, camera, prior)
        weight = diffusion.sds_weight(prior.alphas_cumprod[t], c.weighting)
        loss, grad_norm = finish(c, x, diffusion.sds_gradient(eps, eps_phi, weight), step_ratio)
        # 2. φ's own diffusion loss on the detached render at a fresh (t', ε'), cameras dropped at
        #    random so that the camera-free branch is learned too.
        lo = round(c.particle_t_min * prior.num_train_timesteps)
        hi = round(c.particle_t_max * prior.num_train_timesteps)
        t2 = torch.randint(lo, max(lo, hi) + 1, (b,), generator=g, device=x.device)
        noise2 = gaussian_like(x, g)
        keep = torch.rand(b, generator=g, device=x.device) >= c.camera_dropout
        x2_t = diffusion.add_noise(x.detach(), noise2, t2, prior.alphas_cumprod)
        with torch.no_grad():
            base = prior.predict_noise(x2_t, t2, list(cond), cameras)
        assert self.particle is not None
        pred = base + self.particle(x2_t, t2.float() / prior.num_train_timesteps, camera * keep[:, None])
        particle_loss = F.mse_loss(pred.float(), noise2.float())
        return RuleOutput(
            losses={c.kind: loss, "particle": particle_loss}, grad_norm=grad_norm, timesteps=t, noise=noise
        )
