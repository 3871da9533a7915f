"""What every benchmark writes: the machine it ran on, and its result as json + markdown."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def describe_machine() -> dict[str, str | int]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def write_report(out_dir: Path, name: str, result: dict[str, Any], lines: list[str]) -> None:
    """`out_dir/name.json` (the numbers) and `out_dir/name.md` (the table), and print the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def with_model(config: Any, model: str | None, preset_name: str) -> Any:
    """The benchmarks' `--model`: `config` (a RunConfig) with `model` as its diffusers prior; None keeps
    the preset's. A preset without a diffusers prior: one line."""
    from sds3d.errors import UserError
    from sds3d.guidance.diffusers_prior import DiffusersGuidanceConfig

    if model is None:
        return config
    if not isinstance(config.guidance, DiffusersGuidanceConfig):
        raise UserError(f"--model is for a preset with a diffusers prior, not {preset_name!r}")
    return dataclasses.replace(config, guidance=dataclasses.replace(config.guidance, model=model))
