"""Scheduled scalars: a config value that is either a float or a `Ramp` over training progress.

Training progress reaches every component as `step_ratio` in [0, 1] (step / total steps), as an
argument, never as hidden state (dreamgaussian's `train_step(..., step_ratio)`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ramp:
    """Linear interpolation from `start` to `end` between step ratios `start_ratio` and `end_ratio`,
    constant outside (threestudio's `[start_step, start_value, end_value, end_step]`)."""

    start: float
    end: float
    start_ratio: float = 0.0
    end_ratio: float = 1.0

    def at(self, step_ratio: float) -> float:
        if self.end_ratio <= self.start_ratio:
            return self.end if step_ratio >= self.end_ratio else self.start
        u = (step_ratio - self.start_ratio) / (self.end_ratio - self.start_ratio)
        u = min(max(u, 0.0), 1.0)
        return self.start + (self.end - self.start) * u


Scheduled = float | Ramp


def value_at(value: Scheduled, step_ratio: float) -> float:
    """The value of a float or a Ramp at training progress `step_ratio`."""
    return value.at(step_ratio) if isinstance(value, Ramp) else float(value)
