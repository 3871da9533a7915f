"""Prior accuracy: sample every world prompt from a diffusers prior (DDIM, CFG) and judge the
samples with the attribute classifier trained on ground-truth renders.

    python -m sds3d.bench.prior_accuracy --out benchmarks [--model DIR] [--samples 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sds3d.bench.report import describe_machine, write_report
from sds3d.cameras import CameraConfig, orbit_cameras, sample_cameras, view_labels
from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig
from sds3d.prior.classifier import ClassifierConfig, predict, train_classifier
from sds3d.prior.data import HELD_OUT, PriorDataConfig
from sds3d.prior.model import SHIPPED_PRIOR
from sds3d.prior.sample import image_grid, sample_images
from sds3d.prompts import with_view
from sds3d.world import all_objects
from sds3d.world.metrics import IMAGE_FRONT_SHARE, image_front_share
from sds3d.world.render import render_object
from sds3d.world.shapes import fronted_objects

# Where fronts are judged: the front camera (azimuth 0°, facing the front) and the back (180°).
FRONT_CHECK_VIEWS = {"front": 0.0, "back": 180.0}
FRONT_CHECK_ELEVATION_DEG = 15.0


def _relative(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def world_prompts(samples: int, camera: bool, view_prompts: bool, device: str):
    """Every world object `samples` times: (objects, prompts, cameras or None). Cameras are drawn from
    the prior's training range (seed 1); with `view_prompts` each prompt gets its camera's view suffix
    by the view-dependent prompting rule (as SDS and the training captions do)."""
    objects = [o for o in all_objects() for _ in range(samples)]
    prompts = [o.prompt for o in objects]
    if not camera:
        return objects, prompts, None
    g = torch.Generator().manual_seed(1)
    cameras = sample_cameras(PriorDataConfig().camera, g, batch_size=len(objects))
    if view_prompts:
        labels = view_labels(cameras.elevation_deg, cameras.azimuth_deg)
        prompts = [with_view(p, label) for p, label in zip(prompts, labels, strict=True)]
    return objects, prompts, cameras.to(device)


def score(classifier, images: torch.Tensor, objects: list) -> list[dict]:
    """Shape and colour accuracy of the judged samples, seen and held-out objects separately."""
    shapes, colors = predict(classifier, images)
    rows = []
    for held_out in (False, True):
        pick = [i for i, o in enumerate(objects) if (o.prompt in HELD_OUT) == held_out]
        rows.append({
            "objects": "held out" if held_out else "seen", "samples": len(pick),
            "shape_accuracy": sum(shapes[i] == objects[i].shape for i in pick) / len(pick),
            "color_accuracy": sum(colors[i] == objects[i].color for i in pick) / len(pick),
        })  # fmt: skip
    return rows


def front_rows(guidance, samples: int, guidance_scale: float, steps: int, view_prompts: bool,
               device: str, **sampler) -> tuple[list[dict], torch.Tensor]:  # fmt: skip
    """World v2's fronted prompts sampled from the front camera and from the back one (camera
    conditioned): how often each sample shows the front (≥ IMAGE_FRONT_SHARE of its object pixels in
    the front's colour), beside ground-truth renders from the same cameras. A prior that knows where
    the front is shows it from the front and not from the back. Both cameras start from the same
    noise (sample_images' seed), so the pair differs in the camera alone. Also returns the samples."""
    data = PriorDataConfig()
    rows, images = [], []
    for view, azimuth in FRONT_CHECK_VIEWS.items():
        objects = [o for o in fronted_objects() for _ in range(samples)]
        n = len(objects)
        cameras = orbit_cameras(
            torch.full((n,), FRONT_CHECK_ELEVATION_DEG), torch.full((n,), azimuth),
            torch.full((n,), data.camera.radius[0]), torch.full((n,), data.camera.fovy_deg[0]),
            data.resolution, data.resolution,
        )  # fmt: skip
        prompts = [with_view(o.prompt, view) if view_prompts else o.prompt for o in objects]
        sampled = sample_images(
            guidance, prompts, guidance_scale, steps, cameras=cameras.to(device), **sampler
        )
        shows = torch.cat([image_front_share(sampled[i : i + 1], o) for i, o in enumerate(objects)])
        gt = torch.cat([
            image_front_share(render_object(o, cameras[i : i + 1]).rgb.cpu(), o) for i, o in enumerate(objects)
        ])  # fmt: skip
        rows.append({"camera": view, "azimuth_deg": azimuth, "samples": n,
                     "shows_front": float((shows >= IMAGE_FRONT_SHARE).float().mean()),
                     "ground_truth_shows_front": float((gt >= IMAGE_FRONT_SHARE).float().mean())})  # fmt: skip
        images.append(sampled)
    return rows, torch.cat(images)


def main(argv: list[str] | None = None) -> int:
    import imageio.v2 as imageio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--model", default=str(_relative(SHIPPED_PRIOR)))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM η: 0 deterministic, 1 ancestral")
    parser.add_argument(
        "--camera", action="store_true", help="condition each sample on a random camera of the training range"
    )
    parser.add_argument(
        "--view-prompts", action="store_true", help="with --camera: add each camera's view suffix"
    )
    parser.add_argument("--threshold", type=float, default=0.0, help="dynamic thresholding ratio (0: off)")
    parser.add_argument("--rescale", type=float, default=0.0, help="CFG rescale φ (0: off)")
    parser.add_argument(
        "--camera-guidance",
        default="0",
        metavar="S,S",
        help="with --camera: the fronts check at each of these camera guidance scales s_c",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="prior_accuracy", help="report name (samples: <name>_samples.png)")
    args = parser.parse_args(argv)
    try:
        camera_scales = [float(v) for v in args.camera_guidance.split(",")]
    except ValueError:
        parser.error(f"--camera-guidance takes comma-separated numbers, not {args.camera_guidance!r}")
    t0 = time.perf_counter()
    classifier, judge = train_classifier(ClassifierConfig(), args.device)
    guidance = DiffusersGuidanceConfig(model=args.model).build(CameraConfig()).to(args.device)
    objects, prompts, cameras = world_prompts(args.samples, args.camera, args.view_prompts, args.device)
    images = sample_images(guidance, prompts, args.guidance_scale, args.steps, cameras=cameras, eta=args.eta,
                           threshold_ratio=args.threshold, guidance_rescale=args.rescale)  # fmt: skip
    rows = score(classifier, images.to(args.device), objects)
    sampler = {"eta": args.eta, "threshold_ratio": args.threshold, "guidance_rescale": args.rescale}
    fronts: list[dict] = []
    front_images = []
    for s_c in camera_scales if args.camera else []:
        rows_c, images_c = front_rows(guidance, 2 * args.samples, args.guidance_scale, args.steps,
                                      args.view_prompts, args.device, camera_guidance_scale=s_c, **sampler)  # fmt: skip
        fronts += [{**r, "camera_guidance_scale": s_c} for r in rows_c]
        front_images.append(images_c)
    args.out.mkdir(parents=True, exist_ok=True)
    samples = args.out / (
        "prior_samples.png" if args.name == "prior_accuracy" else f"{args.name}_samples.png"
    )
    imageio.imwrite(samples, image_grid(images, 4 * args.samples))
    if fronts:
        imageio.imwrite(
            args.out / f"{args.name}_fronts.png", image_grid(torch.cat(front_images), 2 * args.samples)
        )
    command = "python -m sds3d.bench.prior_accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
              "model": args.model, "guidance_scale": args.guidance_scale, "ddim_steps": args.steps, "eta": args.eta, "camera": args.camera,
              "judge_on_ground_truth": judge, "rows": rows, "fronts": fronts, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    lines = [
        "# Prior accuracy: samples of every world prompt judged by an attribute classifier",
        "",
        f"Command: `{result['command']}` ({result['date']}), model `{args.model}`  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']}",
        "",
        f"DDIM {args.steps} steps (η = {args.eta:g}), CFG s = {args.guidance_scale} (diffusers convention), "
        f"{'a random camera of the training range per sample' if args.camera else 'no camera'}, "
        f"{args.samples} samples per prompt. The judge (a CNN trained on ground-truth renders of all 30 objects) "
        f"scores {judge['shape_accuracy']:.1%} shape and {judge['color_accuracy']:.1%} colour on fresh ground-truth renders.",
        "",
        "| objects | samples | shape accuracy | colour accuracy |",
        "|---|---:|---:|---:|",
        *[
            f"| {r['objects']} | {r['samples']} | {r['shape_accuracy']:.1%} | {r['color_accuracy']:.1%} |"
            for r in rows
        ],
        "",
        f"Target ≥ 95%. Samples: `{samples}` (rows of {4 * args.samples}: one prompt per "
        f"{args.samples} columns). {result['seconds']} s in all.",
    ]
    if fronts:
        lines += [
            "",
            "## Fronts (world v2)",
            "",
            f"The {len(fronted_objects())} fronted prompts sampled from the front camera (azimuth 0°) and the back one "
            f"(180°), elevation {FRONT_CHECK_ELEVATION_DEG:g}°, {2 * args.samples} samples each"
            f"{', with the view suffix' if args.view_prompts else ''}. Shows the front: ≥ {IMAGE_FRONT_SHARE:.0%} "
            "of the object's pixels nearer the front's colour than the body's. A prior that knows where the "
            "front is shows it from the front and not from the back; both cameras start from the same noise, so "
            f"only the camera differs. Camera guidance s_c: ε̂ += s_c (ε_(y,camera) − ε_(y,no camera)) "
            f"(prior/sample.py). Samples: `{args.name}_fronts.png` "
            "(per s_c, front-camera rows first, one prompt per row).",
            "",
            "| camera guidance s_c | camera | samples | samples show the front | ground truth shows the front |",
            "|---:|---|---:|---:|---:|",
            *[
                f"| {r['camera_guidance_scale']:g} | {r['camera']} ({r['azimuth_deg']:g}°) | {r['samples']} | {r['shows_front']:.0%} | "
                f"{r['ground_truth_shows_front']:.0%} |"
                for r in fronts
            ],
        ]
    write_report(args.out, args.name, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
