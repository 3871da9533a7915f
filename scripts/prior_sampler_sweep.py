"""Prior accuracy of one prior under several sampler settings, with one judge: which guidance scale,
dynamic thresholding, CFG rescale, x_0 clipping, step count, timestep spacing and prompt form let DDIM samples of the
built-in prior show the prompted shape.

    python scripts/prior_sampler_sweep.py --device cuda --out runs/sweep [--samples 4]

Writes `<out>/prior_sampler_sweep.{md,json}` and one sample grid per setting under `<out>/prior_sampler_sweep_grids/`.
Each setting uses the same cameras and initial noise as `python -m sds3d.bench.prior_accuracy`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sds3d.bench.prior_accuracy import score, world_prompts
from sds3d.bench.report import describe_machine, write_report
from sds3d.cameras import CameraConfig
from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig
from sds3d.prior.classifier import ClassifierConfig, train_classifier
from sds3d.prior.model import SHIPPED_PRIOR
from sds3d.prior.sample import image_grid, sample_images

# name → sampler settings; unnamed keys take these defaults. "clipped" is the scheduler config the
# prior shipped with until 2026-11-26 (diffusers' default clip_sample=True), "unclipped" the one now.
DEFAULT = {"camera": True, "view_prompts": False, "guidance_scale": 3.0, "steps": 30, "threshold_ratio": 0.0,
           "guidance_rescale": 0.0, "spacing": None, "clip_sample": True}  # fmt: skip
SETTINGS: dict[str, dict] = {
    "clipped, camera, s 3 (the old measurement)": {},
    "clipped, camera, s 3, 4 steps": {"steps": 4},
    "clipped, camera, s 3, 10 steps": {"steps": 10},
    "clipped, camera, s 3, 20 steps": {"steps": 20},
    "clipped, camera, s 3, trailing spacing": {"spacing": "trailing"},
    "clipped, camera, s 3, view prompts": {"view_prompts": True},
    "clipped, camera, s 3, thresholding 0.95": {"threshold_ratio": 0.95},
    "clipped, camera, s 7.5, thresholding 0.95": {"guidance_scale": 7.5, "threshold_ratio": 0.95},
    "clipped, camera, s 7.5, rescale 0.7": {"guidance_scale": 7.5, "guidance_rescale": 0.7},
    "clipped, no camera, s 3": {"camera": False},
    "**unclipped**, camera, s 3": {"clip_sample": False},
    "unclipped, camera, s 3, 20 steps": {"clip_sample": False, "steps": 20},
    "unclipped, camera, s 3, 50 steps": {"clip_sample": False, "steps": 50},
    "unclipped, camera, s 3, view prompts": {"clip_sample": False, "view_prompts": True},
    "unclipped, camera, s 7.5": {"clip_sample": False, "guidance_scale": 7.5},
    "unclipped, camera, s 20 (the SDS scale)": {"clip_sample": False, "guidance_scale": 20.0},
    "**unclipped**, no camera, s 3": {"clip_sample": False, "camera": False},
    "unclipped, no camera, s 7.5": {"clip_sample": False, "camera": False, "guidance_scale": 7.5},
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import imageio.v2 as imageio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(SHIPPED_PRIOR))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument(
        "--select", default=None, help="comma-separated indices of SETTINGS to run (default all)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    classifier, judge = train_classifier(ClassifierConfig(), args.device)
    guidance = DiffusersGuidanceConfig(model=args.model).build(CameraConfig()).to(args.device)
    (args.out / "prior_sampler_sweep_grids").mkdir(parents=True, exist_ok=True)
    results = []
    names = list(SETTINGS)
    picked = range(len(names)) if args.select is None else [int(i) for i in args.select.split(",")]
    for i in picked:
        name, st = names[i], DEFAULT | SETTINGS[names[i]]
        objects, prompts, cameras = world_prompts(args.samples, st["camera"], st["view_prompts"], args.device)
        images = sample_images(guidance, prompts, st["guidance_scale"], st["steps"], cameras=cameras,
                               threshold_ratio=st["threshold_ratio"], guidance_rescale=st["guidance_rescale"],
                               spacing=st["spacing"], clip_sample=st["clip_sample"])  # fmt: skip
        rows = score(classifier, images.to(args.device), objects)
        imageio.imwrite(
            args.out / "prior_sampler_sweep_grids" / f"{i:02d}.png", image_grid(images, 4 * args.samples)
        )
        results.append({"index": i, "setting": name, **st, "rows": rows})
        print(f"{i:2d} {name:48s} " + "  ".join(f"{r['objects']}: shape {r['shape_accuracy']:.0%} colour "
                                                f"{r['color_accuracy']:.0%}" for r in rows), flush=True)  # fmt: skip
    command = "python scripts/prior_sampler_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
              "model": args.model, "samples_per_prompt": args.samples,
              "judge_on_ground_truth": judge, "settings": results,
              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    lines = [
        "# Prior accuracy under sampler settings (one judge, same cameras and initial noise)",
        "",
        f"Command: `{command}` ({result['date']}), model `{args.model}`  ",
        f"Machine: {result['machine'].get('gpu') or result['machine']['cpu']}, torch {result['machine']['torch']}",
        "",
        f"DDIM (30 steps unless named), {args.samples} samples per prompt; thresholding: diffusers' dynamic "
        "thresholding with max 1.5; rescale: CFG rescale φ. Grid i is `prior_sampler_sweep_grids/<i>.png`.",
        "",
        "| # | setting | shape seen | shape held out | colour seen | colour held out |",
        "|---:|---|---:|---:|---:|---:|",
        *[
            f"| {r['index']} | {r['setting']} | {r['rows'][0]['shape_accuracy']:.0%} | {r['rows'][1]['shape_accuracy']:.0%} "
            f"| {r['rows'][0]['color_accuracy']:.0%} | {r['rows'][1]['color_accuracy']:.0%} |"
            for r in results
        ],
        "",
        f"{result['seconds']} s in all.",
    ]
    write_report(args.out, "prior_sampler_sweep", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
