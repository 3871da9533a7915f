"""`sds3d app`: the browser interface (Gradio; the optional extra `sds3d[app]`).

A page with a prompt (the built-in prior's vocabulary offered as examples), a preset, steps and a
seed; Generate trains in this process while the page shows the step, the speed and the newest
validation render; the result comes back as an interactive 3D view of `mesh.glb`, the turntable and
the files to download. Stop checkpoints the run (as Ctrl-C does in the terminal) and Resume goes on
from there; earlier runs in the outputs folder are listed and can be reopened.

Everything the page does goes through `Studio`, which knows nothing of Gradio (tested without a
browser): one loaded prior per model, shared by every tab, and one run at a time (a second tab's
run waits in Gradio's queue rather than fighting for the CPU). Bad input gives the CLI's one line.
"""

import dataclasses
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sds3d.errors import UserError

# Files a finished run offers for download, in this order.
DOWNLOADS = (
    "mesh.glb",
    "mesh.ply",
    "mesh.obj",
    "turntable.gif",
    "turntable.mp4",
    "summary.json",
    "config.json",
)
VALIDATIONS_SHOWN = 10  # validation renders over a run started from the page


@dataclass
class RunInfo:
    """One run folder as the page lists it."""

    path: Path
    prompt: str
    status: str  # "done", "stopped" (a checkpoint, no export yet) or "new" (nothing trained)
    step: int
    steps: int
    thumbnail: Path | None

    @property
    def caption(self) -> str:
        where = "" if self.status == "done" else f" · {self.status} at {self.step}/{self.steps}"
        return f"{self.prompt}{where} · {self.path.name}"


@dataclass
class Update:
    """What the page shows while a run goes and once it ends."""

    status: str
    validation: Path | None = None
    run_dir: Path | None = None
    done: bool = False
    files: dict[str, Path] = field(default_factory=dict)


def run_info(run_dir: Path) -> RunInfo | None:
    """The page's view of `run_dir`, or None when it is not a readable sds3d run."""
    from sds3d import runs
    from sds3d.config import ConfigError, load_config

    try:
        config = load_config(run_dir / "config.json")
    except (ConfigError, UserError, OSError, ValueError):
        return None
    step = runs.checkpoint_step(run_dir) or 0
    done = (run_dir / "summary.json").is_file() and (run_dir / "mesh.glb").is_file()
    status = "done" if done else ("stopped" if step else "new")
    validations = sorted((run_dir / "validation").glob("step_*.png"))
    thumb = run_dir / "turntable.gif" if (run_dir / "turntable.gif").is_file() else None
    return RunInfo(
        run_dir,
        config.prompt,
        status,
        step,
        config.steps,
        thumb or (validations[-1] if validations else None),
    )


def list_runs(root: Path) -> list[RunInfo]:
    """The runs in `root`, newest first (by their folder's modification time)."""
    if not root.is_dir():
        return []
    found = [info for d in root.iterdir() if d.is_dir() and (info := run_info(d)) is not None]
    return sorted(found, key=lambda i: i.path.stat().st_mtime, reverse=True)


def run_files(run_dir: Path) -> dict[str, Path]:
    return {name: run_dir / name for name in DOWNLOADS if (run_dir / name).is_file()}


def world_prompts() -> list[str]:
    from sds3d.world.shapes import all_objects

    return [o.prompt for o in all_objects()]


class Studio:
    """The app's state: the outputs folder, the loaded priors and the one run going at a time."""

    def __init__(self, outputs: Path | str = "outputs", device: str | None = None):
        self.outputs = Path(outputs)
        if self.outputs.exists() and not self.outputs.is_dir():
            raise UserError(f"--outputs {self.outputs} is a file, not a folder")
        self.device = device
        self._priors: dict[str, Any] = {}
        self._prior_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._stops: dict[str, threading.Event] = {}

    # --- settings → a checked config ---------------------------------------------------------------
    def config_for(self, prompt: str, preset_name: str, steps: Any, seed: Any):
        """The run config the page asks for, checked as the CLI checks it (UserError: one line)."""
        from sds3d.config import PRESETS, check_config, preset
        from sds3d.devices import check_device
        from sds3d.prompts import validate_prompt

        text = validate_prompt(prompt or "")
        if preset_name not in PRESETS:
            raise UserError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
        config = dataclasses.replace(preset(preset_name), prompt=text)
        config.steps = _cli_number(steps, "--steps", "positive_int")
        config.seed = _cli_number(seed, "--seed", "seed")
        if self.device is not None:
            config.device = self.device
        check_device(config.device)
        # live renders over the run, and checkpoints at least as often (what Stop keeps)
        config.validate_every = max(1, config.steps // VALIDATIONS_SHOWN)
        config.checkpoint_every = min(config.checkpoint_every, max(1, config.steps // VALIDATIONS_SHOWN))
        config = check_config(config)
        self.prior_for(config).encode_prompt(config.prompt)  # an unknown world prompt: one line, now
        return config

    def prior_for(self, config):
        """The prior `config.guidance` names, loaded once and shared by every run of the page."""
        from sds3d.config import to_dict
        from sds3d.train import build_prior

        key = json.dumps([to_dict(config)["guidance"], config.device], sort_keys=True)
        with self._prior_lock:
            if key not in self._priors:
                self._priors[key] = build_prior(config)
            return self._priors[key]

    # --- runs ------------------------------------------------------------------------------------------
    def new_run(self, config, session: str = "") -> Iterator[Update]:
        """Train `config` (from `config_for`) in a new folder of the outputs, then export it."""
        from sds3d.api import default_run_dir

        yield from self._follow(config, default_run_dir(config.prompt, self.outputs), False, session)

    def resume(self, run_dir: Path | str | None, session: str = "") -> Iterator[Update]:
        from sds3d.config import load_config

        if not run_dir:
            raise UserError("no run to resume: start one, or open a stopped run from the list")
        run_dir = Path(run_dir)
        info = run_info(run_dir)
        if info is None:
            raise UserError(f"{run_dir} is not an sds3d run folder (no readable config.json)")
        if info.status != "stopped":
            raise UserError(f"{run_dir.name} is {'finished' if info.status == 'done' else 'not trained yet'}; "
                            "there is nothing to resume")  # fmt: skip
        config = load_config(run_dir / "config.json")
        if self.device is not None:
            config.device = self.device
        yield from self._follow(config, run_dir, resume=True, session=session)

    def stop(self, session: str = "") -> bool:
        """Ask the session's running run to stop after its current step; False if none runs."""
        event = self._stops.get(session)
        if event is None:
            return False
        event.set()
        return True

    def _follow(self, config, run_dir: Path, resume: bool, session: str = "") -> Iterator[Update]:
        """Train and export in a thread, yielding an Update at least every second."""
        from sds3d.api import generate

        with self._run_lock:
            stop = self._stops[session] = threading.Event()
            events: queue.Queue = queue.Queue()
            prior = self.prior_for(config)
            outcome: dict[str, Any] = {}

            def work() -> None:
                try:
                    outcome["result"] = generate(config, run_dir, resume=resume, progress=False, prior=prior,
                                                 on_step=lambda step, _: events.put(step), should_stop=stop.is_set)  # fmt: skip
                except UserError as err:
                    outcome["error"] = str(err)
                except Exception as err:  # a bug: shown in the page, and the app goes on
                    outcome["error"] = f"{type(err).__name__}: {err}"

            thread = threading.Thread(target=work, name=f"sds3d-run-{run_dir.name}", daemon=True)
            t0, step, first = time.perf_counter(), 0, None
            thread.start()
            try:
                yield Update(f"{config.prompt!r}: starting ({config.steps} steps, {config.preset}, seed {config.seed})",
                             run_dir=run_dir)  # fmt: skip
                while thread.is_alive():
                    thread.join(timeout=0.5)
                    while not events.empty():
                        step = events.get()
                        first = first or (step, time.perf_counter())
                    if step:
                        yield Update(
                            _progress_line(config, step, first, stop.is_set()), _newest(run_dir), run_dir
                        )
                if "error" in outcome:
                    yield Update(f"error: {outcome['error']}", _newest(run_dir), run_dir, done=True)
                    return
                result = outcome["result"]
                if result.train.interrupted:
                    yield Update(f"stopped at step {result.train.steps_done}/{config.steps}; the checkpoint is kept "
                                 "— Resume goes on from there", _newest(run_dir), run_dir, done=True)  # fmt: skip
                    return
                wall = time.perf_counter() - t0
                yield Update(f"done: {config.prompt!r}, {result.train.steps_done} steps, {wall:.0f} s "
                             f"({result.train.it_per_s:.1f} it/s) → {run_dir}", _newest(run_dir), run_dir,
                             done=True, files=run_files(run_dir))  # fmt: skip
            finally:  # the page went away (or the generator was closed): stop the run, keep its checkpoint
                stop.set()
                thread.join()
                self._stops.pop(session, None)


def _cli_number(value: Any, flag: str, parser: str) -> int:
    """A number field read by the CLI's own argument parser (`cli._positive_int`, `cli._seed`), so
    that a bad value gets the CLI's message; Gradio's numbers come as floats (30.0)."""
    import argparse

    from sds3d import cli

    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    try:
        return getattr(cli, f"_{parser}")(text)
    except argparse.ArgumentTypeError as err:
        raise UserError(f"argument {flag}: {err}") from None


def _newest(run_dir: Path) -> Path | None:
    renders = sorted((run_dir / "validation").glob("step_*.png"))
    return renders[-1] if renders else None


def _progress_line(config, step: int, first: tuple[int, float] | None, stopping: bool) -> str:
    rate = ""
    if first is not None and step > first[0]:
        per_s = (step - first[0]) / max(time.perf_counter() - first[1], 1e-9)
        rate = f", {per_s:.1f} it/s, about {(config.steps - step) / per_s:.0f} s left"
    if step >= config.steps:
        return f"{config.prompt!r}: trained {step} steps; making the mesh and the turntable…"
    return f"{config.prompt!r}: step {step}/{config.steps}{rate}{' — stopping after this step' if stopping else ''}"


# --- the page ----------------------------------------------------------------------------------------
def build_app(studio: Studio):
    """The Gradio Blocks of the page (launch with `serve`)."""
    import gradio as gr

    from sds3d.config import PRESETS

    with gr.Blocks(title="sds3d") as demo:
        gr.Markdown(
            "# sds3d — text to 3D by score distillation\n"
            "The built-in prior knows a small world: *a {red, orange, yellow, green, blue, purple} "
            "{sphere, cube, cylinder, cone, torus}*. The GPU presets take any text with Stable Diffusion."
        )
        current = gr.State("")  # the run this tab shows (a folder path)
        listed = gr.State([])  # the folders behind the gallery, in its order
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value="a blue torus", elem_id="prompt", max_lines=1)
                gr.Examples(
                    world_prompts(), inputs=prompt, label="The built-in prior's world", examples_per_page=30
                )
                preset_box = gr.Dropdown(list(PRESETS), value="default", label="Preset", elem_id="preset")
                with gr.Row():
                    steps = gr.Number(
                        value=PRESETS["default"].steps, precision=0, minimum=1, label="Steps", elem_id="steps"
                    )
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
                    resume = gr.Button("Resume", elem_id="resume")
                status = gr.Markdown("Ready.", elem_id="status")
                live = gr.Image(label="Validation render", type="filepath", elem_id="validation", height=160)
            with gr.Column(scale=2):
                model = gr.Model3D(label="mesh.glb", elem_id="model", height=420)
                turntable = gr.Image(label="Turntable", type="filepath", elem_id="turntable", height=200)
                downloads = gr.File(label="Files", file_count="multiple", elem_id="downloads")
        gr.Markdown("## Earlier runs (click one to open it)")
        refresh = gr.Button("Refresh the list", size="sm")
        gallery = gr.Gallery(label="outputs", columns=6, height=240, object_fit="contain", allow_preview=False,
                             elem_id="runs")  # fmt: skip

        def shown(update: Update):
            files = update.files
            return (
                update.status,
                str(update.validation) if update.validation else None,
                str(files["turntable.gif"]) if "turntable.gif" in files else None,
                [str(p) for p in files.values()] or None,
                str(update.run_dir or ""),
            )

        # The 3D view is set after a run by its own (unstreamed) step: Model3D does not draw a value
        # that arrives in a stream of updates.
        streamed = [status, live, turntable, downloads, current]

        def stream(make: Callable[[], Iterator[Update]]):
            try:
                for update in make():
                    yield shown(update)
            except UserError as err:
                yield f"error: {err}", None, None, None, gr.skip()

        def on_generate(text, preset_name, n_steps, n_seed, request: gr.Request):
            def make():
                return studio.new_run(
                    studio.config_for(text, preset_name, n_steps, n_seed), _session(request)
                )

            yield from stream(make)

        def on_resume(run_dir, request: gr.Request):
            yield from stream(lambda: studio.resume(run_dir, _session(request)))

        def on_stop(request: gr.Request):
            return gr.skip() if studio.stop(_session(request)) else "Nothing is running in this tab."

        def on_list():
            runs = list_runs(studio.outputs)
            items = [(str(r.thumbnail), r.caption) for r in runs if r.thumbnail is not None]
            return items, [str(r.path) for r in runs if r.thumbnail is not None]

        def on_model(run_dir):
            glb = Path(run_dir) / "mesh.glb" if run_dir else None
            return str(glb) if glb is not None and run_files(glb.parent).get("mesh.glb") else None

        def on_open(paths, evt: gr.SelectData):
            info = run_info(Path(paths[evt.index]))
            if info is None:
                return "error: that run folder is gone or unreadable", None, None, None, ""
            stopped = " — Resume goes on from there" if info.status == "stopped" else ""
            return shown(
                Update(
                    f"opened {info.caption}{stopped}",
                    _newest(info.path),
                    info.path,
                    True,
                    run_files(info.path),
                )
            )

        inputs = [prompt, preset_box, steps, seed]
        clear = lambda: None
        for button, handler, args in ((go, on_generate, inputs), (resume, on_resume, [current])):
            (button.click(clear, None, model, queue=False)
             .then(handler, args, streamed, concurrency_id="train", concurrency_limit=1)
             .then(on_model, [current], model, queue=False)
             .then(on_list, None, [gallery, listed], queue=False))  # fmt: skip
        preset_box.change(lambda name: PRESETS[name].steps if name in PRESETS else gr.skip(), preset_box, steps,
                          queue=False)  # fmt: skip
        stop.click(on_stop, None, status, queue=False)
        refresh.click(on_list, None, [gallery, listed], queue=False)
        gallery.select(on_open, [listed], streamed, queue=False).then(on_model, [current], model, queue=False)
        demo.load(on_list, None, [gallery, listed], queue=False)
    return demo


def _session(request) -> str:
    return getattr(request, "session_hash", None) or ""


def serve(studio: Studio, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page at http://host:port; with `block=False` return (app, url) at once."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page reports nothing anywhere
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the app needs Gradio: pip install 'sds3d[app]'") from None
    studio.outputs.mkdir(parents=True, exist_ok=True)
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name=host, server_port=port, allowed_paths=[str(studio.outputs.resolve())],
                            prevent_thread_lock=not block, quiet=not block, show_error=True)  # fmt: skip
    return demo, url
