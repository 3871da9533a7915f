"""Differentiable renderers: volume rendering of NeRFs now, splatting later."""
