"""`sds3d study` (bench/study.py): specs, settings → configs, cells shared and resumed, the
statistics of the report, and one line + exit 2 for every bad spec."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from sds3d.bench import study
from sds3d.cli import main
from sds3d.config import preset
from sds3d.errors import UserError


def _spec(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


SMALL = """
name = "small"
seeds = 2
prompts = ["a red cube", "a blue torus"]
[base]
steps = 2
"export.grid_resolution" = 24
"export.iso_candidates" = 4
[axes]
cfg = [3.0, 7.5]
"""


# --- specs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, words",
    [
        ("name = 'x'\n[axes]\nweighting = ['nope']\n", "rule.weighting"),
        ("name = 'x'\n[axes]\ncfg = ['high']\n", "guidance_scale"),
        ("name = 'x'\n[axes]\nshading = ['glossy']\n", "unknown shading 'glossy'"),
        ("name = 'x'\n[axes]\nrule = ['magic']\n", "unknown rule 'magic'"),
        ("name = 'x'\n[axes]\n'renderer.nope' = [1]\n", "no 'nope'"),
        ("name = 'x'\n[axes]\ncfg = []\n", "non-empty list"),
        ("name = 'x'\nprompts = ['a teapot']\n", "not world prompts"),
        ("name = 'x'\nprompts = 'some'\n", "one of study, quick, all"),
        ("name = 'x'\nseeds = 'three'\n", "seeds"),
        ("name = 'x'\nsteps = 3\n", "unknown setting(s) steps"),
        ("name = '../x'\n", "`name` must be letters"),
        ("name = 'x'\n[axes\n", "not valid TOML"),
    ],
)
def test_bad_specs_are_one_line(tmp_path, text, words):
    with pytest.raises(UserError, match=None) as err:
        study.load_spec(_spec(tmp_path, text))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_bad_spec_exits_2_and_runs_nothing(tmp_path, capsys):
    path = _spec(tmp_path, "{ not json", "s.json")
    assert main(["study", str(path), "--dir", str(tmp_path / "cells")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["study", str(tmp_path / "missing.toml")]) == 2
    assert not (tmp_path / "cells").exists()


def test_named_prompt_sets_and_seed_count(tmp_path):
    spec = study.load_spec(_spec(tmp_path, "name = 'x'\nseeds = 4\nprompts = 'study'\n"))
    assert spec.seeds == [0, 1, 2, 3]
    assert len(spec.prompts) == 10 and sum(p in study.HELD_OUT for p in spec.prompts) == 5
    shapes = sorted(study.parse_prompt(p).shape for p in spec.prompts)  # type: ignore[union-attr]
    assert shapes == sorted(["cone", "cube", "cylinder", "sphere", "torus"] * 2)
    assert len(study.load_spec(_spec(tmp_path, "name = 'x'\nprompts = 'all'\n")).prompts) == 30


# --- settings → configs ---------------------------------------------------------------------------
def test_each_axis_sets_its_field():
    base = preset("default")
    assert study.apply_setting(base, "weighting", "uniform").rule.weighting == "uniform"
    assert study.apply_setting(base, "t_schedule", "dreamtime").rule.t_schedule == "dreamtime"
    assert study.apply_setting(base, "cfg", 7.5).rule.guidance_scale == 7.5
    assert study.apply_setting(base, "steps", 123).steps == 123
    assert study.apply_setting(base, "prior", "runs/p").guidance.model == "runs/p"  # type: ignore[union-attr]
    assert study.apply_setting(base, "rule.t_max_end", 0.5).rule.t_max_end == 0.5
    lit = study.apply_setting(base, "shading", "lambertian").renderer
    assert (lit.albedo_prob, lit.textureless_prob, lit.light_jitter) == (0.0, 0.0, 0.0)
    mix = study.apply_setting(base, "shading", "textureless-mix").renderer
    assert (mix.albedo_prob, mix.textureless_prob, mix.light_jitter) == (0.2, 0.5, 1.0)
    ism = study.apply_setting(base, "rule", "ism").rule
    assert ism.kind == "ism" and ism.guidance_scale == base.rule.guidance_scale
    # the base is not changed in place
    assert base.rule.weighting == "dreamfusion" and base.renderer.albedo_prob == 1.0


def test_one_axis_at_a_time_and_cross(tmp_path):
    one = study.load_spec(
        _spec(tmp_path, "name='x'\n[axes]\ncfg=[5.0, 20.0]\nweighting=['seed','uniform']\n")
    )
    pts = study.points(one)
    assert [p for p, _ in pts] == [(), (("cfg", 5.0),), (("cfg", 20.0),), (("weighting", "seed"),),
                                   (("weighting", "uniform"),)]  # fmt: skip
    assert pts[1][1].rule.guidance_scale == 5.0 and pts[1][1].rule.weighting == "dreamfusion"
    cross = study.load_spec(
        _spec(tmp_path, "name='x'\ncross=true\n[axes]\ncfg=[5.0, 20.0]\nweighting=['seed','uniform']\n")
    )
    pts = study.points(cross)
    assert len(pts) == 4  # 2 × 2 (the base is a cell of the cross when its values are on the axes)
    assert {(c.rule.guidance_scale, c.rule.weighting) for _, c in pts} == {
        (5.0, "seed"), (5.0, "uniform"), (20.0, "seed"), (20.0, "uniform")}  # fmt: skip


def test_cells_share_settings_and_go_seed_by_seed(tmp_path):
    spec = study.load_spec(_spec(tmp_path, SMALL))
    cells = study.cells(spec, "cpu")
    assert len(cells) == 3 * 2 * 2  # (base, 3, 7.5) × 2 seeds × 2 prompts
    # s = 3 is the preset's own: the same cells as the base; 7.5 is not
    keys = {c.point: {x.key for x in cells if x.point == c.point} for c in cells}
    assert keys[()] == keys[(("cfg", 3.0),)] and keys[()].isdisjoint(keys[(("cfg", 7.5),)])
    assert [c.seed for c in cells] == [0] * 6 + [1] * 6
    config = json.loads(cells[-1].config_json)
    assert (config["seed"], config["steps"], config["export"]["grid_resolution"]) == (1, 2, 24)
    # where a cell runs is not part of what it is
    assert [c.key for c in study.cells(spec, "cuda")] == [c.key for c in cells]


def test_the_committed_cells_keep_their_keys():
    """A cell's file name is its config's hash: a new config field must not orphan the committed
    cells (benchmarks/study_*.json). The key of the rules study's base was measured before the
    Gaussians existed; their section and `representation = "nerf"` stay out of it."""
    base = study.points(study.load_spec(Path("studies/rules.toml")))[0][1]
    assert study.config_key(base) == "71dc6ae95b4e3a3c"
    gaussians = dataclasses.replace(base, representation="gaussians")
    assert study.config_key(gaussians) != study.config_key(base)
    guided = dataclasses.replace(base, rule=dataclasses.replace(base.rule, camera_guidance_scale=5.0))
    assert study.config_key(guided) != study.config_key(base)  # a later field counts once it is set
    # the Gaussians' own settings count only when Gaussians train
    other = dataclasses.replace(base.gaussians, num_init=7)
    assert study.config_key(dataclasses.replace(base, gaussians=other)) == study.config_key(base)
    assert study.config_key(dataclasses.replace(gaussians, gaussians=other)) != study.config_key(gaussians)


# --- statistics -----------------------------------------------------------------------------------
def _row(seed, prompt, shape_ok, iou, true_shape="cube"):
    return {"seed": seed, "prompt": prompt, "shape_ok": shape_ok, "color_ok": True, "iou": iou, "psnr": 20.0,
            "true_shape": true_shape, "seconds": 1.0, "device": "cpu"}  # fmt: skip


def test_mean_and_spread_are_over_seeds_of_prompt_means():
    rows = [_row(0, "a", True, 0.4), _row(0, "b", False, 0.6, "torus"),  # seed 0: IoU 0.5, shape 50%
            _row(1, "a", True, 0.8), _row(1, "b", True, 0.6, "torus")]  # seed 1: IoU 0.7, shape 100%  # fmt: skip
    s = study.summarise_point(rows, [0, 1])
    assert s["iou"] == pytest.approx(0.6) and s["iou_sd"] == pytest.approx(math.sqrt(0.02), abs=1e-4)
    assert s["shape_accuracy"] == pytest.approx(0.75) and s["shape_accuracy_sd"] == pytest.approx(
        0.3536, abs=1e-4
    )
    assert s["shape_failures"] == {"cube": "0/2", "torus": "1/2"}
    assert study.summarise_point(rows[:2], [0, 1])["iou_sd"] is None  # one seed: no spread
    # a seed cut short (one of its two prompts) does not count beside a whole one
    cut = study.summarise_point(rows[:3], [0, 1], prompts=2)
    assert cut["iou"] == pytest.approx(0.5) and (cut["seeds"], cut["complete_seeds"]) == (1, 1)
    assert study.summarise_point(rows[:3], [0, 1])["iou"] == pytest.approx(0.65)


def test_conclusions_call_a_difference_only_beyond_the_spread():
    a = {"iou": 0.80, "iou_sd": 0.01, "shape_accuracy": 1.0}
    b = {"iou": 0.70, "iou_sd": 0.02, "shape_accuracy": 0.9}
    clear = study.conclusions("cfg", [(5, b), (20, a)])
    assert "cfg = 20" in clear[0] and "more than twice" in clear[0] and "≥ 95%: 20;" in clear[1]
    close = study.conclusions("cfg", [(5, {**b, "iou_sd": 0.06}), (20, a)])
    assert "not a clear difference" in close[0]
    # an unfinished setting (a few cells, no whole seed) is not compared with finished ones
    whole = {"complete_seeds": 3}
    partial = study.conclusions("cfg", [(5, {**b, **whole}), (20, {**a, **whole}), (50, {"iou": 0.95, "iou_sd": None,
                                "shape_accuracy": 1.0, "complete_seeds": 0})])  # fmt: skip
    assert "cfg = 20" in partial[0] and "Not compared" in partial[-1] and "50" in partial[-1]
    assert "Too few" in study.conclusions("cfg", [(5, {**b, **whole}), (50, {**a, "complete_seeds": 1})])[0]


def test_prior_accuracy_pools_seen_and_held_out(tmp_path):
    path = tmp_path / "pa.json"
    path.write_text(json.dumps({"rows": [{"samples": 100, "shape_accuracy": 0.9},
                                         {"samples": 20, "shape_accuracy": 0.6}]}))  # fmt: skip
    assert study.prior_accuracy_of(str(path)) == pytest.approx(0.85)
    assert study.prior_accuracy_of(str(tmp_path / "none.json")) is None


# --- running --------------------------------------------------------------------------------------
def test_study_runs_resumes_and_reports(tmp_path, monkeypatch, capsys):
    spec = _spec(tmp_path, SMALL.replace("seeds = 2", "seeds = 1"))
    cells_dir, out = tmp_path / "cells", tmp_path / "out"
    seen: list[tuple[float, int, str]] = []
    real_call = study.CellRunner.__call__

    def counting(self, cell):
        config = json.loads(cell.config_json)
        seen.append((config["rule"]["guidance_scale"], config["seed"], config["prompt"]))
        return real_call(self, cell)

    monkeypatch.setattr(study.CellRunner, "__call__", counting)
    argv = ["study", str(spec), "--dir", str(cells_dir), "--out", str(out)]
    assert main([*argv, "--limit", "1"]) == 0  # stopped after one cell …
    assert "0 of 4 cells done, running 1" in capsys.readouterr().out
    assert len(seen) == 1 and len(list((cells_dir / "cells").glob("*.json"))) == 1
    assert main(argv) == 0  # … resumed: the other three, not the first again
    assert len(seen) == 4 and len(set(seen)) == 4
    assert {s for s, _, _ in seen} == {3.0, 7.5}
    report = json.loads((out / "study_small.json").read_text())
    assert report["cells_done"] == report["cells_total"] == 4
    assert report["points"]["cfg=7.5"]["cells"] == 2 and report["points"]["cfg=3.0"]["cells"] == 2
    cell = report["cells"][0]
    assert {"shape", "iou", "psnr", "seconds", "train_seconds"} <= set(cell) and 0.0 <= cell["iou"] <= 1.0
    md = (out / "study_small.md").read_text()
    assert "| 7.5 | 2 | 1 |" in md and "What the numbers show" in md
    assert (out / "study_small_cfg.png").stat().st_size > 1000
    assert main(argv) == 0 and len(seen) == 4  # nothing left to run
    # a failed cell (its file says so) runs again
    path = next((cells_dir / "cells").glob("*.json"))
    path.write_text(json.dumps({"key": path.stem, "error": "RuntimeError: boom"}))
    assert main(argv) == 0 and len(seen) == 5


def test_a_fresh_cells_folder_goes_on_from_the_committed_report(tmp_path, monkeypatch, capsys):
    spec = _spec(tmp_path, SMALL.replace("seeds = 2", "seeds = 1"))
    out = tmp_path / "out"
    ran: list[str] = []

    def fake_run(todo, cells_dir, *a, **k):
        for c in todo:
            ran.append(c.key)
            row = {"key": c.key, "point": [list(p) for p in c.point], "seed": c.seed, "prompt": c.prompt,
                   "true_shape": "cube", "shape": "cube", "shape_ok": True, "color": "red", "color_ok": True,
                   "iou": 0.5, "psnr": 20.0, "faces": 10, "seconds": 1.0, "train_seconds": 1.0}  # fmt: skip
            (cells_dir / f"{c.key}.json").write_text(json.dumps(row))

    monkeypatch.setattr(study, "run_cells", fake_run)
    first = ["study", str(spec), "--dir", str(tmp_path / "a"), "--out", str(out), "--no-plots"]
    assert main([*first, "--limit", "3"]) == 0 and len(ran) == 3
    report = json.loads((out / "study_small.json").read_text())
    assert report["cells_done"] == 3
    # the report names a cell that a bug stopped: it is not taken, and runs again
    report["cells"].append({"key": "0123456789abcdef-s0-bad", "error": "RuntimeError: boom"})
    (out / "study_small.json").write_text(json.dumps(report))
    fresh = ["study", str(spec), "--dir", str(tmp_path / "b"), "--out", str(out), "--no-plots"]
    assert main([*fresh, "--from-reports"]) == 0
    assert "took 3 cells from the reports" in capsys.readouterr().out
    assert len(ran) == 4 and len(set(ran)) == 4  # only the missing cell ran
    assert json.loads((out / "study_small.json").read_text())["cells_done"] == 4
    assert not (tmp_path / "b" / "cells" / "0123456789abcdef-s0-bad.json").exists()
    # a cell already in the folder is kept over the report's record
    kept = tmp_path / "b" / "cells" / f"{ran[0]}.json"
    kept.write_text(kept.read_text().replace('"iou": 0.5', '"iou": 0.75'))
    assert main([*fresh, "--from-reports"]) == 0 and len(ran) == 4
    assert '"iou": 0.75' in kept.read_text()
    (out / "study_small.json").write_text("{not json")
    assert main([*fresh, "--from-reports"]) == 2
    assert "not a study report" in capsys.readouterr().err


def test_quick_is_seed_0_and_one_prompt_per_shape(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(study, "run_cells", lambda todo, *a, **k: seen.extend(todo))
    spec = _spec(tmp_path, SMALL)
    assert (
        main(
            [
                "study",
                str(spec),
                "--quick",
                "--dir",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path),
                "--no-plots",
            ]
        )
        == 0
    )
    assert {c.seed for c in seen} == {0} and sorted({c.prompt for c in seen}) == sorted(study.QUICK_PROMPTS)
    assert len(seen) == 2 * 5 and (tmp_path / "study_small_quick.md").is_file()


def test_a_study_folder_in_use_is_one_line(tmp_path, capsys):
    import fcntl
    import os

    from sds3d import runs

    spec = _spec(tmp_path, SMALL)
    (tmp_path / "cells").mkdir()
    fd = os.open(tmp_path / "cells" / runs.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another process holding it would
    try:
        code = main(["study", str(spec), "--dir", str(tmp_path / "cells"), "--limit", "1"])
        # a report only reads: it can be written while a study runs
        report = main(["study", str(spec), "--dir", str(tmp_path / "cells"), "--report", "--no-plots",
                       "--out", str(tmp_path / "out")])  # fmt: skip
    finally:
        os.close(fd)
    assert code == 2 and "in use by another sds3d process" in capsys.readouterr().err
    assert report == 0 and (tmp_path / "out" / "study_small.md").is_file()


def _fake_results(spec, iou_of) -> dict:
    """A finished cell for every cell of `spec`, its IoU chosen by `iou_of(config dict)`."""
    found = {}
    for cell in study.cells(spec, "cpu"):
        config = json.loads(cell.config_json)
        found[cell.key] = {**_row(cell.seed, cell.prompt, True, iou_of(config)), "key": cell.key}
    return found


def test_cross_report_is_a_grid_with_a_heatmap(tmp_path):
    spec = study.load_spec(_spec(tmp_path, "name='grid'\nseeds=2\nprompts='quick'\ncross=true\n"
                                 "[axes]\nweighting=['seed','uniform']\nt_schedule=['constant','sqrt','linear']\n"))  # fmt: skip
    bonus = {"constant": 0.0, "sqrt": 0.1, "linear": 0.05}
    found = _fake_results(
        spec, lambda c: 0.5 + bonus[c["rule"]["t_schedule"]] + (c["rule"]["weighting"] == "seed") * 0.2
    )
    result = study.report(spec, Path("grid.toml"), found, tmp_path, "test")
    assert result["cells_done"] == result["cells_total"] == 2 * 3 * 2 * 5
    assert result["points"]["weighting=seed, t_schedule=sqrt"]["iou"] == pytest.approx(0.8)
    md = (tmp_path / "study_grid.md").read_text()
    assert "Highest mean IoU: weighting×t_schedule = weighting=seed, t_schedule=sqrt" in md
    assert (tmp_path / "study_grid_weighting_x_t_schedule.png").stat().st_size > 1000


def test_prior_axis_is_plotted_against_prior_accuracy(tmp_path):
    for name, acc in (("a", 0.2), ("b", 0.9), ("shipped", 0.95)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": [{"samples": 10, "shape_accuracy": acc}]}))
    text = (f"name='p'\nseeds=1\nprompts=['a red cube']\n[base]\n'guidance.model'='sds3d/world-prior-32'\n"
            f"[axes]\nprior=['runs/a', 'runs/b']\n"
            f"[prior_accuracy]\n'runs/a'='{tmp_path / 'a.json'}'\n'runs/b'='{tmp_path / 'b.json'}'\n"
            f"'sds3d/world-prior-32'='{tmp_path / 'shipped.json'}'\n")  # fmt: skip
    spec = study.load_spec(_spec(tmp_path, text))
    found = _fake_results(spec, lambda c: 0.9 if c["guidance"]["model"] == "runs/b" else 0.3)
    study.report(spec, Path("p.toml"), found, tmp_path, "test")
    md = (tmp_path / "study_p.md").read_text()
    # the preset's own prior is not on the axis: shown beside it as "base", at its own accuracy
    assert (
        "Prior shape accuracy (its samples judged by the classifier): base: 95%, runs/a: 20%, runs/b: 90%"
        in md
    )
    assert "Highest mean IoU: prior = runs/b (0.900); lowest: base (0.300)" in md and "one seed" in md
    assert (tmp_path / "study_p_prior.png").is_file()


def test_a_cell_that_hits_a_bug_is_reported_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    def boom(self, cell):
        if cell.prompt == "a red cube":
            raise RuntimeError("boom")
        return {"key": cell.key, "seed": cell.seed}

    monkeypatch.setattr(study.CellRunner, "__call__", boom)
    got: list[dict] = []
    todo = study.cells(study.load_spec(_spec(tmp_path, SMALL)), "cpu")[:2]
    study.run_cells(todo, tmp_path, tmp_path / "w", 1, got.append)
    assert [("error" in r) for r in got] == [True, False] and "RuntimeError: boom" in got[0]["error"]


def test_waves_group_stackable_cells_and_leave_the_rest_alone_last(tmp_path):
    spec = study.load_spec(
        _spec(tmp_path, SMALL.replace("cfg = [3.0, 7.5]", "rule = ['sds', 'vsd']\nsteps = [2, 3]"))
    )
    todo = study.cells(spec, "cpu")  # (base, sds = base, vsd, steps 2 = base, steps 3) × 2 seeds × 2 prompts
    by_point = {p: [c for c in todo if c.point == p] for p in {c.point for c in todo}}
    unique = list({c.key: c for c in todo}.values())
    assert len(unique) == 3 * 2 * 2
    groups = study.waves(unique, 3)
    assert sorted(len(w) for w in groups) == [
        1,
        1,
        1,
        1,
        1,
        1,
        3,
        3,
    ]  # 4 base: 3 + 1, 4 steps=3: 3 + 1, 4 vsd alone
    vsd = {c.key for c in by_point[(("rule", "vsd"),)]}
    assert {c.key for w in groups[-4:] for c in w} == vsd  # the cells that train alone come last
    for wave in groups:  # a wave shares everything but prompt, seed and rule
        assert len({json.loads(c.config_json)["steps"] for c in wave}) == 1
    assert [[c.key for c in w] for w in study.waves(unique, 1)] == [
        [c.key] for c in unique
    ]  # K = 1: in order


def test_time_limit_starts_no_cell_after_it_and_still_reports(tmp_path, monkeypatch):
    ran: list[str] = []
    monkeypatch.setattr(
        study.CellRunner, "run_wave", lambda self, wave: ran.extend(c.key for c in wave) or []
    )
    spec, out = _spec(tmp_path, SMALL), tmp_path / "out"
    argv = ["study", str(spec), "--dir", str(tmp_path / "c"), "--out", str(out), "--no-plots"]
    assert main([*argv, "--time-limit", "0"]) == 0 and ran == []
    report = json.loads((out / "study_small.json").read_text())
    assert report["cells_done"] == 0 and report["cells_total"] == 8
    assert main([*argv, "--time-limit", "3600"]) == 0 and len(ran) == 8
