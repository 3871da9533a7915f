"""Profile the fast-sd SDS step on a GPU (random-weight SD architecture): wall time per step, and
the operators by GPU time and by CPU time (torch.profiler).

    python scripts/profile_step.py [sd15|sd21] [--compile]
"""

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sds3d import train as train_module
from sds3d.bench import speed
from sds3d.guidance.diffusers_prior import DiffusersGuidance

WARMUP, ACTIVE = 15, 10


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "sd15"
    config = speed.run_config(arch, "cuda", "--compile" in sys.argv, "bfloat16")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    schedule = torch.profiler.schedule(wait=0, warmup=WARMUP, active=ACTIVE, repeat=1)
    marks: list[float] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        torch.profiler.profile(activities=activities, schedule=schedule) as prof,
    ):
        guidance = DiffusersGuidance(config.guidance, speed.build_components(arch, Path(tmp) / "tok")).to(
            "cuda"
        )

        def on_step(step: int, scene: object) -> None:
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            prof.step()

        run = dataclasses.replace(config, steps=WARMUP + ACTIVE + 1)
        train_module.train(run, Path(tmp) / "run", progress=False, guidance=guidance, on_step=on_step)
    wall = statistics.median(
        (b - a) * 1000 for a, b in zip(marks[WARMUP:], marks[WARMUP + 1 :], strict=False)
    )
    print(f"{arch}: {wall:.1f} ms a step (synchronised)")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
