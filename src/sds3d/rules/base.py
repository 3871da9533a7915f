"""The Rule seam: a rule takes a frozen prior, the render and the texts, and returns named losses.

    rule(prior, rgb, cond, uncond, step_ratio, cameras, generator) → RuleOutput(losses, …)

A rule owns everything that is a choice of the distillation method: the timestep schedule, the
weighting w(t), classifier-free guidance and clipping (and, for rules such as VSD, parameters of its
own, to be trained beside the scene and checkpointed with it: not needed by any rule yet). The prior (guidance/base.py) only encodes texts and images and predicts noise;
the training loop adds the losses to the representation's regularisers and steps the optimiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sds3d.cameras import Cameras
from sds3d.guidance.base import Prior


@dataclass
class RuleOutput:
    losses: dict[str, torch.Tensor]  # named scalars; the loop adds their sum to the total loss
    grad_norm: torch.Tensor  # scalar, mean over the batch of ‖g‖ in the model's space (no host sync)
    timesteps: torch.Tensor  # [B] long
    noise: torch.Tensor  # ε, in the model's space (for diagnostics and tests)


class Rule(nn.Module):
    """Base class of rules: `forward` is the rule."""

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
