"""Mesh export from fields with known geometry: iso-level, haze, floaters, axes and colours."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import trimesh

from conftest import AnalyticField, shape_field
from sds3d.export import (
    EmptySceneError,
    ExportConfig,
    extract_mesh,
    framing_fovy_deg,
    render_mesh_turntable,
    render_turntable,
    srgb_to_linear,
    write_mesh,
    write_turntable,
)
from sds3d.representations.nerf import BackgroundConfig
from sds3d.world.metrics import mesh_iou
from sds3d.world.shapes import shape_sdf

CONFIG = ExportConfig(
    grid_resolution=64, iso_view_resolution=64, num_samples=96, turntable_frames=4, turntable_resolution=32,
    nerf_turntable_resolution=32,
)  # fmt: skip


def read_glb(path):
    """The JSON chunk and the accessors of a .glb, decoded by hand (glTF 2.0 §4.4)."""
    import json
    import struct

    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_len, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A
    gltf = json.loads(data[20 : 20 + json_len])
    bin_len, bin_type = struct.unpack_from("<II", data, 20 + json_len)
    assert bin_type == 0x004E4942
    blob = data[28 + json_len : 28 + json_len + bin_len]
    kinds = {5126: np.float32, 5125: np.uint32}
    widths = {"VEC3": 3, "SCALAR": 1}

    def accessor(i):
        a = gltf["accessors"][i]
        view = gltf["bufferViews"][a["bufferView"]]
        out = np.frombuffer(
            blob, kinds[a["componentType"]], a["count"] * widths[a["type"]], view["byteOffset"]
        )
        return out.reshape(a["count"], -1) if a["type"] != "SCALAR" else out

    return gltf, accessor


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
    ply = trimesh.load(paths["ply"], force="mesh")
    assert np.asarray(ply.vertices)[:, 2].max() == pytest.approx(0.45, abs=0.05)  # ply stays +Z up
    colors = np.asarray(ply.visual.vertex_colors)[:, :3]  # the ply keeps sRGB bytes, for analysis
    assert np.abs(colors.astype(int) - [230, 26, 26]).max() <= 2


def test_glb_has_a_matte_material_smooth_normals_and_linear_vertex_colours(tmp_path):
    mesh = extract_mesh(shape_field("sphere", albedo=(0.9, 0.5, 0.1)), BG, CONFIG)
    gltf, accessor = read_glb(write_mesh(mesh, tmp_path)["glb"])
    (primitive,) = gltf["meshes"][0]["primitives"]
    material = gltf["materials"][primitive["material"]]["pbrMetallicRoughness"]
    assert material["metallicFactor"] == 0 and material["roughnessFactor"] >= 0.5
    assert material["baseColorFactor"] == [1, 1, 1, 1]
    positions, normals = (
        accessor(primitive["attributes"]["POSITION"]),
        accessor(primitive["attributes"]["NORMAL"]),
    )
    colors = accessor(primitive["attributes"]["COLOR_0"])
    assert len(positions) == len(normals) == len(colors) == len(mesh.vertices)
    assert np.allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-5)
    # Smooth and outward: on a sphere about the origin the normal is the position's direction.
    radial = positions / np.linalg.norm(positions, axis=1, keepdims=True)
    cosine = (normals * radial).sum(1)
    assert cosine.mean() > 0.98 and cosine.min() > 0.8
    # COLOR_0 is linear (glTF §3.7.2.1): 0.5 sRGB is 0.214 linear, not 0.5.
    expected = srgb_to_linear(mesh.colors / 255.0)
    assert np.allclose(colors, expected, atol=1e-6) and colors[:, 1].mean() == pytest.approx(0.214, abs=0.01)
    assert srgb_to_linear(np.array([0.0, 0.04045, 1.0])) == pytest.approx([0.0, 0.04045 / 12.92, 1.0])
    assert np.array_equal(accessor(primitive["indices"]).reshape(-1, 3), mesh.faces)
    assert gltf["accessors"][primitive["attributes"]["POSITION"]]["max"] == pytest.approx(
        positions.max(0).tolist()
    )


def test_obj_names_its_mtl_with_a_matte_material(tmp_path):
    mesh = extract_mesh(shape_field("cube", albedo=(0.2, 0.4, 0.9)), BG, CONFIG)
    paths = write_mesh(mesh, tmp_path)
    text = paths["obj"].read_text()
    assert "mtllib mesh.mtl" in text and "usemtl sds3d-vertex-colour" in text
    assert "newmtl sds3d-vertex-colour" in paths["mtl"].read_text() and "Ks 0 0 0" in paths["mtl"].read_text()
    obj = trimesh.load(paths["obj"], force="mesh")
    assert len(obj.faces) == len(mesh.faces)


def test_glb_of_an_asymmetric_field_is_rotated_not_mirrored(tmp_path):
    """A blob at world (0.4, 0.2, 0.1) must land at glTF (0.4, 0.1, −0.2), with outward faces
    (positive signed volume): a mirror would put it at (0.4, 0.1, 0.2) and turn the faces inside out."""
    centre = torch.tensor([0.4, 0.2, 0.1])
    field = AnalyticField(lambda p: 200 * torch.sigmoid(-300 * ((p - centre).norm(dim=-1) - 0.25)))
    mesh = extract_mesh(field, BG, CONFIG)
    gltf, accessor = read_glb(write_mesh(mesh, tmp_path)["glb"])
    (primitive,) = gltf["meshes"][0]["primitives"]
    v = accessor(primitive["attributes"]["POSITION"]).astype(np.float64)
    f = accessor(primitive["indices"]).reshape(-1, 3).astype(np.int64)
    assert v.mean(0) == pytest.approx([0.4, 0.1, -0.2], abs=0.02)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6
    assert volume == pytest.approx(4 / 3 * np.pi * 0.25**3, rel=0.3)  # positive: faces point outward


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


def test_nerf_turntable_frames(tmp_path):
    frames = render_turntable(shape_field("torus", albedo=(0.1, 0.3, 0.95)), BG, CONFIG)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert (frames[0, 16, :, 2] > 200).any() and (frames[0, 0, 0] == 255).all()  # blue object, white corner


def test_mesh_turntable_is_lit_and_matches_the_fields_silhouette():
    field = shape_field("sphere", albedo=(0.1, 0.3, 0.95))
    config = ExportConfig(grid_resolution=64, turntable_frames=2, turntable_resolution=64)
    mesh = extract_mesh(field, BG, config)
    frames = render_mesh_turntable(mesh, config)
    assert frames.shape == (2, 64, 64, 3) and frames.dtype == np.uint8
    fovy = framing_fovy_deg(mesh.vertices, config)
    volume = render_turntable(
        field, BG, dataclasses.replace(config, nerf_turntable_resolution=64, view_fovy_deg=fovy)
    )
    mesh_fg, nerf_fg = (frames != 255).any(-1), (volume != 255).any(-1)
    assert (mesh_fg & nerf_fg).sum() / (mesh_fg | nerf_fg).sum() > 0.9  # same camera, same image axes
    blue = frames[0][mesh_fg[0]][:, 2].astype(float)
    assert blue.max() - blue.min() > 80  # lit: the sphere is shaded from bright to dark
    # The light is above the camera: the top half of the sphere is brighter than the bottom half.
    rows = np.nonzero(mesh_fg[0])[0]
    assert (rows.max() - rows.min() + 1) / 64 == pytest.approx(config.turntable_fill, abs=0.06)  # framed
    top = frames[0][:32][mesh_fg[0][:32]][:, 2].mean()
    bottom = frames[0][32:][mesh_fg[0][32:]][:, 2].mean()
    assert rows.min() < 32 < rows.max() and top > bottom + 20
    flat = render_mesh_turntable(
        extract_mesh(field, BG, config), dataclasses.replace(config, turntable_lit=False)
    )
    assert np.abs(np.median(flat[0][mesh_fg[0]], axis=0) - [26, 77, 242]).max() <= 2  # the albedo alone


def test_turntable_gif_loops_at_its_frame_rate(tmp_path):
    from PIL import Image

    frames = (np.random.default_rng(0).random((5, 16, 16, 3)) * 255).astype(np.uint8)
    (gif,) = [p for p in write_turntable(frames, tmp_path, fps=10) if p.suffix == ".gif"]
    with Image.open(gif) as image:
        durations = []
        for i in range(image.n_frames):
            image.seek(i)
            durations.append(image.info["duration"])
        assert image.n_frames == 5 and image.info.get("loop") == 0
    assert durations == [100] * 5  # milliseconds: 1/fps s a frame, not 0
