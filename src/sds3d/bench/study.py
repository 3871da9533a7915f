"""`sds3d study SPEC`: a grid of settings × seeds × prompts, every cell scored against the ground truth.

    sds3d study studies/weighting_schedule.toml [--workers 8] [--device cuda] [--dir runs/study-NAME]
    sds3d study SPEC --quick             # a first look on a CPU: seed 0, one prompt per shape
    sds3d study SPEC --report            # rewrite the report from the cells found, run nothing

SPEC (TOML or JSON; `studies/` holds the committed ones):

    name = "weighting_schedule"
    preset = "default"               # every cell starts from this preset …
    seeds = 3                        # … a count (0, 1, 2) or a list
    prompts = "study"                # "quick" (5), "study" (10, 5 held out) or "all" (30), or a list
    cross = true                     # false (the default): one axis at a time around the preset
    [base]                           # settings every cell shares (dotted paths into config.json)
    steps = 800
    [axes]
    weighting = ["dreamfusion", "seed", "uniform", "fantasia3d", "ism"]
    t_schedule = ["constant", "linear", "sqrt", "step", "dreamtime"]
    [prior_accuracy]                 # optional, for a `prior` axis: value → prior_accuracy report
    "runs/prior-1000/pipeline" = "benchmarks/prior_accuracy_step_1000.json"

Axes: `rule` (a name of `sds3d rules`, the preset's settings kept), `weighting`, `t_schedule`, `cfg`
(the guidance scale s), `shading` (SHADINGS), `prior` (a diffusers folder), `steps`, or any dotted
path of config.json (`rule.t_max_end`, `renderer.num_samples`, …).

A cell is (settings, seed, prompt). It trains (the prior is loaded once per worker and shared by all
its cells), extracts the mesh and scores it as `bench quality` does: shape, colour, 3D IoU, PSNR.
Each finished cell is one small json in `DIR/cells/`, named by a hash of its whole config, so a
killed or interrupted study resumes where it stopped, and a cell two studies share runs once.
The report (`--out`, default `benchmarks/`): `study_<name>.md` + `.json`, every point's mean ± spread
over seeds (each seed's mean over the prompts; spread = their standard deviation), shape failures
per shape, and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sds3d.batch import EXPORT_THREADS
from sds3d.config import ConfigError, RunConfig, from_dict, preset, to_dict
from sds3d.errors import UserError
from sds3d.prior.data import HELD_OUT
from sds3d.world.shapes import SHAPES, all_objects, parse_prompt

# Ten prompts, two per shape: the five the prior never saw (prior/data.py HELD_OUT) and five it saw.
STUDY_PROMPTS = (
    "a red torus", "a green cube", "a blue cone", "a yellow cylinder", "a purple sphere",
    "a blue torus", "a red cube", "a yellow cone", "a purple cylinder", "a orange sphere",
)  # fmt: skip
QUICK_PROMPTS = ("a blue torus", "a green cube", "a yellow sphere", "a blue cone", "a purple cylinder")

# Shading during training (renderer fields). DreamFusion samples a light around the camera and shades
# each step with one of albedo, textureless or lambertian; these isolate the choices.
SHADINGS: dict[str, dict[str, Any]] = {
    "albedo": {"albedo_prob": 1.0, "textureless_prob": 0.0},  # the default preset
    "lambertian": {"albedo_prob": 0.0, "textureless_prob": 0.0, "light_jitter": 0.0},  # light at the camera
    "light-sampling": {"albedo_prob": 0.0, "textureless_prob": 0.0, "light_jitter": 1.0},  # lights around it
    "textureless-mix": {
        "albedo_prob": 0.2,
        "textureless_prob": 0.5,
        "light_jitter": 1.0,
    },  # DreamFusion's mix
}
ALIASES = {"weighting": "rule.weighting", "t_schedule": "rule.t_schedule", "cfg": "rule.guidance_scale",
           "prior": "guidance.model", "steps": "steps"}  # fmt: skip
# Not part of a cell's identity: where it ran and how often it wrote checkpoints or validation renders.
NOT_IN_KEY = ("device", "validate_every", "checkpoint_every", "prompt", "seed")
# Fields added after cells were measured, left out of the key while they hold the value that every
# earlier cell implicitly had, so committed cells stay found (`tests/test_study.py` pins a key).
KEY_SINCE_ADDED = {"representation": "nerf", "rule.camera_guidance_scale": 0.0}
# A representation's own section is part of the key only when that representation trains.
REPRESENTATION_SECTIONS = {"gaussians": "gaussians", "mesh": "mesh"}


@dataclass
class StudySpec:
    name: str
    preset: str = "default"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    prompts: list[str] = field(default_factory=lambda: list(STUDY_PROMPTS))
    cross: bool = False
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    prior_accuracy: dict[str, str] = field(default_factory=dict)


def load_spec(path: Path) -> StudySpec:
    """Read and check a SPEC file; every problem is one `UserError` line."""
    import tomllib  # Python 3.11+; a .json spec works on 3.10 too

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such study spec (a .toml or .json file)")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a study spec is a table of settings")
    known = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not isinstance(data.get("name"), str) or not data["name"].replace("_", "").replace("-", "").isalnum():
        raise UserError(f"{path}: `name` must be letters, digits, '-' and '_' (it names the report files)")
    seeds = data.get("seeds", 3)
    seeds = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"{path}: `seeds` must be a count or a list of integers")
    prompts = data.get("prompts", "study")
    named = {"study": STUDY_PROMPTS, "quick": QUICK_PROMPTS, "all": tuple(o.prompt for o in all_objects())}
    if isinstance(prompts, str):
        if prompts not in named:
            raise UserError(f"{path}: `prompts` is a list or one of {', '.join(named)}, not {prompts!r}")
        prompts = list(named[prompts])
    bad = [p for p in prompts if not isinstance(p, str) or parse_prompt(p) is None]
    if bad:
        raise UserError(f"{path}: not world prompts (scored against the ground truth): {bad}")
    axes = data.get("axes", {})
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise UserError(f"{path}: `axes` maps each axis to a non-empty list of values")
    spec = StudySpec(name=data["name"], preset=data.get("preset", "default"), seeds=seeds, prompts=prompts,
                     cross=bool(data.get("cross", False)), base=dict(data.get("base", {})), axes=dict(axes),
                     prior_accuracy=dict(data.get("prior_accuracy", {})))  # fmt: skip
    points(spec)  # every setting applied once: a bad axis or value is refused before any cell runs
    return spec


# --- settings → configs ---------------------------------------------------------------------------
def _set_path(config: RunConfig, path: str, value: Any) -> RunConfig:
    """`config` with the dotted config.json path set to `value` (types checked by `from_dict`)."""
    data = to_dict(config)
    node, keys = data, path.split(".")
    for key in keys[:-1]:
        if not isinstance(node, dict) or key not in node or not isinstance(node[key], dict):
            raise UserError(f"unknown setting {path!r}: config.json has no {key!r} there")
        node = node[key]
    if keys[-1] not in node:
        raise UserError(f"unknown setting {path!r}: config.json has no {keys[-1]!r} there")
    node[keys[-1]] = value
    try:
        return from_dict(RunConfig, data)
    except ConfigError as err:
        raise UserError(f"setting {path} = {value!r}: {err}") from None


def apply_setting(config: RunConfig, axis: str, value: Any) -> RunConfig:
    if axis == "rule":
        from sds3d.rules import with_rule

        return dataclasses.replace(config, rule=with_rule(config.rule, str(value)))
    if axis == "shading":
        if value not in SHADINGS:
            raise UserError(f"unknown shading {value!r}; choose from {', '.join(SHADINGS)}")
        return dataclasses.replace(config, renderer=dataclasses.replace(config.renderer, **SHADINGS[value]))
    return _set_path(config, ALIASES.get(axis, axis), value)


def base_config(spec: StudySpec) -> RunConfig:
    config = preset(spec.preset)
    for path, value in spec.base.items():
        config = apply_setting(config, path, value)
    return config


Point = tuple[tuple[str, Any], ...]  # ((axis, value), …): the settings that differ from the base


def points(spec: StudySpec) -> list[tuple[Point, RunConfig]]:
    """The study's settings. One axis at a time: the base, then each axis's values. Cross: every
    combination. Two settings that give the same config share their cells (`Cell.key`)."""
    base = base_config(spec)
    if spec.cross:
        combos: list[Point] = [()]
        for axis, values in spec.axes.items():
            combos = [(*c, (axis, v)) for c in combos for v in values]
    else:
        combos = [()] + [((axis, v),) for axis, values in spec.axes.items() for v in values]
    out = []
    for combo in combos:
        config = base
        for axis, value in combo:
            config = apply_setting(config, axis, value)
        out.append((combo, config))
    return out


def config_key(config: RunConfig) -> str:
    data = {k: v for k, v in to_dict(config).items() if k not in NOT_IN_KEY}
    for name, implicit in KEY_SINCE_ADDED.items():  # dotted: a field of a section
        *sections, field_name = name.split(".")
        holder: Any = data
        for section in sections:
            holder = holder.get(section) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and field_name in holder and holder[field_name] == implicit:
            del holder[field_name]
    for section, representation in REPRESENTATION_SECTIONS.items():
        if config.representation != representation:
            data.pop(section, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    point: Point
    seed: int
    prompt: str
    config_json: str  # the whole RunConfig, so a worker process needs nothing else
    key: str  # the config's hash, seed and prompt: the cell's file name in DIR/cells/


def cells(spec: StudySpec, device: str) -> list[Cell]:
    """Seed by seed (every setting's first seed before any second), so a study stopped early has
    every setting measured on fewer seeds rather than some settings on none."""
    out = []
    for seed in spec.seeds:
        for point, config in points(spec):
            for prompt in spec.prompts:
                c = dataclasses.replace(config, prompt=prompt, seed=seed, device=device,
                                        validate_every=0, checkpoint_every=config.steps)  # fmt: skip
                key = f"{config_key(config)}-s{seed}-{prompt.replace(' ', '_')}"
                out.append(Cell(point, seed, prompt, json.dumps(to_dict(c)), key))
    return out


# --- running cells --------------------------------------------------------------------------------
class CellRunner:
    """Runs cells in one process, building each distinct prior once and keeping it for later cells."""

    def __init__(self, cells_dir: Path, work_dir: Path):
        self.cells_dir, self.work_dir = cells_dir, work_dir
        self.priors: dict[str, Any] = {}

    def prior(self, config: RunConfig):
        from sds3d.train import build_prior

        key = json.dumps(to_dict(config.guidance), sort_keys=True) + config.device
        if key not in self.priors:
            self.priors[key] = build_prior(config)
        return self.priors[key]

    def __call__(self, cell: Cell) -> dict:
        from sds3d.train import train

        config = from_dict(RunConfig, json.loads(cell.config_json))
        run_dir = self._fresh(cell)
        try:
            prior = self.prior(config)
            t0 = time.perf_counter()  # the prior's loading is not the cell's
            train(config, run_dir, progress=False, prior=prior)
        except UserError as err:  # a divergence: a failed cell
            return self._finish(cell, config, err, math.nan, time.perf_counter())
        return self._finish(cell, config, None, time.perf_counter() - t0, t0)

    def run_wave(self, wave: Sequence[Cell]) -> list[dict]:
        """Cells of one stack key (batch.stack_key) trained together (batch.train_scenes), then meshed
        and scored on threads. A bug fails the whole wave: each cell is reported, none kept."""
        from sds3d.batch import train_scenes

        if len(wave) == 1:
            return [self.guarded(wave[0])]
        try:
            configs = [from_dict(RunConfig, json.loads(c.config_json)) for c in wave]
            run_dirs = [self._fresh(c) for c in wave]
            prior = self.prior(configs[0])
            t0 = time.perf_counter()
            results = train_scenes(configs, run_dirs, prior, resume=False, progress=False)
            seconds = time.perf_counter() - t0
            with ThreadPoolExecutor(max_workers=EXPORT_THREADS) as pool:
                futures = [
                    pool.submit(self._finish, cell, config, result if isinstance(result, Exception) else None,
                                seconds, t0, len(wave))
                    for cell, config, result in zip(wave, configs, results, strict=True)
                ]  # fmt: skip
                return [f.result() for f in futures]
        except Exception as err:
            return [{"key": c.key, "error": f"{type(err).__name__}: {err}"} for c in wave]

    def _fresh(self, cell: Cell) -> Path:
        run_dir = self.work_dir / cell.key
        shutil.rmtree(run_dir, ignore_errors=True)
        return run_dir

    def _finish(
        self, cell: Cell, config: RunConfig, failed: Exception | None, train_seconds: float, t0: float,
        scenes: int = 1,
    ) -> dict:  # fmt: skip
        """Mesh and score a trained cell (or record why it failed), write its json, clear its folder."""
        from sds3d.bench.quality import score_run
        from sds3d.export import EmptySceneError, write_mesh
        from sds3d.runs import write_atomic
        from sds3d.train import load_scene

        obj = parse_prompt(cell.prompt)
        assert obj is not None
        run_dir = self.work_dir / cell.key
        row: dict[str, Any]
        try:
            if failed is not None:
                raise failed
            _, scene, _ = load_scene(run_dir, config.device)
            write_mesh(scene.to_mesh(config.export), run_dir)
            row = score_run(run_dir, obj, config.device)
        except (EmptySceneError, UserError) as err:  # an empty scene or a divergence: a failed cell
            row = {"shape": "none", "shape_ok": False, "color": "none", "color_ok": False, "iou": 0.0,
                   "psnr": 0.0, "faces": 0, "failed": str(err)}  # fmt: skip
        result = {"key": cell.key, "point": [list(p) for p in cell.point], "seed": cell.seed,
                  "prompt": cell.prompt, "true_shape": obj.shape, **row,
                  "seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(train_seconds, 1),
                  "device": config.device, "scenes": scenes}  # fmt: skip
        write_atomic(self.cells_dir / f"{cell.key}.json", json.dumps(result))
        shutil.rmtree(run_dir, ignore_errors=True)
        return result

    def guarded(self, cell: Cell) -> dict:
        """The cell's result, or {"key", "error"} for a bug it hit: reported, not kept (it runs again
        next time), and the study goes on. Ctrl-C is not caught."""
        try:
            return self(cell)
        except Exception as err:
            return {"key": cell.key, "error": f"{type(err).__name__}: {err}"}


def _worker(cells_dir: str, work_dir: str, threads: int, tasks, results, deadline: float | None) -> None:
    import torch

    torch.set_num_threads(threads)
    runner = CellRunner(Path(cells_dir), Path(work_dir))
    while (wave := tasks.get()) is not None:
        for row in _skipped(wave) if _past(deadline) else runner.run_wave(wave):
            results.put(row)


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


def _skipped(wave: Sequence[Cell]) -> list[dict]:
    """What a wave not started before the deadline reports: nothing kept, it runs next time."""
    return [{"key": c.key, "skipped": True} for c in wave]


def waves(todo: Sequence[Cell], scenes: int) -> list[list[Cell]]:
    """`todo` in groups of at most `scenes` cells that can train together (batch.stack_key), in the
    order of their last cell (so seed by seed, as `cells` orders them); with `scenes` > 1 the cells
    that must train alone (batch.stack_problem) come after the groups: per cell they cost the most,
    so a study stopped early (--time-limit) has the most cells."""
    from sds3d.batch import stack_key
    from sds3d.representations.nerf_stack import stack_problem

    out: list[list[Cell]] = []
    alone: list[list[Cell]] = []
    open_: dict[str, list[Cell]] = {}
    for cell in todo:
        config = from_dict(RunConfig, json.loads(cell.config_json))
        if scenes <= 1 or stack_problem(config) is not None:
            alone.append([cell])
            continue
        key = stack_key(config)
        group = open_.setdefault(key, [])
        group.append(cell)
        if len(group) >= scenes:
            out.append(open_.pop(key))
    return out + list(open_.values()) + alone


def run_cells(todo: Sequence[Cell], cells_dir: Path, work_dir: Path, workers: int,
              on_result: Callable[[dict], None], scenes: int = 1, deadline: float | None = None) -> None:  # fmt: skip
    """Run `todo`, in this process (workers = 1) or in `workers` processes (each with its priors),
    `scenes` cells trained together where their configs allow it. No wave starts after `deadline`
    (a time.time()); those report {"key", "skipped"}."""
    if workers <= 1:
        runner = CellRunner(cells_dir, work_dir)
        for wave in waves(todo, scenes):
            for row in _skipped(wave) if _past(deadline) else runner.run_wave(wave):
                on_result(row)
        return
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [ctx.Process(target=_worker, args=(str(cells_dir), str(work_dir), threads, tasks, results, deadline),
                         daemon=True)
             for _ in range(workers)]  # fmt: skip
    for wave in waves(todo, scenes):
        tasks.put(wave)
    for _ in procs:
        tasks.put(None)
    for p in procs:
        p.start()
    try:
        received = 0
        while received < len(todo):
            try:
                row = results.get(timeout=10)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):  # killed (out of memory, say): say so, not hang
                    raise UserError(f"every study worker stopped with {len(todo) - received} cells left; "
                                    "finished cells are kept: run the same command again") from None  # fmt: skip
                continue
            received += 1
            on_result(row)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
        for q in (tasks, results):
            q.cancel_join_thread()  # cells never taken must not block the exit (Ctrl-C, timeout)
            q.close()


def read_cells(cells_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(cells_dir.glob("*.json")) if cells_dir.is_dir() else []:
        try:
            row = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue  # a torn file (it cannot be: writes are atomic) counts as not done
        out[row.get("key", path.stem)] = row
    return out


def import_reports(reports: Sequence[Path], cells_dir: Path) -> int:
    """Write the finished cells that `reports` (study_NAME.json) record into `cells_dir`, leaving
    the cells already there alone; a missing report is skipped. Returns how many were written."""
    from sds3d.runs import write_atomic

    taken = 0
    for path in reports:
        if not path.is_file():
            continue
        try:
            rows = json.loads(path.read_text())["cells"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not a study report ({type(err).__name__}: {err})") from None
        for row in rows:
            key = row.get("key") if isinstance(row, dict) else None
            if not isinstance(key, str) or "error" in row or not re.fullmatch(r"[\w.-]+", key):
                continue
            target = cells_dir / f"{key}.json"
            if not target.exists():
                write_atomic(target, json.dumps(row))
                taken += 1
    return taken


# --- the report -----------------------------------------------------------------------------------
def _label(point: Point) -> str:
    return ", ".join(f"{a}={v}" for a, v in point) or "base"


def summarise_point(rows: list[dict], seeds: Sequence[int], prompts: int | None = None) -> dict:
    """Each seed's mean over its prompts, then the mean and standard deviation over seeds. With
    `prompts`, only seeds that have all their prompts count (while any seed is complete): a seed cut
    short by a stopped study would weigh its few prompts as much as a whole seed."""
    out: dict[str, Any] = {"cells": len(rows)}
    by_seed = [[r for r in rows if r["seed"] == s] for s in seeds]
    by_seed = [b for b in by_seed if b]
    complete = [b for b in by_seed if prompts is not None and len(b) >= prompts]
    by_seed = complete or by_seed
    out["seeds"] = len(by_seed)
    out["complete_seeds"] = len(complete)
    for metric, pick in (("shape_accuracy", "shape_ok"), ("color_accuracy", "color_ok"), ("iou", "iou"),
                         ("psnr", "psnr")):  # fmt: skip
        per_seed = [float(np.mean([float(r[pick]) for r in b])) for b in by_seed]
        out[metric] = round(float(np.mean(per_seed)), 4) if per_seed else None
        out[metric + "_sd"] = round(float(np.std(per_seed, ddof=1)), 4) if len(per_seed) > 1 else None
    out["shape_failures"] = {
        s: f"{sum(not r['shape_ok'] for r in rows if r['true_shape'] == s)}/{sum(r['true_shape'] == s for r in rows)}"
        for s in SHAPES if any(r["true_shape"] == s for r in rows)
    }  # fmt: skip
    out["seconds_per_cell"] = round(float(np.mean([r["seconds"] for r in rows])), 1) if rows else None
    out["devices"] = sorted({r.get("device", "?") for r in rows})
    return out


def _pm(s: dict, metric: str, fmt: str) -> str:
    if s.get(metric) is None:
        return "–"
    sd = s.get(metric + "_sd")
    return format(s[metric], fmt) + ("" if sd is None else " ± " + format(sd, fmt))


def prior_accuracy_of(path: str) -> float | None:
    """Shape accuracy (all samples, seen and held out) of a prior_accuracy report."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    n = sum(r["samples"] for r in rows)
    return sum(r["shape_accuracy"] * r["samples"] for r in rows) / n if n else None


def conclusions(axis: str, table: list[tuple[Any, dict]]) -> list[str]:
    """What the numbers show, and no more: best and worst mean IoU, whether their difference is
    larger than the spread over seeds, and which settings reach 95% shape accuracy. Only settings
    measured on as many whole seeds as the best-measured one (2 are enough) are compared: a few
    cells of an unfinished setting are not a mean."""
    measured = [(v, s) for v, s in table if s.get("iou") is not None]
    need = max(1, min(2, max((s.get("complete_seeds", 1) for _, s in measured), default=1)))
    done = [(v, s) for v, s in measured if s.get("complete_seeds", 1) >= need]
    left = [str(v) for v, s in measured if (v, s) not in done]
    if len(done) < 2:
        return [f"Too few settings measured on whole seeds to compare ({len(done)} of {len(table)})."]
    best = max(done, key=lambda vs: vs[1]["iou"])
    worst = min(done, key=lambda vs: vs[1]["iou"])
    spreads = [s["iou_sd"] for _, s in done if s.get("iou_sd") is not None]
    spread = max(spreads, default=0.0)
    gap = best[1]["iou"] - worst[1]["iou"]
    if not spreads:
        verdict = "not compared with a spread: one seed per setting measures none."
    elif gap > 2 * spread:
        verdict = f"more than twice the largest spread over seeds ({spread:.3f})."
    else:
        verdict = f"within twice the largest spread over seeds ({spread:.3f}): not a clear difference."
    lines = [
        f"- Highest mean IoU: {axis} = {best[0]} ({_pm(best[1], 'iou', '.3f')}); lowest: {worst[0]} "
        f"({_pm(worst[1], 'iou', '.3f')}). The gap, {gap:.3f}, is {verdict}"
    ]
    reach = [str(v) for v, s in done if (s.get("shape_accuracy") or 0) >= 0.95]
    lines.append(f"- Shape accuracy ≥ 95%: {', '.join(reach) if reach else 'none'}; "
                 f"highest {max(s['shape_accuracy'] for _, s in done):.0%} ({max(done, key=lambda vs: vs[1]['shape_accuracy'])[0]}).")  # fmt: skip
    if left:
        lines.append(f"- Not compared (fewer whole seeds than the others so far): {', '.join(left)}.")
    return lines


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "the study's plots need matplotlib: pip install 'sds3d[study]', or pass --no-plots"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_axis(path: Path, axis: str, table: list[tuple[Any, dict]], x_values: list[float] | None) -> None:
    """IoU, shape accuracy and PSNR against the axis: at numeric positions (a number axis, or the
    priors' measured accuracy) when there are some, else one column per setting."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    labels = [str(v) for v, _ in table]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v, _ in table)
    if x_values is None and numbers and axis != "prior":
        x_values = [float(v) for v, _ in table]
    xs = x_values if x_values is not None else list(range(len(table)))
    log_x = numbers and x_values is not None and axis != "prior" and min(xs) > 0 and max(xs) / min(xs) > 10
    for ax, metric, name in zip(
        axes, ("iou", "shape_accuracy", "psnr"), ("3D IoU", "shape accuracy", "PSNR (dB)"), strict=True
    ):
        ys = [s.get(metric) if s.get(metric) is not None else math.nan for _, s in table]
        err = [s.get(metric + "_sd") or 0.0 for _, s in table]
        ax.errorbar(xs, ys, yerr=err, fmt="o-" if x_values is not None else "o", capsize=4)
        if log_x:
            ax.set_xscale("log")
            ax.set_xticks(xs, labels)
            ax.minorticks_off()
        elif x_values is None:
            ax.set_xticks(xs, labels, rotation=20)
        elif axis == "prior":
            for x, y, label in zip(xs, ys, labels, strict=True):
                ax.annotate(
                    label.rsplit("/", 1)[-1], (x, y), textcoords="offset points", xytext=(3, 5), fontsize=7
                )
        if metric == "shape_accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(f"{name}, mean ± sd over seeds")
        ax.set_xlabel("prior shape accuracy" if axis == "prior" and x_values is not None else axis)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_cross(path: Path, axes: list[str], grid: np.ndarray, values: list[list[Any]], metric: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(1.3 * len(values[1]) + 2.5, 0.7 * len(values[0]) + 1.8))
    im = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(values[1])), [str(v) for v in values[1]])
    ax.set_yticks(range(len(values[0])), [str(v) for v in values[0]])
    ax.set_xlabel(axes[1])
    ax.set_ylabel(axes[0])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(spec: StudySpec, spec_path: Path, found: dict[str, dict], out: Path, command: str,
           plots: bool = True) -> dict:  # fmt: skip
    from sds3d.bench.report import describe_machine, write_report

    out.mkdir(parents=True, exist_ok=True)
    all_cells = cells(spec, "cpu")
    by_point: dict[Point, list[dict]] = {}
    for cell in all_cells:
        by_point.setdefault(cell.point, [])
        if cell.key in found and "error" not in found[cell.key]:
            by_point[cell.point].append(found[cell.key])
    summary = {
        _label(p): summarise_point(rows, spec.seeds, len(spec.prompts)) for p, rows in by_point.items()
    }
    finished = {c.key for c in all_cells if c.key in found and "error" not in found[c.key]}
    done = len(finished)
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
              "spec": dataclasses.asdict(spec), "spec_file": str(spec_path), "cells_done": done,
              "cells_total": len({c.key for c in all_cells}), "points": summary,
              "cells": [found[c.key] for c in all_cells if c.key in found]}  # fmt: skip
    counts: dict[str, int] = {}
    for key in finished:
        device = found[key].get("device", "?")
        counts[device] = counts.get(device, 0) + 1
    devices = [f"{d} ({n} cells)" for d, n in sorted(counts.items())]
    base = base_config(spec)
    lines = [
        f"# Study `{spec.name}`: 3D quality against the ground truth",
        "",
        f"Command: `{command}` ({result['date']}); spec `{spec_path}`; cells ran on: {', '.join(devices) or 'none yet'}.  ",
        f"Base: preset `{spec.preset}`{''.join(f', {k} = {v}' for k, v in spec.base.items())} "
        f"({base.steps} steps, rule {base.rule.kind}, w(t) {base.rule.weighting}, t schedule {base.rule.t_schedule}, "
        f"s = {base.rule.guidance_scale:g}). {len(spec.seeds)} seeds × {len(spec.prompts)} prompts a setting "
        f"({sum(p in HELD_OUT for p in spec.prompts)} held out of the prior's training); "
        f"{'every combination of the axes' if spec.cross else 'one axis at a time around the base'}. "
        f"Cells done: {done} of {len({c.key for c in all_cells})}.",
        "",
        "Each value: the mean over seeds of each seed's mean over the prompts ± the standard deviation over "
        "seeds (only whole seeds, all prompts done, count while any seed of the setting is whole). Shape: the primitive with the highest 3D IoU at its best rotation about z is the prompt's; "
        "IoU: with the prompt's primitive (64³ voxels); PSNR: albedo renders against the ground truth, 8 views. "
        "Shape misses: per true shape, misses / cells.",
        "",
    ]  # fmt: skip
    questions = list(spec.axes) if not spec.cross else ["×".join(spec.axes)]
    point_configs = points(spec)
    base_key = config_key(base)
    for axis in questions:
        if spec.cross:
            table = [(_label(p), summary[_label(p)]) for p in by_point]
        else:
            table = [(v, summary[_label(p)]) for p in by_point for a, v in p if a == axis]
            own = {config_key(c) for p, c in point_configs if p and p[0][0] == axis}
            if base_key not in own:  # the preset's own value is not on this axis: show it beside
                table.insert(0, ("base", summary["base"]))
        lines += [f"## {axis}", "",
                  "| setting | cells | whole seeds | shape | colour | IoU | PSNR (dB) | shape misses | s / cell |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
        for value, s in table:
            misses = ", ".join(f"{k} {v}" for k, v in s["shape_failures"].items() if not v.startswith("0/"))
            lines.append(f"| {value} | {s['cells']} | {s['complete_seeds']} | {_pm(s, 'shape_accuracy', '.0%')} | {_pm(s, 'color_accuracy', '.0%')} "
                         f"| {_pm(s, 'iou', '.3f')} | {_pm(s, 'psnr', '.2f')} | {misses or 'none'} | {s['seconds_per_cell']} |")  # fmt: skip
        lines += ["", "What the numbers show:", "", *conclusions(axis, table), ""]
        if plots and any(s.get("iou") is not None for _, s in table):
            png = out / f"study_{spec.name}_{axis.replace('×', '_x_')}.png"
            if spec.cross and len(spec.axes) == 2:
                (a0, v0), (a1, v1) = spec.axes.items()
                grid = np.full((len(v0), len(v1)), math.nan)
                for p, rows in by_point.items():
                    settings = dict(p)
                    if rows and a0 in settings and a1 in settings:
                        grid[v0.index(settings[a0]), v1.index(settings[a1])] = summary[_label(p)]["iou"]
                _plot_cross(png, [a0, a1], grid, [v0, v1], "3D IoU (mean over seeds)")
            else:
                xs = None
                if axis == "prior" and spec.prior_accuracy:
                    models = [
                        str(getattr(base.guidance, "model", "")) if v == "base" else str(v) for v, _ in table
                    ]
                    acc = [prior_accuracy_of(spec.prior_accuracy.get(m, "")) for m in models]
                    xs = [a for a in acc if a is not None] if all(a is not None for a in acc) else None
                    if xs is not None:
                        lines.insert(len(lines) - 1, "- Prior shape accuracy (its samples judged by the classifier): "
                                     + ", ".join(f"{v}: {a:.0%}" for (v, _), a in zip(table, xs, strict=True)))  # fmt: skip
                _plot_axis(png, axis, table, xs)
            lines += [f"![{axis}]({png.name})", ""]
    write_report(out, f"study_{spec.name}", result, lines)
    return result


# --- the command ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sds3d study", description=__doc__.splitlines()[0])
    parser.add_argument(
        "spec",
        type=Path,
        nargs="+",
        help="study specs (.toml or .json; see `studies/`): their cells run in one pool",
    )
    parser.add_argument("--device", default="cpu", help="where cells train (cpu, cuda)")
    parser.add_argument("--workers", type=int, default=1, help="cells at a time, each worker its own process")
    parser.add_argument("--scenes", type=int, default=1,
                        help="cells trained together in one worker (sds3d batch's stacked scenes; K)")  # fmt: skip
    parser.add_argument(
        "--dir", type=Path, help="where cells are kept, shared by studies (default runs/study-cells)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="where the report goes")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the cells found")
    parser.add_argument("--limit", type=int, help="run at most N of the missing cells, then report")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="start no cell after SECONDS (those running finish), then report")  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib)")
    parser.add_argument("--from-reports", action="store_true",
                        help="first take the cells recorded in the specs' reports in --out (a fresh clone "
                             "goes on where the committed reports left off)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help=f"a first look on a CPU: seed 0 and {len(QUICK_PROMPTS)} prompts (one per shape); report study_NAME_quick")  # fmt: skip
    args = parser.parse_args(argv)
    specs = [load_spec(path) for path in args.spec]
    if args.quick:
        specs = [
            dataclasses.replace(s, name=f"{s.name}_quick", seeds=[0], prompts=list(QUICK_PROMPTS))
            for s in specs
        ]
    if args.workers < 1 or args.scenes < 1:
        raise UserError(f"--workers and --scenes must be 1 or more, not {min(args.workers, args.scenes)}")
    from sds3d import runs

    study_dir = args.dir or Path("runs") / "study-cells"
    command = "sds3d study " + " ".join(argv if argv is not None else sys.argv[1:])

    def write_reports(cells_dir: Path) -> None:
        found = read_cells(cells_dir)
        for spec, path in zip(specs, args.spec, strict=True):
            report(spec, path, found, args.out, command.strip(), plots=not args.no_plots)

    if args.report:  # read-only: a report can be written while a study runs (cell files are atomic)
        if study_dir.exists() and not study_dir.is_dir():
            raise UserError(f"--dir {study_dir} is a file, not a study folder")
        write_reports(study_dir / "cells")
        return 0
    with runs.locked(study_dir, create=True):
        cells_dir, work_dir = study_dir / "cells", study_dir / "work"
        cells_dir.mkdir(exist_ok=True)
        shutil.rmtree(work_dir, ignore_errors=True)  # what a killed cell left: it runs again
        if args.from_reports:
            taken = import_reports([args.out / f"study_{s.name}.json" for s in specs], cells_dir)
            print(f"took {taken} cells from the reports in {args.out}", flush=True)
        found = read_cells(cells_dir)
        unique = list({c.key: c for spec in specs for c in cells(spec, args.device)}.values())  # shared: once
        missing = [c for c in unique if c.key not in found or "error" in found[c.key]]
        todo = missing[: args.limit] if args.limit is not None else missing
        total = len(unique)
        if not args.report and todo:
            from tqdm.auto import tqdm

            print(f"study {', '.join(s.name for s in specs)}: {total - len(missing)} of {total} cells done, running {len(todo)} "
                  f"({args.workers} worker{'s' if args.workers > 1 else ''}, {args.device})", flush=True)  # fmt: skip
            bar = tqdm(total=len(todo), unit="cell", dynamic_ncols=True)

            def on_result(row: dict) -> None:
                if row.get("skipped"):  # not started before --time-limit
                    bar.total -= 1
                    bar.refresh()
                    return
                found[row["key"]] = row
                bar.update(1)
                if "error" in row:
                    bar.write(f"cell {row['key']} failed: {row['error']}")

            try:
                deadline = None if args.time_limit is None else time.time() + args.time_limit
                run_cells(todo, cells_dir, work_dir, args.workers, on_result, args.scenes, deadline)
            except KeyboardInterrupt:
                bar.close()
                print(f"\ninterrupted: {len(read_cells(cells_dir))} cells kept in {cells_dir}; run the same "
                      "command again to continue", file=sys.stderr)  # fmt: skip
                return 130
            finally:
                bar.close()
                shutil.rmtree(work_dir, ignore_errors=True)
        write_reports(cells_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
