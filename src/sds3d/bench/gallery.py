"""Five prompts (one per shape) with one preset (the empirical prior by default): a grid of
turntable frames and each mesh's score against the ground truth.

    python -m sds3d.bench.gallery --out benchmarks
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sds3d.bench.report import describe_machine, write_report
from sds3d.config import preset

PROMPTS = ("a blue torus", "a red cube", "a yellow sphere", "a green cone", "a purple cylinder")
FRAMES_PER_ROW = 6


def _label(image: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image)
    ImageDraw.Draw(pil).text((4, 4), text, fill=(0, 0, 0))
    return np.asarray(pil)


def turntable_row(gif: Path, label: str) -> np.ndarray:
    """FRAMES_PER_ROW evenly spaced frames of a run's turntable side by side, labelled."""
    import imageio.v2 as imageio

    frames = imageio.mimread(gif)
    step = max(len(frames) // FRAMES_PER_ROW, 1)
    row = np.concatenate([np.asarray(f)[..., :3] for f in frames[::step][:FRAMES_PER_ROW]], axis=1)
    return _label(row, label)


def main(argv: list[str] | None = None) -> int:
    import imageio.v2 as imageio

    from sds3d.api import generate
    from sds3d.world import parse_prompt
    from sds3d.world.metrics import area_weighted_color, load_mesh_arrays, mesh_iou, nearest_color

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=Path("docs/gallery_empirical.png"))
    parser.add_argument("--preset", default="empirical")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows, results = [], []
    for prompt in PROMPTS:
        config = dataclasses.replace(preset(args.preset), prompt=prompt, seed=args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = generate(config, Path(tmp) / "run", progress=False)
            seconds = time.perf_counter() - t0
            verts, faces, colors = load_mesh_arrays(out.files["ply"])
            obj = parse_prompt(prompt)
            assert obj is not None
            iou = mesh_iou(verts, faces, obj.shape)
            rows.append(turntable_row(out.files["gif"], f"{prompt}   IoU {iou:.2f}"))
        color = nearest_color(area_weighted_color(verts, faces, colors))
        results.append({"prompt": prompt, "iou": round(iou, 3), "color": color, "color_ok": color == obj.color,
                        "seconds": round(seconds, 1)})  # fmt: skip
        print(results[-1], flush=True)
    args.image.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(args.image, np.concatenate(rows, axis=0))
    command = "python -m sds3d.bench.gallery " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command.strip(), "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
               "seed": args.seed, "results": results,
               "mean_iou": round(float(np.mean([r["iou"] for r in results])), 3),
               "color_accuracy": float(np.mean([r["color_ok"] for r in results]))}  # fmt: skip
    lines = [
        f"# The {args.preset} preset on five prompts: 3D IoU and colour against the ground truth",
        "",
        f"Command: `{summary['command']}` ({summary['date']}), seed {args.seed}  ",
        f"Machine: {summary['machine']['cpu']}, {summary['machine']['cores']} cores, torch {summary['machine']['torch']}",
        "",
        "| prompt | mesh IoU | colour | seconds (train + export) |",
        "|---|---:|---|---:|",
        *[f"| {r['prompt']} | {r['iou']:.3f} | {r['color']} | {r['seconds']} |" for r in results],
        f"| **mean** | **{summary['mean_iou']:.3f}** | **{summary['color_accuracy']:.0%}** | |",
        "",
        f"Image: `{args.image}`.",
    ]
    write_report(args.out, f"gallery_{args.preset}", summary, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
