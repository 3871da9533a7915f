"""View-dependent prompts, negative prompts and the embedding cache."""

from __future__ import annotations

import pytest
import torch

from sds3d.cameras import orbit_cameras
from sds3d.errors import UserError
from sds3d.prompts import PromptConfig, PromptProcessor, strip_view


def _cams():
    el = torch.tensor([10.0, 10.0, 10.0, 80.0])
    az = torch.tensor([0.0, 90.0, 180.0, 0.0])
    full = lambda v: torch.full((4,), v)
    return orbit_cameras(el, az, full(2.5), full(40.0), 4, 4)


def test_view_dependent_texts_and_negative_prompt():
    calls: list[str] = []
    proc = PromptProcessor(
        "a red cube", PromptConfig(negative_prompt="blurry"), lambda t: calls.append(t) or len(t)
    )
    cond, uncond = proc.texts(_cams())
    assert cond == [
        "a red cube, front view",
        "a red cube, side view",
        "a red cube, back view",
        "a red cube, overhead view",
    ]
    assert uncond == ["blurry"] * 4
    proc(_cams())
    proc(_cams())
    assert sorted(calls) == sorted(set(cond) | {"blurry"})  # each text encoded once


def test_plain_prompts_without_view_dependence():
    proc = PromptProcessor("a red cube", PromptConfig(view_dependent=False), len)
    assert proc.texts(_cams()) == (["a red cube"] * 4, [""] * 4)


def test_prompt_validation_and_suffix_parsing():
    with pytest.raises(UserError):
        PromptProcessor("  ", PromptConfig(), len)
    assert PromptProcessor("  a   red cube ", PromptConfig(), len).prompt == "a red cube"
    assert strip_view("a red cube, back view") == ("a red cube", "back")
    assert strip_view("a red cube") == ("a red cube", None)
