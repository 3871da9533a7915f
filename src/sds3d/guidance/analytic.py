"""Two priors with exact ε̂ and no training, for tests and the CPU smoke path.

Both are pixel-space priors over [−1, 1] images at a fixed resolution, with DDPM's schedule.

Gaussian prior. p_y = N(μ_y, s²I) per prompt (and N(μ_∅, s²I) for ""). Then
p_t = N(α_t μ, v_t I), v_t = α_t² s² + σ_t², and the exact noise prediction is
    ε*(x_t) = σ_t (x_t − α_t μ)/v_t.
Under CFG the expected SDS gradient is (α_t σ_t/v_t)(x − m) with m = μ_y + (s − 1)(μ_y − μ_∅),
so SDS drives every particle to the single point m for any w(t) (tests/test_priors.py checks it).

Empirical prior. p_y is uniform over a finite set {x_i} of ground-truth renders of the prompt's
synthetic-world object (for a view-suffixed prompt, the renders from that view). The
minimum-error denoiser is the posterior mean
    x̂_0(x_t) = Σ_i softmax_i(−‖x_t − α_t x_i‖²/2σ_t²) x_i,   ε̂ = (x_t − α_t x̂_0)/σ_t.
"" is the union over all 30 objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from sds3d import diffusion
from sds3d.cameras import CameraConfig, Cameras, view_labels
from sds3d.errors import UserError
from sds3d.guidance.base import Prior, resize_to
from sds3d.prompts import strip_view
from sds3d.world import all_objects, parse_prompt
from sds3d.world.render import object_views
from sds3d.world.shapes import WorldObject


def _world_object(text: str) -> WorldObject:
    obj = parse_prompt(text)
    if obj is None:
        raise UserError(
            f'the built-in analytic priors know only the synthetic-world prompts ("a {{colour}} {{shape}}", '
            f'e.g. "a blue torus", or "a blue cube with a red front"), not {text!r}'
        )
    return obj


# The front range of `WorldViewsConfig.front_view_share` (DreamFusion's "front view" azimuths).
FRONT_VIEW_DEG = 45.0


@dataclass
class WorldViewsConfig:
    """Which ground-truth renders make a prior's image set: the training camera ranges by default."""

    resolution: int = 32
    views_per_object: int = 96
    uncond_views_per_object: int = 16
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seed: int = 0
    # Photos show objects from the front more often than from the back (the cause of the Janus
    # problem in real priors): this share of each object's views is drawn from the front range,
    # |azimuth| < FRONT_VIEW_DEG, the rest from the camera's whole range. 0: uniform.
    front_view_share: float = 0.0

    def render(self, obj: WorldObject, num_views: int, cam: CameraConfig) -> ImageSet:
        """Renders of one object from `num_views` cameras drawn from `cam`'s ranges (a share of them
        from the front range, `front_view_share`)."""
        if not 0.0 <= self.front_view_share <= 1.0:
            raise UserError(f"front_view_share must be in [0, 1], not {self.front_view_share}")
        n_front = round(self.front_view_share * num_views)
        parts = []
        for n, azimuth, seed in ((num_views - n_front, cam.azimuth_deg, self.seed),
                                 (n_front, (-FRONT_VIEW_DEG, FRONT_VIEW_DEG), self.seed + 1)):  # fmt: skip
            if n > 0:
                parts.append(object_views(obj, n, cam.elevation_deg, azimuth, cam.radius, cam.fovy_deg,
                                          self.resolution, seed, "albedo", self.background))  # fmt: skip
        images = torch.cat([im for im, _ in parts])
        cameras = [c for _, c in parts]
        elevation = torch.cat([c.elevation_deg for c in cameras])
        azimuth_all = torch.cat([c.azimuth_deg for c in cameras])
        directions = torch.cat([view_directions(c) for c in cameras])
        return ImageSet((images * 2 - 1).flatten(1), directions, view_labels(elevation, azimuth_all))


@dataclass
class ImageSet:
    """A finite image set: [M, D] images in [−1, 1], the unit direction [M, 3] from the origin to each
    image's camera, and each camera's view label."""

    images: torch.Tensor
    directions: torch.Tensor
    labels: list[str]

    def subset(self, keep: torch.Tensor) -> ImageSet:
        return ImageSet(
            self.images[keep],
            self.directions[keep],
            [lab for lab, k in zip(self.labels, keep.tolist(), strict=True) if k],
        )

    @staticmethod
    def concat(sets: Sequence[ImageSet]) -> ImageSet:
        return ImageSet(
            torch.cat([s.images for s in sets]),
            torch.cat([s.directions for s in sets]),
            [lab for s in sets for lab in s.labels],
        )


def view_directions(cameras: Cameras) -> torch.Tensor:
    return torch.nn.functional.normalize(cameras.position, dim=-1)


@dataclass
class GaussianPriorGuidanceConfig:
    std: float = 0.5  # s: p_y = N(μ_y, s²I)
    views: WorldViewsConfig = field(default_factory=WorldViewsConfig)
    scheduler: dict = field(default_factory=lambda: dict(diffusion.DDPM_SCHEDULER_CONFIG))

    kind: Literal["gaussian"] = "gaussian"

    def build(
        self, camera: CameraConfig, means: dict[str, torch.Tensor] | None = None
    ) -> GaussianPriorGuidance:
        return GaussianPriorGuidance(self, camera, means)


class GaussianPriorGuidance(Prior):
    """N(μ_y, s²I) per prompt. Means come from `means` (text → [3, R, R] in [−1, 1]) or, for world
    prompts, from the average ground-truth render of the object."""

    def __init__(
        self,
        config: GaussianPriorGuidanceConfig,
        camera: CameraConfig,
        means: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__(config.scheduler)
        self.config = config
        self.camera = camera
        self.means = dict(means or {})

    def encode_prompt(self, text: str) -> torch.Tensor:
        base, _ = strip_view(text)
        if base not in self.means:
            views = self.config.views
            if base == "":
                sets = [
                    views.render(o, views.uncond_views_per_object, self.camera).images for o in all_objects()
                ]
                mean = torch.cat(sets).mean(0)
            else:
                mean = views.render(_world_object(base), views.views_per_object, self.camera).images.mean(0)
            self.means[base] = mean.reshape(3, views.resolution, views.resolution)
        return self.means[base]

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        return resize_to(rgb, self.config.views.resolution) * 2 - 1

    def predict_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, embeddings: Sequence[torch.Tensor], cameras: Cameras | None
    ) -> torch.Tensor:
        mu = torch.stack(list(embeddings)).to(x_t)
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1).to(x_t)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        v = alpha**2 * self.config.std**2 + sigma**2
        return sigma * (x_t - alpha * mu) / v


@dataclass
class EmpiricalPriorGuidanceConfig:
    views: WorldViewsConfig = field(default_factory=WorldViewsConfig)
    # Camera conditioning (as MVDream's): each set image is weighted by exp(−∠(c, c_i)²/2κ²), the
    # angle between the rendering camera and the image's camera. None: no camera conditioning.
    camera_kernel_deg: float | None = None
    scheduler: dict = field(default_factory=lambda: dict(diffusion.DDPM_SCHEDULER_CONFIG))

    kind: Literal["empirical"] = "empirical"

    def build(self, camera: CameraConfig) -> EmpiricalPriorGuidance:
        return EmpiricalPriorGuidance(self, camera)


class EmpiricalPriorGuidance(Prior):
    """The exact denoiser of a finite image set per prompt (see the module docstring)."""

    def __init__(self, config: EmpiricalPriorGuidanceConfig, camera: CameraConfig):
        super().__init__(config.scheduler)
        self.config = config
        self.camera = camera
        self._views: dict[tuple[WorldObject, int], ImageSet] = {}

    def _object_views(self, obj: WorldObject, num_views: int) -> ImageSet:
        key = (obj, num_views)
        if key not in self._views:
            self._views[key] = self.config.views.render(obj, num_views, self.camera)
        return self._views[key]

    def encode_prompt(self, text: str) -> ImageSet:
        """The image set for a text; a view suffix keeps the renders from that view."""
        base, label = strip_view(text)
        views = self.config.views
        if base == "":
            return ImageSet.concat(
                [self._object_views(o, views.uncond_views_per_object) for o in all_objects()]
            )
        image_set = self._object_views(_world_object(base), views.views_per_object)
        if label is not None:
            keep = torch.tensor([lab == label for lab in image_set.labels])
            if bool(keep.any()):
                return image_set.subset(keep)
        return image_set

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        return resize_to(rgb, self.config.views.resolution) * 2 - 1

    def predict_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, embeddings: Sequence[ImageSet], cameras: Cameras | None
    ) -> torch.Tensor:
        abar = self.alphas_cumprod[t].to(x_t)
        kernel = self.config.camera_kernel_deg
        directions = None if cameras is None or kernel is None else view_directions(cameras).to(x_t)
        eps = []
        for i, image_set in enumerate(embeddings):
            alpha, sigma = abar[i].sqrt(), (1 - abar[i]).sqrt()
            xi = x_t[i].reshape(1, -1)
            images = image_set.images.to(x_t)
            logits = -((xi - alpha * images) ** 2).sum(dim=1) / (2 * sigma**2)
            if directions is not None and kernel is not None:
                cos = (image_set.directions.to(x_t) @ directions[i]).clamp(-1.0, 1.0)
                logits = logits - torch.rad2deg(torch.arccos(cos)) ** 2 / (2 * kernel**2)
            x0 = torch.softmax(logits, dim=0) @ images
            eps.append(((xi[0] - alpha * x0) / sigma).reshape(x_t.shape[1:]))
        return torch.stack(eps)
