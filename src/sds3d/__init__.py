"""sds3d: text-to-3D by Score Distillation Sampling (DreamFusion, arXiv:2209.14988) in plain PyTorch."""

__version__ = "0.1.0"
