"""K hash-grid NeRF scenes of one configuration trained as one (batch.py: many prompts, one process).

The K scenes stay independent, but their parameters are stacked so that one pass renders them all:
the hash tables are one table of K blocks (`HashGrid(scenes=K)`: a point reads its own scene's
block), the MLP's weights are [K, out, in] and its layers batched matrix products (`torch.baddbmm`),
points arrive scene by scene. A scene's loss touches only its own slices, and Adam is elementwise,
so one optimiser over the stack steps every scene as its own optimiser would. `NeRFStack.scene(k)` is
scene k as a plain `NeRFScene` (its checkpoint, its mesh); `NeRFStack([scene, …])` stacks scenes built
as `train.build_scene` builds them, so scene k starts where a run of its own would.

What stacks (`stack_problem`): the RGB NeRF with a solid, random or learned background (the learned
MLPs stacked as the field's are), analytic normals, uncompiled; anything else (other normals, a
compiled field, a latent warm-up) trains one scene at a time (batch.py says so). The twin of this
fast path is the plain `NeRFScene`: tests compare K stacked scenes with K scenes rendered and
trained alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sds3d.cameras import Cameras
from sds3d.devices import SceneGenerators
from sds3d.ramp import value_at
from sds3d.render.volume import RenderOutput, Shading, render
from sds3d.representations.nerf import Background, BackgroundConfig, DensityAlbedo, HashGridNeRFConfig
from sds3d.representations.nerf_scene import NeRFScene

if TYPE_CHECKING:
    from sds3d.config import OptimConfig, RunConfig

# A plain scene's parameter → the stacked parameter holding it (the state-dict names of NeRFScene).
STACKED_NAMES = {
    "nerf.encoding.tables": "tables",
    "nerf.mlp.0.weight": "w1",
    "nerf.mlp.0.bias": "b1",
    "nerf.mlp.2.weight": "w2",
    "nerf.mlp.2.bias": "b2",
}
# A learned background's MLP (nerf.Background) → the stacked background's parameters.
BACKGROUND_NAMES = {
    "background.mlp.0.weight": "w1",
    "background.mlp.0.bias": "b1",
    "background.mlp.2.weight": "w2",
    "background.mlp.2.bias": "b2",
}


def stack_problem(config: RunConfig) -> str | None:
    """Why scenes of `config` cannot be stacked, or None when they can."""
    if config.representation != "nerf":
        return f"{config.representation} (only NeRFs stack)"
    if config.nerf.normal_type != "analytic":
        return f"{config.nerf.normal_type} normals"
    if config.nerf.compile:
        return "a compiled NeRF"
    if config.stages:
        return "stages (a latent warm-up)"
    if config.rule.kind in ("vsd", "esd"):
        return f"the {config.rule.kind} rule (a particle score trained per scene)"
    return None


class StackedHashGridNeRF(nn.Module):
    """The fields of K `HashGridNeRF`s (nerf.py) of one config, queried together."""

    def __init__(self, config: HashGridNeRFConfig, scenes: int):
        super().__init__()
        self.config = config
        self.scenes = scenes
        self.encoding = config.grid.build(scenes)
        e, h = self.encoding.output_dim, config.hidden_dim
        self.w1 = nn.Parameter(torch.zeros(scenes, h, e))
        self.b1 = nn.Parameter(torch.zeros(scenes, h))
        self.w2 = nn.Parameter(torch.zeros(scenes, 4, h))
        self.b2 = nn.Parameter(torch.zeros(scenes, 4))

    def query(self, points: torch.Tensor, ids: torch.Tensor) -> DensityAlbedo:
        """Density and albedo of points [N, 3] that are len(ids) equal groups, group g in scene ids[g]."""
        g, n = ids.shape[0], points.shape[0]
        m = n // g
        bound = self.config.bound
        unit = (points + bound) / (2 * bound)
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        e = self.encoding(unit, ids.repeat_interleave(m)).view(g, m, -1)
        h = torch.relu(torch.baddbmm(self.b1[ids][:, None], e, self.w1[ids].transpose(1, 2)))
        raw = torch.baddbmm(self.b2[ids][:, None], h, self.w2[ids].transpose(1, 2)).reshape(n, -1)
        blob = self.config.blob_scale * (1 - points.norm(dim=-1) / self.config.blob_std)
        return DensityAlbedo(density=F.softplus(raw[:, 0] + blob) * inside, albedo=torch.sigmoid(raw[:, 1:4]))

    def view(self, ids: torch.Tensor) -> SceneView:
        return SceneView(self, ids)


class SceneView:
    """Some scenes of a stacked field, with the query interface render/volume.py uses."""

    def __init__(self, field: StackedHashGridNeRF, ids: torch.Tensor):
        self.field, self.ids, self.config = field, ids, field.config

    def __call__(self, points: torch.Tensor, latent: bool = False) -> DensityAlbedo:
        return self.field.query(points, self.ids)

    def normals(
        self, points: torch.Tensor, create_graph: bool, latent: bool = False
    ) -> tuple[DensityAlbedo, torch.Tensor]:
        """n = −∇τ/‖∇τ‖ by autograd of the density (HashGridNeRF's analytic normals)."""
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            out = self.field.query(points, self.ids)
            (grad,) = torch.autograd.grad(
                out.density.sum(), points, create_graph=create_graph, retain_graph=True
            )
        return out, -F.normalize(grad, dim=-1, eps=1e-6)


class StackedBackground(nn.Module):
    """The learned backgrounds of K scenes (nerf.Background's MLP of the ray direction), stacked."""

    def __init__(self, config: BackgroundConfig, scenes: int):
        super().__init__()
        self.config, h = config, config.hidden_dim
        self.w1 = nn.Parameter(torch.zeros(scenes, h, 3))
        self.b1 = nn.Parameter(torch.zeros(scenes, h))
        self.w2 = nn.Parameter(torch.zeros(scenes, 3, h))
        self.b2 = nn.Parameter(torch.zeros(scenes, 3))

    def view(self, ids: torch.Tensor) -> BackgroundView:
        return BackgroundView(self, ids)


class BackgroundView:
    """Some scenes' learned backgrounds, called as render/volume.py calls a Background."""

    def __init__(self, background: StackedBackground, ids: torch.Tensor):
        self.background, self.ids = background, ids

    def __call__(
        self, dirs: torch.Tensor, generator=None, random: bool = True, latent: bool = False
    ) -> torch.Tensor:
        """dirs [B, H, W, 3], len(ids) equal groups of views scene by scene → RGB [B, H, W, 3]."""
        if latent:
            raise NotImplementedError(
                "a stacked background has no latent head (latent warm-ups do not stack)"
            )
        bg, ids = self.background, self.ids
        x = dirs.reshape(ids.shape[0], -1, 3)
        h = torch.relu(torch.baddbmm(bg.b1[ids][:, None], x, bg.w1[ids].transpose(1, 2)))
        raw = torch.baddbmm(bg.b2[ids][:, None], h, bg.w2[ids].transpose(1, 2))
        return torch.sigmoid(raw).reshape(dirs.shape)


def select_cameras(cameras: Cameras, index: torch.Tensor) -> Cameras:
    return Cameras(
        cameras.c2w[index], cameras.fovy_deg[index], cameras.elevation_deg[index], cameras.azimuth_deg[index],
        cameras.radius[index], cameras.width, cameras.height,
    )  # fmt: skip


def split_output(out: RenderOutput, parts: int) -> list[RenderOutput]:
    """A render of `parts` scenes' cameras → one RenderOutput per scene (views, no copies)."""

    def chunk(x: torch.Tensor | None) -> list[torch.Tensor | None]:
        return [None] * parts if x is None else list(x.chunk(parts))

    fields = [chunk(getattr(out, f)) for f in RenderOutput.__dataclass_fields__]
    return [RenderOutput(*(f[i] for f in fields)) for i in range(parts)]  # type: ignore[arg-type]


class NeRFStack(nn.Module):
    """K NeRF scenes of one config: stacked parameters, one render and one optimiser for all."""

    def __init__(self, scenes: Sequence[NeRFScene]):
        super().__init__()
        first = scenes[0]
        self.template = copy.deepcopy(first)  # a plain scene to write scene k into
        self.field = StackedHashGridNeRF(first.nerf.config, len(scenes))
        learned = first.background.config.kind == "learned"
        # Solid or random: the scene's own (no parameters); learned: one MLP per scene, stacked.
        self.background: Background | StackedBackground = (
            StackedBackground(first.background.config, len(scenes))
            if learned
            else copy.deepcopy(first.background)
        )
        self.names = {**STACKED_NAMES, **(BACKGROUND_NAMES if learned else {})}
        self.renderer, self.weights = first.renderer, first.weights
        self._id_tensors: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
        with torch.no_grad():
            for k, scene in enumerate(scenes):
                self.load_scene(k, scene)

    def __len__(self) -> int:
        return self.field.scenes

    def _per_scene(self, name: str) -> torch.Tensor:
        """The stacked parameter of a plain scene's `name`, as [K, *its shape in one scene]."""
        return self.per_scene(name, self.stacked_parameter(name))

    def per_scene(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped as the stacked parameter of `name` (its Adam state, say), as [K, …]."""
        return tensor.view(len(self), -1, tensor.shape[-1]) if name == "nerf.encoding.tables" else tensor

    def stacked_parameter(self, name: str) -> nn.Parameter:
        if name in BACKGROUND_NAMES:
            return getattr(self.background, BACKGROUND_NAMES[name])
        f = self.field
        return f.encoding.tables if name == "nerf.encoding.tables" else getattr(f, STACKED_NAMES[name])

    @torch.no_grad()
    def load_scene(self, k: int, scene: NeRFScene) -> None:
        """Write a plain scene's parameters into slot k."""
        state = scene.state_dict()
        for name in self.names:
            self._per_scene(name)[k].copy_(state[name])

    @torch.no_grad()
    def scene(self, k: int) -> NeRFScene:
        """Scene k as a plain NeRFScene (a copy)."""
        scene = copy.deepcopy(self.template)
        scene.load_state_dict({name: self._per_scene(name)[k].clone() for name in self.names}, strict=False)
        return scene

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """NeRFScene's groups: the tables at the grid's learning rate, the MLPs at the MLP's."""
        f = self.field
        rest = [f.w1, f.b1, f.w2, f.b2, *self.background.parameters()]  # a solid background has none
        return [{"params": [f.encoding.tables], "lr": optim.lr_grid}, {"params": rest, "lr": optim.lr_mlp}]

    def render_scenes(
        self,
        cameras: Cameras,  # B cameras per scene, scene by scene
        shadings: Sequence[Shading],  # one per scene
        light_positions: torch.Tensor | None,  # [K·B, 3] (rows of albedo scenes unused)
        step_ratio: float,
        generators: SceneGenerators,
    ) -> tuple[list[RenderOutput], dict[str, torch.Tensor]]:
        """The training render of every scene (scenes that drew the same shading in one pass) and
        the regularisers' sum over scenes. → (one RenderOutput per scene, named losses)."""
        k, per = len(self), len(cameras) // len(self)
        oriented = value_at(self.weights.orientation, step_ratio) > 0
        outs: list[RenderOutput | None] = [None] * k
        terms: dict[str, torch.Tensor] = {}
        device = cameras.c2w.device
        for shading in dict.fromkeys(shadings):
            ids = [i for i in range(k) if shadings[i] == shading]
            group = len(ids) == k  # every scene: no selection (and no host-to-device copies)
            rows = (
                None if group else torch.tensor([i * per + j for i in ids for j in range(per)], device=device)
            )
            out = render(
                self.field.view(self._ids(ids, device)),
                self.background.view(self._ids(ids, device))
                if isinstance(self.background, StackedBackground)
                else self.background,
                cameras if rows is None else select_cameras(cameras, rows), self.renderer.num_samples,
                shading=shading,
                light_positions=None if shading == "albedo" or light_positions is None
                else (light_positions if rows is None else light_positions[rows]),
                ambient=self.renderer.ambient, stratified=True, need_normals=oriented,
                normals_create_graph=oriented,
                generator=generators if group else SceneGenerators([generators.generators[i] for i in ids]),
            )  # fmt: skip
            for name, value in self._regularizers(out, len(ids), step_ratio).items():
                terms[name] = terms[name] + value if name in terms else value
            for i, part in zip(ids, split_output(out, len(ids)), strict=True):
                outs[i] = part
        return [o for o in outs if o is not None], terms

    def _ids(self, ids: list[int], device: torch.device) -> torch.Tensor:
        """The scene indices as a tensor on `device`, made once per distinct set."""
        key = (tuple(ids), str(device))
        if key not in self._id_tensors:
            self._id_tensors[key] = torch.tensor(ids, device=device)
        return self._id_tensors[key]

    def _regularizers(self, out: RenderOutput, scenes: int, step_ratio: float) -> dict[str, torch.Tensor]:
        """Σ over the scenes of a render of each one's regularisers (NeRFScene.regularizers): the
        mean-based ones as `scenes` × the mean over all (the scenes' renders are of one size); the
        orientation loss, normalised per scene, scene by scene."""
        terms: dict[str, torch.Tensor] = {}
        if value_at(self.weights.orientation, step_ratio) > 0:
            for part in split_output(out, scenes):
                if "orientation" in (t := self.template.regularizers(part, step_ratio)):
                    terms["orientation"] = terms.get("orientation", 0) + t["orientation"]
        whole = self.template.regularizers(out, step_ratio)
        for name in ("sparsity", "entropy"):
            if name in whole:
                terms[name] = scenes * whole[name]
        return terms

    def finite_scenes(self) -> torch.Tensor:
        """[K] bool (no host sync): every parameter of scene k is finite."""
        checks = [torch.isfinite(self._per_scene(n).reshape(len(self), -1)).all(dim=1) for n in self.names]
        return torch.stack(checks).all(dim=0)
