"""Keeping the GPU step free of host synchronisation.

A pageable host tensor copied to the GPU waits for the copy (and so for the queue before it), and
a host generator cannot draw on the GPU. The training loop keeps one host generator for all
randomness (reproducible, resumable); on a GPU each large draw comes from a device generator seeded
by one draw of the host generator, and small host tensors travel through pinned memory without
blocking. On the CPU both helpers are the identity, so CPU runs stay bit-identical.
"""

from __future__ import annotations

import torch


def device_generator(generator: torch.Generator | None, device: torch.device | str) -> torch.Generator | None:
    """`generator` itself on the CPU; on another device, a generator there seeded from it."""
    device = torch.device(device)
    if device.type == "cpu" or generator is None:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor.to(device)`; a host tensor bound for a GPU goes through pinned memory, asynchronously."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
