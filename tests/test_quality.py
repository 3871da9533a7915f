"""The 3D quality benchmark: its shape metric on exact meshes, and a short real run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import trimesh

from sds3d.cli import main
from sds3d.world.metrics import psnr, shape_ious


def test_shape_ious_find_a_turned_cube_and_a_sphere():
    box = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    box.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(30), [0, 0, 1]))
    ious = shape_ious(np.asarray(box.vertices), np.asarray(box.faces))
    assert max(ious, key=lambda k: ious[k]) == "cube" and ious["cube"] > 0.95  # 30° is in the 5° grid
    ball = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    ious = shape_ious(np.asarray(ball.vertices), np.asarray(ball.faces))
    assert max(ious, key=lambda k: ious[k]) == "sphere" and ious["sphere"] > 0.9


def test_psnr_of_known_errors():
    a = np.zeros((4, 4, 3))
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert psnr(a, a) == float("inf")


def test_quick_quality_run_scores_a_real_mesh(tmp_path):
    rc = main(["bench", "quality", "--quick", "--limit", "1", "--steps", "60", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    (row,) = report["results"]["full"]
    assert row["prompt"] == "a blue torus" and row["faces"] > 100
    assert 0.0 < row["iou"] <= 1.0 and 5.0 < row["psnr"] < 60.0
    assert row["shape"] in ("sphere", "cube", "cylinder", "cone", "torus") and row["seconds"] > 0
    assert report["summary"]["full"]["prompts"] == 1
    assert "| a blue torus |" in (tmp_path / "quality.md").read_text()


def test_quality_prompts_must_be_world_prompts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "quality", "--prompts", "a green cube, a red blob"])
    assert exit_info.value.code == 2
    assert "not world prompts: a red blob" in capsys.readouterr().err


def test_a_prompt_that_fails_is_scored_as_a_failure_and_the_benchmark_goes_on(tmp_path, monkeypatch):
    from sds3d.bench import quality
    from sds3d.config import preset
    from sds3d.export import EmptySceneError

    def empty(config, run_dir, **kwargs):
        raise EmptySceneError("the scene is empty")

    monkeypatch.setattr("sds3d.api.generate", empty)
    row = quality.run_prompt(preset("fast"), tmp_path / "run")
    assert row["failed"] == "the scene is empty" and not row["shape_ok"] and row["iou"] == 0.0
    assert quality.summarise([row])["shape_accuracy"] == 0.0


def test_quality_rule_must_be_known(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--rule", "nope", "--limit", "1"])
    assert "unknown rule 'nope'" in capsys.readouterr().err


def test_quality_model_and_camera_guidance_reach_every_run_and_the_report(tmp_path, monkeypatch):
    from sds3d.bench import quality

    seen = []

    def fake_run(config, workdir, rows=None):
        seen.append(config)
        return {"prompt": config.prompt, "held_out": False, "shape": "cube", "shape_ok": True, "color": "green",
                "color_ok": True, "iou": 0.5, "psnr": 20.0, "seconds": 1.0, "faces": 10}  # fmt: skip

    monkeypatch.setattr(quality, "run_prompt", fake_run)
    argv = ["bench", "quality", "--prompts", "a green cube,a red cone", "--model", "sds3d/world-prior-32",
            "--camera-guidance", "2.5", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert [c.guidance.model for c in seen] == ["sds3d/world-prior-32"] * 2  # not the preset's own
    assert [c.rule.camera_guidance_scale for c in seen] == [2.5, 2.5]
    report = json.loads((tmp_path / "quality.json").read_text())
    assert report["model"] == "sds3d/world-prior-32" and report["camera_guidance_scale"] == 2.5
    assert "camera guidance s_c = 2.5" in (tmp_path / "quality.md").read_text()


@pytest.mark.parametrize(
    "extra,needle",
    [(["--rule", "csd", "--camera-guidance", "2"], "camera guidance"),
     (["--camera-guidance", "-1"], "must be ≥ 0"),
     (["--preset", "empirical", "--model", "x"], "diffusers prior")],
)  # fmt: skip
def test_quality_bad_model_or_camera_guidance_is_one_line(capsys, extra, needle):
    try:
        rc = main(["bench", "quality", "--limit", "1", *extra])
    except SystemExit as exit_info:
        rc = exit_info.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
