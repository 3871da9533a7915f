"""The command line: every bad input is one line on stderr and exit code 2; a real run writes
what it promises; the README's Python example runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sds3d.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sds3d: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "   "], "prompt is empty"),
        (["generate", "a " * 200], "limit is 300"),
        (["generate", "a red cube", "--preset", "nope"], "unknown preset 'nope'"),
        (["generate", "a red cube", "--prior", "nope"], "unknown prior 'nope'"),
        (["generate", "a red cube", "--steps", "0"], "must be positive"),
        (["generate", "a red cube", "--steps", "-3"], "must be positive"),
        (["generate", "a red cube", "--steps", "many"], "whole number"),
        (["generate", "a red cube", "--resume"], "--resume needs --out"),
        (["generate", "a red cube", "--latent-warmup", "-1"], "--latent-warmup must be 0 or more"),
        (["export", "/nonexistent/run"], "not an sds3d run folder"),
        (["render", "/nonexistent/run"], "not an sds3d run folder"),
        (["bogus"], "invalid choice"),
        (["prior", "train"], "--out"),
        (["prior", "train", "--out", "x", "--steps", "0"], "must be positive"),
        (
            ["generate", "a red cube", "--model", "/nonexistent/model"],
            "model folder '/nonexistent/model' does not exist",
        ),
        (["generate", "a red cube", "--preset", "empirical", "--prior", "diffusers"], "needs --model"),
        (
            ["generate", "a red cube", "--prior", "gaussian", "--model", "x"],
            "--model is for the diffusers prior",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, needle):
    assert needle in _one_line_error(capsys, argv)


def test_existing_output_folder_needs_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "something.txt").write_text("keep me")
    err = _one_line_error(capsys, ["generate", "a red cube", "--out", str(tmp_path)])
    assert "--resume" in err and "--overwrite" in err
    err = _one_line_error(capsys, ["generate", "a red cube", "--out", str(tmp_path), "--overwrite"])
    assert "not an sds3d run folder" in err and (tmp_path / "something.txt").exists()


def test_unknown_prompt_for_the_builtin_prior_is_a_user_error(tmp_path, capsys):
    err = _one_line_error(
        capsys,
        ["generate", "a photo of a dog", "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress"],
    )
    assert "synthetic-world" in err


def test_diverging_run_exits_2_and_says_which_checkpoint_is_kept(tmp_path, capsys, monkeypatch):
    import sds3d.train as train_mod

    real_train = train_mod.train

    def poisoned(*args, **kwargs):
        def poison(step, scene):
            if step == 2:
                import torch

                with torch.no_grad():
                    scene.nerf.mlp[0].weight.fill_(float("nan"))

        return real_train(*args, **{**kwargs, "on_step": poison})

    monkeypatch.setattr("sds3d.api.train", poisoned)
    run = tmp_path / "run"
    err = _one_line_error(
        capsys,
        ["generate", "a red cube", "--preset", "fast", "--steps", "4", "--out", str(run), "--no-progress"],
    )
    assert "diverged" in err and "no checkpoint was written yet" in err


def test_generate_writes_mesh_turntable_summary_and_resume_extends(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "generate",
        "a blue sphere",
        "--preset",
        "fast",
        "--steps",
        "30",
        "--seed",
        "3",
        "--out",
        str(run),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(run) in out
    for name in ("mesh.glb", "mesh.ply", "mesh.obj", "turntable.gif", "summary.json", "config.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["prompt"] == "a blue sphere" and summary["steps"] == 30 and summary["seed"] == 3
    assert summary["preset"] == "fast" and summary["it_per_s"] > 0 and summary["mesh"]["faces"] > 0
    assert {"torch", "sds3d", "diffusers", "python"} <= set(summary["versions"])
    assert json.loads((run / "config.json").read_text())["prompt"] == "a blue sphere"
    assert (
        main(["generate", "a blue sphere", "--out", str(run), "--resume", "--steps", "40", "--no-progress"])
        == 0
    )
    assert json.loads((run / "summary.json").read_text())["steps"] == 40
    err = _one_line_error(capsys, ["generate", "a red cube", "--out", str(run), "--resume"])
    assert "a run for 'a blue sphere'" in err
    assert main(["render", str(run), "--shading", "lambertian"]) == 0
    assert (run / "render-lambertian" / "turntable.gif").is_file()


def test_console_script_lists_presets():
    exe = Path(sys.executable).parent / "sds3d"
    result = subprocess.run([str(exe), "presets"], capture_output=True, text=True, check=True)
    assert re.search(r"^default\s+diffusers\s+800 steps\s+sds3d's learned prior", result.stdout, re.M)
    assert re.search(r"^empirical\s+empirical\s+400 steps", result.stdout, re.M)
    assert re.search(r"^dreamfusion-sd\s+diffusers\s+10000 steps", result.stdout, re.M)
    help_text = subprocess.run(
        [str(exe), "generate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"learned\s+prior", help_text)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python API example, run as written (in a temporary folder)."""
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.files["glb"].is_file() and not result.train.interrupted
