"""Time of one SDS step on the CPU at the default preset, split into render, prior and backward,
and the wall time of the default demo (train + export), with the demo mesh's score.

    python -m sds3d.bench.cpu_step --out benchmarks
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sds3d.bench.report import describe_machine, write_report
from sds3d.config import preset
from sds3d.prompts import PromptProcessor
from sds3d.train import build_optimizer, build_prior, build_rule, build_scene

DEMO_PROMPT = "a blue torus"


def time_step_phases(steps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each phase of the default preset's SDS step."""
    config = dataclasses.replace(preset("default"), prompt=DEMO_PROMPT)
    scene, prior, rule = build_scene(config), build_prior(config), build_rule(config)
    prompts = PromptProcessor(config.prompt, config.prompts, prior.encode_prompt)
    rule.prepare(prior, prompts)
    optimizer = build_optimizer(config, scene, [rule])
    generator = torch.Generator().manual_seed(0)
    from sds3d.cameras import sample_cameras

    phases: dict[str, list[float]] = {"render": [], "prior": [], "backward": [], "step": []}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        cams = sample_cameras(config.camera, generator)
        out = scene.render(cams, stratified=True, generator=generator)
        t1 = time.perf_counter()
        cond, uncond = prompts(cams)
        g = rule(prior, out.rgb, cond, uncond, i / (warmup + steps), cameras=cams, generator=generator)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sum(g.losses.values()).backward()  # type: ignore[union-attr]
        optimizer.step()
        t3 = time.perf_counter()
        if i >= warmup:
            for name, dt in (
                ("render", t1 - t0),
                ("prior", t2 - t1),
                ("backward", t3 - t2),
                ("step", t3 - t0),
            ):
                phases[name].append(dt * 1000)
    return {name: statistics.median(v) for name, v in phases.items()}


def time_demo() -> dict[str, float]:
    """The default demo's work (train + export) on DEMO_PROMPT, with its mesh's 3D IoU and colour."""
    from sds3d.api import generate
    from sds3d.world import parse_prompt
    from sds3d.world.metrics import area_weighted_color, load_mesh_arrays, mesh_iou, nearest_color

    config = dataclasses.replace(preset("default"), prompt=DEMO_PROMPT)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = generate(config, Path(tmp) / "run", progress=False)
        total = time.perf_counter() - t0
        verts, faces, colors = load_mesh_arrays(out.files["ply"])
        obj = parse_prompt(DEMO_PROMPT)
        assert obj is not None
        iou = mesh_iou(verts, faces, obj.shape)
        color = nearest_color(area_weighted_color(verts, faces, colors))
    return {
        "total_s": round(total, 1), "train_s": round(out.train.wall_s, 1), "export_s": out.summary["export_wall_s"],
        "it_per_s": round(out.train.it_per_s, 2), "steps": config.steps, "iou": round(iou, 3), "color": color,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m sds3d.bench.cpu_step " + " ".join(argv if argv is not None else sys.argv[1:])
    phases = time_step_phases(args.steps, args.warmup)
    demo = None if args.skip_demo else time_demo()
    result: dict[str, Any] = {"command": command.strip(), "machine": describe_machine(), "step_ms": phases, "demo": demo,
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    cfg = preset("default")
    lines = [
        "# One SDS step on the CPU, default preset",
        "",
        f"Command: `{result['command']}` ({result['date']})  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"torch {result['machine']['torch']} ({result['machine']['torch_threads']} threads)",
        "",
        f"Default preset: {cfg.camera.width}×{cfg.camera.height} renders, {cfg.renderer.num_samples} samples per ray, "
        f"batch {cfg.camera.batch_size}, {cfg.guidance.kind} prior. "
        f"Median of {args.steps} steps after {args.warmup} warm-up steps.",
        "",
        "| phase | ms |",
        "|---|---:|",
        *[f"| {name} | {ms:.1f} |" for name, ms in phases.items()],
    ]
    if demo is not None:
        lines += [
            "",
            f'## `make demo` ("{DEMO_PROMPT}", {demo["steps"]} steps): budget ≤ 180 s',
            "",
            "| total s | train s | export s | it/s | mesh IoU | colour |",
            "|---:|---:|---:|---:|---:|---|",
            f"| {demo['total_s']} | {demo['train_s']} | {demo['export_s']} | {demo['it_per_s']} | {demo['iou']} | {demo['color']} |",
            "",
            "Total is train + export inside one process (the `.venv` set-up is not included).",
        ]
    write_report(args.out, "cpu_step", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
