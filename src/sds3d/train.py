"""The training loop: one SDS step after another, with checkpoints that make every run resumable.

One step (numbered as in the loop below):
1. sample random cameras (cameras.py) and a shading mode and light (render/volume.py);
2. render the representation (representations/nerf_scene.py: the NeRF through render/volume.py);
3. look up the texts for these views (prompts.py) and take the rule's losses (rules/) from the
   frozen prior (guidance/);
4. add the representation's regularisers (losses.py) and take an Adam step.
A run is a list of stages (stages.py), each with its rule; step 0 of the loop starts a new stage
when one begins. With a latent warm-up (a first stage that renders latents, Latent-NeRF) the first
steps render latents, unshaded, straight into the U-Net; when it ends the scene's RGB heads are
written from its latent heads and training goes on in RGB through the VAE.

Determinism: all randomness of a step comes from one `torch.Generator` seeded by `config.seed`;
its state is saved with every checkpoint, so a run resumed from a checkpoint continues exactly as
the uninterrupted run would. Ctrl-C finishes the current step, writes a checkpoint and returns.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sds3d import runs
from sds3d.cameras import orbit_cameras, sample_cameras
from sds3d.config import RunConfig, load_config, save_config
from sds3d.devices import to_device
from sds3d.errors import UserError
from sds3d.guidance.base import Prior
from sds3d.prompts import PromptProcessor
from sds3d.render.volume import choose_shading, sample_lights
from sds3d.representations.base import Representation
from sds3d.representations.nerf_scene import NeRFScene
from sds3d.rules import RuleConfig
from sds3d.rules.base import Rule
from sds3d.stages import latent_stage, plan_stages, stage_at

CHECKPOINT = runs.CHECKPOINT
# Validation views: front, side, back and overhead, as labelled by view-dependent prompting.
VALIDATION_VIEWS_DEG = ((15.0, 0.0), (15.0, 90.0), (15.0, 180.0), (75.0, 45.0))


class DivergedError(UserError):
    """The loss or the parameters became NaN/Inf."""


def is_latent(config: RunConfig, steps_done: int) -> bool:
    """Whether the scene after `steps_done` steps still renders latents: the warm-up's heads are
    converted when the next stage starts, so a checkpoint of the warm-up's last step is latent."""
    warmup = latent_stage(config.stages)
    return warmup is not None and steps_done <= warmup.steps


@dataclass
class TrainOutput:
    run_dir: Path
    steps_done: int
    wall_s: float
    it_per_s: float
    interrupted: bool
    final_losses: dict[str, float] = field(default_factory=dict)


def build_scene(config: RunConfig) -> Representation:
    torch.manual_seed(config.seed)  # parameter initialisation
    if config.representation == "gaussians":
        return config.gaussians.build(config.background.color).to(config.device)
    if config.representation == "mesh":  # empty: `start_from_previous` or a checkpoint fills it
        return config.mesh.build(config.background.color).to(config.device)
    warmup = latent_stage(config.stages)
    channels = 0 if warmup is None else warmup.latent_channels
    scene = NeRFScene(config.nerf, config.background, config.renderer, config.regularizers, channels)
    return scene.to(config.device)


def start_from_previous(config: RunConfig, scene: Representation, run_dir: Path) -> None:
    """A mesh stage's first step: the mesh of the run it refines (`config.mesh.from_previous`)."""
    if config.representation != "mesh":
        return
    from sds3d.representations.mesh import MeshScene, load_previous_mesh

    if not config.mesh.from_previous:
        raise UserError(
            "the mesh stage starts from a finished run: give its folder (--from RUN, mesh.from_previous)"
        )
    previous = Path(config.mesh.from_previous)
    if previous.resolve() == run_dir.resolve():
        raise UserError(
            f"a mesh stage cannot refine the run in its own folder ({run_dir}); give it another --out"
        )
    mesh = load_previous_mesh(previous)
    cast(MeshScene, scene).set_mesh(mesh.vertices, mesh.faces, mesh.colors)


def build_prior(config: RunConfig) -> Prior:
    return config.guidance.build(config.camera).to(config.device)


def build_rule(config: RunConfig, rule: RuleConfig | None = None) -> Rule:
    """The run's rule, or a stage's `rule`."""
    return (rule or config.rule).build().to(config.device)


def build_optimizer(
    config: RunConfig, scene: Representation, rules: Sequence[Rule] = ()
) -> torch.optim.Optimizer:
    """Adam over the scene's parameter groups and the rules' own (VSD's particle score)."""
    o = config.optim
    groups = scene.param_groups(o) + [g for rule in rules for g in rule.param_groups()]
    return torch.optim.Adam(
        groups, betas=o.betas, eps=o.eps,
        fused=config.device.startswith("cuda"),  # one kernel for the whole update
    )  # fmt: skip


def load_scene(run_dir: Path, device: str = "cpu") -> tuple[RunConfig, Representation, int]:
    """The config, scene and step of a run folder's newest usable checkpoint (runs.py)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not an sds3d run folder (no config.json)")
    if not runs.has_checkpoint(run_dir):
        raise UserError(f"{run_dir} has no checkpoint ({CHECKPOINT}); train it first")
    config = load_config(run_dir / "config.json")
    config.device = device
    # Export and rendering query the field without autograd, in chunks: no compiled NeRF needed.
    config.nerf.compile = False
    state = runs.load_checkpoint(run_dir, map_location=device).state
    scene = build_scene(config)
    runs.load_state(scene, state["scene"], f"the checkpoint in {run_dir / 'checkpoints'}")
    step = int(state["step"])
    if is_latent(config, step):  # stopped in the latent warm-up: show it in colour from here on
        cast(NeRFScene, scene).latents_to_rgb_()  # latent stages are the NeRF's (check_config)
    return config, scene, step


def save_checkpoint(
    run_dir: Path, scene: Representation, rules: nn.ModuleList, optimizer: torch.optim.Optimizer, step: int,
    rng_state: torch.Tensor,
) -> None:  # fmt: skip
    state = {"scene": scene.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": rng_state}
    if rule_state := rules.state_dict():  # the stages' rules' own parameters (VSD), resumed with the scene
        state["rules"] = rule_state
    runs.save_checkpoint(run_dir, state)


def resume_from_checkpoint(
    config: RunConfig,
    run_dir: Path,
    scene: Representation,
    rules: nn.ModuleList,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> int:
    """Scene, optimiser and generator as the newest usable checkpoint left them. → its step.

    The optimiser's settings come from config.json, not the checkpoint: Adam's state dict carries
    its learning rates, which would otherwise silently win over an edited config."""
    state = runs.load_checkpoint(run_dir, map_location=config.device).state
    where = f"the checkpoint in {run_dir / 'checkpoints'}"
    runs.load_state(scene, state["scene"], where)
    if rules.state_dict() or "rules" in state:
        runs.load_state(rules, state.get("rules", {}), where)
    runs.load_state(optimizer, state["optimizer"], where)
    try:
        generator.set_state(state["rng"])
    except RuntimeError as err:
        raise UserError(f"{where} has an unusable generator state ({err})") from None
    wanted = build_optimizer(config, scene, [cast(Rule, r) for r in rules]).param_groups
    for group, new in zip(optimizer.param_groups, wanted, strict=True):
        for key in ("lr", "betas", "eps"):
            if _plain(group[key]) != _plain(new[key]):
                print(f"sds3d: note: optimiser {key} {group[key]} -> {new[key]} (changed in config.json); "
                      "the resumed run uses the new value", file=sys.stderr)  # fmt: skip
                group[key] = new[key]
    return int(state["step"])


def _plain(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)


def validation_cameras(config: RunConfig):
    el = torch.tensor([v[0] for v in VALIDATION_VIEWS_DEG])
    az = torch.tensor([v[1] for v in VALIDATION_VIEWS_DEG])
    full = lambda v: torch.full((len(el),), float(v))
    cam = config.camera
    res = max(cam.width, 64)
    radius, fovy = (cam.radius[0] + cam.radius[1]) / 2, (cam.fovy_deg[0] + cam.fovy_deg[1]) / 2
    return orbit_cameras(el, az, full(radius), full(fovy), res, res)


@torch.no_grad()
def save_validation(config: RunConfig, scene: Representation, path: Path, latent: bool = False) -> None:
    import imageio.v2 as imageio

    out = scene.render(validation_cameras(config).to(config.device), random_background=False, latent=latent)
    rgb = cast(NeRFScene, scene).preview_rgb(out.rgb) if latent else out.rgb
    row = rgb.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, (np.concatenate(list(row), axis=1) * 255 + 0.5).astype(np.uint8))


class StopRequest:
    """Turns the first Ctrl-C into a request to stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(
    config: RunConfig,
    run_dir: Path | str,
    resume: bool = False,
    progress: bool = True,
    on_step=None,
    prior: Prior | None = None,
    overwrite: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> TrainOutput:
    """Optimise a NeRF for `config.prompt`; checkpoints go to `run_dir/checkpoints/last.pt`.

    `on_step(step, scene)` is called after each completed step (used by tests and benchmarks);
    `prior` replaces the one `config.guidance` builds (shared between runs, or the speed benchmark's
    random-weight models): it is used as it is and never changed;
    `overwrite` replaces an earlier run in `run_dir` (runs.py says what it removes), once the
    prompt has been checked; `should_stop()` true before a step stops the run there as Ctrl-C does
    (a checkpoint, `interrupted`): how a run in another thread, out of Ctrl-C's reach, is stopped. The run folder is locked for
    the whole call.
    """
    run_dir = Path(run_dir)
    with runs.locked(run_dir, create=not resume):
        return _train(config, run_dir, resume, progress, on_step, prior, overwrite, should_stop)


def _train(
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    on_step,
    prior: Prior | None,
    overwrite: bool,
    should_stop: Callable[[], bool] | None = None,
) -> TrainOutput:
    if resume:
        if not runs.has_checkpoint(run_dir):
            raise UserError(f"nothing to resume: {run_dir / CHECKPOINT} does not exist")
    else:
        runs.check_new_run(run_dir, overwrite)
    # The prior next: a missing model or an unknown prompt fails before anything is written or removed.
    owned = prior is None
    prior = build_prior(config) if prior is None else prior
    stages = plan_stages(config.stages, config.steps, config.rule)
    stage_rules = [build_rule(config, stage.rule) for stage in stages]
    rules = nn.ModuleList(stage_rules)  # one state dict for the checkpoint
    prompts = PromptProcessor(config.prompt, config.prompts, prior.encode_prompt)
    for rule in stage_rules:
        rule.prepare(prior, prompts)  # its own texts (NFSD, Perp-Neg) and parameters (VSD)
    prompts.precompute()  # every text once; then our own prior's text encoder goes (large for SD and IF)
    release = getattr(prior, "release_text_encoder", None)
    if owned and callable(release):
        release()
    warmup = latent_stage(config.stages)
    latent_maps = None if warmup is None else _latent_maps(prior, warmup.latent_channels)
    scene = build_scene(config)
    optimizer = build_optimizer(config, scene, stage_rules)
    generator = torch.Generator().manual_seed(config.seed)
    if latent_maps is not None:  # fitted afresh each time; a resumed run keeps its checkpoint's maps
        cast(NeRFScene, scene).set_latent_maps(*latent_maps)
    start = 0
    if resume:
        start = resume_from_checkpoint(config, run_dir, scene, rules, optimizer, generator)
        if start > config.steps:
            raise UserError(
                f"{run_dir} is already at step {start}; pass --steps {start} or more to resume it"
            )
    else:
        start_from_previous(config, scene, run_dir)
        if runs.user_entries(run_dir):
            runs.clear_run(run_dir)  # --overwrite, every argument checked
    runs.mark_run(run_dir)
    save_config(config, run_dir / "config.json")

    cpu = config.device == "cpu"
    on_cuda = config.device.startswith("cuda")  # asynchronous host copies need CUDA events
    sync_every = 1 if cpu else 10  # host syncs only every few steps on a GPU
    last: dict[str, torch.Tensor] = {}
    pending: tuple[torch.Tensor, torch.cuda.Event, int] | None = None  # stats on their way to the host
    step = start
    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc=config.prompt[:40], disable=not progress, unit="it")
    with StopRequest() as stop:
        for step in range(start, config.steps):
            if stop.requested or (should_stop is not None and should_stop()):
                break
            step_ratio = step / config.steps
            if not cpu:  # a new step for CUDA-graph replays (torch.compile mode="reduce-overhead")
                torch.compiler.cudagraph_mark_step_begin()
            # 0. The stage of this step; the representation is told when a new one begins.
            stage = stage_at(stages, step)
            if step == stage.start and stage.index > 0:
                scene.start_stage(stages[stage.index - 1].render, stage.render)
            latent, rule = stage.render == "latent", stage_rules[stage.index]
            # 1. Cameras, shading and light (latents are rendered unshaded).
            cameras = sample_cameras(config.camera, generator)
            shading = "albedo" if latent else choose_shading(config.renderer, generator)
            lights = sample_lights(cameras, config.renderer, generator) if shading != "albedo" else None
            cond, uncond = prompts(cameras)  # view labels from the host copy: no device sync
            cameras = cameras.to(config.device)
            # 2. Render.
            lights = None if lights is None else to_device(lights, config.device)
            out = scene.render_train(cameras, shading, lights, step_ratio, generator, latent)
            # 3. Score distillation: the rule's losses from the frozen prior.
            g = rule(prior, out.rgb, cond, uncond, step_ratio, cameras=cameras, generator=generator,
                     rgb_as_latents=latent)  # fmt: skip
            # 4. The representation's regularisers and the optimiser step.
            terms = dict(g.losses) | scene.regularizers(out, step_ratio)
            loss = cast(torch.Tensor, sum(terms.values()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scene.post_step(step_ratio, optimizer)
            last = {k: v.detach() for k, v in terms.items()} | {
                "loss": loss.detach(),
                "grad_norm": g.grad_norm.detach(),
            }

            done = step + 1
            if done % sync_every == 0 or done == config.steps:
                # The loss, the timestep and the NaN check travel to the host together. On a GPU
                # they are read one interval later (an asynchronous copy, no stall), except before a
                # checkpoint is written: a diverged scene is never saved.
                stats = torch.stack([last["loss"].float(), g.timesteps[0].float(), _finite(scene).float()])
                if not on_cuda or done % config.checkpoint_every == 0 or done == config.steps:
                    _report(stats.tolist(), done, bar, run_dir)
                    pending = None
                else:
                    if pending is not None:
                        pending[1].synchronize()
                        _report(pending[0].tolist(), pending[2], bar, run_dir)
                    host = stats.to("cpu", non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
                    pending = (host, ready, done)
            bar.update(1)
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_checkpoint(run_dir, scene, rules, optimizer, done, generator.get_state())
            if config.validate_every > 0 and (done % config.validate_every == 0 or done == config.steps):
                save_validation(config, scene, run_dir / "validation" / f"step_{done:06d}.png",
                                latent=is_latent(config, done))  # fmt: skip
            step = done
            if on_step is not None:
                on_step(done, scene)
        else:
            step = config.steps
    bar.close()
    interrupted = step < config.steps
    if interrupted:
        save_checkpoint(run_dir, scene, rules, optimizer, step, generator.get_state())
    wall = time.perf_counter() - t0
    return TrainOutput(
        run_dir=run_dir, steps_done=step, wall_s=wall, it_per_s=(step - start) / max(wall, 1e-9),
        interrupted=interrupted, final_losses={k: float(v) for k, v in last.items()},
    )  # fmt: skip


def _latent_maps(prior: Prior, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's fitted latent↔RGB maps, or one line on why this prior has no latent warm-up."""
    fit = getattr(prior, "latent_rgb_maps", None)
    if fit is None:
        raise UserError(
            f"the latent warm-up needs a latent diffusion model (with a VAE), not {type(prior).__name__}"
        )
    to_rgb, to_latent = fit()
    if to_rgb.shape[0] - 1 != channels:
        raise UserError(
            f"the model's latents have {to_rgb.shape[0] - 1} channels; the latent warm-up has {channels}"
        )
    return to_rgb, to_latent


def _report(stats: list[float], done: int, bar: tqdm, run_dir: Path) -> None:
    """Show the loss and timestep of step `done`; raise if the loss or the scene is not finite."""
    value, t_shown, finite = stats
    if not np.isfinite(value) or not finite:
        bar.close()
        kept = runs.checkpoint_step(run_dir)
        where = (
            f"the last good checkpoint (step {kept}) is kept in {run_dir / CHECKPOINT}"
            if kept is not None
            else "no checkpoint was written yet"
        )
        raise DivergedError(f"training diverged to NaN/Inf at step {done}; {where}")
    bar.set_postfix(loss=f"{value:.4g}", t=int(t_shown))


def _finite(scene: Representation) -> torch.Tensor:
    """A 0-d bool tensor (no host sync): every parameter is finite."""
    return torch.stack([torch.isfinite(p).all() for p in scene.parameters()]).all()
