"""Many prompts in one process: the prior loaded once, K scenes trained at a time.

`train_scenes` is train.py's loop for K independent scenes of one configuration: each has its own
generator (so its own cameras, shading, lights, stratified samples, timesteps and noise: exactly
the random numbers it would draw trained alone), its own prompt and its own run folder; their
parameters are stacked (representations/nerf_stack.py) so that one pass renders all K, and a rule
that can serve a batch (`Rule.batchable`) makes one prior call for all of them: one U-Net call per
step instead of K. Rule losses are batch means, so a rule called on K scenes is scaled by K: every
scene gets the gradient it gets alone. Each scene's checkpoints, validation renders, mesh and
summary.json are written to its own run folder exactly as `sds3d generate` writes them, so any of
them can be resumed, exported or rendered alone.

`run_batch` is `sds3d batch`: prompts × seeds, K at a time, an index (`index.json`) and a contact
sheet of every result; a failed prompt is reported and the rest go on; a killed batch resumes (done
prompts are skipped, started ones continue from their checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from sds3d import runs
from sds3d.cameras import Cameras, sample_cameras
from sds3d.config import RunConfig, save_config, to_dict
from sds3d.devices import SceneGenerators, to_device
from sds3d.errors import UserError
from sds3d.guidance.base import Prior
from sds3d.prompts import PromptProcessor
from sds3d.render.volume import Shading, choose_shading, sample_lights
from sds3d.representations.nerf_scene import NeRFScene
from sds3d.representations.nerf_stack import NeRFStack, stack_problem
from sds3d.rules.base import Rule
from sds3d.train import (
    StopRequest,
    TrainOutput,
    build_optimizer,
    build_rule,
    build_scene,
    save_validation,
)  # fmt: skip

INDEX = "index.json"
# Meshes are made on threads beside training: marching cubes and the mesh turntable run on the CPU.
EXPORT_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
CONTACT_SHEET = "contact_sheet.png"


def concat_cameras(cameras: Sequence[Cameras]) -> Cameras:
    """Batches of cameras (of one image size) as one, in order."""
    cat = lambda name: torch.cat([getattr(c, name) for c in cameras])
    first = cameras[0]
    return Cameras(cat("c2w"), cat("fovy_deg"), cat("elevation_deg"), cat("azimuth_deg"), cat("radius"),
                   first.width, first.height)  # fmt: skip


def stack_key(config: RunConfig) -> str:
    """Scenes whose configs agree on this can be stacked: everything but prompt, seed, rule and the
    bookkeeping of where and how often results are written."""
    data = to_dict(config)
    for name in ("prompt", "seed", "rule", "export", "validate_every", "checkpoint_every", "preset"):
        data.pop(name, None)
    return json.dumps(data, sort_keys=True)


@dataclass
class _Scene:
    config: RunConfig
    run_dir: Path
    rule: Rule
    prompts: PromptProcessor
    generator: torch.Generator
    start: int = 0
    failed: str | None = None


def _lone_optimizer_state(stack: NeRFStack, k: int, optimizer: torch.optim.Optimizer, config: RunConfig):
    """Scene k's Adam state in the format of its own run's optimiser (train.build_optimizer)."""
    scene = stack.scene(k)
    lone = build_optimizer(replace(config, device="cpu"), scene)
    names = dict(scene.named_parameters())
    for name, p in names.items():
        state = optimizer.state.get(stack.stacked_parameter(name))
        if state:
            lone.state[p] = {
                key: value.clone() if key == "step" else stack.per_scene(name, value)[k].clone()
                for key, value in state.items()
            }
    return scene, lone.state_dict()


def _load_lone_optimizer_state(
    stack: NeRFStack, k: int, optimizer: torch.optim.Optimizer, config: RunConfig, state: dict[str, Any]
) -> None:
    scene = stack.scene(k)
    lone = build_optimizer(replace(config, device="cpu"), scene)
    runs.load_state(lone, state, "the checkpoint's optimiser state")
    for name, p in scene.named_parameters():
        if p not in lone.state:
            continue
        stacked = stack.stacked_parameter(name)
        target = optimizer.state[stacked]
        for key, value in lone.state[p].items():
            if key == "step":
                target[key] = value.to(stacked.device) if config.device.startswith("cuda") else value.clone()
            else:
                if key not in target:
                    target[key] = torch.zeros_like(stacked)
                stack.per_scene(name, target[key])[k].copy_(value)


def _save(scene_k: _Scene, stack: NeRFStack, k: int, optimizer: torch.optim.Optimizer, step: int) -> None:
    plain, opt_state = _lone_optimizer_state(stack, k, optimizer, scene_k.config)
    state = {
        "scene": plain.state_dict(),
        "optimizer": opt_state,
        "step": step,
        "rng": scene_k.generator.get_state(),
    }
    runs.save_checkpoint(scene_k.run_dir, state)


def train_scenes(
    configs: Sequence[RunConfig],
    run_dirs: Sequence[Path],
    prior: Prior,
    resume: bool = True,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[TrainOutput | Exception]:
    """Train K scenes of one configuration (`stack_key`) together; each run folder as `train` would
    leave it. `resume`: folders with a checkpoint continue from it (all at one step). The run folders
    are locked for the whole call; `on_step(done)` is called after each step (tests, benchmarks).
    → per scene, its TrainOutput or the error that stopped it."""
    if len({stack_key(c) for c in configs}) != 1:
        raise ValueError("train_scenes needs configs that differ only in prompt, seed and rule")
    if (why := stack_problem(configs[0])) is not None:
        raise UserError(f"scenes with {why} cannot be trained together; train them one at a time")
    with contextlib.ExitStack() as held:
        for run_dir in run_dirs:
            held.enter_context(runs.locked(Path(run_dir), create=True))
        return _train_scenes(list(configs), [Path(d) for d in run_dirs], prior, resume, progress, on_step)


def _train_scenes(
    configs: list[RunConfig], run_dirs: list[Path], prior: Prior, resume: bool, progress: bool,
    on_step: Callable[[int], None] | None,
) -> list[TrainOutput | Exception]:  # fmt: skip
    config = configs[0]
    device = config.device
    scenes: list[_Scene] = []
    plain = []
    for cfg, run_dir in zip(configs, run_dirs, strict=True):
        rule = build_rule(cfg)
        prompts = PromptProcessor(cfg.prompt, cfg.prompts, prior.encode_prompt)
        rule.prepare(prior, prompts)
        prompts.precompute()
        scenes.append(_Scene(cfg, run_dir, rule, prompts, torch.Generator().manual_seed(cfg.seed)))
        plain.append(cast(NeRFScene, build_scene(cfg)))  # stack_problem refused other representations
    stack = NeRFStack(plain).to(device)
    optimizer = torch.optim.Adam(
        stack.param_groups(config.optim), betas=config.optim.betas, eps=config.optim.eps,
        fused=device.startswith("cuda"),
    )  # fmt: skip
    checkpoints = [resume and runs.has_checkpoint(s.run_dir) for s in scenes]
    if any(checkpoints) and not all(checkpoints):
        raise ValueError("train_scenes resumes all of its scenes or none")
    if all(checkpoints):
        states = [runs.load_checkpoint(s.run_dir, map_location=device).state for s in scenes]
        if len({int(st["step"]) for st in states}) != 1:
            raise ValueError("train_scenes resumes scenes that stopped at one step")
        with torch.no_grad():
            for k, (s, st) in enumerate(zip(scenes, states, strict=True)):
                lone = cast(NeRFScene, build_scene(s.config))
                runs.load_state(lone, st["scene"], f"the checkpoint in {s.run_dir}")
                stack.load_scene(k, lone)
                _load_lone_optimizer_state(stack, k, optimizer, s.config, st["optimizer"])
                s.generator.set_state(st["rng"])
                s.start = int(st["step"])
    else:
        for s in scenes:
            if runs.user_entries(s.run_dir):
                runs.check_new_run(s.run_dir, overwrite=False)
    for s in scenes:
        runs.mark_run(s.run_dir)
        save_config(s.config, s.run_dir / "config.json")

    start, steps = scenes[0].start, config.steps
    k_all = len(scenes)
    per = config.camera.batch_size
    generators = SceneGenerators([s.generator for s in scenes])
    # Scenes with one rule config share one rule call when the rule can serve a batch.
    groups: dict[str, list[int]] = {}
    for k, s in enumerate(scenes):
        key = json.dumps(to_dict(s.config.rule), sort_keys=True) if s.rule.batchable else f"alone-{k}"
        groups.setdefault(key, []).append(k)
    cpu, on_cuda = device == "cpu", device.startswith("cuda")
    t0 = time.perf_counter()
    step = start
    bar = tqdm(total=steps, initial=start, desc=f"{k_all} scenes", disable=not progress, unit="it")
    with StopRequest() as stop:
        for step in range(start, steps):
            if stop.requested:
                break
            step_ratio = step / steps
            if on_cuda:
                torch.compiler.cudagraph_mark_step_begin()
            # 1. Each scene's cameras, shading and light from its own generator (train.py's order).
            cams, shadings, lights, conds, unconds = [], [], [], [], []
            for s in scenes:
                c = sample_cameras(s.config.camera, s.generator)
                shading: Shading = choose_shading(s.config.renderer, s.generator)
                light = (
                    sample_lights(c, s.config.renderer, s.generator)
                    if shading != "albedo"
                    else torch.zeros(per, 3)
                )
                cond, uncond = s.prompts(c)
                cams.append(c)
                shadings.append(shading)
                lights.append(light)
                conds.append(cond)
                unconds.append(uncond)
            cameras = concat_cameras(cams).to(device)
            light_positions = to_device(torch.cat(lights), device)
            # 2. Render all scenes (those with one shading in one pass) and their regularisers.
            outs, terms = stack.render_scenes(cameras, shadings, light_positions, step_ratio, generators)
            # 3. The rules' losses: one prior call for each group of scenes that share a batchable rule.
            for ids in groups.values():
                rule = scenes[ids[0]].rule
                sub = SceneGenerators([generators.generators[i] for i in ids])
                g = rule(
                    prior, torch.cat([outs[i].rgb for i in ids]), [t for i in ids for t in conds[i]],
                    [t for i in ids for t in unconds[i]], step_ratio,
                    cameras=cameras if len(ids) == k_all else _select(cameras, ids, per),
                    generator=cast(torch.Generator, sub if len(ids) > 1 else sub.generators[0]),
                )  # fmt: skip
                for name, value in g.losses.items():  # batch means → the sum of the scenes' own losses
                    terms[name] = terms.get(name, 0) + len(ids) * value
            # 4. One optimiser step for all scenes.
            loss = cast(torch.Tensor, sum(terms.values()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            bar.update(1)
            checkpoint = done % config.checkpoint_every == 0 or done == steps
            if checkpoint or (cpu and done % 10 == 0):
                _mark_diverged(scenes, stack, done)
            if checkpoint:
                for k, s in enumerate(scenes):
                    if s.failed is None:
                        _save(s, stack, k, optimizer, done)
            if config.validate_every > 0 and (done % config.validate_every == 0 or done == steps):
                for k, s in enumerate(scenes):
                    if s.failed is None:
                        save_validation(
                            s.config, stack.scene(k), s.run_dir / "validation" / f"step_{done:06d}.png"
                        )
            step = done
            if on_step is not None:
                on_step(done)
        else:
            step = steps
    bar.close()
    interrupted = step < steps
    if interrupted:
        _mark_diverged(scenes, stack, step)
        for k, s in enumerate(scenes):
            if s.failed is None:
                _save(s, stack, k, optimizer, step)
    wall = time.perf_counter() - t0
    results: list[TrainOutput | Exception] = []
    for s in scenes:
        if s.failed is not None:
            results.append(UserError(s.failed))
        else:
            results.append(TrainOutput(
                run_dir=s.run_dir, steps_done=step, wall_s=wall, it_per_s=(step - s.start) / max(wall, 1e-9),
                interrupted=interrupted,
            ))  # fmt: skip
    return results


def _select(cameras: Cameras, ids: list[int], per: int) -> Cameras:
    """The cameras of scenes `ids` (each has `per`)."""
    from sds3d.representations.nerf_stack import select_cameras

    rows = torch.tensor([i * per + j for i in ids for j in range(per)], device=cameras.c2w.device)
    return select_cameras(cameras, rows)


def _mark_diverged(scenes: list[_Scene], stack: NeRFStack, done: int) -> None:
    """Scenes whose parameters stopped being finite fail (their last good checkpoint is kept); the
    others go on (their slices of the stack never mix with a failed scene's)."""
    finite = stack.finite_scenes().tolist()
    for s, ok in zip(scenes, finite, strict=True):
        if not ok and s.failed is None:
            kept = runs.checkpoint_step(s.run_dir)
            s.failed = f"training diverged to NaN/Inf by step {done}" + (
                f"; the last good checkpoint (step {kept}) is kept" if kept is not None else ""
            )


# --- sds3d batch: prompts × seeds, K at a time ---------------------------------------------------
@dataclass
class BatchItem:
    prompt: str
    seed: int
    run_dir: Path
    status: str = "pending"  # pending | done | failed
    error: str | None = None
    train_wall_s: float | None = None
    export_wall_s: float | None = None
    files: dict[str, str] = field(default_factory=dict)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped. One line on a bad file."""
    from sds3d.prompts import validate_prompt

    if not path.is_file():
        raise UserError(f"{path} is not a file of prompts" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    prompts = [
        validate_prompt(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line; # starts a comment)")
    return prompts


def plan_items(prompts: Sequence[str], seeds: Sequence[int], out_dir: Path) -> list[BatchItem]:
    """One item per (prompt, seed), each in `out_dir/<slug>-s<seed>` (a repeated slug gets -2, -3, …)."""
    from sds3d.api import slugify

    items, used = [], set()
    for prompt in dict.fromkeys(prompts):  # a prompt listed twice runs once
        for seed in seeds:
            name, n = f"{slugify(prompt)}-s{seed}", 2
            while name in used:
                name, n = f"{slugify(prompt)}-s{seed}-{n}", n + 1
            used.add(name)
            items.append(BatchItem(prompt, seed, out_dir / name))
    return items


def _write_index(out_dir: Path, items: Sequence[BatchItem], meta: dict[str, Any]) -> None:
    rows = [{"prompt": i.prompt, "seed": i.seed, "run_dir": i.run_dir.name, "status": i.status, "error": i.error,
             "train_wall_s": i.train_wall_s, "export_wall_s": i.export_wall_s, "files": i.files}
            for i in items]  # fmt: skip
    runs.write_atomic(out_dir / INDEX, json.dumps(meta | {"results": rows}, indent=2))


def _finished(item: BatchItem) -> bool:
    summary = item.run_dir / "summary.json"
    if not summary.is_file():
        return False
    try:
        data = json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    item.files = {k: str(item.run_dir.name + "/" + v) for k, v in data.get("files", {}).items()}
    item.train_wall_s, item.export_wall_s = data.get("train_wall_s"), data.get("export_wall_s")
    return True


def run_batch(
    base: RunConfig,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    scenes: int = 16,
    progress: bool = True,
    prior: Prior | None = None,
    log=print,
    limit: int | None = None,
) -> list[BatchItem]:
    """`sds3d batch`: every (prompt, seed) trained and exported into `out_dir`, `scenes` at a time, with
    one prior (only the first `limit` (prompt, seed) pairs with `limit`). Writes `out_dir/index.json`
    after every batch and a contact sheet at the end."""
    from sds3d.train import build_prior

    items, todo, write_index = plan_batch(base, prompts, seeds, out_dir, scenes, limit)
    if todo:
        log(f"sds3d: {len(todo)} of {len(items)} results to make ({len(items) - len(todo)} done), "
            f"{scenes} scenes at a time -> {out_dir}")  # fmt: skip
        prior = build_prior(base) if prior is None else prior
        make_results(base, todo, prior, scenes, progress, log, on_wave=write_index)
        write_index()
    write_contact_sheet(Path(out_dir), items)
    return items


def plan_batch(
    base: RunConfig,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    scenes: int,
    limit: int | None,
) -> tuple[list[BatchItem], list[BatchItem], Callable[[], None]]:
    """The batch's items (those already finished marked done), the ones to make, and a function that
    writes `out_dir/index.json` as they stand (written once here)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    items = plan_items(prompts, seeds, out_dir)[:limit]
    meta = {"preset": base.preset, "device": base.device, "scenes_per_batch": scenes, "seeds": list(seeds),
            "command": "sds3d " + " ".join(sys.argv[1:])}  # fmt: skip
    todo = []
    for item in items:
        if _finished(item):
            item.status = "done"
        else:
            todo.append(item)

    def write_index() -> None:
        _write_index(out_dir, items, meta)

    write_index()
    return items, todo, write_index


def make_results(
    base: RunConfig, todo: Sequence[BatchItem], prior: Prior, scenes: int, progress: bool = False, log=print,
    on_wave: Callable[[], None] = lambda: None,
) -> None:  # fmt: skip
    """Train and export `todo` (resuming what has a checkpoint), `scenes` at a time where the config
    stacks (else one by one), setting each item's status; `on_wave()` whenever statuses have changed
    (after the prompts are checked and after each wave is trained): the index is written there."""
    for item in todo:  # a prompt the prior cannot read fails here, alone
        try:
            prior.encode_prompt(item.prompt)
        except UserError as err:
            item.status, item.error = "failed", str(err)
            log(f"sds3d: {item.prompt!r} (seed {item.seed}) failed: {err}")
    todo = [i for i in todo if i.status == "pending"]
    on_wave()
    stackable = stack_problem(base) is None
    if not stackable:
        log(f"sds3d: note: {stack_problem(base)} cannot be stacked; scenes train one at a time")
    waves = _waves(todo, base, scenes if stackable else 1)
    # Meshes and turntables of one batch are made on a thread while the next one trains.
    with ThreadPoolExecutor(max_workers=EXPORT_THREADS) as exporter:
        pending: list[Future] = []
        for n, wave in enumerate(waves, 1):
            log(f"sds3d: batch {n}/{len(waves)}: {len(wave)} scene(s)")
            for item, config, result in _train_wave(base, wave, prior, progress, stackable):
                pending.append(exporter.submit(_export_item, item, config, result))
            on_wave()
        for future in pending:
            future.result()


def _waves(todo: Sequence[BatchItem], base: RunConfig, size: int) -> list[list[BatchItem]]:
    """Groups of at most `size` items that start at one step (fresh, or resumed from one checkpoint step)."""
    by_start: dict[int, list[BatchItem]] = {}
    for item in todo:
        step = runs.checkpoint_step(item.run_dir) if runs.has_checkpoint(item.run_dir) else 0
        by_start.setdefault(step or 0, []).append(item)
    return [group[i : i + size] for group in by_start.values() for i in range(0, len(group), size)]


def _train_wave(
    base: RunConfig, wave: list[BatchItem], prior: Prior, progress: bool, stackable: bool
) -> list[tuple[BatchItem, RunConfig, TrainOutput]]:
    """Train one wave; items that failed are marked. → the trained ones, to export."""
    from sds3d.train import train

    configs = [replace(base, prompt=i.prompt, seed=i.seed) for i in wave]
    try:
        if stackable:
            results = train_scenes(configs, [i.run_dir for i in wave], prior, resume=True, progress=progress)
        else:
            (item,) = wave
            resume = runs.has_checkpoint(item.run_dir)
            results = [train(configs[0], item.run_dir, resume=resume, progress=progress, prior=prior)]
    except (UserError, RuntimeError, ValueError) as err:  # the whole wave failed (out of memory, say)
        for item in wave:
            item.status, item.error = "failed", str(err).splitlines()[0]
        return []
    trained = []
    for item, config, result in zip(wave, configs, results, strict=True):
        if isinstance(result, Exception):
            item.status, item.error = "failed", str(result)
        elif result.interrupted:
            raise KeyboardInterrupt
        else:
            trained.append((item, config, result))
    return trained


def _export_item(item: BatchItem, config: RunConfig, result: TrainOutput) -> None:
    from sds3d.api import export_run, write_summary

    try:
        t0 = time.perf_counter()
        files = export_run(item.run_dir, config.device)
        write_summary(config, item.run_dir, result, files, time.perf_counter() - t0)
        _finished(item)
        item.status = "done"
    except UserError as err:  # an empty scene: nothing to mesh
        item.status, item.error = "failed", str(err)


def write_contact_sheet(out_dir: Path, items: Sequence[BatchItem], views: int = 4) -> Path | None:
    """One row per finished result: `views` frames of its turntable, evenly spaced around it."""
    import imageio.v2 as imageio

    rows = []
    for item in items:
        gif = item.run_dir / "turntable.gif"
        if item.status != "done" or not gif.is_file():
            continue
        frames = [np.asarray(f)[..., :3] for f in imageio.mimread(gif)]
        picks = [frames[round(j * len(frames) / views) % len(frames)] for j in range(views)]
        rows.append(np.concatenate(picks, axis=1))
    if not rows:
        return None
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    path = out_dir / CONTACT_SHEET
    imageio.imwrite(path, np.concatenate(rows, axis=0).astype(np.uint8))
    return path
