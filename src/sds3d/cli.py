"""The `sds3d` command. Entry points only: parsing, messages and exit codes; the work is in api.py.

Exit codes: 0 done, 2 bad input or a run that diverged (one line on stderr, no traceback),
130 interrupted by Ctrl-C (a checkpoint is written; `--resume` continues).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from sds3d.errors import UserError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        raise UserError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= 2**64 - 1:  # torch.Generator takes a 64-bit unsigned seed
        raise argparse.ArgumentTypeError(f"must be in 0…2^64−1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from sds3d.config import GUIDANCE_KINDS, PRESETS
    from sds3d.rules import RULES

    parser = _Parser(prog="sds3d", description="Text to 3D by Score Distillation Sampling, on any machine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser(
        "generate",
        help="train a NeRF for a prompt, then export a mesh and a turntable",
        description=(
            "Train a NeRF for PROMPT by score distillation, then write mesh.glb/.ply/.obj, turntable.gif "
            "and summary.json. The default prior is sds3d's own learned prior of the synthetic world "
            "(sds3d/world-prior-32-fronts, shipped in the package), so PROMPT must read "
            '"a {red|orange|yellow|green|blue|purple} {sphere|cube|cylinder|cone|torus}", optionally '
            '"... with a {colour} front". '
            "With --model (a diffusers folder or hub id) any text prompt goes to Stable Diffusion, "
            "DeepFloyd IF or another diffusers U-Net pipeline; see `sds3d presets` for their recipes."
        ),
    )
    g.add_argument("prompt", nargs="?", help="the text (optional with --config: the config's prompt)")
    g.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (default: default)")
    g.add_argument(
        "--config", type=Path, metavar="CONFIG_JSON",
        help="re-run a run's config.json (e.g. outputs/RUN/config.json) in a new --out; other flags override it",
    )  # fmt: skip
    g.add_argument("--prior", help=f"override the preset's prior: {', '.join(GUIDANCE_KINDS)}")
    g.add_argument(
        "--rule", help=f"override the preset's distillation rule: {', '.join(RULES)} (`sds3d rules`)"
    )
    g.add_argument(
        "--model", help="diffusers folder or hub id of the diffusers prior (implies --prior diffusers)"
    )
    g.add_argument(
        "--from", dest="from_run", type=Path, metavar="RUN_DIR",
        help="refine the mesh of a finished run (the refine preset unless --preset; PROMPT defaults to the run's)",
    )  # fmt: skip
    g.add_argument(
        "--camera-guidance", type=float, metavar="S_C",
        help="camera guidance: add S_C × what the camera changes in the prior's prediction (a camera-conditioned "
        "prior; against the Janus problem, benchmarks/janus.md; default: the preset's, 0)",
    )  # fmt: skip
    g.add_argument("--steps", type=_positive_int, help="training steps (default: the preset's)")
    g.add_argument("--seed", type=_seed, help="random seed, 0…2^64−1 (default: the preset's, 0)")
    g.add_argument(
        "--latent-warmup", type=int, metavar="STEPS",
        help="render latents for the first STEPS steps (Latent-NeRF; threestudio's rgb_as_latents): "
        "no VAE encoder in those steps; latent models (Stable Diffusion) only",
    )  # fmt: skip
    g.add_argument("--out", type=Path, help="run folder (default: outputs/<slug-of-prompt>-<timestamp>/)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument("--device", help="torch device, e.g. cpu or cuda (default: the preset's; cpu for default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("export", help="mesh and turntable of a run folder's last checkpoint")
    e.add_argument("run_dir", type=Path)
    r = sub.add_parser("render", help="turntable GIFs of a run (albedo and shaded)")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--shading", default="albedo", choices=["albedo", "lambertian", "textureless"])
    sub.add_parser("presets", help="list the presets")
    sub.add_parser("rules", help="list the distillation rules, with their papers and equations")
    p = sub.add_parser("prior", help="the built-in prior").add_subparsers(
        dest="prior_command", required=True, parser_class=_Parser
    )
    pt = p.add_parser("train", help="train the built-in prior on renders of the synthetic world")
    pt.add_argument(
        "--out", type=Path, required=True, help="folder for checkpoints and the diffusers pipeline"
    )
    pt.add_argument("--steps", type=_positive_int, help="total training steps (default 20000)")
    pt.add_argument("--batch-size", type=_positive_int)
    pt.add_argument("--device", default="cpu")
    pt.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    pt.add_argument("--max-minutes", type=float, help="stop with a checkpoint after this long (resume later)")
    pt.add_argument("--init", type=Path, help="start from the weights of this diffusers folder (fine-tune)")
    pt.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-4)")
    pt.add_argument("--snr-gamma", type=float, help="min-SNR-γ loss weighting (default: the plain ε loss)")
    pt.add_argument(
        "--fronted-high-t",
        type=float,
        metavar="SHARE",
        help="share of the fronted objects' samples with t from the noisy end (t ≥ 600; default 0)",
    )
    pt.add_argument(
        "--snapshots", default="", help="comma-separated steps: also keep the prior there (pipeline-stepN)"
    )
    b = sub.add_parser(
        "bench",
        help="benchmarks: quality (3D results against ground truth), speed (SDS step vs its floor), janus (fronts against the true front)",
    )
    b.add_argument("benchmark", choices=list(BENCHMARKS))
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own options (--help)")
    bt = sub.add_parser(
        "batch", help="many prompts in one process: the prior loaded once, K scenes trained at a time",
        description="Train and export every prompt of PROMPTS (one per line, # comments) for each seed, "
        "K scenes at a time with one prior call per step for all of them. Each result is a run folder "
        "in --out, as `sds3d generate` writes it; --out/index.json lists them and --out/contact_sheet.png "
        "shows them. Run the same command again to resume a stopped batch.",
    )  # fmt: skip
    bt.add_argument("prompts", type=Path, metavar="PROMPTS.txt")
    bt.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (default: default)")
    bt.add_argument("--seeds", type=_positive_int, default=1, help="seeds 0…N−1 per prompt (default 1)")
    bt.add_argument(
        "--scenes", type=_positive_int, default=16, help="scenes trained at a time, K (default 16)"
    )
    bt.add_argument("--steps", type=_positive_int, help="training steps (default: the preset's)")
    bt.add_argument(
        "--out", type=Path, help="folder of the results (default: outputs/batch-<name of PROMPTS>)"
    )
    bt.add_argument("--device", help="torch device (default: the preset's)")
    bt.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                    help="compile the prior with CUDA graphs (auto: on a GPU)")  # fmt: skip
    bt.add_argument("--no-progress", action="store_true", help="no progress bars")
    bt.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                    help="shard the prompts over Ray workers, one per GPU: a local Ray, or the cluster at "
                    "ADDRESS ('auto': the running one); needs sds3d[ray]")  # fmt: skip
    bt.add_argument("--ray-workers", type=_positive_int, metavar="N",
                    help="Ray workers (default: one per GPU of the cluster; 1 on CPUs)")  # fmt: skip
    st = sub.add_parser("study", help="a grid of settings x seeds x prompts scored against the ground truth",
                        add_help=False)  # fmt: skip
    st.add_argument("study_args", nargs=argparse.REMAINDER, help="SPEC [options] (sds3d study --help)")
    ap = sub.add_parser("app", help="the browser interface (Gradio; needs sds3d[app])",
                        description="Serve sds3d's page: prompt, preset, live progress, the mesh in a 3D viewer, "
                        "Stop and Resume, earlier runs. Bound to 127.0.0.1 unless --host says otherwise.")  # fmt: skip
    ap.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    ap.add_argument("--port", type=_positive_int, default=7860, help="port (default 7860)")
    ap.add_argument(
        "--outputs", type=Path, default=Path("outputs"), help="folder of the runs (default outputs)"
    )
    ap.add_argument("--device", help="torch device for every run (default: each preset's)")
    pt.add_argument("--compile", action="store_true", help="torch.compile the U-Net and text encoder (GPU)")
    pt.add_argument("--no-progress", action="store_true")
    return parser


def _resolve_config(args: argparse.Namespace):
    from sds3d.config import GUIDANCE_KINDS, DiffusersGuidanceConfig, check_config, load_config, preset
    from sds3d.devices import check_device
    from sds3d.prompts import validate_prompt
    from sds3d.rules import with_rule
    from sds3d.stages import StageConfig

    if args.config is not None and (args.resume or args.preset):
        raise UserError(f"--config cannot be combined with {'--resume' if args.resume else '--preset'}")
    from_run = getattr(args, "from_run", None)
    if from_run is not None:
        if args.resume or args.config is not None:
            raise UserError(f"--from cannot be combined with {'--resume' if args.resume else '--config'}")
        if not (from_run / "config.json").is_file():
            raise UserError(f"--from {from_run} is not an sds3d run folder (no config.json)")
        if args.prompt is None:
            args.prompt = load_config(from_run / "config.json").prompt
        args.preset = args.preset or "refine"
    if args.prompt is None and args.config is None and not args.resume:
        raise UserError("the following arguments are required: prompt")
    prompt = None if args.prompt is None else validate_prompt(args.prompt)
    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out RUN_DIR, the folder of the run to continue")
        if not (args.out / "config.json").is_file():
            raise UserError(f"nothing to resume in {args.out}: no config.json")
        config = load_config(args.out / "config.json")
        if prompt is not None and config.prompt != prompt:
            raise UserError(f"{args.out} is a run for {config.prompt!r}, not {prompt!r}")
    else:
        if args.config is not None:
            config = load_config(args.config)
            config.prompt = validate_prompt(prompt or config.prompt)
        else:
            assert prompt is not None  # checked above
            config = dataclasses.replace(preset(args.preset or "default"), prompt=prompt)
        prior = args.prior or ("diffusers" if args.model else None)
        if prior is not None:
            if prior not in GUIDANCE_KINDS:
                raise UserError(f"unknown prior {prior!r}; choose from {', '.join(GUIDANCE_KINDS)}")
            if prior == "diffusers":
                if isinstance(
                    config.guidance, DiffusersGuidanceConfig
                ):  # keep the preset's dtype and compilation
                    config.guidance = dataclasses.replace(
                        config.guidance, model=args.model or config.guidance.model
                    )
                elif not args.model:
                    raise UserError("--prior diffusers needs --model, a diffusers folder or hub id")
                else:
                    config.guidance = DiffusersGuidanceConfig(model=args.model)
            elif args.model:
                raise UserError(f"--model is for the diffusers prior, not {prior!r}")
            elif config.guidance.kind != prior:
                config.guidance = GUIDANCE_KINDS[prior]()
        if args.rule is not None:
            config.rule = with_rule(config.rule, args.rule)  # the preset's t, w(t) and CFG
        if getattr(args, "camera_guidance", None) is not None:
            config.rule = dataclasses.replace(config.rule, camera_guidance_scale=args.camera_guidance)
        if args.seed is not None:
            config.seed = args.seed
        if from_run is not None:
            if config.representation != "mesh":
                raise UserError(
                    f"--from starts a mesh stage; preset {config.preset!r} trains a {config.representation}"
                )
            config.mesh = dataclasses.replace(config.mesh, from_previous=str(from_run))
        elif config.representation == "mesh" and not config.mesh.from_previous:
            raise UserError(
                f"preset {config.preset!r} refines a finished run: give its folder with --from RUN_DIR"
            )
        if args.latent_warmup is not None:
            if args.latent_warmup < 0:
                raise UserError(f"--latent-warmup must be 0 or more steps, not {args.latent_warmup}")
            rest = [s for s in config.stages if s.render != "latent"]
            warmup = [StageConfig(steps=args.latent_warmup, render="latent")] if args.latent_warmup else []
            config.stages = warmup + rest
    if args.steps is not None:
        config.steps = args.steps
    if args.device is not None:
        config.device = args.device
    check_device(config.device)
    return check_config(config)


def _run_dir(args: argparse.Namespace, prompt: str) -> Path:
    """The run folder, checked before the prior loads (train.py checks again, under the lock)."""
    from sds3d import runs
    from sds3d.api import default_run_dir

    run_dir = args.out if args.out is not None else default_run_dir(prompt)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a run folder")
    if not args.resume and run_dir.is_dir():
        runs.check_new_run(run_dir, args.overwrite)
    return run_dir


def cmd_generate(args: argparse.Namespace) -> int:
    from sds3d.api import generate

    config = _resolve_config(args)
    run_dir = _run_dir(args, config.prompt)
    print(
        f"sds3d: {config.prompt!r}, preset {config.preset}, {config.steps} steps, seed {config.seed} -> {run_dir}"
    )
    out = generate(
        config, run_dir, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite
    )
    if out.train.interrupted:
        print(
            f"sds3d: interrupted at step {out.train.steps_done}/{config.steps}; checkpoint saved. Continue with:\n"
            f"  sds3d generate {_quote(config.prompt)} --out {_quote(str(run_dir))} --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(f"sds3d: {out.train.steps_done} steps in {out.train.wall_s:.1f} s ({out.train.it_per_s:.1f} it/s)")
    print(f"sds3d: results in {run_dir}/")
    for name in ("glb", "ply", "obj", "gif", "mp4"):
        if name in out.files:
            print(f"  {out.files[name]}")
    print(f"  {run_dir / 'summary.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sds3d.api import export_run

    for path in export_run(args.run_dir).values():
        print(path)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from sds3d.api import render_run

    for path in render_run(args.run_dir, args.shading, progress=True):
        print(path)
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from sds3d.rules import RULES

    for name, info in RULES.items():
        print(f"{name:10s} {info.paper}\n{'':10s} {info.equation}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from sds3d.config import PRESET_NOTES, PRESETS

    for name, config in PRESETS.items():
        print(f"{name:15s} {config.guidance.kind:10s} {config.steps:6d} steps  {PRESET_NOTES.get(name, '')}")
    return 0


def cmd_prior(args: argparse.Namespace) -> int:
    from sds3d.devices import check_device
    from sds3d.prior.train import PriorTrainConfig, train_prior

    check_device(args.device)
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder")
    config = PriorTrainConfig()
    if args.steps is not None:
        config.steps = args.steps
    if args.batch_size is not None:
        config.batch_size = args.batch_size
    if args.lr is not None:
        config.lr = args.lr
    if args.snr_gamma is not None:
        if args.snr_gamma <= 0:
            raise UserError(f"--snr-gamma must be positive, not {args.snr_gamma}")
        config.snr_gamma = args.snr_gamma
    if args.fronted_high_t is not None:
        if not 0.0 <= args.fronted_high_t <= 1.0:
            raise UserError(f"--fronted-high-t must be in [0, 1], not {args.fronted_high_t}")
        config.fronted_high_t_share = args.fronted_high_t
    if args.init is not None and not (args.init / "unet").is_dir():
        raise UserError(f"--init {args.init} is not a diffusers folder of the prior (no unet/)")
    if (args.out / "checkpoint.pt").exists() and not args.resume:
        raise UserError(f"{args.out} already has a checkpoint; pass --resume to continue it")
    try:
        snapshots = tuple(int(s) for s in args.snapshots.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--snapshots takes comma-separated step counts, not {args.snapshots!r}") from None
    summary = train_prior(
        config,
        args.out,
        args.device,
        args.resume,
        args.max_minutes,
        not args.no_progress,
        args.compile,
        args.init,
        snapshots,
    )
    print(f"sds3d: prior at step {summary['steps']}/{config.steps}; pipeline in {args.out / 'pipeline'}")
    return 0


# `sds3d bench NAME ARGS…` runs `python -m sds3d.bench.NAME ARGS…`.
BENCHMARKS = {"quality": "sds3d.bench.quality", "speed": "sds3d.bench.speed", "janus": "sds3d.bench.janus"}


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(BENCHMARKS[args.benchmark]).main(args.bench_args) or 0)


def cmd_batch(args: argparse.Namespace) -> int:
    from sds3d.api import slugify
    from sds3d.batch import read_prompts, run_batch
    from sds3d.config import DiffusersGuidanceConfig, check_config, preset
    from sds3d.devices import check_device

    prompts = read_prompts(args.prompts)
    config = preset(args.preset or "default")
    if args.steps is not None:
        config.steps = args.steps
    if args.device is not None:  # with --ray the GPUs are the workers' (each sees its own as cuda)
        ray_cuda = args.ray is not None and args.device.startswith("cuda")
        config.device = "cuda" if ray_cuda else check_device(args.device)
    compile = args.compile == "yes" or (args.compile == "auto" and config.device.startswith("cuda"))
    if compile and isinstance(config.guidance, DiffusersGuidanceConfig) and not config.guidance.compile:
        config.guidance = dataclasses.replace(config.guidance, compile=True, compile_mode="reduce-overhead")
    check_config(config)
    out = args.out or Path("outputs") / f"batch-{slugify(args.prompts.stem)}"
    if args.ray is not None:
        from sds3d.batch_ray import run_batch_ray

        items = run_batch_ray(config, prompts, list(range(args.seeds)), out, args.scenes, args.ray or None,
                              args.ray_workers)  # fmt: skip
    elif args.ray_workers is not None:
        raise UserError("--ray-workers goes with --ray")
    else:
        items = run_batch(
            config, prompts, list(range(args.seeds)), out, args.scenes, progress=not args.no_progress
        )
    done = sum(i.status == "done" for i in items)
    for item in items:
        if item.status == "failed":
            print(f"sds3d: failed: {item.prompt!r} seed {item.seed}: {item.error}", file=sys.stderr)
    print(f"sds3d: {done}/{len(items)} results in {out}/ (index.json, contact_sheet.png)")
    return 0 if done == len(items) else 1


def cmd_app(args: argparse.Namespace) -> int:
    from sds3d.app import Studio, serve

    if args.device is not None:
        from sds3d.devices import check_device

        check_device(args.device)
    serve(Studio(args.outputs, args.device), args.host, args.port)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from sds3d.bench import study

    return study.main(args.study_args)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _interrupted_while_importing(signum, frame):  # noqa: ARG001 (a signal handler's signature)
    print("sds3d: interrupted", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def _ctrl_c_quits_at_once():
    """While the parser imports torch, numpy and scipy nothing is written yet, so Ctrl-C quits at once.

    A KeyboardInterrupt raised inside a half-done `import numpy…` can leave numpy's lazy attributes
    recursing forever (a RecursionError and a traceback instead of "interrupted"); quitting from the
    signal handler never lets the import see the interrupt."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        yield
        return
    before = signal.signal(signal.SIGINT, _interrupted_while_importing)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def main(argv: list[str] | None = None) -> int:
    commands = {"generate": cmd_generate, "export": cmd_export, "render": cmd_render, "presets": cmd_presets, "rules": cmd_rules,
                "prior": cmd_prior, "bench": cmd_bench, "study": cmd_study, "batch": cmd_batch, "app": cmd_app}  # fmt: skip
    try:
        with _ctrl_c_quits_at_once():
            args = build_parser().parse_args(argv)
        return commands[args.command](args)
    except UserError as err:
        print(f"sds3d: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sds3d: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
