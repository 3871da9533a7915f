"""Mesh export from fields with known geometry: iso-level, haze, floaters, axes and colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from conftest import AnalyticField, shape_field
from sds3d.export import (
    EmptySceneError,
    ExportConfig,
    extract_mesh,
    render_turntable,
    write_mesh,
    write_turntable,
)
from sds3d.representations.nerf import BackgroundConfig
from sds3d.world.metrics import mesh_iou
from sds3d.world.shapes import shape_sdf

CONFIG = ExportConfig(
    grid_resolution=64, iso_view_resolution=64, num_samples=96, turntable_frames=4, turntable_resolution=32
)
BG = BackgroundConfig().build()


def test_mesh_of_a_cone_round_trips_through_glb_with_y_up_and_colours(tmp_path):
    mesh = extract_mesh(shape_field("cone", albedo=(0.9, 0.1, 0.1)), BG, CONFIG)
    assert mesh_iou(mesh.vertices, mesh.faces, "cone", resolution=48) > 0.9
    paths = write_mesh(mesh, tmp_path)
    loaded = trimesh.load(paths["glb"], force="mesh")
    assert len(loaded.faces) == len(mesh.faces) > 100
    v = np.asarray(loaded.vertices)
    # +Z up in the world becomes +Y up in glTF: the apex (world z = 0.45) is the highest y.
    assert v[:, 1].max() == pytest.approx(0.45, abs=0.05) and v[:, 1].min() == pytest.approx(-0.45, abs=0.05)
    assert v[:, 2].max() == pytest.approx(0.5, abs=0.05)  # the base radius lies in the XZ plane
    apex = v[v[:, 1].argmax()]
    assert abs(apex[0]) < 0.1 and abs(apex[2]) < 0.1
    colors = np.asarray(loaded.visual.vertex_colors)[:, :3]
    assert np.abs(colors.astype(int) - [230, 26, 26]).max() <= 2
    ply = trimesh.load(paths["ply"], force="mesh")
    assert np.asarray(ply.vertices)[:, 2].max() == pytest.approx(0.45, abs=0.05)  # ply stays +Z up
    obj = trimesh.load(paths["obj"], force="mesh")
    assert len(obj.vertices) > 0


def test_low_density_haze_and_a_floater_are_not_exported():
    def density(p):
        cube = 200 * torch.sigmoid(-300 * shape_sdf("cube", p))
        haze = torch.full_like(cube, 0.25)  # 2 units of it: opacity 1 − e^−0.5 ≈ 0.39, never opaque
        floater = 200 * torch.sigmoid(-300 * ((p - torch.tensor([0.75, 0.75, 0.75])).norm(dim=-1) - 0.08))
        return cube + haze + floater

    mesh = extract_mesh(AnalyticField(density), BG, CONFIG)
    assert mesh_iou(mesh.vertices, mesh.faces, "cube", resolution=48) > 0.85
    assert np.abs(mesh.vertices).max() < 0.6  # neither the haze's box nor the floater


def test_an_empty_scene_is_an_error_not_an_empty_file(tmp_path):
    with pytest.raises(EmptySceneError, match="empty"):
        extract_mesh(AnalyticField(lambda p: torch.full_like(p[:, 0], 0.01)), BG, CONFIG)
    assert not any(tmp_path.iterdir())


def test_turntable_frames_and_gif(tmp_path):
    frames = render_turntable(shape_field("torus", albedo=(0.1, 0.3, 0.95)), BG, CONFIG)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert (frames[0, 16, :, 2] > 200).any() and (frames[0, 0, 0] == 255).all()  # blue object, white corner
    paths = write_turntable(frames, tmp_path)
    import imageio.v2 as imageio

    assert len(imageio.mimread(paths[0])) == 4
