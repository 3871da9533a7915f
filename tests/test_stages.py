"""Stages (stages.py): a run as a list of segments, each with its own rule and what it renders."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch

from sds3d.config import ConfigError, check_config, load_config, preset, to_dict
from sds3d.rules import SDSRuleConfig, with_rule
from sds3d.stages import StageConfig, plan_stages


def test_plan_stages_covers_the_run_and_gives_the_rest_to_the_runs_rule():
    vsd, sds = with_rule(SDSRuleConfig(), "vsd"), SDSRuleConfig()
    plan = plan_stages([StageConfig(steps=3, render="latent"), StageConfig(steps=4, rule=vsd)], 10, sds)
    assert [(s.start, s.end, s.render, s.rule.kind) for s in plan] == [
        (0, 3, "latent", "sds"), (3, 7, "rgb", "vsd"), (7, 10, "rgb", "sds"),
    ]  # fmt: skip
    assert [(s.start, s.end) for s in plan_stages([], 5, sds)] == [(0, 5)]
    assert len(plan_stages([StageConfig(steps=5)], 5, sds)) == 1  # the stages fill the run


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([StageConfig(steps=2), StageConfig(steps=2, render="latent")], "only the first stage"),
        ([StageConfig(steps=0)], "must be positive"),
        ([StageConfig(steps=7)], "more than the run's 6"),
    ],
)
def test_stages_no_run_can_use_are_one_line(stages, message):
    with pytest.raises(ConfigError, match=message):
        check_config(dataclasses.replace(preset("fast"), steps=6, stages=stages))


def test_a_config_json_with_the_old_latent_warmup_flag_loads_as_a_first_stage(tmp_path):
    config = dataclasses.replace(
        preset("fast"), stages=[StageConfig(steps=3, render="latent", latent_channels=4)]
    )
    new = to_dict(config)
    old = {k: v for k, v in new.items() if k != "stages"} | {"latent_warmup": {"steps": 3, "channels": 4}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert to_dict(load_config(tmp_path / "config.json")) == new
    (tmp_path / "config.json").write_text(json.dumps(old | {"latent_warmup": {"steps": 0, "channels": 4}}))
    assert load_config(tmp_path / "config.json").stages == []
    # A stage's rule goes through config.json by its kind.
    config.stages = [StageConfig(steps=2, rule=with_rule(SDSRuleConfig(guidance_scale=3.0), "ism"))]
    (tmp_path / "config.json").write_text(json.dumps(to_dict(config)))
    loaded = load_config(tmp_path / "config.json").stages[0].rule
    assert type(loaded).__name__ == "ISMRuleConfig" and loaded.guidance_scale == 3.0


def test_each_stage_trains_with_its_rule_and_a_run_resumes_exactly_across_stages(tmp_path):
    """Stage 1: VSD for 2 steps; then SDS. VSD's particle network trains in its stage only (its
    state is the same after step 4 as after step 2); the run stopped inside the first stage and
    resumed ends exactly where the uninterrupted run does."""
    from sds3d.train import train

    config = preset("fast")
    config.camera.width = config.camera.height = 8
    config.renderer.num_samples = 8
    config = dataclasses.replace(config, prompt="a red cube", steps=4, checkpoint_every=2, validate_every=0,
                                 stages=[StageConfig(steps=2, rule=with_rule(config.rule, "vsd"))])  # fmt: skip
    states = {}

    def keep(step, scene):
        states[step] = (
            torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
            if step in (2, 4)
            else None
        )

    out = train(config, tmp_path / "a", progress=False, on_step=keep)
    assert "sds" in out.final_losses and "vsd" not in out.final_losses  # the last stage's rule
    at2, at4 = states[2]["rules"], states[4]["rules"]
    assert float(at2["0.particle.conv_out.weight"].abs().sum()) > 0  # trained in its stage
    assert all(torch.equal(at2[k], at4[k]) for k in at2)  # and left alone after it

    def stop_at_1(step, scene):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(config, tmp_path / "b", progress=False, on_step=stop_at_1).steps_done == 1
    train(config, tmp_path / "b", resume=True, progress=False)
    a, b = (torch.load(tmp_path / x / "checkpoints" / "last.pt", weights_only=True) for x in "ab")
    for key in ("scene", "rules"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_latent_warmup_flag_sets_a_first_stage(capsys):
    from sds3d.cli import _resolve_config, build_parser, main

    args = build_parser().parse_args(["generate", "a red cube", "--preset", "fast", "--latent-warmup", "5"])
    assert _resolve_config(args).stages == [StageConfig(steps=5, render="latent")]
    assert main(["generate", "a red cube", "--preset", "fast", "--steps", "3", "--latent-warmup", "5"]) == 2
    assert "more than the run's 3" in capsys.readouterr().err
