"""Nothing lost, one line for every bad input: run folders under --overwrite, a second process,
corrupt checkpoints and configs, crafted pickles, bad paths, seeds and devices, Ctrl-C at start-up.

The table-driven test runs every bad input through the CLI and checks the contract: exit code 2,
one line on stderr, no traceback, and the run folder byte-for-byte as it was (its lock file aside).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sds3d import runs
from sds3d.cli import main
from sds3d.config import preset
from sds3d.train import train

PROMPT = "a green sphere"


def tiny_config(**overrides):
    """The built-in prior's fast preset at 8×8 with 8 samples: a few seconds a run."""
    config = preset("fast")
    config.camera.width = config.camera.height = 8
    config.renderer.num_samples = 8
    config.export = dataclasses.replace(
        config.export, grid_resolution=24, iso_view_resolution=16, turntable_frames=2, turntable_resolution=16,
        nerf_turntable_resolution=8, num_samples=16,
    )  # fmt: skip
    return dataclasses.replace(config, **{"prompt": PROMPT, "steps": 4, "checkpoint_every": 2,
                                          "validate_every": 0, **overrides})  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run folder with two checkpoints: last.pt (step 4) and prev.pt (step 2)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(), run, progress=False)
    return run


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the lock file aside) → its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != runs.LOCK
    }


def one_line_error(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("sds3d: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- breaking a run folder ------------------------------------------------------------------------
def _only_last(run: Path) -> None:  # a run whose one checkpoint is last.pt: nothing to fall back to
    for name in ("prev.pt", "prev.pt.sha256"):
        (run / "checkpoints" / name).unlink()


def _last(run: Path) -> Path:
    return run / runs.CHECKPOINT


def _rewrite_with_checksum(run: Path, obj) -> None:
    """A file that passes the checksum (as if written by sds3d) but holds `obj`."""
    torch.save(obj, _last(run))
    digest = hashlib.sha256(_last(run).read_bytes()).hexdigest()
    (run / "checkpoints" / "last.pt.sha256").write_text(digest + "\n")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.target}",))

    target = "/nonexistent"


def _crafted_pickle(run: Path) -> None:
    import pickle

    _Evil.target = str(run.parent / "PWNED")
    _last(run).write_bytes(pickle.dumps({"scene": _Evil(), "optimizer": {}, "step": 1, "rng": None}))
    (run / "checkpoints" / "last.pt.sha256").unlink()  # no sidecars at all: a pre-checksum run
    (run / "checkpoints" / "prev.pt.sha256").unlink()
    (run / "checkpoints" / "prev.pt").unlink()


def _config(run: Path, edit) -> None:
    path = run / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _truncate(fraction: float):
    def breaker(run: Path) -> None:
        _only_last(run)
        data = _last(run).read_bytes()
        _last(run).write_bytes(data[: int(len(data) * fraction)])

    return breaker


def _garble(offset: str, size: int):
    def breaker(run: Path) -> None:
        _only_last(run)
        data = bytearray(_last(run).read_bytes())
        start = 0 if offset == "header" else len(data) // 2
        data[start : start + size] = os.urandom(size)
        _last(run).write_bytes(bytes(data))

    return breaker


RUN_BREAKERS = {
    "last.pt empty": (_truncate(0.0), "corrupt"),
    "last.pt cut in half": (_truncate(0.5), "corrupt"),
    "last.pt header garbled": (_garble("header", 64), "corrupt"),
    "last.pt 4 KB garbled": (_garble("middle", 4096), "corrupt"),
    "valid .pt, wrong keys": (
        lambda r: (_only_last(r), _rewrite_with_checksum(r, {"weights": 1})),
        "expected keys",
    ),
    "crafted pickle": (_crafted_pickle, "refusing"),
    "both checkpoints corrupt": (
        lambda r: [p.write_bytes(b"x" * 100) for p in (_last(r), r / runs.PREVIOUS)],
        "prev.pt is no better",
    ),
    "config.json not JSON": (lambda r: (r / "config.json").write_text("steps: 4\n"), "not valid JSON"),
    "config.json cut in half": (
        lambda r: (r / "config.json").write_text((r / "config.json").read_text()[:300]),
        "not valid JSON",
    ),
    "config.json wrong type": (
        lambda r: _config(r, lambda d: d.update(steps="many")),
        "steps must be a whole",
    ),
    "config.json nested wrong type": (
        lambda r: _config(r, lambda d: d["nerf"]["grid"].update(num_levels=[4])),
        "num_levels must be a whole",
    ),
    "config.json unknown field": (lambda r: _config(r, lambda d: d.update(stpes=4)), "unknown field 'stpes'"),
    "config.json shapes do not match": (
        lambda r: _config(r, lambda d: d["nerf"]["grid"].update(num_levels=4)),
        "does not match",
    ),
}


@pytest.mark.parametrize("command", ["resume", "export", "render"])
@pytest.mark.parametrize("case", list(RUN_BREAKERS))
def test_a_broken_run_is_one_line_exit_2_and_left_as_it_was(run, capsys, command, case):
    breaker, needle = RUN_BREAKERS[case]
    breaker(run)
    before = snapshot(run)
    argv = {
        "resume": ["generate", PROMPT, "--out", run, "--resume", "--steps", 6, "--no-progress"],
        "export": ["export", run],
        "render": ["render", run],
    }[command]
    assert needle in one_line_error(capsys, argv)
    assert snapshot(run) == before
    assert not (run.parent / "PWNED").exists()  # the crafted pickle's code never ran


def _pickle_weights_model(root: Path) -> Path:
    from conftest import build_tiny_pixel_pipeline

    model = build_tiny_pixel_pipeline(root / "pickled")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    shutil.rmtree(model / "unet")
    unet.save_pretrained(model / "unet", safe_serialization=False)
    assert (model / "unet" / "diffusion_pytorch_model.bin").is_file()
    return model


def _index_naming(root: Path, library: str, cls: str) -> Path:
    from conftest import build_tiny_pixel_pipeline

    model = build_tiny_pixel_pipeline(root / f"index-{library}-{cls}")
    index = json.loads((model / "model_index.json").read_text())
    index["tokenizer"] = [library, cls]
    (model / "model_index.json").write_text(json.dumps(index))
    return model


GENERATE_CASES = {
    "--out is a file": (lambda t: ["--out", t / "afile"], "is a file"),
    "--out under a file": (lambda t: ["--out", t / "afile" / "run"], "afile is a file"),
    "--out cannot be created": (lambda t: ["--out", "/proc/sds3d-test/run"], "cannot create"),
    "--seed negative": (lambda t: ["--seed", "-1"], "argument --seed: must be in 0…2^64−1"),
    "--seed 2^64": (lambda t: ["--seed", str(2**64)], "argument --seed: must be in 0…2^64−1"),
    "--device tpu": (lambda t: ["--device", "tpu"], "unknown device 'tpu'"),
    "--device cuda:7": (lambda t: ["--device", "cuda:7"], "cuda:7"),
    "--model with pickle weights": (
        lambda t: ["--model", _pickle_weights_model(t), "--out", t / "r"],
        "only safetensors",
    ),
    "model_index naming os.system": (
        lambda t: ["--model", _index_naming(t, "os", "system"), "--out", t / "r"],
        "only classes of diffusers and transformers",
    ),
    "model_index naming a function": (
        lambda t: ["--model", _index_naming(t, "transformers", "pipeline"), "--out", t / "r"],
        "not a model, tokenizer or scheduler class",
    ),
    "--config and --preset": (lambda t: ["--config", t / "afile", "--preset", "fast"], "cannot be combined"),
    "--config not JSON": (lambda t: ["--config", t / "afile"], "not valid JSON"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_bad_generate_arguments_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, case):
    (tmp_path / "afile").write_text("not a folder")
    if case == "--device cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    args, needle = GENERATE_CASES[case]
    extra = args(tmp_path)
    capsys.readouterr()  # what building a test model printed
    before = snapshot(tmp_path)
    assert needle in one_line_error(capsys, ["generate", PROMPT, "--steps", 2, "--no-progress", *extra])
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(("pickled", "index-"))} == {
        k: v for k, v in before.items() if not k.startswith(("pickled", "index-"))
    }
    assert not (tmp_path / "r").exists()


def test_cuda_without_cuda_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    assert "cannot use CUDA" in one_line_error(capsys, ["generate", PROMPT, "--device", "cuda"])


# --- --overwrite ----------------------------------------------------------------------------------
def test_overwrite_never_deletes_a_folder_sds3d_did_not_make(tmp_path, capsys):
    """The reported loss: a folder with config.json, precious.txt and src/main.js was removed, and
    then the run failed on an unknown word."""
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "precious.txt").write_text("keep me")
    (folder / "src" / "main.js").write_text("console.log(1)")
    before = snapshot(folder)
    for prompt in ("a purple dragon", PROMPT):  # an unknown word, then a valid prompt
        err = one_line_error(capsys, ["generate", prompt, "--out", folder, "--overwrite", "--steps", 2])
        assert "not an sds3d run folder" in err and snapshot(folder) == before


def test_overwrite_checks_the_prompt_before_it_removes_anything(run, capsys):
    before = snapshot(run)
    err = one_line_error(capsys, ["generate", "a purple dragon", "--out", run, "--overwrite", "--steps", 2])
    assert "dragon" in err and snapshot(run) == before


def test_overwrite_replaces_what_sds3d_wrote_and_keeps_the_rest(run, capsys):
    (run / "notes.txt").write_text("mine")
    (run / "render-albedo").mkdir()
    (run / "render-albedo" / "turntable.gif").write_bytes(b"old")
    old_digest = (run / "checkpoints" / "last.pt.sha256").read_text()
    train(tiny_config(seed=7, steps=2), run, progress=False, overwrite=True)
    assert "kept 1 file(s)" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine" and not (run / "render-albedo").exists()
    assert json.loads((run / "config.json").read_text())["seed"] == 7
    assert not (run / runs.PREVIOUS).exists()  # the old run's checkpoints are gone, not rotated
    assert (run / "checkpoints" / "last.pt.sha256").read_text() != old_digest


# --- the lock -------------------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys, time
    from sds3d import runs
    with runs.locked(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_a_second_process_is_refused_while_the_first_holds_the_run(run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        for argv in (
            ["generate", PROMPT, "--out", run, "--resume", "--steps", 6],
            ["generate", PROMPT, "--out", run, "--overwrite", "--steps", 2],
            ["export", run],
            ["render", run],
        ):
            err = one_line_error(capsys, argv)
            assert f"in use by another sds3d process (pid {holder.pid})" in err
        assert snapshot(run) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    with runs.locked(run):  # and the run is free again: no stale lock
        pass


def test_the_lock_is_reentrant_in_one_process_and_released_after(run):
    with runs.locked(run), runs.locked(run):
        pass
    probe = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(60)", "pass"), str(run)],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "locked"


# --- checkpoints ----------------------------------------------------------------------------------
def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one_with_a_warning(run, capsys):
    data = bytearray(_last(run).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)  # 4 KB garbled in the middle
    _last(run).write_bytes(bytes(data))
    loaded = runs.load_checkpoint(run)
    err = capsys.readouterr().err.strip()
    assert loaded.path.name == "prev.pt" and int(loaded.state["step"]) == 2
    assert err.startswith("sds3d: warning: ") and "\n" not in err and "corrupt" in err and "step 2" in err
    # and a resumed run goes on from step 2 to the end
    out = train(tiny_config(), run, resume=True, progress=False)
    assert out.steps_done == 4 and runs.load_checkpoint(run).path.name == "last.pt"


def test_a_checkpoint_changed_after_it_was_written_fails_its_checksum(run, capsys):
    """Well-formed, finite, and not what sds3d wrote: only the checksum can tell."""
    state = torch.load(_last(run), weights_only=True)
    state["scene"]["nerf.encoding.tables"] += 1.0
    torch.save(state, _last(run))
    loaded = runs.load_checkpoint(run)
    assert loaded.path.name == "prev.pt" and "SHA-256" in capsys.readouterr().err


def test_every_moment_of_the_checkpoint_rotation_leaves_a_verified_checkpoint(tmp_path, monkeypatch):
    """A crash (here: os.replace failing) after any number of the rotation's renames leaves a
    checkpoint that loads and passes its checksum: the new one or the one before."""
    real_replace = os.replace
    for crash_after in range(4):  # save_checkpoint renames four times
        folder = tmp_path / f"crash{crash_after}"
        folder.mkdir()
        state = lambda step: {"scene": {"w": torch.full((3,), float(step))}, "optimizer": {}, "step": step,
                              "rng": torch.Generator().get_state()}  # fmt: skip
        runs.save_checkpoint(folder, state(1))
        runs.save_checkpoint(folder, state(2))
        calls = []

        def crashing_replace(src, dst, calls=calls, n=crash_after):
            if len(calls) == n:
                raise KeyboardInterrupt("killed")
            calls.append(dst)
            return real_replace(src, dst)

        monkeypatch.setattr(runs.os, "replace", crashing_replace)
        with pytest.raises(KeyboardInterrupt):
            runs.save_checkpoint(folder, state(3))
        monkeypatch.setattr(runs.os, "replace", real_replace)
        step = int(runs.load_checkpoint(folder, quiet=True).state["step"])
        assert step in (2, 3), crash_after
    runs.save_checkpoint(folder, state(4))  # no crash: the newest, and the one before kept
    assert int(runs.load_checkpoint(folder).state["step"]) == 4
    assert int(torch.load(folder / runs.PREVIOUS, weights_only=True)["step"]) in (2, 3)


def test_checkpoints_from_before_checksums_still_load(run):
    for name in ("last.pt.sha256", "prev.pt.sha256"):
        (run / "checkpoints" / name).unlink()
    assert int(runs.load_checkpoint(run).state["step"]) == 4


def test_a_checkpoint_with_nan_values_is_refused_even_without_checksums(run, capsys):
    """Damage a checksum cannot see (a run from before checksums): NaN in Adam's state."""
    for name in ("last.pt.sha256", "prev.pt.sha256"):
        (run / "checkpoints" / name).unlink()
    state = torch.load(_last(run), weights_only=True)
    next(iter(state["optimizer"]["state"].values()))["exp_avg"].view(-1)[0] = float("nan")
    torch.save(state, _last(run))
    loaded = runs.load_checkpoint(run)
    assert loaded.path.name == "prev.pt" and "NaN" in capsys.readouterr().err


def test_a_changed_learning_rate_in_config_json_is_used_and_said(trained_run, tmp_path, capsys):
    """Adam's state dict carries its learning rates; before, they silently won over config.json."""
    same, changed = tmp_path / "same", tmp_path / "changed"
    for folder in (same, changed):
        shutil.copytree(trained_run, folder)
        _config(folder, lambda d: d.update(steps=6))
    _config(changed, lambda d: d["optim"].update(lr_grid=0.05))
    capsys.readouterr()
    train(runs_config(same), same, resume=True, progress=False)
    assert "lr" not in capsys.readouterr().err
    train(runs_config(changed), changed, resume=True, progress=False)
    assert "optimiser lr 0.01 -> 0.05 (changed in config.json)" in capsys.readouterr().err
    a = torch.load(same / runs.CHECKPOINT, weights_only=True)
    b = torch.load(changed / runs.CHECKPOINT, weights_only=True)
    assert b["optimizer"]["param_groups"][0]["lr"] == 0.05
    assert not torch.equal(a["scene"]["nerf.encoding.tables"], b["scene"]["nerf.encoding.tables"])


def runs_config(folder: Path):
    from sds3d.config import load_config

    return load_config(folder / "config.json")


# --- Ctrl-C at start-up ---------------------------------------------------------------------------
INTERRUPT_WHILE_LOADING = textwrap.dedent(
    """
    import os, signal, sys
    import sds3d.guidance.diffusers_prior as prior
    real = prior.load_pipeline_components
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the prior loads
        return real(*args, **kwargs)
    prior.load_pipeline_components = interrupted
    from sds3d.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_ctrl_c_while_the_prior_loads_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPT_WHILE_LOADING, "generate", PROMPT, "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "sds3d: interrupted" and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("after_s", [0.5, 2.0])  # in torch's import; in numpy's and scipy's
def test_ctrl_c_during_imports_is_one_line(tmp_path, after_s):
    exe = Path(sys.executable).parent / "sds3d"
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [str(exe), "generate", PROMPT, "--out", str(out)], stderr=subprocess.PIPE, text=True
    )
    time.sleep(after_s)  # the parser's imports (torch, numpy, scipy) take about 5 s
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and err.strip() == "sds3d: interrupted", err
    assert not out.exists()


# --- re-running a run -----------------------------------------------------------------------------
def test_generate_config_reruns_a_runs_config_in_a_new_folder(trained_run, tmp_path, capsys):
    new = tmp_path / "again"
    argv = ["generate", "--config", trained_run / "config.json", "--out", new, "--seed", 5, "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    old_config = json.loads((trained_run / "config.json").read_text())
    new_config = json.loads((new / "config.json").read_text())
    assert new_config == {**old_config, "seed": 5}
    summary = json.loads((new / "summary.json").read_text())
    assert summary["seed"] == 5 and (new / "mesh.glb").is_file() and (new / "mesh.mtl").is_file()
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode == 0:  # run from a checkout: the commit is recorded
        assert summary["versions"]["git_commit"] == head.stdout.strip()


def test_resuming_to_fewer_steps_than_the_checkpoint_is_one_line(run, capsys):
    before = snapshot(run)
    err = one_line_error(
        capsys, ["generate", PROMPT, "--out", run, "--resume", "--steps", 3, "--no-progress"]
    )
    assert "already at step 4" in err and snapshot(run) == before


@pytest.mark.parametrize(
    "extra,needle",
    [(["--out", "{afile}"], "is a file"), (["--out", "{tmp}/p", "--device", "tpu"], "unknown device 'tpu'")],
)
def test_bad_prior_train_arguments_are_one_line(tmp_path, capsys, extra, needle):
    (tmp_path / "afile").write_text("not a folder")
    argv = ["prior", "train", *[a.format(afile=tmp_path / "afile", tmp=tmp_path) for a in extra]]
    assert needle in one_line_error(capsys, argv)
    assert not (tmp_path / "p").exists()


def test_ctrl_c_quits_at_once_while_the_parser_imports_and_not_after(monkeypatch):
    from sds3d import cli

    seen = {}
    real = cli.build_parser

    def spy():
        seen["while"] = signal.getsignal(signal.SIGINT)
        return real()

    monkeypatch.setattr(cli, "build_parser", spy)
    monkeypatch.setattr(
        cli, "cmd_presets", lambda args: seen.setdefault("after", signal.getsignal(signal.SIGINT)) and 0
    )
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["presets"]) == 0
    assert seen["while"] is cli._interrupted_while_importing  # a half-done import never sees the interrupt
    # after the parser: the run's own Ctrl-C handling (a checkpoint at the next step)
    assert seen["after"] is before and signal.getsignal(signal.SIGINT) is before
