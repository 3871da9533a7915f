"""Profile the fast-sd SDS step on a GPU (random-weight SD architecture): wall time per step, and
the operators by GPU time and by CPU time (torch.profiler).

    python scripts/profile_step.py [sd15|sd21] [--compile] [--fast-sd] [--nerf-compile-mode MODE]

`--gaps`: the GPU's idle gaps (from the trace): where the queue ran dry, between which kernels.
`--fast-sd`: the preset as it ships (U-Net and VAE compiled as CUDA graphs, NeRF compiled with
closed-form normals). `--shapes`: also the operators grouped by input shape.
"""

import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from sds3d import train as train_module
from sds3d.bench import speed
from sds3d.guidance.diffusers_prior import DiffusersGuidance

WARMUP, ACTIVE = 15, 10


def print_gaps(prof: torch.profiler.profile, top: int = 20) -> None:
    """The GPU timeline's idle gaps, largest first, each with the kernels either side and the host
    call that launched the kernel after it."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    gpu = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    launches = {
        e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime" and "args" in e
    }
    gaps = []
    for a, b in zip(gpu, gpu[1:], strict=False):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > 0:
            host = launches.get(b["args"].get("correlation"), {}).get("name", "?")
            gaps.append((gap, a["name"][:50], b["name"][:50], host))
    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    idle = sum(g[0] for g in gaps)
    print(f"GPU timeline {span / 1000:.1f} ms over {ACTIVE} steps: idle {idle / 1000:.1f} ms "
          f"({idle / ACTIVE / 1000:.2f} ms a step, in {len(gaps)} gaps)")  # fmt: skip
    for gap, before, after, host in sorted(gaps, reverse=True)[:top]:
        print(f"  {gap:8.0f} us  after {before!r}  before {after!r}  (launched by {host})")
    # Who launches the costliest kernels: the host call and the innermost CPU operator around it.
    cpu_ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")),
                     key=lambda e: e["ts"])  # fmt: skip
    totals: dict[str, float] = {}
    for k in gpu:
        totals[k["name"]] = totals.get(k["name"], 0.0) + k["dur"]
    for name, total in sorted(totals.items(), key=lambda kv: -kv[1])[:12]:
        owners: dict[str, float] = {}
        sample = [k for k in gpu if k["name"] == name][:40]  # a sample: the search below is quadratic
        for k in sample:
            launch = launches.get(k["args"].get("correlation"))
            owner = "?"
            if launch is not None:
                inner = [o for o in cpu_ops if o.get("tid") == launch.get("tid")
                         and o["ts"] <= launch["ts"] <= o["ts"] + o["dur"]]  # fmt: skip
                owner = (
                    f"{launch['name']} in {min(inner, key=lambda o: o['dur'])['name'][:60] if inner else '-'}"
                )
            owners[owner] = owners.get(owner, 0.0) + k["dur"]
        print(f"{total / ACTIVE / 1000:6.2f} ms/step  {name[:70]}")
        for owner, t in sorted(owners.items(), key=lambda kv: -kv[1])[:3]:
            print(f"         {t / sum(owners.values()):4.0%}  {owner}")


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "sd15"
    mode = (
        sys.argv[sys.argv.index("--nerf-compile-mode") + 1]
        if "--nerf-compile-mode" in sys.argv
        else "default"
    )
    if "--fast-sd" in sys.argv:
        config = speed.run_config(
            arch, "cuda", True, "bfloat16", "reduce-overhead", True, "closed_form", nerf_compile_mode=mode
        )
    else:
        config = speed.run_config(arch, "cuda", "--compile" in sys.argv, "bfloat16")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    schedule = torch.profiler.schedule(wait=0, warmup=WARMUP, active=ACTIVE, repeat=1)
    marks: list[torch.cuda.Event] = []  # on the GPU's timeline: no host sync between steps
    with (
        tempfile.TemporaryDirectory() as tmp,
        torch.profiler.profile(
            activities=activities, schedule=schedule, record_shapes="--shapes" in sys.argv
        ) as prof,
    ):
        guidance = DiffusersGuidance(config.guidance, speed.build_components(arch, Path(tmp) / "tok")).to(
            "cuda"
        )

        def on_step(step: int, scene: object) -> None:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
            prof.step()

        run = dataclasses.replace(config, steps=WARMUP + ACTIVE + 1)
        train_module.train(run, Path(tmp) / "run", progress=False, prior=guidance, on_step=on_step)
    torch.cuda.synchronize()
    wall = statistics.median(
        a.elapsed_time(b) for a, b in zip(marks[WARMUP:], marks[WARMUP + 1 :], strict=False)
    )
    print(f"{arch}: {wall:.1f} ms a step")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if "--gaps" in sys.argv:
        print_gaps(prof)
    if "--shapes" in sys.argv:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="device_time_total", row_limit=40, max_name_column_width=40,
                             max_shapes_column_width=70))  # fmt: skip


if __name__ == "__main__":
    main()
