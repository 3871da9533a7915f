"""The Representation seam: what training optimises, renders and finally meshes.

A representation renders a batch of cameras (`render`, and `render_train` inside the loop: a
`RenderOutput` whose `rgb` is [B, C, H, W]), names its optimiser groups (`param_groups`) and its own regularisers
(`regularizers`, named losses at a training progress), and becomes a mesh (`to_mesh`). Two hooks
let it change during a run: `start_stage` when a stage (stages.py) begins that renders differently
(latents → RGB), and `post_step` after each optimiser step (densification and pruning, for
representations that need it). The training loop (train.py) knows nothing else about it; `representations/nerf_scene.py` is the hash-grid NeRF
with its background and volume renderer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sds3d.cameras import Cameras

if TYPE_CHECKING:
    from sds3d.export import ExportConfig, MeshOutput
    from sds3d.render.volume import RenderOutput, Shading


class Representation(nn.Module):
    def render(self, cameras: Cameras, **options: Any) -> RenderOutput:
        raise NotImplementedError

    def render_train(
        self,
        cameras: Cameras,
        shading: Shading,
        light_positions: torch.Tensor | None,
        step_ratio: float,
        generator: torch.Generator | None,
        latent: bool = False,
    ) -> RenderOutput:
        """The training render: random where the representation samples, with what its regularisers need."""
        raise NotImplementedError

    def param_groups(self, optim: Any) -> list[dict[str, Any]]:
        """Optimiser groups with their learning rates (from the run's `OptimConfig`)."""
        raise NotImplementedError

    def regularizers(self, out: RenderOutput, step_ratio: float) -> dict[str, torch.Tensor]:
        """Named, weighted regularisation losses of a training render."""
        raise NotImplementedError

    def to_mesh(self, config: ExportConfig) -> MeshOutput:
        raise NotImplementedError

    def render_turntable(self, config: ExportConfig, shading: Shading, progress: bool = False) -> Any:
        """Renders of the representation itself on the export's orbit ([N, H, W, 3] uint8)."""
        raise NotImplementedError

    def start_stage(self, previous_render: str, render: str) -> None:
        """A stage that renders `render` begins after one that rendered `previous_render`."""
        if previous_render != render:
            raise ValueError(f"{type(self).__name__} cannot go from rendering {previous_render} to {render}")

    def post_step(self, step_ratio: float, optimizer: Any = None) -> None:
        """After each optimiser step, with the optimiser (whose state follows parameters that
        densification grows or prunes); nothing by default."""

    def write_extras(self, run_dir: Any) -> dict[str, Any]:
        """Files besides the mesh that the export writes ({name: path}); none by default."""
        return {}
