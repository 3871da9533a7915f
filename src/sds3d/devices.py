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
