"""Break the code on purpose, one mutation at a time, and check that the named tests fail.

    .venv/bin/python scripts/mutation_check.py            # all mutations (a few minutes on 2 cores)
    .venv/bin/python scripts/mutation_check.py 3 7        # only these

Each mutation is an exact text replacement in one file; the file is restored afterwards, whatever
happens. A mutation whose tests still pass is a hole in the suite: the script exits 1.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "sds3d"

# (file, original text, mutated text, pytest selection)
# fmt: off
MUTATIONS = [
    ('rules/base.py', 'c.t_max_end, c.t_drop_at', '0.5, 0.5', 'tests/test_rules.py -k t_max'),
    ('rules/base.py', 'c.t_max_end, c.t_drop_at', 'c.t_max_end, 0.5', 'tests/test_rules.py -k drop'),
    ('rules/base.py', 'grad = diffusion.nan_guard(grad)', 'pass', 'tests/test_rules.py -k nan'),
    ('render/volume.py', 'rgb_fg + (1 - opacity) * bg', 'rgb_fg + (1 - opacity.detach()) * bg', 'tests/test_render.py -k finite_difference_gradient'),
    ('export.py', '[0.0, -1.0, 0.0]]', '[0.0, 1.0, 0.0]]', 'tests/test_export.py -k mirrored'),
    ('train.py', 'torch.Generator().manual_seed(config.seed)', 'torch.Generator().manual_seed(0)', 'tests/test_rules.py -k seed'),
    ('guidance/analytic.py', 'alpha**2 * self.config.std**2', 'alpha * self.config.std**2', 'tests/test_priors.py -k exact_noise'),
    ('diffusion.py', 'eps) / a.sqrt()', 'eps) / a', 'tests/test_rules.py -k predict_x0'),
    ('runs.py', 'if digests and _digest(data) not in digests:', 'if False:', 'tests/test_run_safety.py -k changed_after'),
    ('runs.py', '    if not is_run(run_dir):\n        raise', '    if False:\n        raise', 'tests/test_run_safety.py -k never_deletes'),
    ('train.py', '                group[key] = new[key]', '                pass', 'tests/test_run_safety.py -k learning_rate'),
    ('export.py', 'srgb_to_linear(colors[:, :3] / 255.0)', '(colors[:, :3] / 255.0)', 'tests/test_export.py -k linear'),
    ('export.py', '"metallicFactor": 0.0', '"metallicFactor": 1.0', 'tests/test_export.py -k matte'),
    ('export.py', 'duration=round(1000 / fps)', 'duration=1 / fps', 'tests/test_export.py -k gif'),
    ('runs.py', '        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n', '', 'tests/test_run_safety.py -k second_process'),
    ('export.py', 'light_positions=_turntable_lights(cams) if config.turntable_lit else None', 'light_positions=None', 'tests/test_export.py -k lit'),
    ('cli.py', '    if not 0 <= value <= 2**64 - 1:', '    if False:', 'tests/test_run_safety.py -k seed'),
    ('runs.py', 'if bad:  # training', 'if False:  # training', 'tests/test_run_safety.py -k nan_values'),
    ('train.py', '        runs.check_new_run(run_dir, overwrite)\n', '        runs.check_new_run(run_dir, overwrite)\n        if overwrite and runs.user_entries(run_dir):\n            runs.clear_run(run_dir)\n', 'tests/test_run_safety.py -k prompt_before'),
    ('rules/sds.py', 'literal = c.kind == "literal"', 'literal = False', 'tests/test_rules.py -k formula'),
    ('representations/nerf_scene.py', 'oriented = value_at(self.weights.orientation, step_ratio) > 0', 'oriented = False', 'tests/test_representations.py -k only_for'),
    ('representations/nerf_scene.py', 'value_at(self.weights.entropy, step_ratio)', 'value_at(self.weights.entropy, 1.0)', 'tests/test_representations.py -k ramps'),
    ('representations/nerf_scene.py', '"lr": optim.lr_mlp}', '"lr": optim.lr_grid}', 'tests/test_representations.py -k param_groups'),
    ('rules/sds.py', 'c.guidance_scale * eps_cond.detach(), c.guidance_scale * eps_uncond', 'eps.detach(), noise', 'tests/test_rules.py -k csd'),
    ('rules/inversion.py', 's = (t - round(c.interval * prior.num_train_timesteps)).clamp_min(0)', 's = t', 'tests/test_rules.py -k ism'),
    ('rules/inversion.py', 'if c.inversion_eta > 0:', 'if False:', 'tests/test_rules.py -k sdi'),
    ('rules/inversion.py', 'c.inversion_guidance_scale)', '1.0)', 'tests/test_rules.py -k sdi'),
    ('rules/guided.py', 'torch.where(below, eps_uncond, eps_uncond - eps_neg)', 'torch.where(below, eps_uncond, eps_uncond)', 'tests/test_rules.py -k nfsd'),
    ('rules/guided.py', '(e_pos - lam * removed)', '(e_pos + lam * removed)', 'tests/test_rules.py -k perp'),
    ('rules/guided.py', 'on = torch.tensor([0.0 if lab == "overhead" else 1.0 for lab in labels])', 'on = torch.ones(len(labels))', 'tests/test_rules.py -k perp'),
    ('rules/vsd.py', 'lam = self.config.camera_free_weight', 'lam = 0.0', 'tests/test_rules.py -k esd'),
    ('rules/vsd.py', '>= c.camera_dropout', '>= 0.0', 'tests/test_rules.py -k vsd_and_esd'),
    ('rules/vsd.py', 'eps_phi = eps_cond + self', 'eps_phi = eps + self', 'tests/test_rules.py -k vsd_and_esd'),
    ('rules/sds.py', 'samples = c.paas_samples if isinstance(c, SJCRuleConfig) else 1', 'samples = 1', 'tests/test_rules.py -k sjc'),
    ('rules/__init__.py', '"sjc": {"weighting": "sjc"}, ', '', 'tests/test_rules.py -k sjc'),
    ('diffusion.py', 'a.sqrt() * x0 + (1 - a).sqrt() * eps', 'a.sqrt() * x0 + (1 - a) * eps', 'tests/test_rules_analytic.py -k ism'),
    ('rules/inversion.py', 'eps_s = prior.predict_noise(x_s, s, list(uncond), cameras)', 'eps_s = prior.predict_noise(x_s, s, list(cond), cameras)', 'tests/test_rules_analytic.py -k ism'),
    ('stages.py', 's.rule if s.rule is not None else rule', 'rule', 'tests/test_stages.py'),
    ('train.py', 'scene.start_stage(stages[stage.index - 1].render, stage.render)', 'pass', 'tests/test_latent_prior.py -k skips_the_vae'),
    ('stages.py', 'if s.render == "latent" and i > 0:', 'if False:', 'tests/test_stages.py -k one_line'),
    # sds3d study: settings reach the config, statistics are over seeds, finished cells are skipped
    ('bench/study.py', '"textureless_prob": 0.0, "light_jitter": 0.0}', '"textureless_prob": 0.0}', 'tests/test_study.py -k each_axis'),
    ('bench/study.py', 'float(np.std(per_seed, ddof=1))', 'float(np.std(per_seed))', 'tests/test_study.py -k spread'),
    ('bench/study.py', 'c.key not in found or "error" in found[c.key]]', '"error" in found.get(c.key, {})]', 'tests/test_study.py -k resumes'),
    ('bench/study.py', 'prompt=prompt, seed=seed, device=device', 'prompt=prompt, seed=0, device=device', 'tests/test_study.py -k seed_by_seed'),
    ('batch.py', 'terms[name] = terms.get(name, 0) + len(ids) * value', 'terms[name] = terms.get(name, 0) + value', 'tests/test_batch.py -k each_scenes_own_step'),
    ('batch.py', 'SceneGenerators([s.generator for s in scenes])', 'SceneGenerators([scenes[0].generator for s in scenes])', 'tests/test_batch.py -k each_scenes_own_step'),
    ('batch.py', '                shadings.append(shading)', '                shadings.append("albedo")', 'tests/test_batch.py -k each_scenes_own_step'),
    ('batch_ray.py', '            queue.appendleft(chunk)', '            pass', 'tests/test_batch.py -k ray'),
    ('bench/study.py', 'return out + list(open_.values()) + alone', 'return alone + out + list(open_.values())', 'tests/test_study.py -k waves'),
    ('bench/study.py', 'return deadline is not None and time.time() >= deadline', 'return False', 'tests/test_study.py -k time_limit'),
    ('app.py', '.then(handler, args, streamed, concurrency_id="train", concurrency_limit=1)', '.then(handler, args, streamed, concurrency_id="train", concurrency_limit=None)', 'tests/test_app.py -k queue'),
    ('app.py', 'config.seed = _cli_number(seed, "--seed", "seed")', '_cli_number(seed, "--seed", "seed")', 'tests/test_app.py -k settings_reach'),
    ('app.py', 'config.validate_every = max(1, config.steps // VALIDATIONS_SHOWN)', 'pass', 'tests/test_app.py -k settings_reach'),
    ('app.py', '        event = self._stops.get(session)\n', '        event = None\n', 'tests/test_app.py -k stop_keeps'),
    ('app.py', '                stop.set()\n                thread.join()', '                thread.join()', 'tests/test_app.py -k closing'),
    ('render/splat.py', 'order = torch.argsort(depth.detach(), dim=1)', 'order = torch.argsort(-depth.detach(), dim=1)', 'tests/test_gaussians.py -k nearer'),
    ('render/splat.py', 'cov2d = cov2d + LOW_PASS_PX2 * torch.eye', 'cov2d = cov2d + 0 * torch.eye', 'tests/test_gaussians.py -k closed_form'),
    ('render/splat.py', 'focal * p[..., 0] / z**2', '-focal * p[..., 0] / z**2', 'tests/test_gaussians.py -k twin'),
    ('representations/gaussians.py', 'self.log_scales[split] -= math.log(1.6)', 'pass', 'tests/test_gaussians.py -k densify_clones'),
    ('representations/gaussians.py', '{k: v if k == "step" else moments(v) for k, v in state.items()}', '{}', 'tests/test_gaussians.py -k densify_clones'),
    ('representations/gaussians.py', 'or not c.densify_from <= step_ratio < c.densify_until', 'or False', 'tests/test_gaussians.py -k schedule'),
    ('representations/gaussians.py', 'self.means.clamp_(-c.bound, c.bound)', 'pass', 'tests/test_gaussians.py -k box'),
    ('representations/gaussians.py', 'lambda x: x[keep]', 'lambda x: x', 'tests/test_gaussians.py -k densify_clones'),
    ('bench/batch.py', '    sys.exit(_command())', '    sys.exit(main())', 'tests/test_batch.py -k combine'),
    ('app.py', 'if info.status != "stopped":', 'if info.status == "done":', 'tests/test_app.py -k stop_keeps'),
    ('representations/gaussians.py', '            self._steps = int(state_dict[prefix + "steps_seen"])', '            pass', 'tests/test_gaussians.py -k resumes'),
]
# fmt: on


def run(index: int) -> bool:
    rel, old, new, tests = MUTATIONS[index]
    path = SRC / rel
    text = path.read_text()
    if text.count(old) != 1:
        print(f"[{index}] {rel}: the original text is not found exactly once; update the script")
        return False
    try:
        path.write_text(text.replace(old, new))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *shlex.split(tests)],
                              cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    finally:
        path.write_text(text)
    killed = proc.returncode == 1
    print(
        f"[{index}] {'killed ' if killed else 'SURVIVED'} {rel}: {old.strip()[:50]!r} -> {new.strip()[:30]!r}"
    )
    return killed


def main() -> int:
    chosen = [int(a) for a in sys.argv[1:]] or range(len(MUTATIONS))
    results = [run(i) for i in chosen]
    print(f"{sum(results)} of {len(results)} mutations killed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
