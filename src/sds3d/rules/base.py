"""The Rule seam: a rule takes a frozen prior, the render and the texts, and returns named losses.

    rule(prior, rgb, cond, uncond, step_ratio, cameras, generator) → RuleOutput(losses, …)

A rule owns everything that is a choice of the distillation method: the timestep schedule, the
weighting w(t), classifier-free guidance and clipping, texts beyond the run's own (`prepare`: NFSD's
negative prompt, Perp-Neg's other views) and parameters of its own (`param_groups`: VSD's particle
score network), which are trained beside the scene and checkpointed with it. The prior
(guidance/base.py) only encodes texts and images and predicts noise; the training loop adds the
losses to the representation's regularisers and steps the optimiser.

The helpers below are the steps every rule shares: draw (t, ε) for a step, and ε̂ with CFG from one
batched prior call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from sds3d import diffusion
from sds3d.cameras import Cameras, concat_cameras
from sds3d.devices import Generators, device_generator, draw_rows
from sds3d.guidance.base import Prior

if TYPE_CHECKING:
    from sds3d.prompts import PromptProcessor
    from sds3d.rules.sds import SDSRuleConfig


@dataclass
class RuleOutput:
    losses: dict[str, torch.Tensor]  # named scalars; the loop adds their sum to the total loss
    grad_norm: torch.Tensor  # scalar, mean over the batch of ‖g‖ in the model's space (no host sync)
    timesteps: torch.Tensor  # [B] long
    noise: torch.Tensor  # ε, in the model's space (for diagnostics and tests)


class Rule(nn.Module):
    """Base class of rules: `forward` is the rule; `config` its settings.

    `batchable`: one call can serve a batch of independent scenes (batch.py): the rows of every
    input are scene by scene, its randomness comes from `draw_timesteps` and `gaussian_like` (one
    generator per scene), its losses are batch means, and it holds nothing that depends on the
    run's prompt or is trained (`prepare`, `param_groups`)."""

    batchable: ClassVar[bool] = True

    def __init__(self, config: Any = None):
        super().__init__()
        self.config = config

    def prepare(self, prior: Prior, prompts: PromptProcessor) -> None:
        """Encode the texts this rule needs beyond the run's (cond, uncond), and build what depends on
        the prior. Called once per run, before the text encoder is released and before the
        optimiser is built; embeddings come from `prompts.embedding` (cached)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups of the rule's own parameters (none for most rules)."""
        return []

    def forward(
        self,
        prior: Prior,
        rgb: torch.Tensor,  # [B, 3, H, W] in [0, 1] (or latents with `rgb_as_latents`)
        cond: Sequence[Any],
        uncond: Sequence[Any],
        step_ratio: float,
        cameras: Cameras | None = None,
        generator: torch.Generator | None = None,
        rgb_as_latents: bool = False,
    ) -> RuleOutput:
        raise NotImplementedError


def to_model_space(prior: Prior, rgb: torch.Tensor, rgb_as_latents: bool) -> torch.Tensor:
    return prior.latents_from_render(rgb) if rgb_as_latents else prior.encode_images(rgb)


def draw_timesteps(
    c: SDSRuleConfig, prior: Prior, step_ratio: float, batch: int, generator: Generators,
    device: torch.device,
) -> tuple[torch.Tensor, Generators]:  # fmt: skip
    """t ~ the config's schedule at `step_ratio` [B] long, and the generator the rest of the step
    draws from: on a GPU one seeded from the run's generator (no host copy, no sync), else the run's.
    A batch of scenes (`SceneGenerators`) draws each scene's rows from its own generator."""
    bounds = diffusion.timestep_bounds(c.t_schedule, step_ratio, c.t_min, c.t_max, c.t_max_end, c.t_drop_at)
    g = device_generator(generator, device)
    t = draw_rows(
        g, batch, lambda n, gk: diffusion.sample_timesteps(n, bounds, prior.num_train_timesteps, gk, device)
    )
    return t, g


def gaussian_like(x: torch.Tensor, g: Generators) -> torch.Tensor:
    """ε ~ N(0, I) shaped as x, drawn in float32 (so a seed means the same ε in any dtype)."""
    draw = lambda n, gk: torch.randn((n, *x.shape[1:]), generator=gk, dtype=torch.float32, device=x.device)
    return draw_rows(g, x.shape[0], draw).to(x)


def predict_guided(
    prior: Prior,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Sequence[Any],
    uncond: Sequence[Any],
    cameras: Cameras | None,
    scale: float,
    always_both: bool = False,
    camera_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(ε̂ = ε_∅ + s(ε_y − ε_∅), ε_∅, ε_y) from one prior call on a batch of 2B; with s = 1 (and not
    `always_both`) only the conditional half is computed and ε_∅ is None. Camera guidance
    (`camera_scale` s_c > 0, with cameras) adds s_c(ε_y − ε_{y,no camera}), one more prior call
    without the cameras: it amplifies what the camera changes in the prediction (prior/sample.py)."""
    if scale == 1.0 and not always_both:
        eps = eps_cond = prior.predict_noise(x_t, t, list(cond), cameras)
        eps_uncond = None
    else:
        both_cams = None if cameras is None else concat_cameras(cameras, cameras)
        eps_both = prior.predict_noise(
            torch.cat([x_t, x_t]), torch.cat([t, t]), list(uncond) + list(cond), both_cams
        )
        eps_uncond, eps_cond = eps_both.chunk(2)
        eps = diffusion.classifier_free_guidance(eps_uncond, eps_cond, scale)
    if camera_scale and cameras is not None:
        eps = eps + camera_scale * (eps_cond - prior.predict_noise(x_t, t, list(cond), None))
    return eps, eps_uncond, eps_cond


def finish(
    c: SDSRuleConfig, x: torch.Tensor, grad: torch.Tensor, step_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared tail of the score rules: g guarded against NaN, clipped (Debiased SDS), injected
    as ∂loss/∂x = g/B. → (loss, mean ‖g‖)."""
    from sds3d.ramp import value_at

    grad = diffusion.nan_guard(grad)
    if c.grad_clip is not None:
        grad = diffusion.clip_gradient(grad, value_at(c.grad_clip, step_ratio))
    loss = diffusion.reparameterised_loss(x, grad) / x.shape[0]
    return loss, grad.flatten(1).norm(dim=1).mean()
