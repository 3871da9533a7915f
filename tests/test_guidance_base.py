"""The SDS step of guidance/base.py with a stub prior whose ε̂ is chosen by the test: the step
follows its config's t-schedule fields, guards NaN, and the training loop draws its timesteps and
cameras from the run's seed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sds3d import diffusion
from sds3d.guidance.base import NoisePredictionGuidance, SDSConfig

T = 1000


class StubPrior(NoisePredictionGuidance):
    """ε̂ = `eps_fn(x_t, t)`; a text is its length as a constant image."""

    def __init__(self, sds: SDSConfig, eps_fn=lambda x_t, t: torch.zeros_like(x_t)):
        super().__init__(sds, diffusion.DDPM_SCHEDULER_CONFIG)
        self.eps_fn = eps_fn
        self.seen: list[dict[str, torch.Tensor]] = []

    def encode_prompt(self, text: str) -> torch.Tensor:
        return torch.full((3, 8, 8), float(len(text)))

    def predict_noise(self, x_t, t, embeddings, cameras):
        return self.eps_fn(x_t, t)

    def forward(self, rgb, cond, uncond, step_ratio, cameras=None, generator=None, rgb_as_latents=False):
        out = super().forward(rgb, cond, uncond, step_ratio, cameras, generator, rgb_as_latents)
        seen = {"t": out.timesteps.clone()}
        if cameras is not None:
            seen["azimuth_deg"] = cameras.azimuth_deg.clone()
        self.seen.append(seen)
        return out


def _timesteps(sds: SDSConfig, step_ratio: float, n: int = 2048) -> torch.Tensor:
    prior = StubPrior(sds)
    rgb = torch.rand(n, 3, 2, 2)
    cond = [prior.encode_prompt("y")] * n
    return prior(rgb, cond, cond, step_ratio, generator=torch.Generator().manual_seed(0)).timesteps


def test_the_step_lowers_t_max_to_the_configs_t_max_end():
    sds = SDSConfig(t_schedule="linear", t_min=0.02, t_max=0.98, t_max_end=0.3)
    assert int(_timesteps(sds, 0.0).max()) > 900
    end = _timesteps(sds, 1.0)
    assert int(end.max()) <= 300 and int(end.max()) > 280 and int(end.min()) >= 20


def test_the_step_drops_t_max_at_the_configs_t_drop_at():
    sds = SDSConfig(t_schedule="step", t_min=0.02, t_max=0.98, t_max_end=0.3, t_drop_at=0.2)
    assert int(_timesteps(sds, 0.1).max()) > 900  # before the drop
    assert int(_timesteps(sds, 0.25).max()) <= 300  # after it (the default 0.5 would still be high)


def test_the_step_guards_a_nan_prediction():
    def one_nan(x_t, t):
        eps = torch.zeros_like(x_t)
        eps[0, 0, 0, 0] = float("nan")
        return eps

    prior = StubPrior(SDSConfig(), one_nan)
    rgb = torch.rand(2, 3, 4, 4, requires_grad=True)
    cond = [prior.encode_prompt("y")] * 2
    out = prior(rgb, cond, cond, 0.5, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(out.loss, rgb)
    assert torch.isfinite(grad).all() and torch.isfinite(out.loss)
    assert grad[1].abs().sum() > 0  # the healthy sample still pushes


def test_timesteps_and_cameras_follow_the_runs_seed(tmp_path):
    from sds3d.config import preset
    from sds3d.train import train

    def run(seed: int, name: str) -> list[dict[str, torch.Tensor]]:
        config = preset("fast")
        config.camera.width = config.camera.height = 8
        config.renderer.num_samples = 4
        config = dataclasses.replace(config, prompt="a red cube", seed=seed, steps=3, validate_every=0)
        prior = StubPrior(config.guidance.sds)
        train(config, tmp_path / name, progress=False, guidance=prior)
        return prior.seen

    a, a_again, b = run(0, "a"), run(0, "a-again"), run(1, "b")
    assert len(a) == 3
    for key in ("t", "azimuth_deg"):
        assert all(torch.equal(x[key], y[key]) for x, y in zip(a, a_again, strict=True))
        assert any(not torch.equal(x[key], y[key]) for x, y in zip(a, b, strict=True)), key


@pytest.mark.parametrize("t", [50, 500, 950])
def test_predict_x0_inverts_add_noise(t):
    g = torch.Generator().manual_seed(t)
    abar = diffusion.alphas_cumprod_from_config(diffusion.DDPM_SCHEDULER_CONFIG)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    steps = torch.tensor([t, t])
    x_t = diffusion.add_noise(x0, eps, steps, abar)
    assert torch.allclose(diffusion.predict_x0(x_t, eps, abar[steps]), x0, atol=1e-4)
