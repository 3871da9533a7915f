"""The Representation seam as the NeRF implements it (representations/nerf_scene.py): its optimiser
groups, its regularisers with their weights and ramps, and a training render that computes normals
only when the orientation loss needs them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sds3d import losses
from sds3d.cameras import sample_cameras
from sds3d.config import OptimConfig, preset
from sds3d.ramp import Ramp
from sds3d.representations.nerf_scene import RegularizerConfig
from sds3d.train import build_scene


def _scene(**weights):
    config = preset("fast")
    config.camera.width = config.camera.height = 8
    config.renderer.num_samples = 8
    return config, build_scene(dataclasses.replace(config, regularizers=RegularizerConfig(**weights)))


def test_param_groups_hold_every_parameter_once_at_its_learning_rate():
    _, scene = _scene()
    groups = scene.param_groups(OptimConfig(lr_grid=0.02, lr_mlp=0.003))
    assert [g["lr"] for g in groups] == [0.02, 0.003]
    assert groups[0]["params"] == [scene.nerf.encoding.tables]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in scene.parameters()) and len(set(ids)) == len(ids)


def test_regularizers_follow_their_weights_and_ramps():
    config, scene = _scene(orientation=2.0, sparsity=0.5, entropy=Ramp(0.0, 0.05, 0.3, 1.0))
    cams = sample_cameras(config.camera, torch.Generator().manual_seed(0))
    lights = cams.position * 2
    out = scene.render_train(cams, "lambertian", lights, 0.2, torch.Generator().manual_seed(1))
    assert out.sample_normals is not None  # the orientation loss needs them
    early = scene.regularizers(out, 0.2)
    assert set(early) == {"orientation", "sparsity"}  # the entropy ramp starts at 0.3
    opacity = out.opacity.flatten()
    assert torch.allclose(early["sparsity"], 0.5 * losses.sparsity_loss(opacity))
    assert torch.allclose(
        early["orientation"],
        2.0 * losses.orientation_loss(out.weights, out.sample_normals, out.ray_dirs, opacity),
    )
    late = scene.regularizers(out, 1.0)
    assert torch.allclose(late["entropy"], 0.05 * losses.entropy_loss(opacity))
    mid = scene.regularizers(out, 0.65)
    assert torch.allclose(mid["entropy"], 0.025 * losses.entropy_loss(opacity))


@pytest.mark.parametrize("orientation", [0.0, 1.0])
def test_the_training_render_computes_normals_only_for_the_orientation_loss(orientation):
    config, scene = _scene(orientation=orientation)
    cams = sample_cameras(config.camera, torch.Generator().manual_seed(0))
    out = scene.render_train(cams, "albedo", None, 0.5, torch.Generator().manual_seed(1))
    assert (out.sample_normals is not None) == (orientation > 0)
    assert out.rgb.shape == (1, 3, 8, 8)


def test_solid_background_replaces_the_scenes_own():
    config, scene = _scene()
    cams = sample_cameras(config.camera, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.nn.init.constant_(scene.nerf.mlp[-1].bias, -20.0)  # no density anywhere: only background
        out = scene.render(cams, solid_background=(0.25, 0.5, 0.75), random_background=False)
    assert torch.allclose(out.rgb[0, :, 4, 4], torch.tensor([0.25, 0.5, 0.75]), atol=1e-3)
