"""Prompts per camera: DreamFusion's view-dependent suffixes, negative prompts, and a cache of
text embeddings so each distinct text is encoded once per run.

View suffixes (DreamFusion §3.2; threestudio thresholds): ", overhead view" above 60° elevation,
else ", front view" for |azimuth| < 45°, ", back view" for |azimuth| > 135°, else ", side view".
The unconditional branch of CFG uses the negative prompt when one is given, else "".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sds3d.cameras import Cameras, view_labels
from sds3d.errors import UserError

MAX_PROMPT_CHARS = 300
VIEW_SUFFIXES = ("front", "side", "back", "overhead")


@dataclass
class PromptConfig:
    view_dependent: bool = True
    negative_prompt: str = ""
    overhead_deg: float = 60.0
    front_deg: float = 45.0
    back_deg: float = 135.0


def validate_prompt(prompt: str) -> str:
    text = " ".join(prompt.split())
    if not text:
        raise UserError('the prompt is empty; say what to make, e.g. "a blue torus"')
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"the prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    return text


def with_view(prompt: str, label: str) -> str:
    return f"{prompt}, {label} view"


def strip_view(text: str) -> tuple[str, str | None]:
    """("a red cube", "front") from "a red cube, front view"; (text, None) without a suffix."""
    for label in VIEW_SUFFIXES:
        suffix = f", {label} view"
        if text.endswith(suffix):
            return text[: -len(suffix)], label
    return text, None


class PromptProcessor:
    """Texts for each camera of a batch and their cached embeddings."""

    def __init__(self, prompt: str, config: PromptConfig, encode: Callable[[str], Any]):
        self.prompt = validate_prompt(prompt)
        self.config = config
        self._encode = encode
        self._cache: dict[str, Any] = {}

    def texts(self, cameras: Cameras) -> tuple[list[str], list[str]]:
        """(conditional, unconditional) texts, one per camera."""
        if self.config.view_dependent:
            labels = view_labels(cameras.elevation_deg, cameras.azimuth_deg, self.config.overhead_deg,
                                 self.config.front_deg, self.config.back_deg)  # fmt: skip
            cond = [with_view(self.prompt, label) for label in labels]
        else:
            cond = [self.prompt] * len(cameras)
        return cond, [self.config.negative_prompt] * len(cameras)

    def all_texts(self) -> list[str]:
        """Every text a run can ask for: the prompt, its view variants and the negative prompt."""
        views = (
            [with_view(self.prompt, label) for label in VIEW_SUFFIXES] if self.config.view_dependent else []
        )
        return [self.prompt, *views, self.config.negative_prompt]

    def precompute(self) -> None:
        """Encode every text now, so that the text encoder can be freed before training."""
        for text in self.all_texts():
            self.embedding(text)

    def embedding(self, text: str) -> Any:
        if text not in self._cache:
            self._cache[text] = self._encode(text)
        return self._cache[text]

    def __call__(self, cameras: Cameras) -> tuple[list[Any], list[Any]]:
        cond, uncond = self.texts(cameras)
        return [self.embedding(t) for t in cond], [self.embedding(t) for t in uncond]
