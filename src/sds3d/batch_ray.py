"""`sds3d batch --ray [ADDRESS]`: a batch's prompts sharded over Ray actors, one per GPU (or N on CPUs).

Each actor (`BatchWorker`) builds its prior once and is handed chunks of `scenes` prompts, which it
trains and exports as `sds3d batch` does in one process (batch.make_results). The driver keeps the
queue: an idle actor gets the next chunk, and the chunk of an actor that dies (killed, out of memory,
its node gone) goes back to the queue for another, resuming from the checkpoints it left. The driver
writes `index.json` and the contact sheet; results are written by the actors into the run folders,
so on a cluster of several machines `--out` must be a folder every node sees at the same path.

Ray is an optional extra (`pip install 'sds3d[ray]'`). Without ADDRESS a local Ray is started (or
the cluster of $RAY_ADDRESS joined, as `ray.init` does); `--ray auto` joins a running one.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sds3d.batch import BatchItem, make_results, plan_batch, write_contact_sheet
from sds3d.config import RunConfig, from_dict, to_dict
from sds3d.errors import UserError


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray, an optional extra: pip install 'sds3d[ray]'") from None
    return ray


class BatchWorker:
    """One actor: its own prior, built once; `run` makes the results of one chunk of items."""

    def __init__(self, base: dict, scenes: int, threads: int | None = None):
        import torch

        from sds3d.train import build_prior

        if threads:
            torch.set_num_threads(threads)
        self.base = from_dict(RunConfig, base)
        self.scenes = scenes
        self.prior = build_prior(self.base)

    def run(self, chunk: Sequence[tuple[str, int, str]]) -> list[dict]:
        items = [BatchItem(prompt, seed, Path(run_dir)) for prompt, seed, run_dir in chunk]
        make_results(self.base, items, self.prior, self.scenes, progress=False, log=lambda *a: None)
        return [dataclasses.asdict(i) | {"run_dir": str(i.run_dir)} for i in items]

    def where(self) -> dict:
        import socket

        import ray

        return {"host": socket.gethostname(), "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


def run_batch_ray(
    base: RunConfig,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    scenes: int = 16,
    address: str | None = None,
    workers: int | None = None,
    log=print,
    on_dispatch: Callable[[Any, list[BatchItem]], None] | None = None,
) -> list[BatchItem]:
    """`run_batch` over Ray actors: `workers` of them (default: one per GPU of the cluster with a
    cuda device, else 1), each given chunks of `scenes` items. `on_dispatch(actor, chunk)` is called
    as each chunk is handed out. → the items, as `run_batch` returns them."""
    ray = require_ray()
    items, todo, write_index = plan_batch(base, prompts, seeds, out_dir, scenes, None)
    if todo:
        cuda = base.device.startswith("cuda")
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        try:
            actors = _start_workers(ray, base, scenes, workers, cuda)
            log(f"sds3d: {len(todo)} of {len(items)} results to make, {scenes} scenes at a time on "
                f"{len(actors)} Ray worker(s) -> {out_dir}")  # fmt: skip
            _dispatch(ray, actors, todo, scenes, write_index, log, on_dispatch)
        finally:
            write_index()
            if started:
                ray.shutdown()
    write_contact_sheet(Path(out_dir), items)
    return items


def _start_workers(ray: Any, base: RunConfig, scenes: int, workers: int | None, cuda: bool) -> list[Any]:
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if cuda and gpus < 1:
        raise UserError("--device cuda with --ray: the Ray cluster has no GPU")
    n = workers or (gpus if cuda else 1)
    if cuda and n > gpus:
        raise UserError(f"--ray-workers {n}: the Ray cluster has {gpus} GPU(s), one per worker")
    threads = max(1, cpus // n)
    remote = ray.remote(BatchWorker).options(num_gpus=1 if cuda else 0, num_cpus=0 if cuda else threads)
    return [remote.remote(to_dict(base), scenes, None if cuda else threads) for _ in range(n)]


def _dispatch(
    ray: Any, actors: list[Any], todo: list[BatchItem], scenes: int, write_index: Callable[[], None], log,
    on_dispatch: Callable[[Any, list[BatchItem]], None] | None,
) -> None:  # fmt: skip
    """Hand out chunks to idle actors until every chunk is made; a dead actor's chunk goes back."""
    queue = deque(todo[i : i + scenes] for i in range(0, len(todo), scenes))
    idle, running = list(actors), dict[Any, tuple[Any, list[BatchItem]]]()
    while queue or running:
        while queue and idle:
            actor, chunk = idle.pop(0), queue.popleft()
            ref = actor.run.remote([(i.prompt, i.seed, str(i.run_dir)) for i in chunk])
            running[ref] = (actor, chunk)
            if on_dispatch is not None:
                on_dispatch(actor, chunk)
        if not running:
            raise UserError(f"every Ray worker died with {sum(map(len, queue))} results left; finished ones "
                            "are kept: run the same command again")  # fmt: skip
        (ref,), _ = ray.wait(list(running), num_returns=1)
        actor, chunk = running.pop(ref)
        try:
            rows = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            log(f"sds3d: a Ray worker died ({type(err).__name__}); its {len(chunk)} result(s) go to another")
            queue.appendleft(chunk)
            continue
        for item, row in zip(chunk, rows, strict=True):
            for name in ("status", "error", "train_wall_s", "export_wall_s", "files"):
                setattr(item, name, row[name])
            if item.status == "failed":
                log(f"sds3d: {item.prompt!r} (seed {item.seed}) failed: {item.error}")
        idle.append(actor)
        write_index()
