"""World v2 (objects with a front) and the Janus metric: analytic cases with 0, 1 and 2 fronts, the
renderer's front, the front-biased image sets and `sds3d bench janus`'s conditions and report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sds3d.cameras import CameraConfig, orbit_cameras
from sds3d.config import preset
from sds3d.world.metrics import janus
from sds3d.world.render import render_object
from sds3d.world.shapes import COLORS, WorldObject, fronted_objects, ground_truth_mesh, in_front, parse_prompt

CUBE = WorldObject("cube", "blue", "red")


def _sphere(front_azimuths_deg: list[float], half_width_deg: float = 30.0, obj: WorldObject = CUBE):
    """An icosphere coloured with the body colour and front patches centred on the given azimuths."""
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    az = np.rad2deg(np.arctan2(v[:, 1], v[:, 0]))
    front = np.zeros(len(v), dtype=bool)
    for a in front_azimuths_deg:
        front |= np.abs((az - a + 180) % 360 - 180) < half_width_deg
    colors = np.where(front[:, None], np.array(COLORS[obj.front]), np.array(COLORS[obj.color]))
    return v, f, (colors * 255).round().astype(np.uint8)


def test_fronted_prompts_parse_and_name_their_front():
    objects = fronted_objects()
    assert len(objects) >= 4 and all(o.front is not None and o.front != o.color for o in objects)
    assert parse_prompt("a blue cube with a red front") == CUBE
    assert parse_prompt("A Blue Cube with a Red front, back view") == CUBE
    assert parse_prompt("a blue cube with a blue front") is None  # no front to see
    assert parse_prompt("a blue cube with a pink front") is None
    assert parse_prompt("a blue cube").front is None


def test_the_front_faces_the_front_camera():
    """Azimuth 0° is the "front view" (cameras.py): seen from there the middle of the cube is the
    front's colour, from behind it is the body's, and from the side the front is at the image's edge."""
    el = torch.tensor([0.0, 0.0, 0.0])
    cams = orbit_cameras(
        el, torch.tensor([0.0, 180.0, 90.0]), torch.full((3,), 2.5), torch.full((3,), 40.0), 33, 33
    )
    rgb = render_object(CUBE, cams).rgb
    red, blue = torch.tensor(COLORS["red"]), torch.tensor(COLORS["blue"])
    assert torch.allclose(rgb[0, :, 16, 16], red) and torch.allclose(rgb[1, :, 16, 16], blue)
    assert torch.allclose(rgb[2, :, 16, 16], blue)
    assert in_front(torch.tensor([[0.4, 0.1, 0.0], [0.4, 0.3, 0.0], [-0.4, 0.0, 0.0]])).tolist() == [
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "azimuths,width,fronts,is_janus,ok",
    [([], 30.0, 0, False, False), ([0.0], 30.0, 1, False, True), ([0.0, 180.0], 30.0, 2, True, False),
     ([90.0], 30.0, 1, False, False), ([0.0, 90.0, 180.0, 270.0], 15.0, 4, True, False),
     ([0.0, 45.0], 30.0, 1, False, True)],  # two touching patches are one (wider) front
)  # fmt: skip
def test_janus_metric_counts_fronts(azimuths, width, fronts, is_janus, ok):
    r = janus(*_sphere(azimuths, width), CUBE)
    assert (r["fronts"], r["janus"], r["front_ok"], r["everywhere"]) == (fronts, is_janus, ok, False)


def test_janus_metric_front_all_round_is_a_janus_and_an_off_front_is_not_ok():
    everywhere = janus(
        *_sphere([], obj=CUBE), WorldObject("cube", "red", "blue")
    )  # the body is the front's colour
    assert everywhere["everywhere"] and everywhere["janus"] and everywhere["fronts"] == 0
    off = janus(*_sphere([45.0]), CUBE)  # one front, turned by one sector
    assert off["fronts"] == 1 and not off["front_ok"] and off["sector_share"][1] == max(off["sector_share"])


@pytest.mark.parametrize("obj", fronted_objects(), ids=lambda o: o.shape)
def test_ground_truth_fronted_meshes_have_one_front_where_it_should_be(obj):
    mesh = ground_truth_mesh(obj.shape).subdivide_to_size(0.03)
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    colors = (obj.albedo_at(torch.from_numpy(v).float()).numpy() * 255).round().astype(np.uint8)
    r = janus(v, f, colors, obj)
    assert r["fronts"] == 1 and r["front_ok"] and not r["janus"]
    assert r["sector_share"][0] > 0.9 and max(r["sector_share"][1:]) < 0.3


def test_janus_metric_needs_a_fronted_object():
    with pytest.raises(ValueError, match="no front"):
        janus(*_sphere([0.0]), WorldObject("cube", "blue"))


def test_front_biased_image_sets():
    from sds3d.guidance.analytic import EmpiricalPriorGuidanceConfig, WorldViewsConfig

    def views(share):
        config = EmpiricalPriorGuidanceConfig(
            views=WorldViewsConfig(resolution=8, views_per_object=40, front_view_share=share)
        )
        return config.build(CameraConfig(elevation_deg=(0.0, 30.0))).encode_prompt(
            "a blue cube with a red front"
        )

    uniform, biased = views(0.0), views(0.75)
    front_share = lambda s: sum(lab == "front" for lab in s.labels) / len(s.labels)  # noqa: E731
    assert len(biased.labels) == 40 and front_share(biased) >= 0.75 > front_share(uniform) + 0.3
    azimuth = torch.rad2deg(torch.atan2(biased.directions[:, 1], biased.directions[:, 0]))
    assert (azimuth.abs() < 45).sum() >= 30
    # The red front shows in front views only: the mean front image is redder than the mean back image.
    red = lambda s, keep: s.images[keep].reshape(-1, 3, 64)[:, 0].mean()  # noqa: E731
    is_front = torch.tensor([lab == "front" for lab in uniform.labels])
    assert red(uniform, is_front) > red(uniform, ~is_front)


def test_bench_conditions_set_what_they_name():
    from sds3d.bench.janus import CAMERA_GUIDANCE, CONDITIONS, base_config

    base = base_config(0.5, "cpu", 7)
    assert base.steps == 7 and base.guidance.views.front_view_share == 0.5
    got = {name: (c(base).guidance.camera_kernel_deg is not None, c(base).prompts.view_dependent, c(base).rule.kind,
                  c(base).rule.camera_guidance_scale) for name, c in CONDITIONS.items()}  # fmt: skip
    assert got == {"neither": (False, False, "sds", 0.0), "view-prompts": (False, True, "sds", 0.0),
                   "camera": (True, False, "sds", 0.0), "both": (True, True, "sds", 0.0),
                   "perp-neg": (False, True, "perp-neg", 0.0),
                   "camera-guidance": (True, False, "sds", CAMERA_GUIDANCE)}  # fmt: skip


def test_bench_janus_camera_guidance_flag_sets_the_conditions_scale(tmp_path, monkeypatch):
    from sds3d.bench import janus

    seen = {}

    def fake_run(config, prompts, seeds, work, strips=None, label=""):
        seen[label] = config.rule.camera_guidance_scale
        return [{"prompt": prompts[0], "seed": 0, "seconds": 1.0, "fronts": 1, "everywhere": False,
                 "janus": False, "front_ok": True, "front_sectors": 1, "sector_share": [0.0] * 8}]  # fmt: skip

    monkeypatch.setattr(janus, "run_condition", fake_run)
    argv = ["--conditions", "camera,camera-guidance", "--camera-guidance", "2.5", "--out", str(tmp_path)]
    assert janus.main(argv) == 0
    assert seen == {"camera": 0.0, "camera-guidance": 2.5}
    assert "| camera-guidance (s_c = 2.5) |" in (tmp_path / "janus.md").read_text()


def test_bench_conditions_switch_a_learned_priors_camera_input():
    from sds3d.bench.janus import CONDITIONS, base_config
    from sds3d.errors import UserError

    base = base_config(0.75, "cpu", None, "default")  # the built-in learned prior: no image sets to bias
    assert base.steps == preset("default").steps
    assert [CONDITIONS[c](base).guidance.camera_condition for c in ("neither", "camera", "both")] == [
        False,
        True,
        True,
    ]
    with pytest.raises(UserError, match="no camera conditioning"):
        CONDITIONS["camera"](base_config(0.75, "cpu", None, "gaussian"))
    assert (
        CONDITIONS["camera"](base_config(0.75, "cpu", None, "default", "runs/p")).guidance.model == "runs/p"
    )
    with pytest.raises(UserError, match="--model is for a preset with a diffusers prior"):
        base_config(0.75, "cpu", None, "empirical", "runs/p")


def test_bench_janus_runs_reports_and_combines(tmp_path, capsys):
    from sds3d.cli import main

    _command = lambda argv: main(["bench", "janus", *argv])  # noqa: E731  (as `sds3d bench janus` runs it)

    prompt = "a blue cube with a red front"
    for condition in ("neither", "camera"):
        assert _command(["--steps", "3", "--seeds", "1", "--conditions", condition, "--prompts", prompt,
                         "--out", str(tmp_path), "--name", f"j_{condition}",
                         "--image", str(tmp_path / f"j_{condition}.png")]) == 0  # fmt: skip
    a = json.loads((tmp_path / "j_neither.json").read_text())
    assert (
        a["front_share"] == 0.75
        and list(a["results"]) == ["neither"]
        and a["results"]["neither"][0]["prompt"] == prompt
    )
    assert len(a["results"]["neither"][0]["sector_share"]) == 8 and a["summary"]["neither"]["runs"] == 1
    paths = [str(tmp_path / "j_neither.json"), str(tmp_path / "j_camera.json")]
    assert (
        _command(
            ["--combine", *paths, "--out", str(tmp_path), "--name", "j", "--image", str(tmp_path / "j.png")]
        )
        == 0
    )
    joined = json.loads((tmp_path / "j.json").read_text())
    import imageio.v2 as imageio

    strips = [imageio.imread(tmp_path / f"j_{c}.png") for c in ("neither", "camera")]
    assert imageio.imread(tmp_path / "j.png").shape[0] == sum(
        im.shape[0] for im in strips
    )  # both, one under another
    assert (
        list(joined["results"]) == ["neither", "camera"]
        and "| camera | 1 |" in (tmp_path / "j.md").read_text()
    )
    capsys.readouterr()
    # Bad input: one line, exit code 2.
    assert _command(["--combine", paths[0], paths[0], "--out", str(tmp_path)]) == 2
    assert _command(["--conditions", "mirror", "--out", str(tmp_path)]) == 2
    assert _command(["--prompts", "a blue cube", "--out", str(tmp_path)]) == 2
    assert _command(["--front-share", "1.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("sds3d: error:") for line in err)
    # A learned prior's report names its preset instead of a front share.
    from sds3d.bench.janus import write_janus_report

    write_janus_report(tmp_path, "learned", {**a, "preset": "default", "front_share": None, "summary": None})
    assert "Prior: the `default` preset's." in (tmp_path / "learned.md").read_text()
    write_janus_report(tmp_path, "own", {**a, "preset": "default", "model": "runs/p", "front_share": None})
    assert "Prior: the `default` preset's, its model `runs/p`." in (tmp_path / "own.md").read_text()


@pytest.mark.parametrize("obj", fronted_objects(), ids=lambda o: o.shape)
def test_image_front_share_sees_the_front_from_the_front_only(obj):
    """Ground-truth renders from the front camera (azimuth 0°) show the front's colour, from the back
    (180°) next to none; an image in the body colour alone and one with the colours swapped bound it."""
    from sds3d.world.metrics import IMAGE_FRONT_SHARE, image_front_share

    cams = orbit_cameras(torch.tensor([15.0, 15.0]), torch.tensor([0.0, 180.0]), torch.tensor([2.5, 2.5]),
                         torch.tensor([40.0, 40.0]), 32, 32)  # fmt: skip
    front, back = image_front_share(render_object(obj, cams).rgb, obj).tolist()
    assert front >= IMAGE_FRONT_SHARE and back < IMAGE_FRONT_SHARE / 4  # edge pixels blend colours
    swapped = WorldObject(obj.shape, obj.front, obj.color)  # its "front" colour is obj's body colour
    assert image_front_share(render_object(swapped, cams[1:]).rgb, obj).item() > 0.95
    with pytest.raises(ValueError, match="no front"):
        image_front_share(torch.ones(1, 3, 4, 4), WorldObject(obj.shape, obj.color))


def test_prior_accuracy_fronts_check_samples_both_cameras(tiny_pixel_model):
    """The fronts table: every fronted prompt from the front and the back camera, with ground truth
    that shows the front from the front only."""
    from sds3d.bench.prior_accuracy import front_rows
    from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig

    guidance = DiffusersGuidanceConfig(model=str(tiny_pixel_model)).build(CameraConfig())
    rows, images = front_rows(guidance, 2, 3.0, 2, view_prompts=True, device="cpu")
    assert [(r["camera"], r["azimuth_deg"]) for r in rows] == [("front", 0.0), ("back", 180.0)]
    assert [r["ground_truth_shows_front"] for r in rows] == [1.0, 0.0]
    assert all(r["samples"] == 2 * len(fronted_objects()) for r in rows)
    assert images.shape[0] == 4 * len(fronted_objects()) and 0 <= min(r["shows_front"] for r in rows) <= 1


def test_a_resumed_condition_keeps_its_seconds_from_the_batch_index(monkeypatch, tmp_path):
    """A condition's runs train as one wave: seconds per run = (the wave's wall time + the exports) / n,
    read from the batch's items, not from how long this (resumed) call took."""
    import sds3d.batch
    from sds3d.batch import BatchItem
    from sds3d.bench.janus import base_config, run_condition

    prompt = fronted_objects()[0].prompt
    items = [BatchItem(prompt, s, tmp_path / f"r{s}", "failed", "boom", 120.0, 1.0 + s) for s in range(4)]
    monkeypatch.setattr(sds3d.batch, "run_batch", lambda *a, **k: items)
    rows = run_condition(base_config(0.75, "cpu", 3), [prompt], [0, 1, 2, 3], tmp_path)
    assert [r["seconds"] for r in rows] == [pytest.approx((120 + 1 + 2 + 3 + 4) / 4, abs=0.05)] * 4
    items[
        0
    ].train_wall_s = None  # not all timed (a run from before the index kept times): the call's own wall time
    assert run_condition(base_config(0.75, "cpu", 3), [prompt], [0, 1, 2, 3], tmp_path)[0]["seconds"] < 5
