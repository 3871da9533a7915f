"""The synthetic world: definitions, exact geometry, the analytic renderer and the IoU metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sds3d.cameras import orbit_cameras
from sds3d.world import COLORS, SHAPES, all_objects, parse_prompt
from sds3d.world.metrics import area_weighted_color, iou, mesh_iou, mesh_occupancy, nearest_color
from sds3d.world.render import render_object
from sds3d.world.shapes import WorldObject, ground_truth_mesh, occupancy_grid, shape_sdf


def test_thirty_objects_with_prompts():
    objects = all_objects()
    assert len(objects) == 30 and len({o.prompt for o in objects}) == 30
    assert parse_prompt("a purple cylinder") == WorldObject("cylinder", "purple")
    assert parse_prompt("a pink cube") is None and parse_prompt("cube") is None


@pytest.mark.parametrize(
    "shape,inside,outside",
    [
        ("sphere", [0, 0, 0.49], [0, 0, 0.51]),
        ("cube", [0.39, 0.39, 0.39], [0.41, 0, 0]),
        ("cylinder", [0.39, 0, 0.44], [0, 0, 0.46]),
        ("cone", [0, 0, 0.44], [0.3, 0, 0.2]),  # radius at z = 0.2 is 0.5·(0.45 − 0.2)/0.9 ≈ 0.14
        ("torus", [0.42, 0, 0.15], [0, 0, 0]),  # the hole is empty
    ],
)
def test_sdf_sign_at_known_points(shape, inside, outside):
    assert shape_sdf(shape, torch.tensor(inside, dtype=torch.float32)).item() < 0
    assert shape_sdf(shape, torch.tensor(outside, dtype=torch.float32)).item() > 0


def test_sdf_is_a_distance_where_known():
    assert shape_sdf("sphere", torch.tensor([1.0, 0, 0])).item() == pytest.approx(0.5)
    assert shape_sdf("cube", torch.tensor([0.6, 0.0, 0.0])).item() == pytest.approx(0.2)
    assert shape_sdf("torus", torch.tensor([0.0, 0.0, 0.0])).item() == pytest.approx(0.42 - 0.16)
    # the cone's apex and base rim
    assert abs(shape_sdf("cone", torch.tensor([0.0, 0.0, 0.45])).item()) < 1e-6
    assert abs(shape_sdf("cone", torch.tensor([0.5, 0.0, -0.45])).item()) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_ground_truth_mesh_agrees_with_the_sdf(shape):
    mesh = ground_truth_mesh(shape)
    assert mesh.is_watertight
    assert mesh_iou(np.asarray(mesh.vertices), np.asarray(mesh.faces), shape, resolution=48) > 0.97


def test_iou_metric_tells_shapes_apart():
    sphere = ground_truth_mesh("sphere")
    assert mesh_iou(np.asarray(sphere.vertices), np.asarray(sphere.faces), "cube", resolution=32) < 0.8
    occ = mesh_occupancy(np.asarray(sphere.vertices), np.asarray(sphere.faces), 32)
    assert occ.sum() / 32**3 * 8 == pytest.approx(4 / 3 * math.pi * 0.5**3, rel=0.05)
    assert iou(occupancy_grid("cube", 16), occupancy_grid("cube", 16)) == 1.0


def test_analytic_render_of_a_sphere_is_a_disc_of_the_right_size():
    cam = orbit_cameras(
        torch.tensor([30.0]), torch.tensor([20.0]), torch.tensor([2.5]), torch.tensor([40.0]), 96, 96
    )
    out = render_object(WorldObject("sphere", "green"), cam)
    # Angular radius asin(r/d); image radius = focal·tan(asin(r/d)).
    focal = 48 / math.tan(math.radians(20))
    radius_px = focal * math.tan(math.asin(0.5 / 2.5))
    assert out.opacity.sum().item() == pytest.approx(math.pi * radius_px**2, rel=0.03)
    centre = out.rgb[0, :, 48, 48]
    assert torch.allclose(centre, torch.tensor(COLORS["green"]), atol=1e-6)
    assert torch.equal(out.rgb[0, :, 0, 0], torch.ones(3))  # white background
    assert out.depth[0, 0, 48, 48].item() == pytest.approx(2.0, abs=1e-3)


def test_colour_metric():
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float64)
    faces = np.array([[0, 1, 2]])
    colors = np.array([[230, 25, 25]] * 3, dtype=np.uint8)
    assert nearest_color(area_weighted_color(verts, faces, colors)) == "red"
    for name, rgb in COLORS.items():
        assert nearest_color(np.array(rgb) * 0.6) == name  # darker (shaded) keeps the hue
