"""Stages: a run as a list of (steps, what is rendered, rule) segments, taken in order.

    config.stages = [StageConfig(steps=300, render="latent"), StageConfig(steps=500, rule=<vsd>)]

The stages run first, in the order given; the run's remaining steps (`config.steps` − their steps)
are a last stage that renders RGB with the run's own `rule`. So a run without stages is one RGB stage,
as before, and Latent-NeRF's warm-up (threestudio's `rgb_as_latents`) is a first stage with
`render="latent"`: NeRF and background render C latent channels straight into a latent model's U-Net
(no VAE encoder), and when the next stage starts the representation turns its latent heads into RGB
ones (`Representation.start_stage`). Each stage's rule is prepared once and trained and checkpointed
with the scene (VSD's particle network in a stage of its own, say). Training progress `step_ratio`
stays the run's (step / config.steps), so a rule's t-schedule runs over the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sds3d.rules import RuleConfig


@dataclass
class StageConfig:
    steps: int = 1
    render: Literal["rgb", "latent"] = "rgb"  # latent: a latent model's latents, no VAE (first stage only)
    rule: RuleConfig | None = None  # None: the run's rule
    latent_channels: int = 4  # the U-Net's latent channels (4 for Stable Diffusion), latent stages only


@dataclass
class Stage:
    """A planned stage: steps [start, end) of the run."""

    index: int
    start: int
    end: int
    render: Literal["rgb", "latent"]
    rule: RuleConfig


def plan_stages(stages: list[StageConfig], steps: int, rule: RuleConfig) -> list[Stage]:
    """The run's stages with their step ranges: the configured ones, then the rest in RGB with `rule`."""
    planned, start = [], 0
    for i, s in enumerate(stages):
        planned.append(Stage(i, start, start + s.steps, s.render, s.rule if s.rule is not None else rule))
        start += s.steps
    if start < steps or not planned:
        planned.append(Stage(len(planned), start, steps, "rgb", rule))
    return planned


def stage_at(stages: list[Stage], step: int) -> Stage:
    for stage in stages:
        if stage.start <= step < stage.end:
            return stage
    return stages[-1]


def latent_stage(stages: list[StageConfig]) -> StageConfig | None:
    """The latent warm-up, if the run has one (it can only be the first stage)."""
    return stages[0] if stages and stages[0].render == "latent" else None


def check_stages(stages: list[StageConfig], steps: int, where: str) -> list[str]:
    """What is wrong with a run's stages, as one-line messages (empty if nothing)."""
    problems = []
    for i, s in enumerate(stages):
        if s.steps <= 0:
            problems.append(f"{where}[{i}].steps must be positive, not {s.steps}")
        if s.render == "latent" and i > 0:
            problems.append(f"{where}[{i}] renders latents; only the first stage can (Latent-NeRF's warm-up)")
    if sum(s.steps for s in stages) > steps:
        problems.append(f"{where} take {sum(s.steps for s in stages)} steps, more than the run's {steps}")
    return problems
