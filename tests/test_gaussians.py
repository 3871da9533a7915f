"""3D Gaussians (representations/gaussians.py, render/splat.py): the dense rasteriser against its
pixel-loop twin and against closed forms, densify/prune with the optimiser in step, checkpoints
whose Gaussian count changed, the mesh and the 3DGS .ply, and a run end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from sds3d.cameras import orbit_cameras
from sds3d.config import ConfigError, check_config, preset
from sds3d.render._reference import splat_reference
from sds3d.render.splat import LOW_PASS_PX2, covariances, splat
from sds3d.representations.gaussians import GaussianScene, GaussiansConfig

f64 = lambda x: torch.tensor(x, dtype=torch.float64)


def _cameras(elevations, azimuths, width, height, radius=2.5, fovy=40.0):
    n = len(elevations)
    return orbit_cameras(f64(elevations), f64(azimuths), f64([radius] * n), f64([fovy] * n), width, height)


def _random_gaussians(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.3 + f64([0.1, -0.05, 0.2])
    scales = torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.15 + 0.03
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    opacities = torch.rand(n, generator=g, dtype=torch.float64) * 0.9
    return means, covariances(scales, quats), colors, opacities


# --- the rasteriser -------------------------------------------------------------------------------
def test_splat_matches_its_pixel_loop_twin():
    means, covs, colors, opacities = _random_gaussians(14)
    cams = _cameras([20.0, -5.0, 70.0], [30.0, 200.0, 290.0], 11, 9)  # not square, not symmetric
    bg = f64([1.0, 0.5, 0.2])
    rgb, alpha, _ = splat(means, covs, colors, opacities, cams, bg)
    assert torch.allclose(rgb, splat_reference(means, covs, colors, opacities, cams, bg), atol=1e-12)
    assert 0.2 < alpha.max() <= 1 and alpha.min() >= 0


def test_one_gaussian_in_closed_form():
    """An isotropic Gaussian at the origin seen head-on from distance d: the centre pixel is
    o·c + (1 − o)·bg, and one pixel over the weight falls by exp(−½ / σ_px²), σ_px² = (fσ/d)² + 0.3."""
    sigma, o, d, size, fovy = 0.1, 0.7, 2.5, 9, 40.0
    cams = _cameras([0.0], [0.0], size, size, radius=d, fovy=fovy)
    covs = (sigma**2 * torch.eye(3, dtype=torch.float64))[None]
    color, bg = f64([[0.9, 0.1, 0.2]]), f64([0.0, 0.0, 1.0])
    rgb, alpha, depth = splat(f64([[0.0, 0.0, 0.0]]), covs, color, f64([o]), cams, bg)
    c = size // 2  # odd size: the centre pixel's centre is the image centre
    assert torch.allclose(rgb[0, :, c, c], o * color[0] + (1 - o) * bg)
    focal = 0.5 * size / math.tan(math.radians(fovy / 2))
    var_px = (focal * sigma / d) ** 2 + LOW_PASS_PX2
    assert alpha[0, 0, c, c + 1].item() == pytest.approx(o * math.exp(-0.5 / var_px), rel=1e-9)
    assert alpha[0, 0, c + 1, c + 1].item() == pytest.approx(o * math.exp(-1.0 / var_px), rel=1e-9)
    assert depth[0, 0, c, c].item() == pytest.approx(o * d, rel=1e-9)


def test_nearer_gaussians_cover_farther_ones():
    """Red in front of blue on the camera's axis, as seen from either side: the front one wins."""
    means = f64([[0.0, -0.3, 0.0], [0.0, 0.3, 0.0]])  # red at −y, blue at +y
    covs = (0.05**2 * torch.eye(3, dtype=torch.float64)).expand(2, 3, 3)
    colors, o = f64([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), f64([0.8, 0.8])
    cams = _cameras([0.0, 0.0], [-90.0, 90.0], 9, 9)  # from −y, then from +y
    rgb, _, _ = splat(means, covs, colors, o, cams, f64([1.0, 1.0, 1.0]))
    # front a = 0.8: 0.8·front + 0.2·(0.8·back + 0.2·white); red is nearer to the camera on −y
    for k in range(2):
        red_in_front = cams.position[k, 1].item() < 0
        expected = (0.84, 0.04, 0.2) if red_in_front else (0.2, 0.04, 0.84)
        assert tuple(round(v, 6) for v in rgb[k, :, 4, 4].tolist()) == expected
    assert cams.position[0, 1] * cams.position[1, 1] < 0  # one camera on each side


def test_splat_gradients_are_the_derivatives():
    means, covs, colors, opacities = _random_gaussians(3, seed=1)
    cams = _cameras([15.0], [40.0], 5, 4)
    bg = f64([0.3, 0.6, 0.9])
    inputs = tuple(t.clone().requires_grad_() for t in (means, covs, colors, opacities))
    fn = lambda m, c, col, o: splat(m, 0.5 * (c + c.transpose(1, 2)), col, o, cams, bg)[0]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


# --- the representation ---------------------------------------------------------------------------
def _scene(n: int = 12, **overrides) -> GaussianScene:
    torch.manual_seed(0)
    return GaussiansConfig(num_init=n, **overrides).build()


def _step(scene: GaussianScene, optimizer, size: int = 8) -> None:
    cams = orbit_cameras(
        torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.5]), torch.tensor([40.0]), size, size
    )
    optimizer.zero_grad()
    scene.render(cams).rgb.square().mean().backward()
    optimizer.step()


def test_densify_clones_small_splits_large_and_prunes_with_the_optimiser_in_step():
    scene = _scene(12, dense_scale=0.05)
    with torch.no_grad():
        scene.log_scales[1] = math.log(0.2)  # a large one
        scene.opacity_logits[5] = -10.0  # nearly transparent: pruned
    optimizer = torch.optim.Adam(scene.param_groups(None))
    _step(scene, optimizer)
    grad = torch.zeros(12)
    grad[[0, 1]] = 1.0  # 0 small → cloned, 1 large → split
    old0, old1, scale1 = scene.means[0].clone(), scene.means[1].clone(), scene.log_scales[1].clone()
    scene.densify_and_prune(optimizer, grad)
    assert len(scene) == 12 + 2 - 1
    assert torch.equal(scene.means[0], old0) and (scene.means == old0).all(-1).sum() == 2  # a clone
    assert torch.allclose(scene.log_scales[1], scale1 - math.log(1.6))  # split: smaller …
    twin = scene.means[-1]
    assert torch.allclose((scene.means[1] + twin) / 2, old1, atol=1e-6)  # … and on both sides of it
    assert float(scene.opacities.min()) >= scene.config.min_opacity
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(any(h is q for h in held) for q in scene.parameters())  # the optimiser has the new ones
    for p in held:
        assert optimizer.state[p]["exp_avg"].shape == p.shape
    assert optimizer.state[scene.means]["exp_avg"][-1].abs().sum() == 0  # new rows start at zero
    _step(scene, optimizer)  # and training goes on


def test_post_step_densifies_on_its_schedule_only():
    scene = _scene(12, densify_every=2, densify_from=0.5, densify_until=0.8, grad_threshold=0.0)
    optimizer = torch.optim.Adam(scene.param_groups(None))
    counts = []
    for step in range(10):
        _step(scene, optimizer)
        scene.post_step(step / 10, optimizer)
        counts.append(len(scene))
    changed = [i for i in range(1, 10) if counts[i] != counts[i - 1]]
    assert changed and all(5 <= i < 8 and (i + 1) % 2 == 0 for i in changed), counts


def test_means_stay_in_the_box():
    scene = _scene(4, bound=0.5)
    with torch.no_grad():
        scene.means[0] = torch.tensor([3.0, -3.0, 0.1])
    scene.post_step(0.0)
    assert scene.means.abs().max() <= 0.5


def test_density_grid_is_the_sum_of_the_gaussians():
    scene = _scene(30)
    with torch.no_grad():
        scene.opacity_logits.uniform_(-1, 2)
        scene.log_scales.uniform_(math.log(0.03), math.log(0.2))
        scene.quats.normal_()
    r = 20
    dens, cols = scene.density_grid(r)
    axis = torch.linspace(-1, 1, r)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3)
    with torch.no_grad():
        d = grid[:, None] - scene.means[None]
        w = scene.opacities * torch.exp(
            -0.5 * torch.einsum("pni,nij,pnj->pn", d, torch.linalg.inv(scene.covariances()), d)
        )
    assert np.allclose(dens, w.sum(-1).view(r, r, r).numpy(), atol=0.02 * float(w.sum(-1).max()))
    assert np.allclose(
        cols, (w @ scene.albedo.detach()).view(r, r, r, 3).numpy(), atol=0.02 * float(w.sum(-1).max())
    )


def test_a_cube_of_gaussians_meshes_as_a_cube():
    from sds3d.world.metrics import shape_ious

    axis = torch.linspace(-0.37, 0.37, 16)  # the world's cube: half extent 0.4
    centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3)
    scene = _scene(len(centres))
    with torch.no_grad():
        scene.means.copy_(centres)
        scene.log_scales.fill_(math.log(0.02))
        scene.opacity_logits.fill_(3.0)
        scene.color_logits.copy_(torch.tensor([2.0, -2.0, -2.0]))  # red
    mesh = scene.to_mesh(preset("gaussians").export)
    ious = shape_ious(mesh.vertices, mesh.faces)
    assert max(ious, key=lambda k: ious[k]) == "cube" and ious["cube"] > 0.8
    assert mesh.colors[:, 0].min() > 200 and mesh.colors[:, 1:].max() < 60


def test_splat_ply_is_the_3dgs_layout(tmp_path):
    scene = _scene(7)
    scene.write_extras(tmp_path)
    raw = (tmp_path / "splats.ply").read_bytes()
    head, body = raw.split(b"end_header\n", 1)
    props = [line.split()[-1] for line in head.decode().splitlines() if line.startswith("property")]
    assert "element vertex 7" in head.decode() and props[:3] == ["x", "y", "z"]
    assert {"f_dc_0", "opacity", "scale_0", "rot_0"} <= set(props)
    data = np.frombuffer(body, dtype="<f4").reshape(7, len(props))
    assert np.allclose(data[:, :3], scene.means.detach().numpy())
    assert np.allclose(data[:, props.index("opacity")], scene.opacity_logits.detach().numpy())
    sh = data[:, props.index("f_dc_0")] * 0.28209479177387814 + 0.5
    assert np.allclose(sh, scene.albedo[:, 0].detach().numpy(), atol=1e-6)


def test_gaussians_refuse_shading_they_cannot_do():
    config = preset("gaussians")
    config.renderer.albedo_prob = 0.5
    with pytest.raises(ConfigError, match="albedo only"):
        check_config(config)
    with pytest.raises(Exception, match="albedo only"):
        _scene(3).render(_cameras([0.0], [0.0], 4, 4).to("cpu"), "lambertian")


# --- end to end -----------------------------------------------------------------------------------
def test_a_gaussian_run_resumes_after_its_count_changed_and_exports(tmp_path):
    from sds3d.api import generate
    from sds3d.train import load_scene

    config = dataclasses.replace(
        preset("gaussians"), prompt="a red cube", steps=12, checkpoint_every=6, validate_every=0
    )
    config.gaussians = dataclasses.replace(config.gaussians, num_init=300, densify_every=3, densify_from=0.0,
                                           grad_threshold=0.0, max_gaussians=340)  # fmt: skip
    run = tmp_path / "run"
    stop_at = {"n": 0}

    def stop():  # stop after 6 steps: a checkpoint with more Gaussians than the run began with
        stop_at["n"] += 1
        return stop_at["n"] > 6

    first = generate(config, run, progress=False, should_stop=stop)
    assert first.train.interrupted and first.train.steps_done == 6
    _, scene, step = load_scene(run)
    grown = len(scene)
    assert step == 6 and grown > 300
    assert scene._steps == 6  # the densify schedule's count comes back with the checkpoint
    done = generate(config, run, resume=True, progress=False)
    assert done.train.steps_done == 12 and not done.train.interrupted
    assert {"glb", "splats", "gif"} <= set(done.files) and (run / "splats.ply").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mesh"]["faces"] > 0 and summary["mesh"]["silhouette_iou"] is None


def test_relative_mesh_level_does_not_inflate_densely_overlapping_gaussians():
    """Overlapping Gaussians pile their density up far above the absolute level, so that surface
    moves out by a few standard deviations; the relative level cuts at a fraction of the interior's."""
    import dataclasses

    axis = torch.linspace(-0.37, 0.37, 24)  # the world's cube, packed denser and with wider Gaussians
    centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3)
    extent = {}
    for mode in ("absolute", "relative"):
        scene = _scene(len(centres))
        scene.config = dataclasses.replace(scene.config, mesh_level_mode=mode, mesh_level=0.15)
        with torch.no_grad():
            scene.means.copy_(centres)
            scene.log_scales.fill_(math.log(0.03))
            scene.opacity_logits.fill_(3.0)
        mesh = scene.to_mesh(preset("gaussians").export)
        extent[mode] = float(np.abs(mesh.vertices).max())
    assert extent["relative"] == pytest.approx(0.4, abs=0.06)
    assert extent["absolute"] > extent["relative"] + 0.03
