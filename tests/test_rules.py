"""The SDS rule (rules/sds.py) with a stub prior whose ε̂ is chosen by the test: the step follows
its config's t-schedule fields, guards NaN, and the training loop draws its timesteps and cameras
from the run's seed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sds3d import diffusion
from sds3d.guidance.base import Prior
from sds3d.rules import RULES, SDSRuleConfig

T = 1000


class StubPrior(Prior):
    """ε̂ = `eps_fn(x_t, t)`; a text is its length as a constant image. Records what it is asked."""

    def __init__(self, eps_fn=lambda x_t, t: torch.zeros_like(x_t)):
        super().__init__(diffusion.DDPM_SCHEDULER_CONFIG)
        self.eps_fn = eps_fn
        self.seen: list[dict[str, torch.Tensor]] = []

    def encode_prompt(self, text: str) -> torch.Tensor:
        return torch.full((3, 8, 8), float(len(text)))

    def predict_noise(self, x_t, t, embeddings, cameras):
        seen = {"t": t.clone()}
        if cameras is not None:
            seen["azimuth_deg"] = cameras.azimuth_deg.clone()
        self.seen.append(seen)
        return self.eps_fn(x_t, t)


def _timesteps(config: SDSRuleConfig, step_ratio: float, n: int = 2048) -> torch.Tensor:
    prior, rule = StubPrior(), config.build()
    rgb = torch.rand(n, 3, 2, 2)
    cond = [prior.encode_prompt("y")] * n
    return rule(prior, rgb, cond, cond, step_ratio, generator=torch.Generator().manual_seed(0)).timesteps


def test_the_step_lowers_t_max_to_the_configs_t_max_end():
    sds = SDSRuleConfig(t_schedule="linear", t_min=0.02, t_max=0.98, t_max_end=0.3)
    assert int(_timesteps(sds, 0.0).max()) > 900
    end = _timesteps(sds, 1.0)
    assert int(end.max()) <= 300 and int(end.max()) > 280 and int(end.min()) >= 20


def test_the_step_drops_t_max_at_the_configs_t_drop_at():
    sds = SDSRuleConfig(t_schedule="step", t_min=0.02, t_max=0.98, t_max_end=0.3, t_drop_at=0.2)
    assert int(_timesteps(sds, 0.1).max()) > 900  # before the drop
    assert int(_timesteps(sds, 0.25).max()) <= 300  # after it (the default 0.5 would still be high)


def test_the_step_guards_a_nan_prediction():
    def one_nan(x_t, t):
        eps = torch.zeros_like(x_t)
        eps[0, 0, 0, 0] = float("nan")
        return eps

    prior, rule = StubPrior(one_nan), SDSRuleConfig().build()
    rgb = torch.rand(2, 3, 4, 4, requires_grad=True)
    cond = [prior.encode_prompt("y")] * 2
    loss = rule(prior, rgb, cond, cond, 0.5, generator=torch.Generator().manual_seed(0)).losses["sds"]
    (grad,) = torch.autograd.grad(loss, rgb)
    assert torch.isfinite(grad).all() and torch.isfinite(loss)
    assert grad[1].abs().sum() > 0  # the healthy sample still pushes


def test_timesteps_and_cameras_follow_the_runs_seed(tmp_path):
    from sds3d.config import preset
    from sds3d.train import train

    def run(seed: int, name: str) -> list[dict[str, torch.Tensor]]:
        config = preset("fast")
        config.camera.width = config.camera.height = 8
        config.renderer.num_samples = 4
        config = dataclasses.replace(config, prompt="a red cube", seed=seed, steps=3, validate_every=0)
        prior = StubPrior()
        train(config, tmp_path / name, progress=False, prior=prior)
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


def test_a_config_json_from_before_the_rule_seam_loads_as_a_rule(tmp_path):
    """Earlier runs kept the SDS settings in `guidance.sds` with a `mode`; they resume unchanged."""
    import json

    from sds3d.config import load_config, preset, to_dict

    config = preset("literal")
    new = to_dict(config)
    old = json.loads(json.dumps(new))
    rule = old.pop("rule")
    old["guidance"]["sds"] = {**{k: v for k, v in rule.items() if k != "kind"}, "mode": rule["kind"]}
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = load_config(tmp_path / "config.json")
    assert loaded.rule.kind == "literal" and to_dict(loaded) == new


def test_rule_flag_and_listing(capsys):
    from sds3d.cli import _resolve_config, build_parser, main

    args = build_parser().parse_args(["generate", "a red cube", "--preset", "empirical", "--rule", "literal"])
    config = _resolve_config(args)
    assert config.rule.kind == "literal" and config.rule.guidance_scale == 1.0  # the preset's settings kept
    assert main(["generate", "a red cube", "--rule", "nope"]) == 2
    assert "unknown rule 'nope'" in capsys.readouterr().err
    assert main(["rules"]) == 0
    listing = capsys.readouterr().out
    assert "sds" in listing and "literal" in listing and "arXiv:2209.14988" in listing


def test_the_literal_rule_trains_through_the_denoiser(tmp_path):
    """A literal run reports its loss under its own name and moves the scene."""
    from sds3d.config import preset
    from sds3d.train import load_scene, train

    config = preset("literal")
    config.camera.width = config.camera.height = 8
    config.renderer.num_samples = 8
    config.guidance.views.resolution = 8
    config.guidance.views.views_per_object = 8
    config.guidance.views.uncond_views_per_object = 2
    config = dataclasses.replace(config, prompt="a red cube", steps=2, validate_every=0)
    out = train(config, tmp_path, progress=False)
    assert "literal" in out.final_losses and "sds" not in out.final_losses
    from sds3d.train import build_scene

    assert not torch.equal(
        load_scene(tmp_path)[1].nerf.encoding.tables, build_scene(config).nerf.encoding.tables
    )


@pytest.mark.parametrize("kind", ["sds", "literal"])
def test_each_rules_gradient_equals_its_formula_for_a_linear_denoiser(kind):
    """ε̂ = a·x_t: SDS's gradient is w(t)(ε̂ − ε)/B; the literal loss Σ w‖ε̂ − ε‖²/B has 2w(ε̂ − ε)·a·α_t/B
    (the Jacobian SDS drops). The same t and ε are drawn here from the same generator."""
    a, b, step_ratio = 0.5, 3, 0.4
    config = SDSRuleConfig(kind=kind, weighting="dreamfusion")
    prior = StubPrior(lambda x_t, t: a * x_t)
    rgb = torch.rand(b, 3, 4, 4, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    cond = [prior.encode_prompt("y")] * b
    out = config.build()(prior, rgb, cond, cond, step_ratio, generator=torch.Generator().manual_seed(3))
    (ours,) = torch.autograd.grad(out.losses[kind], rgb)

    g = torch.Generator().manual_seed(3)
    bounds = diffusion.timestep_bounds("constant", step_ratio, 0.02, 0.98, 0.5, 0.5)
    t = diffusion.sample_timesteps(b, bounds, T, g)
    eps = torch.randn(b, 3, 4, 4, generator=g)
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x = rgb.detach() * 2 - 1
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
    w = 1 - abar
    residual = a * x_t - eps
    grad_x = (w * residual if kind == "sds" else 2 * w * residual * a * abar.sqrt()) / b
    assert torch.equal(out.timesteps, t)
    assert torch.allclose(ours, grad_x * 2, atol=1e-6)  # x = 2·rgb − 1


def test_a_prior_shared_by_two_runs_is_left_as_it_was(tmp_path):
    """`generate(prior=…)` uses a caller's prior as it is: a second prompt on it still encodes."""
    from sds3d.api import generate
    from sds3d.config import preset
    from sds3d.train import build_prior

    config = preset("fast")
    config.camera.width = config.camera.height = 8
    config.renderer.num_samples = 4
    config.export = dataclasses.replace(config.export, grid_resolution=24, iso_view_resolution=16,
                                        turntable_frames=2, turntable_resolution=16, num_samples=16)  # fmt: skip
    config = dataclasses.replace(config, steps=1, validate_every=0)
    prior = build_prior(config)
    for prompt in ("a red cube", "a blue torus"):
        generate(dataclasses.replace(config, prompt=prompt), tmp_path / prompt.replace(" ", "-"), progress=False,
                 prior=prior)  # fmt: skip
    assert prior.text_encoder is not None
    assert all(not p.requires_grad for p in prior.parameters())


def test_csd_is_the_guidance_term_alone_a_constant_push_under_two_gaussians():
    """N(μ_y, s₀²I) and N(μ_∅, s₀²I): ε_y − ε_∅ = α σ (μ_∅ − μ_y)/v for any x, so CSD's gradient
    w(t)·s·α σ (μ_∅ − μ_y)/v does not depend on the render (no fixed point, unlike SDS)."""
    from sds3d.cameras import CameraConfig
    from sds3d.guidance.analytic import GaussianPriorGuidanceConfig, WorldViewsConfig

    res, b, scale, std = 4, 3, 5.0, 0.5
    g = torch.Generator().manual_seed(0)
    mu_y, mu_0 = torch.rand(3, res, res, generator=g) - 0.5, torch.rand(3, res, res, generator=g) - 0.5
    prior = GaussianPriorGuidanceConfig(std=std, views=WorldViewsConfig(resolution=res)).build(
        CameraConfig(), means={"y": mu_y, "": mu_0}
    )
    rule = SDSRuleConfig(kind="csd", guidance_scale=scale).build()
    grads = []
    for seed in (1, 2):  # two unrelated renders, the same (t, ε) stream
        rgb = torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
        out = rule(prior, rgb, [mu_y] * b, [mu_0] * b, 0.5, generator=torch.Generator().manual_seed(9))
        grads.append(torch.autograd.grad(out.losses["csd"], rgb)[0])
    abar = prior.alphas_cumprod[out.timesteps].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    v = alpha**2 * std**2 + sigma**2
    expected = (1 - abar) * scale * alpha * sigma * (mu_0 - mu_y) / v * 2 / b  # x = 2·rgb − 1
    assert torch.allclose(grads[0], expected, atol=1e-6) and torch.allclose(grads[1], expected, atol=1e-6)


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_trains_the_builtin_and_a_tiny_sd_prior(name, tiny_sd_model, tmp_path):
    from conftest import tiny_diffusers_run
    from sds3d.config import preset
    from sds3d.train import train

    config = preset("fast")
    config.camera.width = config.camera.height = 8
    config.renderer.num_samples = 8
    for i, run in enumerate([config, tiny_diffusers_run(tiny_sd_model, size=16, steps=2)]):
        run = dataclasses.replace(run, prompt="a red cube", steps=2, validate_every=0)
        run.rule = dataclasses.replace(run.rule, kind=name)
        out = train(run, tmp_path / str(i), progress=False)
        assert out.steps_done == 2 and name in out.final_losses and out.final_losses["grad_norm"] > 0
