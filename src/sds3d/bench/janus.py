"""`sds3d bench janus`: how often a front ends up on more than one side (the Janus problem), measured
on world v2's fronted objects ("a blue cube with a red front") against their known front.

    sds3d bench janus [--seeds 3] [--conditions neither,view-prompts,camera,both,perp-neg]
                      [--front-share 0.75] [--preset empirical] [--steps N] [--device cuda]
                      [--out benchmarks] [--image PNG]

Every condition trains every fronted prompt × seed with the `empirical` preset (the exact denoiser
of ground-truth renders, no learned weights; the built-in learned prior was trained on the 30
one-colour objects and knows no fronts), all of a condition's scenes at once (`sds3d batch`), then
scores each exported mesh with `world.metrics.janus`: the front's colour per azimuth sector, the
number of fronts, Janus (more than one front, or the front all round) and front accuracy (one front,
at the true front's azimuth). The prior's image sets are front-biased as photos are: a share
(`--front-share`) of each object's renders come from the front range (|azimuth| < 45°).
`--preset` runs another preset instead (a learned prior: "camera" switches its camera input; it
must have been trained on fronted objects for the numbers to mean anything).

Conditions (what the step knows about the camera):
- neither: no camera conditioning, no view prompts;
- view-prompts: DreamFusion's ", front view" / ", side view" / ", back view" suffixes (the prior
  keeps only the renders with that label);
- camera: camera conditioning (each render weighted by a kernel on the angle to the rendering
  camera, as MVDream's camera embedding), no view prompts;
- both: the two together (the `empirical` preset as shipped);
- perp-neg: view prompts with the Perp-Neg rule (the other views as negative prompts);
- camera-guidance: camera conditioning with camera guidance, ε̂ += s_c(ε_{y,c} − ε_{y,no camera})
  (`--camera-guidance`, default CAMERA_GUIDANCE): what the camera changes, amplified.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sds3d.bench.report import describe_machine, with_model, write_report
from sds3d.config import RunConfig, preset
from sds3d.errors import UserError
from sds3d.guidance.analytic import EmpiricalPriorGuidanceConfig
from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig
from sds3d.rules import with_rule
from sds3d.world.shapes import fronted_objects, parse_prompt

CAMERA_KERNEL_DEG = 10.0  # the empirical preset's
CAMERA_GUIDANCE = 5.0  # s_c of the camera-guidance condition


def _condition(
    camera: bool, view_prompts: bool, rule: str = "sds", camera_guidance: float = 0.0
) -> Callable[[RunConfig], RunConfig]:
    def apply(config: RunConfig) -> RunConfig:
        g = config.guidance
        guidance: EmpiricalPriorGuidanceConfig | DiffusersGuidanceConfig
        if isinstance(g, EmpiricalPriorGuidanceConfig):
            guidance = dataclasses.replace(g, camera_kernel_deg=CAMERA_KERNEL_DEG if camera else None)
        elif isinstance(g, DiffusersGuidanceConfig):  # a learned prior's camera input on or off
            guidance = dataclasses.replace(g, camera_condition=camera)
        else:
            raise UserError(
                f"the {g.kind} prior has no camera conditioning to switch (use the empirical or a diffusers prior)"
            )
        prompts = dataclasses.replace(config.prompts, view_dependent=view_prompts)
        rule_config = dataclasses.replace(with_rule(config.rule, rule), camera_guidance_scale=camera_guidance)
        return dataclasses.replace(config, guidance=guidance, prompts=prompts, rule=rule_config)

    return apply


CONDITIONS: dict[str, Callable[[RunConfig], RunConfig]] = {
    "neither": _condition(camera=False, view_prompts=False),
    "view-prompts": _condition(camera=False, view_prompts=True),
    "camera": _condition(camera=True, view_prompts=False),
    "both": _condition(camera=True, view_prompts=True),
    "perp-neg": _condition(camera=False, view_prompts=True, rule="perp-neg"),
    "camera-guidance": _condition(camera=True, view_prompts=False, camera_guidance=CAMERA_GUIDANCE),
}


def base_config(
    front_share: float,
    device: str,
    steps: int | None,
    preset_name: str = "empirical",
    model: str | None = None,
) -> RunConfig:
    """`preset_name` on `device`; the empirical prior's image sets front-biased by `front_share` (a
    learned prior's bias is whatever its training data had); `model` replaces a diffusers prior's."""
    if not 0.0 <= front_share <= 1.0:
        raise UserError(f"--front-share must be in [0, 1], not {front_share}")
    config = dataclasses.replace(preset(preset_name), device=device, validate_every=0)
    config = with_model(config, model, preset_name)
    if isinstance(config.guidance, EmpiricalPriorGuidanceConfig):
        views = dataclasses.replace(config.guidance.views, front_view_share=front_share)
        config = dataclasses.replace(config, guidance=dataclasses.replace(config.guidance, views=views))
    return config if steps is None else dataclasses.replace(config, steps=steps)


def run_condition(
    config: RunConfig,
    prompts: list[str],
    seeds: list[int],
    work: Path,
    strips: list | None = None,
    label: str = "",
) -> list[dict]:
    """Train and export every prompt × seed of one condition at once; one scored row each. With
    `strips`, append labelled turntable frames of seed 0's results."""
    from sds3d.batch import run_batch
    from sds3d.world.metrics import janus, load_mesh_arrays

    t0 = time.perf_counter()
    items = run_batch(
        config, prompts, seeds, work, len(prompts) * len(seeds), progress=False, log=lambda *a: None
    )
    seconds = (time.perf_counter() - t0) / max(len(items), 1)
    walls = [(i.train_wall_s, i.export_wall_s) for i in items]
    timed = [(a, b) for a, b in walls if a is not None and b is not None]
    if timed and len(timed) == len(items):
        # All of a condition's runs train as one wave: its wall time shared, plus each run's export. Read
        # from the batch's index, so a condition resumed after a kill keeps the time it took.
        seconds = (max(a for a, _ in timed) + sum(b for _, b in timed)) / len(items)
    rows = []
    for item in items:
        obj = parse_prompt(item.prompt)
        assert obj is not None
        row: dict = {"prompt": item.prompt, "seed": item.seed, "seconds": round(seconds, 1)}
        if item.status != "done":
            rows.append({**row, "failed": item.error or item.status, "fronts": 0, "everywhere": False,
                         "janus": False, "front_ok": False, "front_sectors": 0, "sector_share": []})  # fmt: skip
            continue
        verts, faces, colors = load_mesh_arrays(item.run_dir / "mesh.ply")
        rows.append({**row, **janus(verts, faces, colors, obj)})
        if strips is not None and item.seed == seeds[0]:
            from sds3d.bench.gallery import turntable_row

            r = rows[-1]
            text = f"{label}: {item.prompt}  fronts {'all round' if r['everywhere'] else r['fronts']}"
            strips.append(
                turntable_row(item.run_dir / "turntable.gif", text + ("  JANUS" if r["janus"] else ""))
            )
    return rows


SAME = ("preset", "model", "steps", "front_share", "seeds", "prompts", "device")


def combine(paths: list[Path]) -> dict:
    """One report from reports of disjoint conditions made alike (steps, front share, seeds, prompts)."""
    import json

    reports = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: not a report of this benchmark ({type(err).__name__}: {err})") from None
        if isinstance(data, dict):
            data.setdefault("preset", "empirical")  # reports from before --preset
            data.setdefault("model", None)  # … and before --model
        if not isinstance(data, dict) or not {*SAME, "results", "command", "machine", "date"} <= set(data):
            raise UserError(f"{path}: not a report of `sds3d bench janus`")
        reports.append(data)
    first = reports[0]
    results: dict = {}
    for data in reports:
        for field in SAME:
            if data[field] != first[field]:
                raise UserError(f"{field} differs between the reports: {first[field]!r} and {data[field]!r}")
        if set(results) & set(data["results"]):
            raise UserError(
                f"condition(s) {', '.join(set(results) & set(data['results']))} in more than one report"
            )
        results |= data["results"]
    images = [d["image"] for d in reports if d.get("image")]
    guided = [d.get("camera_guidance_scale") for d in reports if "camera-guidance" in d["results"]]
    return {
        **first,
        "camera_guidance_scale": guided[0] if guided else first.get("camera_guidance_scale"),
        "command": "; ".join(d["command"] for d in reports),
        "results": results,
        "images": images,
    }


def stack_rows(images: list[np.ndarray]) -> np.ndarray:
    """Images one under another, the narrower padded white on the right."""
    width = max(im.shape[1] for im in images)
    return np.concatenate(
        [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255) for im in images]
    )


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "runs": n,
        "janus_rate": round(sum(r["janus"] for r in rows) / n, 3),
        "front_accuracy": round(sum(r["front_ok"] for r in rows) / n, 3),
        "no_front_rate": round(sum(r["fronts"] == 0 and not r["everywhere"] for r in rows) / n, 3),
        "failed": sum("failed" in r for r in rows),
        "seconds_per_run": round(float(np.mean([r["seconds"] for r in rows])), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sds3d bench janus", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0…N−1 for every prompt")
    parser.add_argument(
        "--conditions", default=",".join(CONDITIONS), help=f"comma-separated: {', '.join(CONDITIONS)}"
    )
    parser.add_argument("--front-share", type=float, default=0.75,
                        help="share of each object's prior renders seen from the front (0: uniform views)")  # fmt: skip
    parser.add_argument("--preset", default="empirical",
                        help="the preset every run starts from (default: empirical; a learned prior must know fronts)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="override the preset's steps")
    parser.add_argument(
        "--model", help="the preset's diffusers prior instead (a folder, e.g. a retrained prior)"
    )
    parser.add_argument("--camera-guidance", type=float, default=CAMERA_GUIDANCE, metavar="S_C",
                        help=f"s_c of the camera-guidance condition (default {CAMERA_GUIDANCE:g})")  # fmt: skip
    parser.add_argument("--prompts", help="comma-separated fronted world prompts (default: all)")
    parser.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--name", default="janus", help="report file name (without .md/.json)")
    parser.add_argument(
        "--work", type=Path, help="keep the runs here (a killed bench resumes; default: a temp dir)"
    )
    parser.add_argument("--image", type=Path, help="write turntable frames of seed 0's results here (PNG); "
                        "with --combine, the joined reports' images one under another")  # fmt: skip
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="join reports of other conditions (processes run at once) into one (runs nothing)")  # fmt: skip
    args = parser.parse_args(argv)
    command = "sds3d bench janus " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.combine:
        report = combine(args.combine)
        write_janus_report(args.out, args.name, report | {"combined_by": command.strip()})
        if args.image is not None:
            import imageio.v2 as imageio

            found = [Path(p) for p in report["images"] if Path(p).is_file()]
            if not found:
                raise UserError(
                    "--image: the joined reports name no image that exists (run them with --image)"
                )
            args.image.parent.mkdir(parents=True, exist_ok=True)
            imageio.imwrite(args.image, stack_rows([imageio.imread(p)[..., :3] for p in found]))
        return 0
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions:
        raise UserError(
            f"unknown condition(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CONDITIONS)}"
        )
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    if args.camera_guidance < 0:
        raise UserError(f"--camera-guidance must be ≥ 0, not {args.camera_guidance}")
    prompts = [o.prompt for o in fronted_objects()]
    if args.prompts:
        prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
        bad = [p for p in prompts if (o := parse_prompt(p)) is None or o.front is None]
        if bad:
            raise UserError(
                f"not fronted world prompts: {', '.join(map(repr, bad))} (e.g. {fronted_objects()[0].prompt!r})"
            )
    base = base_config(args.front_share, args.device, args.steps, args.preset, args.model)
    seeds = list(range(args.seeds))
    results: dict[str, list[dict]] = {}
    strips: list[np.ndarray] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in conditions:
            config = CONDITIONS[name](base)
            if name == "camera-guidance":
                config.rule = dataclasses.replace(config.rule, camera_guidance_scale=args.camera_guidance)
            rows = run_condition(config, prompts, seeds, work / name,
                                 strips if args.image is not None else None, name)  # fmt: skip
            results[name] = rows
            print(f"{name}: {summarise(rows)}", flush=True)
    report = {
        "command": command.strip(), "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
        "device": args.device, "preset": args.preset, "model": args.model, "steps": base.steps, "seeds": seeds,
        "front_share": args.front_share if isinstance(base.guidance, EmpiricalPriorGuidanceConfig) else None,
        "prompts": prompts, "camera_guidance_scale": args.camera_guidance, "results": results, "image": str(args.image) if args.image and strips else None,
    }  # fmt: skip
    write_janus_report(args.out, args.name, report)
    if args.image is not None and strips:
        import imageio.v2 as imageio

        args.image.parent.mkdir(parents=True, exist_ok=True)
        imageio.imwrite(args.image, stack_rows(strips))
    return 0


def _label(condition: str, report: dict) -> str:
    s_c = report.get("camera_guidance_scale")
    return f"{condition} (s_c = {s_c:g})" if condition == "camera-guidance" and s_c is not None else condition


def write_janus_report(out: Path, name: str, report: dict) -> None:
    results = report["results"]
    report["summary"] = summary = {c: summarise(rows) for c, rows in results.items()}
    machine, share = report["machine"], report["front_share"]
    lines = [
        "# The Janus problem, measured: fronted objects against their known front",
        "",
        f"Command: `{report['command']}` ({report['date']}), seeds {report['seeds']}, {report['steps']} steps per run  ",
        *([f"Joined by `{report['combined_by']}`  "] if "combined_by" in report else []),
        f"Machine: {machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu']}, torch {machine['torch']}",
        "",
        (f"Prior: the `empirical` preset (exact denoiser of ground-truth renders), {share:.0%} of each object's "
         "renders from the front (|azimuth| < 45°). " if share is not None else
         f"Prior: the `{report.get('preset', 'empirical')}` preset's"
         + (f", its model `{report['model']}`. " if report.get("model") else ". ")) +
        "Per exported mesh "
        "(`world.metrics.janus`): faces coloured nearer the front's colour than the body's, per 45° azimuth sector; "
        "a sector shows the front at ≥ 30% of its area. Janus: the front on more than one side (≥ 2 runs of "
        "sectors, or all round). Front accuracy: exactly one front, covering the true front's sector. "
        "No front: the front's colour lost.",
        "",
        "| condition | runs | Janus rate | front accuracy | no front | failed | s / run |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {_label(c, report)} | {s['runs']} | {s['janus_rate']:.0%} | {s['front_accuracy']:.0%} | {s['no_front_rate']:.0%} "
          f"| {s['failed']} | {s['seconds_per_run']} |" for c, s in summary.items()],
    ]  # fmt: skip
    for condition, rows in results.items():
        lines += [
            "",
            f"## {condition}",
            "",
            "| prompt | seed | fronts | Janus | front ok | front share per sector (0°, 45°, …) |",
            "|---|---:|---:|---|---|---|",
            *[f"| {r['prompt']} | {r['seed']} | {'all round' if r['everywhere'] else r['fronts']} "
              f"| {'yes' if r['janus'] else ''} | {'yes' if r['front_ok'] else ''} "
              f"| {r.get('failed') or ' '.join(f'{s:.2f}' for s in r['sector_share'])} |" for r in rows],
        ]  # fmt: skip
    write_report(out, name, report, lines)
