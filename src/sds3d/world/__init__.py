"""The synthetic world: 5 primitives × 6 colours with exact geometry, ground truth for tests,
benchmarks and the priors. See `shapes.py` for the definitions and `render.py` for the renderer."""

from sds3d.world.shapes import COLORS, SHAPES, WorldObject, all_objects, parse_prompt

__all__ = ["COLORS", "SHAPES", "WorldObject", "all_objects", "parse_prompt"]
