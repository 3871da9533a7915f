from __future__ import annotations

import pytest
import torch

from sds3d.cameras import CameraConfig, camera_rays, orbit_cameras, project, sample_cameras, view_labels


def test_c2w_is_a_proper_rotation_and_the_centre_ray_hits_the_origin():
    cams = sample_cameras(CameraConfig(width=9, height=9, batch_size=64), torch.Generator().manual_seed(0))
    rot = cams.c2w[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(64), atol=1e-5)
    origins, dirs = camera_rays(cams)
    o, d = origins[:, 4, 4], dirs[:, 4, 4]  # the centre pixel of a 9×9 image
    closest = o - (o * d).sum(-1, keepdim=True) * d  # the point of the ray nearest the origin
    assert closest.norm(dim=-1).max() < 1e-5


def test_spherical_convention_and_up_vector():
    cam = orbit_cameras(
        torch.tensor([0.0]), torch.tensor([90.0]), torch.tensor([2.0]), torch.tensor([40.0]), 8, 8
    )
    assert torch.allclose(cam.position, torch.tensor([[0.0, 2.0, 0.0]]), atol=1e-6)  # azimuth 90° is +Y
    assert torch.allclose(cam.c2w[0, :3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # image up is world +Z
    top = orbit_cameras(
        torch.tensor([90.0]), torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([40.0]), 8, 8
    )
    assert top.elevation_deg.item() == pytest.approx(89.0)  # clamped so the frame stays defined
    assert torch.isfinite(top.c2w).all()


def test_a_known_point_projects_to_the_expected_pixel():
    # Camera on +X at distance 2 looking at the origin, fovy 90° on 100 px: focal = 50 px.
    # Facing −X with +Z up, image right is world +Y (right = forward × up) and image up is +Z.
    cam = orbit_cameras(
        torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([90.0]), 100, 100
    )
    pix = project(cam, torch.tensor([[[0.0, 0.5, 0.5]]]))
    # depth 2: column 50 + 50·0.5/2 = 62.5, row 50 − 50·0.5/2 = 37.5
    assert torch.allclose(pix, torch.tensor([[[62.5, 37.5]]]), atol=1e-4)


def test_project_inverts_camera_rays():
    cams = sample_cameras(CameraConfig(width=16, height=12, batch_size=3), torch.Generator().manual_seed(1))
    origins, dirs = camera_rays(cams)
    points = (origins + 1.7 * dirs).reshape(3, -1, 3)
    pix = project(cams, points).reshape(3, 12, 16, 2)
    jj, ii = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(12) + 0.5, indexing="xy")
    assert torch.allclose(pix[..., 0], jj.expand(3, -1, -1), atol=1e-3)
    assert torch.allclose(pix[..., 1], ii.expand(3, -1, -1), atol=1e-3)


def test_view_labels_follow_dreamfusion_thresholds():
    el = torch.tensor([10.0, 10.0, 10.0, 10.0, 61.0, 59.0])
    az = torch.tensor([0.0, 44.0, 90.0, 170.0, 90.0, -150.0])
    assert view_labels(el, az) == ["front", "front", "side", "back", "overhead", "back"]
