"""`sds3d bench quality`: the default preset (learned prior) on the world's prompts, each mesh scored
against the ground truth.

    sds3d bench quality [--quick] [--variants full,no-camera,no-view-prompts,neither] [--device cuda]
                        [--out benchmarks]

Per prompt: train with the default preset, export the mesh as `sds3d generate` does, then
- shape: the primitive whose 3D IoU with the mesh is highest at its best rotation about z
  (`world.metrics.shape_ious`); right when it is the prompt's shape;
- colour: the world colour nearest in hue to the mesh's area-weighted vertex albedo;
- IoU: the mesh's 3D IoU with the prompt's primitive (best rotation about z, 64³ voxels);
- PSNR: albedo renders of the trained scene on a white background against ground-truth renders of
  the object from the same 8 cameras (an orbit at 20° elevation, 64×64);
- seconds: training + export, wall clock.
Variants are ablations of the default: `no-camera` gives the prior the "no camera" label instead of
the rendering camera; `no-view-prompts` drops the view suffixes (", side view", …) from the prompt.

`--refine` adds the mesh refinement stage (the `refine` preset, representations/mesh.py) after each
run, as variant `<variant>+refine`: the refined mesh scored the same way (its PSNR from renders of
the mesh), and beside it `mesh PSNR`, the same renders of the mesh before refinement: the NeRF's
volume renders, the exported mesh and the refined mesh side by side. Seconds: the refine stage only.
`--combine A.json B.json …` joins reports of disjoint prompt sets (shards run at once on one GPU).
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
import torch

from sds3d.bench.report import describe_machine, with_model, write_report
from sds3d.config import RunConfig, check_config, preset
from sds3d.errors import UserError
from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig
from sds3d.prior.data import HELD_OUT
from sds3d.world.shapes import WorldObject, all_objects, parse_prompt

# One prompt per shape, two of them held out of the prior's training data.
QUICK = ("a blue torus", "a green cube", "a yellow sphere", "a blue cone", "a purple cylinder")
PSNR_VIEWS, PSNR_RESOLUTION, PSNR_ELEVATION_DEG = 8, 64, 20.0


def _no_camera(config: RunConfig) -> RunConfig:
    if not isinstance(config.guidance, DiffusersGuidanceConfig):
        raise ValueError("the no-camera variant needs the diffusers prior")
    return dataclasses.replace(config, guidance=dataclasses.replace(config.guidance, camera_condition=False))


def _no_view_prompts(config: RunConfig) -> RunConfig:
    return dataclasses.replace(config, prompts=dataclasses.replace(config.prompts, view_dependent=False))


VARIANTS: dict[str, Callable[[RunConfig], RunConfig]] = {
    "full": lambda c: c,
    "no-camera": _no_camera,
    "no-view-prompts": _no_view_prompts,
    "neither": lambda c: _no_view_prompts(_no_camera(c)),
}


@torch.no_grad()
def render_psnr(run_dir: Path, obj: WorldObject, device: str = "cpu") -> float:
    """PSNR (dB) of the trained scene's albedo renders on white against the ground truth's."""
    from sds3d.cameras import turntable_cameras
    from sds3d.train import load_scene
    from sds3d.world.metrics import psnr
    from sds3d.world.render import render_object

    config, scene, _ = load_scene(run_dir, device)
    cams = turntable_cameras(PSNR_VIEWS, PSNR_ELEVATION_DEG, config.export.view_radius, config.export.view_fovy_deg,
                             PSNR_RESOLUTION, PSNR_RESOLUTION)  # fmt: skip
    ours = torch.cat([scene.render(cams[i].to(device), num_samples=config.export.num_samples, solid_background=(1.0, 1.0, 1.0),
                                   random_background=False).rgb.cpu() for i in range(len(cams))])  # fmt: skip
    truth = render_object(obj, cams).rgb
    return psnr(ours.clamp(0, 1).numpy(), truth.numpy())


def score_run(run_dir: Path, obj: WorldObject, device: str = "cpu") -> dict:
    """Shape, colour, IoU and PSNR of a finished run (its `mesh.ply`) against the world object."""
    from sds3d.world.metrics import area_weighted_color, load_mesh_arrays, nearest_color, shape_ious

    verts, faces, colors = load_mesh_arrays(run_dir / "mesh.ply")
    ious = shape_ious(verts, faces)
    shape = max(ious, key=lambda k: ious[k])
    color = nearest_color(area_weighted_color(verts, faces, colors))
    return {
        "shape": shape, "shape_ok": shape == obj.shape, "color": color, "color_ok": color == obj.color,
        "iou": round(ious[obj.shape], 3), "psnr": round(render_psnr(run_dir, obj, device), 2),
        "faces": int(len(faces)),
    }  # fmt: skip


@torch.no_grad()
def mesh_psnr(run_dir: Path, obj: WorldObject) -> float:
    """PSNR (dB) of renders of a run's exported mesh (as the refine stage starts from it)."""
    from sds3d.cameras import turntable_cameras
    from sds3d.config import load_config
    from sds3d.representations.mesh import MeshRefineConfig, load_previous_mesh
    from sds3d.world.metrics import psnr
    from sds3d.world.render import render_object

    mesh = load_previous_mesh(run_dir)
    scene = MeshRefineConfig().build()
    scene.set_mesh(mesh.vertices, mesh.faces, mesh.colors)
    export = load_config(run_dir / "config.json").export
    cams = turntable_cameras(PSNR_VIEWS, PSNR_ELEVATION_DEG, export.view_radius, export.view_fovy_deg,
                             PSNR_RESOLUTION, PSNR_RESOLUTION)  # fmt: skip
    ours = torch.cat([scene.render(cams[i]).rgb for i in range(len(cams))])
    return psnr(ours.clamp(0, 1).numpy(), render_object(obj, cams).rgb.numpy())


def run_prompt(config: RunConfig, workdir: Path, rows: list | None = None) -> dict:
    """Train, export and score one prompt; with `rows`, append a labelled strip of turntable frames."""
    from sds3d.api import generate

    obj = parse_prompt(config.prompt)
    if obj is None:
        raise ValueError(f"{config.prompt!r} is not a world prompt")
    t0 = time.perf_counter()
    try:
        generate(config, workdir, progress=False)
    except UserError as err:  # an empty scene or a divergence: a failed prompt, scored as such
        return {"prompt": config.prompt, "held_out": config.prompt in HELD_OUT, "shape": "none", "shape_ok": False,
                "color": "none", "color_ok": False, "iou": 0.0, "psnr": 0.0, "faces": 0,
                "seconds": round(time.perf_counter() - t0, 1), "failed": str(err)}  # fmt: skip
    seconds = time.perf_counter() - t0
    row = {"prompt": config.prompt, "held_out": config.prompt in HELD_OUT, **score_run(workdir, obj),
           "seconds": round(seconds, 1)}  # fmt: skip
    if rows is not None:
        from sds3d.bench.gallery import turntable_row

        rows.append(turntable_row(workdir / "turntable.gif", f"{config.prompt}   IoU {row['iou']:.2f}"))
    return row


def refine_prompt(coarse_dir: Path, coarse: dict, config: RunConfig, steps: int | None) -> dict:
    """The refine stage from a scored run: the refined mesh's row, with the starting mesh's PSNR."""
    obj = parse_prompt(config.prompt)
    assert obj is not None
    if coarse.get("failed"):  # nothing to refine
        return {**coarse, "mesh_psnr": 0.0, "seconds": 0.0}
    refine = dataclasses.replace(preset("refine"), prompt=config.prompt, seed=config.seed, device=config.device,
                                 validate_every=0)  # fmt: skip
    refine.mesh = dataclasses.replace(refine.mesh, from_previous=str(coarse_dir))
    if steps is not None:
        refine.steps = steps
    row = run_prompt(refine, coarse_dir.with_name(coarse_dir.name + "-refine"))
    return {**row, "mesh_psnr": round(mesh_psnr(coarse_dir, obj), 2)}


def combine(paths: list[Path]) -> dict:
    """One report from shards over disjoint prompts (same preset, rule, steps and seed)."""
    import json

    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise UserError(f"--combine: cannot read {path} ({err})") from None
        if not isinstance(reports[-1], dict) or "results" not in reports[-1]:
            raise UserError(f"--combine: {path} is not a report of `sds3d bench quality`")
        reports[-1].setdefault("camera_guidance_scale", 0.0)  # reports from before --camera-guidance
    keys = ("preset", "rule", "steps", "seed", "model", "camera_guidance_scale")
    if len({tuple(r.get(k) for k in keys) for r in reports}) > 1:
        raise UserError(f"--combine: the reports differ in {', '.join(keys)}")
    results: dict[str, list[dict]] = {}
    for r in reports:
        for variant, rows in r["results"].items():
            results.setdefault(variant, []).extend(rows)
    for variant, rows in results.items():
        if len({row["prompt"] for row in rows}) != len(rows):
            raise UserError(f"--combine: a prompt appears twice in variant {variant}")
    return {**reports[0], "results": results, "shards": [r["command"] for r in reports]}


def _shape(row: dict) -> str | None:
    obj = parse_prompt(row["prompt"])
    return None if obj is None else obj.shape


def summarise(rows: list[dict]) -> dict:
    return {
        "prompts": len(rows),
        "shape_accuracy": round(float(np.mean([r["shape_ok"] for r in rows])), 3),
        "color_accuracy": round(float(np.mean([r["color_ok"] for r in rows])), 3),
        "mean_iou": round(float(np.mean([r["iou"] for r in rows])), 3),
        "mean_psnr": round(float(np.mean([r["psnr"] for r in rows])), 2),
        **(
            {"mean_mesh_psnr": round(float(np.mean([r["mesh_psnr"] for r in rows])), 2)}
            if rows and "mesh_psnr" in rows[0]
            else {}
        ),
        **(
            {"cube_iou": round(float(np.mean(cubes)), 3)}
            if (cubes := [r["iou"] for r in rows if _shape(r) == "cube"])
            else {}
        ),
        "seconds_per_prompt": round(float(np.mean([r["seconds"] for r in rows])), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sds3d bench quality", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} prompts: {', '.join(QUICK)}")
    parser.add_argument("--variants", default="full", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, help="override the preset's steps")
    parser.add_argument("--prompts", help="comma-separated world prompts instead of all 30 (or --quick)")
    parser.add_argument(
        "--limit", type=int, help="only the first N prompts of the selection (for smoke tests)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default", help="the preset every prompt runs (default: default)")
    parser.add_argument(
        "--rule", default="sds", help="the distillation rule (`sds3d rules`), the preset's settings"
    )
    parser.add_argument(
        "--model",
        help="the preset's diffusers prior instead (a folder or a built-in name, e.g. sds3d/world-prior-32-fronts)",
    )
    parser.add_argument("--camera-guidance", type=float, default=None, metavar="S_C",
                        help="the rule's camera guidance s_c (default: the preset's)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--name", default="quality", help="report file name (without .md/.json)")
    parser.add_argument(
        "--image", type=Path, help="write turntable frames of the first variant's results here"
    )
    parser.add_argument("--refine", action="store_true", help="add the mesh refinement stage after each run")
    parser.add_argument(
        "--refine-steps", type=int, help="the refine stage's steps (default: the refine preset's)"
    )
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="join the reports of shards over disjoint prompts into one (runs nothing)")  # fmt: skip
    args = parser.parse_args(argv)
    command = "sds3d bench quality " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.combine:
        data = combine(args.combine)
        data["command"] = command.strip()
        write_quality_report(args.out, args.name, data)
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    prompts = QUICK if args.quick else tuple(o.prompt for o in all_objects())
    if args.prompts:
        prompts = tuple(p.strip() for p in args.prompts.split(","))
        bad = [p for p in prompts if parse_prompt(p) is None]
        if bad:
            parser.error(f"not world prompts: {', '.join(bad)}")
    prompts = prompts[: args.limit] if args.limit else prompts
    from sds3d.rules import RULES, with_rule

    if args.rule not in RULES:
        parser.error(f"unknown rule {args.rule!r}; choose from {', '.join(RULES)}")
    base = dataclasses.replace(preset(args.preset), device=args.device)
    base.rule = with_rule(base.rule, args.rule)
    base = with_model(base, args.model, args.preset)
    if args.camera_guidance is not None:
        if args.camera_guidance < 0:
            raise UserError(f"--camera-guidance must be ≥ 0, not {args.camera_guidance}")
        base.rule = dataclasses.replace(base.rule, camera_guidance_scale=args.camera_guidance)
    check_config(base)  # the rule's own checks (a rule that refuses camera guidance): one line
    if args.steps is not None:
        base = dataclasses.replace(base, steps=args.steps)
    results: dict[str, list[dict]] = {}
    strips: list[np.ndarray] = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            results[variant] = []
            for i, prompt in enumerate(prompts):
                config = VARIANTS[variant](dataclasses.replace(base, prompt=prompt, seed=args.seed))
                # The picture: the quick prompts (one per shape) of the first variant.
                keep = (
                    strips if args.image is not None and variant == variants[0] and prompt in QUICK else None
                )
                row = run_prompt(config, Path(tmp) / f"{variant}-{i}", keep)
                results[variant].append(row)
                print(f"[{variant} {i + 1}/{len(prompts)}] {row}", flush=True)
                if args.refine:
                    refined = refine_prompt(Path(tmp) / f"{variant}-{i}", row, config, args.refine_steps)
                    results.setdefault(f"{variant}+refine", []).append(refined)
                    print(f"[{variant}+refine {i + 1}/{len(prompts)}] {refined}", flush=True)
    if args.image is not None and strips:
        import imageio.v2 as imageio

        args.image.parent.mkdir(parents=True, exist_ok=True)
        imageio.imwrite(args.image, np.concatenate(strips, axis=0))
    report = {"command": command.strip(), "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
              "preset": args.preset, "rule": args.rule, "steps": base.steps, "model": getattr(base.guidance, "model", None),
              "camera_guidance_scale": base.rule.camera_guidance_scale, "seed": args.seed, "results": results}  # fmt: skip
    write_quality_report(args.out, args.name, report)
    return 0


def write_quality_report(out: Path, name: str, report: dict) -> None:
    results = report["results"]
    report["summary"] = summary = {variant: summarise(rows) for variant, rows in results.items()}
    preset_name, rule, seed, steps = report["preset"], report["rule"], report["seed"], report["steps"]
    machine = report["machine"]
    lines = [
        f"# 3D quality against the ground truth: the {preset_name} preset with the learned prior"
        + ("" if rule == "sds" else f", rule {rule}")
        + (f", prior `{report['model']}`" if report.get("model") else "")
        + (f", camera guidance s_c = {report['camera_guidance_scale']:g}" if report.get("camera_guidance_scale") else ""),
        "",
        f"Command: `{report['command']}` ({report['date']}), seed {seed}, {steps} steps per prompt  ",
        *([f"Shards: {', '.join(f'`{c}`' for c in report['shards'])}  "] if "shards" in report else []),
        f"Machine: {machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu']}, torch {machine['torch']}",
        "",
        "Shape: the primitive with the highest 3D IoU after the best rotation about z. Colour: hue of the "
        "area-weighted vertex albedo. IoU: with the prompt's primitive (64³). PSNR: albedo renders on white "
        f"against ground-truth renders, {PSNR_VIEWS} views at {PSNR_ELEVATION_DEG:.0f}° elevation, "
        f"{PSNR_RESOLUTION}² (of the trained scene: the NeRF's volume renders, or the refined mesh). "
        "Mesh PSNR: the same of the exported mesh the refine stage started from. Seconds: training + export "
        "(+refine: the refine stage only). Held-out objects were never seen by the prior.",
        "",
        "| variant | prompts | shape accuracy | colour accuracy | mean IoU | cube IoU | mean PSNR (dB) | mesh PSNR before (dB) | s / prompt |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {v} | {s['prompts']} | {s['shape_accuracy']:.0%} | {s['color_accuracy']:.0%} | {s['mean_iou']:.3f} "
          f"| {s.get('cube_iou', float('nan')):.3f} | {s['mean_psnr']:.2f} | {s.get('mean_mesh_psnr', '–')} "
          f"| {s['seconds_per_prompt']} |" for v, s in summary.items()],
    ]  # fmt: skip
    for variant, rows in results.items():
        refined = bool(rows) and "mesh_psnr" in rows[0]
        lines += [
            "",
            f"## {variant}",
            "",
            "| prompt | held out | shape | colour | IoU | PSNR (dB) |" + (" mesh PSNR before |" if refined else "") + " seconds |",
            "|---|---|---|---|---:|---:|" + ("---:|" if refined else "") + "---:|",
            *[f"| {r['prompt']} | {'yes' if r['held_out'] else ''} | {r['shape']}{'' if r['shape_ok'] else ' ✗'} "
              f"| {r['color']}{'' if r['color_ok'] else ' ✗'} | {r['iou']:.3f} | {r['psnr']:.2f} |"
              + (f" {r['mesh_psnr']:.2f} |" if refined else "") + f" {r['seconds']} |"
              for r in rows],
        ]  # fmt: skip
    write_report(out, name, report, lines)


if __name__ == "__main__":
    sys.exit(main())
