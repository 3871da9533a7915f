"""The short Python API: train a run, then export what a person can look at.

    import dataclasses, sds3d
    config = dataclasses.replace(sds3d.preset("fast"), prompt="a red cube")
    result = sds3d.generate(config, "outputs/red-cube")   # train + mesh + turntable + summary
    print(result.files["glb"])

`generate` = `train.train` then `export_run`; `export_run` re-exports any run folder and
`render_run` renders its turntable in another shading. Each holds the run folder's lock (runs.py).
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sds3d import runs
from sds3d.config import RunConfig
from sds3d.export import (
    Shading,
    render_mesh_turntable,
    write_mesh,
    write_turntable,
)
from sds3d.guidance.base import Prior
from sds3d.train import TrainOutput, load_scene, train

SLUG_MAX_CHARS = 48


@dataclass
class GenerateOutput:
    run_dir: Path
    train: TrainOutput
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def slugify(prompt: str) -> str:
    """A safe folder name from a prompt: lowercase ASCII letters, digits and single dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:SLUG_MAX_CHARS].strip("-")
    return slug or "prompt"


def default_run_dir(prompt: str, root: Path | str = "outputs") -> Path:
    return Path(root) / f"{slugify(prompt)}-{time.strftime('%Y%m%d-%H%M%S')}"


def software_versions() -> dict[str, str]:
    import diffusers
    import numpy
    import trimesh

    import sds3d

    return {
        "sds3d": sds3d.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "numpy": numpy.__version__, "trimesh": str(trimesh.__version__),
        "platform": platform.platform(),
    } | git_commit()  # fmt: skip


def git_commit() -> dict[str, str]:
    """{"git_commit": sha[, "git_dirty": "true"]} when sds3d runs from a git checkout, else {}."""
    import sds3d

    source = Path(sds3d.__file__).resolve().parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=source, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        info = {"git_commit": head.stdout.strip()}
        if run("status", "--porcelain", "--untracked-files=no").stdout.strip():
            info["git_dirty"] = "true"
        return info
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return {}


def export_run(run_dir: Path | str, device: str = "cpu") -> dict[str, Path]:
    """Mesh (glb, ply, obj) and turntable (gif, mp4 with imageio-ffmpeg) of a run's last checkpoint."""
    run_dir = Path(run_dir)
    with runs.locked(run_dir):
        return _export_run(run_dir, device)


def _export_run(run_dir: Path, device: str) -> dict[str, Path]:
    config, scene, step = load_scene(run_dir, device)
    mesh = scene.to_mesh(config.export)
    files: dict[str, Path] = dict(write_mesh(mesh, run_dir)) | scene.write_extras(run_dir)
    frames = render_mesh_turntable(mesh, config.export)
    for path in write_turntable(frames, run_dir, config.export.turntable_fps):
        files[path.suffix.lstrip(".")] = path
    mesh_info = {
        "step": step, "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
        "iso_level": mesh.iso_level, "silhouette_iou": mesh.silhouette_iou,
    }  # fmt: skip
    runs.write_atomic(run_dir / "mesh.json", json.dumps(mesh_info, indent=2))
    return files


def render_run(
    run_dir: Path | str, shading: Shading = "albedo", device: str = "cpu", progress: bool = False
) -> list[Path]:
    """Turntable (gif, mp4) of a run's last checkpoint in `shading`, in `run_dir/render-<shading>/`."""
    run_dir = Path(run_dir)
    with runs.locked(run_dir):
        config, scene, _ = load_scene(run_dir, device)
        out = run_dir / f"render-{shading}"
        out.mkdir(exist_ok=True)
        frames = scene.render_turntable(config.export, shading, progress)
        return write_turntable(frames, out, config.export.turntable_fps)


def generate(
    config: RunConfig,
    run_dir: Path | str,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    prior: Prior | None = None,
    on_step: Callable[[int, Any], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerateOutput:
    """Train, then export; writes `summary.json`. An interrupted run exports nothing (resume it).
    `overwrite` replaces an earlier sds3d run in `run_dir` (only what sds3d wrote there); `prior`
    (built with `train.build_prior`) is used as it is and can serve many runs; `on_step` and
    `should_stop` are `train`'s (the app's progress and Stop button)."""
    run_dir = Path(run_dir)
    with runs.locked(run_dir, create=not resume):
        result = train(config, run_dir, resume=resume, progress=progress, overwrite=overwrite, prior=prior,
                       on_step=on_step, should_stop=should_stop)  # fmt: skip
        out = GenerateOutput(run_dir=run_dir, train=result)
        if result.interrupted:
            return out
        t0 = time.perf_counter()
        out.files = _export_run(run_dir, config.device)
        out.summary = write_summary(config, run_dir, result, out.files, time.perf_counter() - t0)
        return out


def write_summary(
    config: RunConfig, run_dir: Path, result: TrainOutput, files: dict[str, Path], export_wall_s: float
) -> dict:
    """`run_dir/summary.json`: what was run, how long it took, the mesh and the files."""
    summary = {
        "prompt": config.prompt, "preset": config.preset, "seed": config.seed, "steps": config.steps,
        "train_wall_s": round(result.wall_s, 2), "it_per_s": round(result.it_per_s, 3),
        "export_wall_s": round(export_wall_s, 2), "final_losses": result.final_losses,
        "mesh": json.loads((run_dir / "mesh.json").read_text()),
        "files": {k: str(v.name) for k, v in files.items()}, "versions": software_versions(),
    }  # fmt: skip
    runs.write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
