"""Many scenes in one process (batch.py, representations/nerf_stack.py): each scene draws what it
would draw alone, renders and gets gradients as it would alone (the plain NeRFScene is the twin),
its checkpoints are a plain run's, and `sds3d batch` reports failures, resumes and indexes results."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from sds3d import runs
from sds3d.batch import concat_cameras, train_scenes
from sds3d.cameras import sample_cameras
from sds3d.cli import main
from sds3d.config import RunConfig, preset
from sds3d.devices import SceneGenerators
from sds3d.render.volume import sample_lights
from sds3d.representations.nerf_stack import NeRFStack, stack_problem
from sds3d.rules.base import draw_timesteps, gaussian_like
from sds3d.rules.sds import SDSRuleConfig
from sds3d.train import build_prior, build_scene, load_scene, train

PROMPTS = ("a red cube", "a blue torus", "a green cone")


def _config(steps: int = 2, **changes) -> RunConfig:
    base = dataclasses.replace(preset("default"), steps=steps, validate_every=0, checkpoint_every=steps)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def prior():
    return build_prior(_config())


def _gens(seeds=(3, 1, 7)):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_scene_generators_give_each_scene_its_own_draws():
    """t and ε for a batch of 3 scenes × 2 views are, row for row, what each scene's generator gives alone."""
    prior_stub = type("P", (), {"num_train_timesteps": 1000})()
    c = SDSRuleConfig(t_schedule="linear")
    t, g = draw_timesteps(c, prior_stub, 0.3, 6, SceneGenerators(_gens()), torch.device("cpu"))
    noise = gaussian_like(torch.zeros(6, 3, 4, 4), g)
    for k, gen in enumerate(_gens()):
        t_k, g_k = draw_timesteps(c, prior_stub, 0.3, 2, gen, torch.device("cpu"))
        assert torch.equal(t[2 * k : 2 * k + 2], t_k)
        assert torch.equal(noise[2 * k : 2 * k + 2], gaussian_like(torch.zeros(2, 3, 4, 4), g_k))


@pytest.mark.parametrize("background", ["solid", "learned"])
def test_stacked_scenes_render_and_get_gradients_as_each_alone(background):
    """The stack against its twin, three plain NeRFScenes of different seeds: mixed shading in one
    step (albedo, lambertian, albedo), entropy and orientation losses on; a solid background, or a
    learned one (an MLP per scene, each scene's own)."""
    from sds3d.ramp import Ramp  # noqa: F401  (the preset's entropy weight is a Ramp)
    from sds3d.representations.nerf import BackgroundConfig
    from sds3d.representations.nerf_scene import RegularizerConfig

    config = _config(regularizers=RegularizerConfig(orientation=1.0, entropy=0.05, sparsity=0.1),
                     background=BackgroundConfig(kind=background))  # fmt: skip
    config.camera = dataclasses.replace(config.camera, width=12, height=12)
    config.renderer = dataclasses.replace(config.renderer, num_samples=16)
    scenes = [build_scene(dataclasses.replace(config, seed=s)) for s in (0, 1, 2)]
    with torch.no_grad():  # distinct fields, not just distinct hash tables
        for k, scene in enumerate(scenes):
            scene.nerf.encoding.tables.normal_(0, 0.3, generator=torch.Generator().manual_seed(k))
            if background == "learned":  # backgrounds that differ, and differ across the view
                scene.background.mlp[2].weight.normal_(
                    0, 1.0, generator=torch.Generator().manual_seed(10 + k)
                )
    stack = NeRFStack(scenes)
    shadings = ["albedo", "lambertian", "albedo"]
    cams = [sample_cameras(config.camera, g) for g in _gens((5, 6, 7))]
    lights = [sample_lights(c, config.renderer, g) for c, g in zip(cams, _gens((8, 9, 10)), strict=True)]
    outs, terms = stack.render_scenes(
        concat_cameras(cams), shadings, torch.cat(lights), 0.5, SceneGenerators(_gens())
    )
    weights = [torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(20 + k)) for k in range(3)]
    (sum((o.rgb * w).sum() for o, w in zip(outs, weights, strict=True)) + sum(terms.values())).backward()

    lone_terms: dict[str, float] = {}
    for k, (scene, gen) in enumerate(zip(scenes, _gens(), strict=True)):
        out = scene.render_train(cams[k], shadings[k], lights[k], 0.5, gen)
        torch.testing.assert_close(outs[k].rgb, out.rgb, atol=1e-5, rtol=1e-5)
        own = scene.regularizers(out, 0.5)
        for name, value in own.items():
            lone_terms[name] = lone_terms.get(name, 0.0) + float(value.detach())
        ((out.rgb * weights[k]).sum() + sum(own.values())).backward()
        stacked = {"nerf.encoding.tables": stack.per_scene("nerf.encoding.tables", stack.field.encoding.tables.grad)[k],
                   "nerf.mlp.0.weight": stack.field.w1.grad[k], "nerf.mlp.2.bias": stack.field.b2.grad[k]}  # fmt: skip
        if background == "learned":
            bg = stack.background
            stacked |= {"background.mlp.0.weight": bg.w1.grad[k], "background.mlp.0.bias": bg.b1.grad[k],
                        "background.mlp.2.weight": bg.w2.grad[k], "background.mlp.2.bias": bg.b2.grad[k]}  # fmt: skip
        params = dict(scene.named_parameters())
        for name, grad in stacked.items():
            torch.testing.assert_close(grad, params[name].grad, atol=1e-6, rtol=1e-4)
    assert set(terms) == {"orientation", "entropy", "sparsity"}
    for name, value in terms.items():
        assert float(value) == pytest.approx(lone_terms[name], rel=1e-5)
    assert not torch.equal(outs[0].rgb, outs[2].rgb)  # the scenes really differ
    if background == "learned":  # rays that miss every scene show each scene's own background
        corner = [o.rgb[..., 0, 0] for o in outs]
        assert not torch.allclose(corner[0], corner[1]) and not torch.allclose(corner[1], corner[2])


def test_scene_k_comes_back_out_of_the_stack():
    from sds3d.representations.nerf import BackgroundConfig

    scenes = [build_scene(_config(seed=s, background=BackgroundConfig(kind="learned"))) for s in (4, 5)]
    stack = NeRFStack(scenes)
    for k, scene in enumerate(scenes):
        for (name, a), b in zip(
            stack.scene(k).state_dict().items(), scene.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("background", ["solid", "learned"])
def test_a_step_of_stacked_scenes_is_each_scenes_own_step(prior, tmp_path, background):
    """One step: each scene's Adam moments (its gradient) as its own run's, to rounding (the batched
    U-Net call is not bit-for-bit batch-invariant on the CPU), and its generator exactly where its
    own run leaves it (the same draws, in the same order); a learned background's MLP included."""
    from sds3d.bench.study import SHADINGS
    from sds3d.representations.nerf import BackgroundConfig

    mix = dataclasses.replace(_config().renderer, **SHADINGS["textureless-mix"])  # each scene its own shading
    configs = [
        _config(steps=1, prompt=p, seed=s, renderer=mix, background=BackgroundConfig(kind=background))
        for p, s in zip(PROMPTS, (0, 1, 2), strict=True)
    ]
    train_scenes(configs, [tmp_path / f"b{k}" for k in range(3)], prior, progress=False)
    for k, config in enumerate(configs):
        train(config, tmp_path / f"a{k}", progress=False, prior=prior)
        alone = runs.load_checkpoint(tmp_path / f"a{k}").state
        batched = runs.load_checkpoint(tmp_path / f"b{k}").state
        assert torch.equal(alone["rng"], batched["rng"])
        assert len(batched["optimizer"]["state"]) == len(alone["optimizer"]["state"])
        for index, state in alone["optimizer"]["state"].items():
            a, b = state["exp_avg"], batched["optimizer"]["state"][index]["exp_avg"]
            assert (a - b).norm() <= 1e-3 * a.norm(), (k, index)
        assert alone["optimizer"]["param_groups"] == batched["optimizer"]["param_groups"]


def test_stacked_training_resumes_exactly_and_a_batch_run_resumes_alone(prior, tmp_path):
    configs = [
        _config(steps=4, prompt=p, seed=s, checkpoint_every=2)
        for p, s in zip(PROMPTS[:2], (0, 1), strict=True)
    ]
    straight = [tmp_path / f"s{k}" for k in range(2)]
    train_scenes(configs, straight, prior, progress=False)

    def ctrl_c(done: int) -> None:
        if done == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop after this step, checkpoint

    stopped = [tmp_path / f"r{k}" for k in range(2)]
    first = train_scenes(configs, stopped, prior, progress=False, on_step=ctrl_c)
    assert all(not isinstance(r, Exception) and r.interrupted and r.steps_done == 1 for r in first)
    train_scenes(configs, stopped, prior, progress=False)
    for a, b in zip(straight, stopped, strict=True):
        _, sa, step_a = load_scene(a)
        _, sb, step_b = load_scene(b)
        assert step_a == step_b == 4
        for (name, x), y in zip(sa.state_dict().items(), sb.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    # A batch-trained run folder is a plain run: `train` resumes it alone.
    longer = dataclasses.replace(configs[0], steps=5)
    assert train(longer, straight[0], resume=True, progress=False, prior=prior).steps_done == 5


def test_a_diverged_scene_fails_alone(prior, tmp_path, monkeypatch):
    configs = [
        _config(steps=3, prompt=p, seed=s, checkpoint_every=1)
        for p, s in zip(PROMPTS[:2], (0, 1), strict=True)
    ]
    stacks: list[NeRFStack] = []
    build = NeRFStack.__init__

    def keep(self, scenes):
        build(self, scenes)
        stacks.append(self)

    def poison(done: int) -> None:  # scene 1 turns NaN after its step-1 checkpoint
        if done == 1:
            with torch.no_grad():
                stacks[0].field.b2[1, 0] = float("nan")

    monkeypatch.setattr(NeRFStack, "__init__", keep)
    dirs = [tmp_path / "ok", tmp_path / "bad"]
    results = train_scenes(configs, dirs, prior, progress=False, on_step=poison)
    assert not isinstance(results[0], Exception) and results[0].steps_done == 3
    assert isinstance(results[1], Exception) and "diverged" in str(results[1])
    assert runs.checkpoint_step(dirs[1]) == 1  # the failed scene's last good checkpoint is kept
    _, scene, _ = load_scene(dirs[0])
    assert all(torch.isfinite(p).all() for p in scene.parameters())


def test_what_cannot_be_stacked_says_why():
    assert stack_problem(_config()) is None
    assert stack_problem(preset("dreamfusion-sd")) is None  # its learned background stacks
    assert "closed_form normals" in stack_problem(preset("fast-sd"))
    vsd = _config()
    vsd.rule = dataclasses.replace(SDSRuleConfig(), kind="vsd")  # type: ignore[call-arg]
    assert "vsd" in stack_problem(vsd)


def test_batch_command_indexes_reports_failures_and_resumes(tmp_path, capsys):
    prompts = tmp_path / "props.txt"
    prompts.write_text("# props\na red cube\n\na pink elephant\na blue torus\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--steps", "8", "--scenes", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 1  # one prompt failed, the others are done
    index = json.loads((out / "index.json").read_text())
    status = {(r["prompt"], r["status"]) for r in index["results"]}
    assert status == {("a red cube", "done"), ("a pink elephant", "failed"), ("a blue torus", "done")}
    assert "pink" in capsys.readouterr().err
    assert (out / "contact_sheet.png").is_file()
    for row in index["results"]:
        if row["status"] == "done":
            assert (out / row["files"]["glb"]).is_file()
            assert json.loads((out / row["run_dir"] / "summary.json").read_text())["prompt"] == row["prompt"]
    before = (out / "a-red-cube-s0" / "summary.json").stat().st_mtime_ns
    assert main(args) == 1  # again: done results are kept, not redone
    assert (out / "a-red-cube-s0" / "summary.json").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "content, message",
    [(None, "is not a file"), ("", "holds no prompts"), ("# only a comment\n", "holds no prompts")],
)
def test_batch_bad_prompt_files_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_text(content)
    assert main(["batch", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_combine_merges_runs_of_one_lease_and_refuses_two_machines(tmp_path):
    from sds3d.bench import batch as bench
    from sds3d.errors import UserError

    def run(name, ks, sequential, gpu="H100"):
        rows = [{"scenes": k, "prompts": k, "done": k, "load_s": 1.0, "wall_s": 10.0 * k, "prompts_per_hour": 360.0,
                 "train_wall_s_per_wave": 5.0, "peak_gpu_memory_gb": 1.0} for k in ks]  # fmt: skip
        data = {"command": name, "machine": {"gpu": gpu, "cpu": "x", "cores": 16, "torch": "t"}, "device": "cuda",
                "steps": 800, "compile": True, "sequential": sequential, "batch": rows}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        return tmp_path / f"{name}.json"

    seq = {"prompts": 3, "wall_s": 120.0, "prompts_per_hour": 90.0}
    a, b = run("a", [64, 16], None), run("b", [4, 1], seq)
    assert bench.main(["--combine", str(a), str(b), "--name", "both", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "both.json").read_text())
    assert [r["scenes"] for r in data["batch"]] == [1, 4, 16, 64] and data["sequential"] == seq
    assert (
        data["command"].startswith("a; b; then") and "| 64 | 64 | 64 |" in (tmp_path / "both.md").read_text()
    )
    with pytest.raises(UserError, match="different machines"):
        bench.combine([a, run("c", [2], seq, gpu="H200")])
    (tmp_path / "torn.json").write_text('{"command": ')
    for bad, words in ((tmp_path / "torn.json", "not a report"), (tmp_path / "none.json", "not a report"),
                       (tmp_path / "both.md", "not a report")):  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "sds3d.bench.batch", "--combine", str(a), str(bad)],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.startswith("sds3d: error: ") and words in proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_ray_batch_shards_over_two_workers_and_redoes_a_killed_workers_prompts(tmp_path):
    """A local 2-worker Ray: every result made, the chunk of a worker killed as it got it redone by
    the other, the index complete. (Ray is an optional extra; CI installs it.)"""
    ray = pytest.importorskip("ray")
    from sds3d.batch_ray import run_batch_ray

    small = dataclasses.replace(preset("default").export, grid_resolution=32, iso_candidates=4, turntable_frames=4,
                                turntable_resolution=64, turntable_supersample=1)  # fmt: skip
    base = _config(steps=2, export=small)
    dispatched: list[tuple[object, list[str]]] = []

    def kill_the_first(actor, chunk):
        dispatched.append((actor, [i.prompt for i in chunk]))
        if len(dispatched) == 1:
            ray.kill(actor, no_restart=True)

    logs: list[str] = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        items = run_batch_ray(base, PROMPTS, [0], tmp_path / "out", scenes=1, workers=2, log=logs.append,
                              on_dispatch=kill_the_first)  # fmt: skip
    finally:
        ray.shutdown()
    assert [i.status for i in items] == ["done"] * 3, [i.error for i in items]
    assert any("died" in line for line in logs)
    killed, first = dispatched[0]
    redone = [a for a, prompts in dispatched[1:] if prompts == first]
    assert redone and redone[0] is not killed  # the killed worker's prompt, made by the other
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [r["status"] for r in index["results"]] == ["done"] * 3
    for row in index["results"]:
        assert (tmp_path / "out" / row["files"]["glb"]).is_file()
    assert (tmp_path / "out" / "contact_sheet.png").is_file()


def test_batch_bench_makes_an_unstackable_preset_stackable_and_says_how():
    """fast-sd's closed-form normals and compiled NeRF do not stack: the batch runs analytic normals
    and an eager NeRF, and says so; a preset that stacks as it is keeps every setting."""
    from sds3d.bench.batch import batch_config
    from sds3d.errors import UserError

    config, changes = batch_config("fast-sd", "some/folder", "cpu", 5, compile=False)
    assert stack_problem(config) is None and config.guidance.model == "some/folder" and config.steps == 5
    assert changes == ["normals closed_form → analytic", "NeRF compiled → eager"]
    assert (config.nerf.normal_type, config.nerf.compile) == ("analytic", False)
    config, changes = batch_config("dreamfusion-sd", None, "cpu", 5, compile=False)
    assert changes == [] and config.nerf == preset("dreamfusion-sd").nerf
    with pytest.raises(UserError, match="cannot be stacked"):
        batch_config("gaussians", None, "cpu", 5, compile=False)
    with pytest.raises(UserError, match="diffusers prior"):
        batch_config("empirical", "some/folder", "cpu", 5, compile=False)


def test_batch_bench_sequential_runs_name_the_preset_and_model(tmp_path, monkeypatch):
    """The sequential baseline is `sds3d generate` with the same preset and prior as the batch."""
    import subprocess

    from sds3d.bench import batch as bench

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    out = bench.measure_sequential(2, "cpu", 7, tmp_path, "fast-sd", "some/folder")
    assert out["prompts"] == 2 and len(calls) == 2
    for cmd in calls:
        assert cmd[cmd.index("--preset") + 1] == "fast-sd" and cmd[cmd.index("--model") + 1] == "some/folder"
        assert cmd[cmd.index("--steps") + 1] == "7"
    calls.clear()
    bench.measure_sequential(1, "cpu", 7, tmp_path)
    assert "--model" not in calls[0] and calls[0][calls[0].index("--preset") + 1] == "default"


def test_random_model_folder_refuses_sdxl_and_model_with_arch(tmp_path):
    from sds3d.bench.batch import main as bench_main
    from sds3d.bench.batch import random_model_folder
    from sds3d.errors import UserError

    with pytest.raises(UserError, match="--arch"):
        random_model_folder("sdxl", tmp_path / "m")
    with pytest.raises(UserError, match="give one"):
        bench_main(["--model", "x", "--arch", "sd15", "--out", str(tmp_path)])


def test_random_model_folder_loads_as_a_diffusers_prior(tmp_path):
    """--arch's folder at toy size (bench.speed's tiny-sd architecture): it loads through the
    diffusers prior's from_pretrained path, and a second call reuses it."""
    from sds3d.bench.batch import random_model_folder
    from sds3d.cameras import CameraConfig
    from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig

    folder = random_model_folder("tiny-sd", tmp_path / "toy")
    stamp = (folder / "unet" / "config.json").stat().st_mtime_ns
    assert random_model_folder("tiny-sd", tmp_path / "toy") == folder
    assert (folder / "unet" / "config.json").stat().st_mtime_ns == stamp
    guidance = DiffusersGuidanceConfig(model=str(folder), dtype="float32").build(CameraConfig())
    emb = guidance.encode_prompt("a red cube")
    eps = guidance.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([500]), [emb], None)
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
