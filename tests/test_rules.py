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
        config.rule.camera_guidance_scale = 0.0  # one prior call a step
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


def test_camera_guidance_flag(capsys):
    from sds3d.cli import _resolve_config, build_parser, main

    args = build_parser().parse_args(["generate", "a red cube", "--camera-guidance", "4", "--rule", "ism"])
    config = _resolve_config(args)
    assert config.rule.kind == "ism" and config.rule.camera_guidance_scale == 4.0
    assert main(["generate", "a red cube", "--camera-guidance", "-1"]) == 2
    assert main(["generate", "a red cube", "--rule", "perp-neg", "--camera-guidance", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "≥ 0" in err[0] and "perp-neg rule has no camera guidance" in err[1]


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
def test_every_rule_trains_every_kind_of_prior(name, tiny_sd_model, tmp_path):
    """Each rule, by its own class, runs end to end on the built-in prior, the empirical and the
    Gaussian priors and a tiny SD pipeline (latents through a VAE), and is written to config.json
    under its own kind."""
    import json

    from conftest import tiny_diffusers_run
    from sds3d.config import load_config, preset
    from sds3d.rules import RULE_CONFIGS, with_rule
    from sds3d.train import build_rule, train

    configs = []
    for base in ("fast", "empirical", "gaussian"):
        config = preset(base)
        config.camera.width = config.camera.height = 8
        config.renderer.num_samples = 8
        if hasattr(config.guidance, "views"):
            config.guidance.views.resolution = 8
            config.guidance.views.views_per_object = 8
            config.guidance.views.uncond_views_per_object = 2
        configs.append(config)
    configs.append(tiny_diffusers_run(tiny_sd_model, size=16, steps=2))
    for i, run in enumerate(configs):
        run = dataclasses.replace(run, prompt="a red cube", steps=2, validate_every=0)
        run.rule = with_rule(run.rule, name)
        assert type(run.rule) is RULE_CONFIGS[name] and run.rule.kind == name
        out = train(run, tmp_path / str(i), progress=False)
        assert out.steps_done == 2 and name in out.final_losses and out.final_losses["grad_norm"] > 0
        assert json.loads((tmp_path / str(i) / "config.json").read_text())["rule"]["kind"] == name
        assert type(load_config(tmp_path / str(i) / "config.json").rule) is RULE_CONFIGS[name]
        if name in ("vsd", "esd"):
            assert out.final_losses["particle"] > 0
    classes = {"nfsd": "NFSDRule", "perp-neg": "PerpNegRule", "ism": "ISMRule", "sdi": "SDIRule", "vsd": "VSDRule",
               "esd": "VSDRule"}  # fmt: skip
    assert type(build_rule(run)).__name__ == classes.get(name, "SDSRule")


class LinearPrior(Prior):
    """ε̂ = a·x_t + c·e_text, with a text's embedding a fixed random image; the render is the model's
    space (no [0, 1] → [−1, 1] map), so the formulas below read as the papers write them."""

    def __init__(self, texts: list[str], a: float = 0.5, c: float = 0.3, shape=(3, 4, 4)):
        super().__init__(diffusion.DDPM_SCHEDULER_CONFIG)
        g = torch.Generator().manual_seed(11)
        self.emb = {text: torch.randn(shape, generator=g) for text in texts}
        self.a, self.c = a, c

    def encode_prompt(self, text):
        if text not in self.emb:
            from sds3d.errors import UserError

            raise UserError(f"unknown text {text!r}")
        return self.emb[text]

    def encode_images(self, rgb):
        return rgb

    def predict_noise(self, x_t, t, embeddings, cameras):
        return self.a * x_t + self.c * torch.stack(list(embeddings))

    def eps(self, x_t, text):
        return self.a * x_t + self.c * self.emb[text]


def _rule_grad(rule, prior, x, cond, uncond, seed=3, cameras=None):
    rgb = x.clone().requires_grad_(True)
    out = rule(prior, rgb, cond, uncond, 0.4, cameras=cameras, generator=torch.Generator().manual_seed(seed))
    name = next(iter(out.losses))
    return torch.autograd.grad(out.losses[name], rgb)[0], out


def _expand(v):
    return v.reshape(-1, 1, 1, 1)


def _cfg(prior, x_t, cond_text, uncond_text, s):
    return prior.eps(x_t, uncond_text) + s * (prior.eps(x_t, cond_text) - prior.eps(x_t, uncond_text))


def test_sjc_gradient_is_the_paas_average_of_alpha_over_sigma_times_the_residual():
    from sds3d.rules import with_rule

    prior, b, s = LinearPrior(["y", ""]), 3, 2.0
    config = with_rule(SDSRuleConfig(guidance_scale=s), "sjc")
    config.paas_samples = 2
    x = torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, out = _rule_grad(config.build(), prior, x, [prior.emb["y"]] * b, [prior.emb[""]] * b)
    g = torch.Generator().manual_seed(3)
    t = diffusion.sample_timesteps(b, (0.02, 0.98), T, g)
    abar = _expand(prior.alphas_cumprod[t])
    expected = torch.zeros_like(x)
    for _ in range(2):
        n = torch.randn(x.shape, generator=g)
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * n
        expected += (abar.sqrt() / (1 - abar).sqrt()) * (_cfg(prior, x_t, "y", "", s) - n) / 2
    assert torch.equal(out.timesteps, t) and torch.allclose(ours, expected / b, atol=1e-5)


def test_nfsd_gradient_is_the_domain_plus_scaled_condition_term_on_both_sides_of_the_threshold():
    from sds3d.prompts import PromptConfig, PromptProcessor
    from sds3d.rules import with_rule

    prior, b, s = LinearPrior(["y", "", "bad"]), 8, 3.0
    config = with_rule(SDSRuleConfig(guidance_scale=s, weighting="dreamfusion"), "nfsd")
    config.negative_prompt = "bad"
    rule = config.build()
    rule.prepare(prior, PromptProcessor("y", PromptConfig(view_dependent=False), prior.encode_prompt))
    x = torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, out = _rule_grad(rule, prior, x, [prior.emb["y"]] * b, [prior.emb[""]] * b)
    g = torch.Generator().manual_seed(3)
    t = diffusion.sample_timesteps(b, (0.02, 0.98), T, g)
    n = torch.randn(x.shape, generator=g)
    abar = _expand(prior.alphas_cumprod[t])
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * n
    e_u, e_y, e_neg = prior.eps(x_t, ""), prior.eps(x_t, "y"), prior.eps(x_t, "bad")
    delta_d = torch.where(_expand(t) < 200, e_u, e_u - e_neg)
    expected = (1 - abar) * (delta_d + s * (e_y - e_u))
    assert bool((t < 200).any()) and bool((t >= 200).any())  # both branches are exercised
    assert torch.allclose(ours, expected / b, atol=1e-5)


def test_nfsd_falls_back_to_the_unconditional_score_when_the_prior_cannot_encode_its_negative(capsys):
    from sds3d.prompts import PromptConfig, PromptProcessor
    from sds3d.rules import with_rule

    prior = LinearPrior(["y", ""])
    rule = with_rule(SDSRuleConfig(), "nfsd").build()
    rule.prepare(prior, PromptProcessor("y", PromptConfig(view_dependent=False), prior.encode_prompt))
    assert rule.negative is None and "cannot encode NFSD's negative prompt" in capsys.readouterr().err


def test_perp_neg_gradient_removes_the_other_views_perpendicular_parts():
    from sds3d.cameras import orbit_cameras
    from sds3d.prompts import PromptConfig, PromptProcessor
    from sds3d.rules import with_rule

    texts = ["y", "", "y, front view", "y, side view", "y, back view"]
    prior, s, lam = LinearPrior(texts), 2.0, 0.7
    config = with_rule(SDSRuleConfig(guidance_scale=s, weighting="dreamfusion"), "perp-neg")
    config.negative_weight = lam
    rule = config.build()
    rule.prepare(prior, PromptProcessor("y", PromptConfig(), prior.encode_prompt))
    el, az = torch.tensor([10.0, 10.0, 20.0, 75.0]), torch.tensor([5.0, 90.0, 170.0, 30.0])
    cams = orbit_cameras(el, az, torch.full((4,), 2.5), torch.full((4,), 40.0), 8, 8)
    labels, negatives = ["front", "side", "back", "overhead"], [("side", "back"), ("front", "back"),
                                                                 ("front", "side"), None]  # fmt: skip
    cond = [prior.emb[f"y, {lab} view"] if lab != "overhead" else prior.emb["y"] for lab in labels]
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, _ = _rule_grad(rule, prior, x, cond, [prior.emb[""]] * 4, cameras=cams)
    g = torch.Generator().manual_seed(3)
    t = diffusion.sample_timesteps(4, (0.02, 0.98), T, g)
    n = torch.randn(x.shape, generator=g)
    abar = _expand(prior.alphas_cumprod[t])
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * n
    expected = []
    for i in range(4):
        e_u = prior.eps(x_t[i], "")
        e_pos = prior.a * x_t[i] + prior.c * cond[i] - e_u
        total = e_pos.clone()
        for other in negatives[i] or ():
            e_i = prior.eps(x_t[i], f"y, {other} view") - e_u
            total -= lam * (e_i - (e_i * e_pos).sum() / (e_pos * e_pos).sum() * e_pos)
        expected.append((1 - abar[i]) * (e_u + s * total - n[i]))
    assert torch.allclose(ours, torch.stack(expected) / 4, atol=1e-5)


def _ddim(prior, x, k_from, k_to, eps):
    a_f, a_t = _expand(prior.alphas_cumprod[k_from]), _expand(prior.alphas_cumprod[k_to])
    x0 = (x - (1 - a_f).sqrt() * eps) / a_f.sqrt()
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


def test_ism_gradient_compares_the_guided_score_at_t_with_the_inverted_unconditional_one_at_s():
    from sds3d.rules import with_rule

    prior, b, s, n_inv, delta = LinearPrior(["y", ""]), 3, 2.0, 4, 80
    config = with_rule(SDSRuleConfig(guidance_scale=s, t_min=0.3, t_max=0.9), "ism")
    config.inversion_steps, config.interval = n_inv, delta / 1000
    x = torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, out = _rule_grad(config.build(), prior, x, [prior.emb["y"]] * b, [prior.emb[""]] * b)
    t = diffusion.sample_timesteps(b, (0.3, 0.9), T, torch.Generator().manual_seed(3))
    s_t = t - delta
    xs = x.clone()
    for j in range(n_inv):
        k0, k1 = s_t * j // n_inv, s_t * (j + 1) // n_inv
        xs = _ddim(prior, xs, k0, k1, prior.eps(xs, ""))
    eps_s = prior.eps(xs, "")
    x_t = _ddim(prior, xs, s_t, t, eps_s)
    abar = _expand(prior.alphas_cumprod[t])
    expected = ((1 - abar) / abar).sqrt() * (_cfg(prior, x_t, "y", "", s) - eps_s)  # LucidDreamer's w(t)
    assert torch.equal(out.timesteps, t) and torch.allclose(ours, expected / b, atol=1e-5)


def test_sdi_gradient_uses_the_noise_that_ddim_inversion_implies():
    from sds3d.rules import with_rule

    prior, b, s, s_inv, n_inv, eta = LinearPrior(["y", ""]), 3, 2.0, -1.5, 5, 0.3
    config = with_rule(SDSRuleConfig(guidance_scale=s, weighting="dreamfusion"), "sdi")
    config.inversion_guidance_scale, config.inversion_steps, config.inversion_eta = s_inv, n_inv, eta
    x = torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, _ = _rule_grad(config.build(), prior, x, [prior.emb["y"]] * b, [prior.emb[""]] * b)
    g = torch.Generator().manual_seed(3)
    t = diffusion.sample_timesteps(b, (0.02, 0.98), T, g)
    fresh = torch.randn(x.shape, generator=g)
    xi = x.clone()
    for j in range(n_inv):
        xi = _ddim(prior, xi, t * j // n_inv, t * (j + 1) // n_inv, _cfg(prior, xi, "y", "", s_inv))
    abar = _expand(prior.alphas_cumprod[t])
    kappa = (xi - abar.sqrt() * x) / (1 - abar).sqrt()
    kappa = (1 - eta**2) ** 0.5 * kappa + eta * fresh
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * kappa
    expected = (1 - abar) * (_cfg(prior, x_t, "y", "", s) - kappa)
    assert torch.allclose(ours, expected / b, atol=1e-5)


@pytest.mark.parametrize("name", ["vsd", "esd"])
def test_vsd_and_esd_gradients_and_the_particle_models_training_target(name):
    """g = w(ε̂ − ε_φ), ε_φ = ε_y + h; ESD's h = λh(∅) + (1 − λ)h(c). A stub h that depends on the
    camera shows the mix; φ's loss is ‖ε_y(x'_t') + h(x'_t', c or ∅) − ε'‖² at a fresh (t', ε')."""
    from sds3d.cameras import orbit_cameras
    from sds3d.rules import with_rule
    from sds3d.rules.vsd import camera_vectors

    class StubParticle(torch.nn.Module):
        def forward(self, x_t, t_frac, camera):
            return (1 + camera[:, 0] + 2 * camera[:, 4] + t_frac).reshape(-1, 1, 1, 1) * torch.ones_like(x_t)

    prior, b, s = LinearPrior(["y", ""]), 4, 2.0
    config = with_rule(SDSRuleConfig(guidance_scale=s, weighting="dreamfusion"), name)
    config.camera_dropout = 0.5
    lam = config.camera_free_weight
    assert (lam == 0.0) == (name == "vsd")
    rule = config.build()
    rule.particle = StubParticle()
    cams = orbit_cameras(torch.tensor([10.0, 20, 30, 40]), torch.tensor([0.0, 60, 120, 180]),
                         torch.full((4,), 2.5), torch.full((4,), 40.0), 8, 8)  # fmt: skip
    x = torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, out = _rule_grad(rule, prior, x, [prior.emb["y"]] * b, [prior.emb[""]] * b, cameras=cams)
    g = torch.Generator().manual_seed(3)
    t = diffusion.sample_timesteps(b, (0.02, 0.98), T, g)
    n = torch.randn(x.shape, generator=g)
    abar = _expand(prior.alphas_cumprod[t])
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * n
    cam = camera_vectors(cams, b, x.device)
    h = lambda c, tt: (1 + c[:, 0] + 2 * c[:, 4] + tt / 1000).reshape(-1, 1, 1, 1)  # noqa: E731
    h_mix = lam * h(torch.zeros_like(cam), t.float()) + (1 - lam) * h(cam, t.float())
    expected = (1 - abar) * (_cfg(prior, x_t, "y", "", s) - (prior.eps(x_t, "y") + h_mix))
    assert torch.allclose(ours, expected / b, atol=1e-5)
    t2 = torch.randint(20, 981, (b,), generator=g)
    n2 = torch.randn(x.shape, generator=g)
    keep = torch.rand(b, generator=g) >= 0.5
    a2 = _expand(prior.alphas_cumprod[t2])
    x2 = a2.sqrt() * x + (1 - a2).sqrt() * n2
    pred = prior.eps(x2, "y") + h(cam * keep[:, None], t2.float())
    assert bool(keep.any()) and not bool(keep.all())  # both kinds of sample are in the batch
    assert torch.allclose(out.losses["particle"], ((pred - n2) ** 2).mean(), atol=1e-6)


def test_a_vsd_run_resumes_exactly_with_its_particle_network(tmp_path):
    """VSD's particle score network and its Adam state are checkpointed with the scene: a run stopped
    at step 2 and resumed ends where the uninterrupted run does, network included; and the network
    did train (its zero-initialised last layer moved)."""
    from sds3d.config import preset
    from sds3d.rules import with_rule
    from sds3d.train import train

    config = preset("fast")
    config.camera.width = config.camera.height = 8
    config.renderer.num_samples = 8
    config.rule = with_rule(config.rule, "vsd")
    config = dataclasses.replace(config, prompt="a red cube", steps=4, checkpoint_every=2, validate_every=0)

    def stop_at_2(step, scene):
        if step == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    train(config, tmp_path / "a", progress=False)
    assert train(config, tmp_path / "b", progress=False, on_step=stop_at_2).steps_done == 2
    train(config, tmp_path / "b", resume=True, progress=False)
    a, b = (torch.load(tmp_path / x / "checkpoints" / "last.pt", weights_only=True) for x in "ab")
    assert set(a["rules"]) == set(b["rules"]) and a["rules"]
    assert all(torch.equal(a["rules"][k], b["rules"][k]) for k in a["rules"])
    assert all(torch.equal(a["scene"][k], b["scene"][k]) for k in a["scene"])
    assert float(a["rules"]["0.particle.conv_out.weight"].abs().sum()) > 0


class CameraLinearPrior(LinearPrior):
    """LinearPrior plus d·cos(azimuth) when it is given cameras (a camera-conditioned prior)."""

    d = 0.7

    def predict_noise(self, x_t, t, embeddings, cameras):
        eps = super().predict_noise(x_t, t, embeddings, cameras)
        if cameras is None:
            return eps
        return eps + self.d * _expand(torch.cos(torch.deg2rad(cameras.azimuth_deg)))


class _ZeroParticle(torch.nn.Module):
    def forward(self, x_t, t_frac, camera):
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("name", ["sds", "literal", "sjc", "ism", "sdi", "vsd", "esd"])
def test_camera_guidance_adds_its_scale_times_what_the_camera_changes(name):
    """ε̂ += s_c(ε_{y,c} − ε_{y,∅c}): against the same step without it (same t and noise), the
    gradient moves by w(t)·s_c·d·cos(az)/B, az 0°, 60°, 180° (the camera's term is d·cos az)."""
    from sds3d.cameras import orbit_cameras
    from sds3d.rules import with_rule

    prior, b, s_c = CameraLinearPrior(["y", ""]), 3, 2.5
    azimuth = torch.tensor([0.0, 60.0, 180.0])
    cams = orbit_cameras(torch.full((b,), 15.0), azimuth, torch.full((b,), 2.5), torch.full((b,), 40.0), 4, 4)
    config = with_rule(SDSRuleConfig(guidance_scale=3.0), name)
    if name == "literal":
        config.kind = "literal"
    x = torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = [prior.emb["y"]] * b, [prior.emb[""]] * b

    def built(config):
        rule = config.build()
        if name in ("vsd", "esd"):  # the particle score h: zero (its own tests are above)
            rule.particle = _ZeroParticle()
        return rule

    plain, out = _rule_grad(built(config), prior, x, cond, uncond, cameras=cams)
    guided, out_c = _rule_grad(
        built(dataclasses.replace(config, camera_guidance_scale=s_c)), prior, x, cond, uncond, cameras=cams
    )
    assert torch.equal(out.timesteps, out_c.timesteps)
    abar = prior.alphas_cumprod[out.timesteps]
    w = _expand(diffusion.sds_weight(abar, config.weighting)).reshape(-1, 1, 1, 1)
    if name == "literal":  # through the denoiser: ∂ε̂/∂x = a·√ᾱ, and 2w(ε̂ − ε) for the square
        w = 2 * w * prior.a * _expand(abar.sqrt())
    expected = w * s_c * prior.d * _expand(torch.cos(torch.deg2rad(azimuth))) / b
    torch.testing.assert_close(guided - plain, expected.expand_as(plain), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["csd", "nfsd", "perp-neg"])
def test_rules_without_camera_guidance_refuse_it(name):
    from sds3d.rules import with_rule

    # with_rule leaves these rules at s_c = 0 (a preset's s_c does not carry over); set by hand, refused
    config = dataclasses.replace(with_rule(SDSRuleConfig(), name), camera_guidance_scale=2.0)
    if name == "csd":
        config.kind = "csd"
    with pytest.raises(ValueError, match="camera guidance"):
        config.build()
    with pytest.raises(ValueError, match="≥ 0"):
        with_rule(SDSRuleConfig(camera_guidance_scale=-1.0), "sds").build()


def test_a_rule_without_camera_guidance_drops_the_presets_s_c_and_the_others_keep_it():
    from sds3d.config import check_config, preset
    from sds3d.rules import RULES, with_rule

    base = preset("default")
    assert base.rule.camera_guidance_scale == 5.0  # the default preset's (issue 15)
    for name in RULES:
        config = dataclasses.replace(base, rule=with_rule(base.rule, name))
        expected = 0.0 if name in ("csd", "nfsd", "perp-neg") else 5.0
        assert config.rule.camera_guidance_scale == expected, name
        check_config(config)  # `sds3d generate --rule NAME` on the default preset is not refused
