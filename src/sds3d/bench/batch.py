"""`python -m sds3d.bench.batch`: prompts per hour of `sds3d batch` at K scenes a time, against
sequential `sds3d generate` processes (what one does without it), on one machine in one go.

    python -m sds3d.bench.batch [--device cuda] [--scenes 1,4,16,64] [--prompts 64] [--sequential 4]
                                [--steps 800] [--out benchmarks]
    python -m sds3d.bench.batch --combine run1.json run2.json --name batch_gpu   # one lease, two commands
    python -m sds3d.bench.batch --device cuda --preset fast-sd --arch sd15 --name batch_gpu_sd15

Every K trains and exports max(K, --prompts-min) world prompts (the 30 world prompts, then again
with the next seed) with the default preset; the prior is built once per K (its load and, on a GPU,
its compilation are timed apart: `load_s`), and `prompts/h` is results over the batch's wall time,
training and export together. `--sequential N` times N separate `sds3d generate` processes, process
start-up and prior loading included. GPU memory is torch's peak allocation during the batch.

`--preset` runs another preset; `--model DIR` gives its diffusers prior, and `--arch sd15` writes
random weights of Stable Diffusion 1.5's architecture (bench.speed's) to a folder and uses that (no
hub here). Where the preset's scenes cannot be stacked (fast-sd: closed-form normals, a compiled
NeRF), the batch runs it with what stacks (analytic normals, an eager NeRF) and the report lists the
changes; the sequential processes run the preset as it is, fast path and all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sds3d.bench.report import describe_machine, with_model, write_report
from sds3d.config import DiffusersGuidanceConfig, RunConfig, preset
from sds3d.errors import UserError
from sds3d.world.shapes import all_objects


def world_items(n: int) -> tuple[list[str], list[int]]:
    """n (prompt, seed) pairs as prompt and seed lists whose product starts with them."""
    prompts = [o.prompt for o in all_objects()]
    seeds = list(range(-(-n // len(prompts))))
    return prompts, seeds


def random_model_folder(arch: str, out: Path) -> Path:
    """Random weights of `arch` (bench.speed's architectures) as a diffusers folder, what `--model`
    loads; a folder already written is reused."""
    from diffusers import DDPMScheduler

    from sds3d.bench.speed import ARCHS, build_components

    if arch not in ARCHS or "text_2" in ARCHS[arch]:
        raise UserError(
            f"--arch takes one of {', '.join(a for a in ARCHS if 'text_2' not in ARCHS[a])}, not {arch!r}"
        )
    if (out / "model_index.json").is_file():
        return out
    parts = build_components(arch, out / "tokenizer")
    for name in ("text_encoder", "unet", "vae"):
        parts[name].save_pretrained(out / name, safe_serialization=True)
    DDPMScheduler.from_config(parts["scheduler_config"]).save_pretrained(out / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def batch_config(
    preset_name: str, model: str | None, device: str, steps: int, compile: bool
) -> tuple[RunConfig, list[str]]:
    """(the config every K trains with, the changes that made its scenes stackable)."""
    from sds3d.representations.nerf_stack import stack_problem

    config = dataclasses.replace(preset(preset_name), device=device, steps=steps, validate_every=0)
    config = with_model(config, model, preset_name)
    if isinstance(config.guidance, DiffusersGuidanceConfig):
        config.guidance = dataclasses.replace(
            config.guidance,
            compile=compile,
            compile_mode="reduce-overhead" if compile else config.guidance.compile_mode,
        )
    changes = []
    if stack_problem(config) is not None and config.representation == "nerf":
        if config.nerf.normal_type != "analytic":
            changes.append(f"normals {config.nerf.normal_type} → analytic")
        if config.nerf.compile:
            changes.append("NeRF compiled → eager")
        config.nerf = dataclasses.replace(config.nerf, normal_type="analytic", compile=False)
    if (problem := stack_problem(config)) is not None:
        raise UserError(f"the {preset_name} preset's scenes cannot be stacked: {problem}")
    return config, changes


def measure_batch(k: int, n: int, config: RunConfig, work: Path) -> dict:
    """K scenes at a time of `config` (batch_config's) over n world prompts × seeds."""
    from sds3d.batch import run_batch
    from sds3d.train import build_prior

    cuda = config.device.startswith("cuda")
    t0 = time.perf_counter()
    prior = build_prior(config)
    load_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prompts, seeds = world_items(n)
    t0 = time.perf_counter()
    items = run_batch(config, prompts, seeds, work / f"k{k}", k, progress=False, prior=prior, log=lambda *a: None,
                      limit=n)  # fmt: skip
    wall = time.perf_counter() - t0
    done = sum(i.status == "done" for i in items)
    train = [i.train_wall_s for i in items if i.train_wall_s is not None]
    return {
        "scenes": k, "prompts": n, "done": done, "load_s": round(load_s, 1), "wall_s": round(wall, 1),
        "prompts_per_hour": round(done * 3600 / wall, 1),
        "train_wall_s_per_wave": round(max(train), 1) if train else None,
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }  # fmt: skip


def measure_sequential(
    n: int, device: str, steps: int, work: Path, preset_name: str = "default", model: str | None = None
) -> dict:
    prompts, _ = world_items(n)
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts[:n]):
        cmd = [sys.executable, "-m", "sds3d.cli", "generate", prompt, "--device", device, "--steps", str(steps),
               "--preset", preset_name, "--out", str(work / f"seq{i}"), "--no-progress"]  # fmt: skip
        if model is not None:
            cmd += ["--model", model]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return {"prompts": n, "wall_s": round(wall, 1), "prompts_per_hour": round(n * 3600 / wall, 1)}


def combine(paths: list[Path]) -> dict:
    """One report from runs of this benchmark made on one machine in one lease (a device command
    has a time limit): their K rows together, the sequential baseline from the run that has it."""
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: not a report of this benchmark ({type(err).__name__}: {err})") from None
    if any(
        not isinstance(r, dict) or not {"device", "steps", "compile", "machine", "batch"} <= set(r)
        for r in runs
    ):
        raise UserError("--combine takes the .json reports of `python -m sds3d.bench.batch`")
    for run in runs:
        run.setdefault("preset", "default")  # reports from before --preset
    first = runs[0]
    for run in runs[1:]:
        for field in ("device", "steps", "compile", "preset"):
            if run[field] != first[field]:
                raise UserError(f"{field} differs between the runs: {first[field]!r} and {run[field]!r}")
        if run["machine"].get("gpu") != first["machine"].get("gpu"):
            raise UserError("the runs were made on different machines: compare only within one lease")
    sequential = [r["sequential"] for r in runs if r["sequential"]]
    return {**first, "command": "; ".join(r["command"] for r in runs), "sequential": sequential[0] if sequential else None,
            "batch": sorted((row for r in runs for row in r["batch"]), key=lambda row: row["scenes"])}  # fmt: skip


def write(out: Path, name: str, data: dict) -> None:
    sequential, rows, machine = data["sequential"], data["batch"], data["machine"]
    cuda = data["device"].startswith("cuda")
    base = sequential["prompts_per_hour"] if sequential else None
    lines = [
        f"# `sds3d batch` throughput ({data['device']}, {data.get('preset', 'default')} preset, {data['steps']} steps)", "",
        f"Command: `{data['command']}`", "",
        f"Machine: {machine['gpu'] if cuda else machine['cpu']}, {machine['cores']} cores, "
        f"torch {machine['torch']}; prior compiled with CUDA graphs: {'yes' if data['compile'] else 'no'}.", "",
        "Each K trains and exports its prompts K at a time in one process (the prior built once, timed "
        "apart as load); prompts/h counts finished meshes over the batch's wall time, training and export "
        "(on a thread, overlapping the next batch's training) together.", "",
    ]  # fmt: skip
    if data.get("arch"):
        lines += [
            f"Prior: random weights of the {data['arch']} architecture (bench.speed's), written to a folder.",
            "",
        ]
    elif data.get("model"):
        lines += [f"Prior: `{data['model']}`.", ""]
    if data.get("stackable_changes"):
        lines += ["The batch ran the preset with what stacks: " + "; ".join(data["stackable_changes"])
                  + ". The sequential processes ran it as it is.", ""]  # fmt: skip
    if sequential:
        lines += [f"Sequential `sds3d generate` processes ({sequential['prompts']} prompts, start-up and loading "
                  f"included): **{sequential['prompts_per_hour']:.0f} prompts/h** ({sequential['wall_s']} s).", ""]  # fmt: skip
    lines += [
        "| K | prompts | done | load s | train s / wave | wall s | prompts/h | × sequential | peak GPU GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{r['prompts_per_hour'] / base:.1f}×" if base else "–"
        gpu = "–" if r["peak_gpu_memory_gb"] is None else r["peak_gpu_memory_gb"]
        lines.append(f"| {r['scenes']} | {r['prompts']} | {r['done']} | {r['load_s']} | {r['train_wall_s_per_wave']} | "
                     f"{r['wall_s']} | {r['prompts_per_hour']:.0f} | {speedup} | {gpu} |")  # fmt: skip
    write_report(out, name, data, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sds3d.bench.batch", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scenes", default="1,4,16,64", help="comma-separated K")
    parser.add_argument("--prompts-min", type=int, default=16, help="each K makes max(K, this) results")
    parser.add_argument(
        "--sequential", type=int, default=4, help="separate `sds3d generate` runs to time (0: none)"
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--preset", default="default", help="the preset every prompt runs")
    parser.add_argument("--model", help="the preset's diffusers prior: a folder or hub id")
    parser.add_argument("--arch", help="instead of --model: random weights of this architecture (sd15)")
    parser.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                        help="the prior compiled with CUDA graphs (auto: on a GPU)")  # fmt: skip
    parser.add_argument("--name", default=None, help="report name (default: batch_<cpu|gpu>)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: one report (--name) from runs of one lease")  # fmt: skip
    args = parser.parse_args(argv)
    command = "python -m sds3d.bench.batch " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.combine:
        data = combine(args.combine)
        write(args.out, args.name or "batch_gpu", data | {"command": f"{data['command']}; then {command}"})
        return 0
    scenes = [int(k) for k in args.scenes.split(",")]
    compile = args.compile == "yes" or (args.compile == "auto" and args.device.startswith("cuda"))
    if args.model and args.arch:
        raise UserError("--model and --arch are two ways to name the prior: give one")
    rows: list[dict] = []
    sequential: dict | None = None
    name = args.name or f"batch_{'gpu' if args.device.startswith('cuda') else 'cpu'}"

    def report() -> None:  # after every measurement: a bench killed at its time limit keeps what it measured
        write(args.out, name, {"command": command, "machine": describe_machine(), "device": args.device,
                               "steps": args.steps, "compile": compile, "preset": args.preset,
                               "model": None if args.arch else args.model, "arch": args.arch,
                               "stackable_changes": changes, "sequential": sequential, "batch": rows})  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(random_model_folder(args.arch, work / args.arch)) if args.arch else args.model
        config, changes = batch_config(args.preset, model, args.device, args.steps, compile)
        sequential = (
            measure_sequential(args.sequential, args.device, args.steps, work, args.preset, model)
            if args.sequential
            else None
        )
        if sequential:
            print(f"sequential: {sequential}", flush=True)
            report()
        for k in scenes:
            rows.append(measure_batch(k, max(k, args.prompts_min), config, work))
            print(rows[-1], flush=True)
            report()
    return 0


def _command(argv: list[str] | None = None) -> int:
    """`main` as a command: bad input is one line and exit code 2, as in the `sds3d` CLI."""
    try:
        return main(argv)
    except UserError as err:
        print(f"sds3d: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_command())
