"""sds3d: text-to-3D by Score Distillation Sampling (DreamFusion, arXiv:2209.14988) in plain PyTorch.

The names below load on first use, so `import sds3d` (and the `sds3d` command's start, where a
Ctrl-C must end in one line, not a traceback from inside torch's import) costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["PRESETS", "RunConfig", "export_run", "generate", "preset", "__version__"]
_LAZY = {"export_run": "sds3d.api", "generate": "sds3d.api", "PRESETS": "sds3d.config",
         "RunConfig": "sds3d.config", "preset": "sds3d.config"}  # fmt: skip

if TYPE_CHECKING:
    from sds3d.api import export_run, generate
    from sds3d.config import PRESETS, RunConfig, preset


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sds3d' has no attribute {name!r}")
