"""Keeping the GPU step free of host synchronisation.

A pageable host tensor copied to the GPU waits for the copy (and so for the queue before it), and
a host generator cannot draw on the GPU. The training loop keeps one host generator for all
randomness (reproducible, resumable); on a GPU each large draw comes from a device generator seeded
by one draw of the host generator, and small host tensors travel through pinned memory without
blocking. On the CPU both helpers are the identity, so CPU runs stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import torch


class SceneGenerators:
    """One generator per scene of a batch (batch.py), scene k's rows of a batch being the k-th of K
    equal parts. A draw of n rows takes n/K rows from each scene's own generator (`draw_rows`), so
    that every scene sees exactly the random numbers it would see trained alone."""

    def __init__(self, generators: Sequence[torch.Generator | None]):
        self.generators = list(generators)

    def __len__(self) -> int:
        return len(self.generators)


# What the training step draws from: the run's generator, or one per scene of a batch.
Generators = torch.Generator | SceneGenerators | None


@overload
def device_generator(generator: SceneGenerators, device: torch.device | str) -> SceneGenerators: ...
@overload
def device_generator(
    generator: torch.Generator | None, device: torch.device | str
) -> torch.Generator | None: ...
def device_generator(generator, device):
    """`generator` itself on the CPU; on another device, a generator there seeded from it (for
    `SceneGenerators`, one per scene, each seeded from that scene's)."""
    device = torch.device(device)
    if isinstance(generator, SceneGenerators):
        return SceneGenerators([device_generator(g, device) for g in generator.generators])
    if device.type == "cpu" or generator is None:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def draw_rows(
    generator: Generators,
    rows: int,
    draw: Callable[[int, torch.Generator | None], torch.Tensor],
) -> torch.Tensor:
    """`draw(rows, generator)`; for `SceneGenerators`, each scene's rows from its own generator."""
    if not isinstance(generator, SceneGenerators):
        return draw(rows, generator)
    k = len(generator)
    if rows % k:
        raise ValueError(f"{rows} rows do not split into {k} scenes")
    return torch.cat([draw(rows // k, g) for g in generator.generators])


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor.to(device)`; a host tensor bound for a GPU goes through pinned memory, asynchronously."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def check_device(name: str) -> str:
    """`name` if this torch can run on it, else one line on why not (before anything is loaded)."""
    from sds3d.errors import UserError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r}: this torch ({torch.__version__}) cannot use CUDA here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"device {name!r}: there {'is' if count == 1 else 'are'} only {count} CUDA device(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device {name!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UserError(f"device {name!r}: sds3d runs on cpu, cuda or mps")
    return name
