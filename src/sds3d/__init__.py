"""sds3d: text-to-3D by Score Distillation Sampling (DreamFusion, arXiv:2209.14988) in plain PyTorch."""

__version__ = "0.1.0"

from sds3d.api import export_run, generate  # noqa: E402
from sds3d.config import PRESETS, RunConfig, preset  # noqa: E402

__all__ = ["PRESETS", "RunConfig", "export_run", "generate", "preset", "__version__"]
