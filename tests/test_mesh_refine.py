"""The mesh refinement stage: render/mesh.py's differentiable renders against the z-buffer twin and
finite differences, the mesh regularisers on meshes whose values are known, and the stage chained
after a finished run (`--from`), resumed and exported."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import make_mesh_run
from sds3d import runs
from sds3d.cameras import orbit_cameras
from sds3d.cli import main
from sds3d.config import preset
from sds3d.render.mesh import _rasterize_one, rasterize_mesh, render_mesh, vertex_normals_torch
from sds3d.representations.mesh import (
    MeshRefineConfig,
    _adjacency,
    normal_consistency,
    uniform_laplacian,
)


def _camera(res: int = 16, elevation: float = 20.0, azimuth: float = 30.0, dtype=torch.float32):
    t = lambda v: torch.tensor([v], dtype=dtype)
    return orbit_cameras(t(elevation), t(azimuth), t(2.5), t(40.0), res, res)


def _sphere(subdivisions: int = 2):
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.6)
    rng = np.random.default_rng(0)
    colors = rng.uniform(0.1, 0.9, size=(len(m.vertices), 3))
    return (torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.long),
            torch.tensor(colors, dtype=torch.float32))  # fmt: skip


# --- the renderer ---------------------------------------------------------------------------------
def test_render_mesh_matches_the_z_buffer_twin():
    v, f, c = _sphere()
    cam = _camera(24)
    ours = render_mesh(v, f, c, cam)
    twin = rasterize_mesh(v, f, c, vertex_normals_torch(v, f), cam, ambient=0.1)
    assert torch.equal(ours.mask, twin.mask) and ours.mask.sum() > 50
    assert torch.allclose(ours.rgb, twin.rgb, atol=1e-5)
    light = cam.position * 1.2
    lit = render_mesh(v, f, c, cam, "lambertian", light, ambient=0.1)
    lit_twin = rasterize_mesh(v, f, c, vertex_normals_torch(v, f), cam, light, ambient=0.1)
    # the twin lights the point on the pixel's ray, ours the barycentric mix of the corners: ~1e-4 apart
    assert torch.allclose(lit.rgb, lit_twin.rgb, atol=1e-3) and not torch.allclose(
        lit.rgb, ours.rgb, atol=0.05
    )


def test_colour_gradient_is_the_barycentric_weights():
    """d(Σ pixels)/d(colour of vertex k) = Σ over covered pixels of k's barycentric weight."""
    v, f, c = _sphere(1)
    cam = _camera(16)
    c = c.clone().requires_grad_(True)
    render_mesh(v, f, c, cam).rgb[:, 0].sum().backward()
    face, bary, _, _ = _rasterize_one(v, f, c, c, cam)
    expected = torch.zeros(len(v)).index_add(0, f[face[face >= 0]].flatten(), bary[face >= 0].flatten())
    assert torch.allclose(c.grad[:, 0], expected, atol=1e-5) and torch.all(c.grad[:, 1:] == 0)


@pytest.mark.parametrize("shading", ["albedo", "lambertian"])
def test_vertex_gradient_matches_finite_differences(shading):
    """One large triangle facing the camera: coverage stays put under tiny moves, so the render is
    smooth in the vertex positions (through the barycentric weights, normal and surface point)."""
    cam = _camera(12, elevation=0.0, azimuth=0.0, dtype=torch.float64)
    v = torch.tensor([[0.0, -0.7, -0.5], [0.0, 0.7, -0.4], [0.1, 0.0, 0.6]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2]])
    c = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.8, 0.3], [0.2, 0.3, 0.9]], dtype=torch.float64)
    light = torch.tensor([[2.0, 0.5, 1.0]], dtype=torch.float64)
    weight = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn = lambda x: (render_mesh(x, f, c, cam, shading, light).rgb * weight).sum()
    x = v.clone().requires_grad_(True)
    fn(x).backward()
    assert x.grad.abs().sum() > 0
    numeric = torch.zeros_like(v)
    for i in range(3):
        for j in range(3):
            d = torch.zeros_like(v)
            d[i, j] = 1e-6
            numeric[i, j] = (fn(v + d) - fn(v - d)) / 2e-6
    assert torch.allclose(x.grad, numeric, rtol=1e-4, atol=1e-6)


def test_the_soft_silhouette_has_a_gradient_that_grows_the_mesh_outward():
    """Background pixels next to the mesh are partly covered; pushing the vertices out covers more
    (darker on white), so d(Σ rgb)/d(scale) < 0, and with edge_softness 0 it has no such ring."""
    v, f, c = _sphere()
    cam = _camera(16)
    hard = render_mesh(v, f, c, cam)
    soft = render_mesh(v, f, c, cam, edge_softness=0.3)
    ring = (~hard.mask) & (soft.rgb < 1 - 1e-4).any(1, keepdim=True)
    assert ring.sum() > 10 and torch.equal(
        soft.rgb[hard.mask.expand_as(soft.rgb)], hard.rgb[hard.mask.expand_as(hard.rgb)]
    )
    scale = torch.ones((), requires_grad=True)
    render_mesh(v * scale, f, c, cam, edge_softness=0.3).rgb.sum().backward()
    assert scale.grad < 0


def test_supersample_is_the_average_of_the_larger_render():
    v, f, c = _sphere()
    small = render_mesh(v, f, c, _camera(12), supersample=2).rgb
    big = render_mesh(v, f, c, _camera(24)).rgb
    assert torch.allclose(small, torch.nn.functional.avg_pool2d(big, 2), atol=1e-6)


# --- regularisers ---------------------------------------------------------------------------------
def test_adjacency_of_a_tetrahedron():
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    edges, pairs = _adjacency(faces)
    assert len(edges) == 6 and len(pairs) == 6
    assert {tuple(sorted(p)) for p in pairs.tolist()} == {(a, b) for a in range(4) for b in range(a + 1, 4)}


def test_uniform_laplacian_of_a_triangle_and_of_a_constant():
    edges, _ = _adjacency(torch.tensor([[0, 1, 2]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    expected = x - (x.sum(0, keepdim=True) - x) / 2  # each vertex's two neighbours
    assert torch.allclose(uniform_laplacian(x, edges), expected)
    v, f, _ = _sphere()
    assert uniform_laplacian(torch.ones(len(v), 3), _adjacency(f)[0]).abs().max() < 1e-6


def test_normal_consistency_is_zero_on_a_plane_and_one_at_a_right_angle():
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    flat = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    pairs = _adjacency(faces)[1]
    assert normal_consistency(flat, faces, pairs).abs() < 1e-6
    folded = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 1, 0]])  # hinge along 0–2? use 0–2
    bent = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])  # faces in the planes y=0 and x=0
    faces2 = torch.tensor([[0, 1, 2], [0, 2, 3]])
    assert torch.allclose(
        normal_consistency(bent, faces2, _adjacency(faces2)[1]), torch.tensor(1.0), atol=1e-6
    )
    assert normal_consistency(folded, faces, pairs) > 0


def test_each_regulariser_is_its_config_field():
    v, f, c = _sphere(1)
    scene = MeshRefineConfig(laplacian=2.0, normal_consistency=0.0, color_laplacian=0.0, offset=3.0).build()
    scene.set_mesh(v.numpy(), f.numpy(), c.numpy())
    with torch.no_grad():
        scene.offsets.copy_(torch.randn_like(scene.offsets) * 0.01)
    terms = scene.regularizers(None, 0.5)  # type: ignore[arg-type]
    assert set(terms) == {"laplacian", "offset"}
    assert torch.allclose(terms["offset"], 3.0 * scene.offsets.square().sum(-1).mean())
    assert torch.allclose(
        terms["laplacian"], 2.0 * uniform_laplacian(scene.offsets, scene.edges).square().sum(-1).mean()
    )
    other = MeshRefineConfig(laplacian=0.0, normal_consistency=0.5, color_laplacian=1.5, offset=0.0).build()
    other.set_mesh(v.numpy(), f.numpy(), c.numpy())
    terms = other.regularizers(None, 0.5)  # type: ignore[arg-type]
    assert set(terms) == {"normal_consistency", "color_laplacian"}
    assert torch.allclose(
        terms["color_laplacian"], 1.5 * uniform_laplacian(other.albedo, other.edges).square().sum(-1).mean()
    )


# --- the stage after a run ------------------------------------------------------------------------
def _tiny_refine(argv_extra=()):
    return ["generate", "--steps", "4", "--no-progress", *argv_extra]


def test_refine_from_a_run_trains_resumes_and_exports(tmp_path, capsys):
    v, f = make_mesh_run(tmp_path / "coarse")
    out = tmp_path / "fine"
    assert main(_tiny_refine(["--from", str(tmp_path / "coarse"), "--out", str(out), "--seed", "3"])) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["prompt"] == "a red sphere" and config["representation"] == "mesh"
    assert config["mesh"]["from_previous"] == str(tmp_path / "coarse")
    state = runs.load_checkpoint(out).state
    assert torch.equal(state["scene"]["faces"], f) and torch.equal(state["scene"]["base_vertices"], v)
    assert state["scene"]["offsets"].abs().max() > 0  # the vertices moved
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["mesh"]["faces"] == len(f)
        and (out / "mesh.glb").is_file()
        and (out / "turntable.gif").is_file()
    )
    # resume: more steps from the checkpoint, the starting mesh from the checkpoint (not the old run)
    import shutil

    shutil.rmtree(tmp_path / "coarse")
    assert main(["generate", "--out", str(out), "--resume", "--steps", "6", "--no-progress"]) == 0
    assert runs.load_checkpoint(out).state["step"] == 6


def test_a_refine_with_zero_learning_rates_keeps_the_mesh(tmp_path):
    """Wiring: the stage's learning rates are the config's."""
    from sds3d.api import generate

    v, f = make_mesh_run(tmp_path / "coarse")
    config = dataclasses.replace(preset("refine"), prompt="a red sphere", steps=3, validate_every=0)
    config.mesh = dataclasses.replace(config.mesh, from_previous=str(tmp_path / "coarse"), lr_vertices=0.0)
    generate(config, tmp_path / "fine", progress=False)
    scene = runs.load_checkpoint(tmp_path / "fine").state["scene"]
    assert torch.equal(scene["offsets"], torch.zeros_like(v)) and scene["color_logits"].abs().sum() > 0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["a red sphere", "--preset", "refine"], "--from RUN_DIR"),
        (["--from", "{tmp}/nowhere"], "not an sds3d run folder"),
        (["--from", "{tmp}/coarse", "--preset", "default"], "starts a mesh stage"),
        (["--from", "{tmp}/coarse", "--out", "{tmp}/coarse", "--overwrite"], "own folder"),
    ],
)
def test_bad_refine_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    make_mesh_run(tmp_path / "coarse")
    before = sorted(p.name for p in (tmp_path / "coarse").rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(_tiny_refine(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert set(before) <= {p.name for p in (tmp_path / "coarse").rglob("*")}  # nothing of it lost
