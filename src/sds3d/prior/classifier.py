"""An attribute classifier (shape and colour) for 32×32 renders of the synthetic world, trained on
ground-truth renders; it judges images sampled from a prior (prior accuracy, issue 3).

A small CNN with two heads (5 shapes, 6 colours), trained on renders of all 30 objects under the
prior's data distribution (prior/data.py: shading, backgrounds, cameras), so that it judges what a
render shows, not which objects the prior was trained on. Textureless renders carry no colour and are
left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sds3d.prior.data import PriorDataConfig, PriorDataset, render_dataset
from sds3d.world.shapes import COLORS, SHAPES, all_objects


@dataclass
class ClassifierConfig:
    data: PriorDataConfig = field(
        default_factory=lambda: PriorDataConfig(views_per_object=240, textureless_prob=0.0)
    )
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    cosine: bool = True  # cosine decay of the learning rate to zero over the run
    seed: int = 0


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.shape_head = nn.Linear(4 * width, len(SHAPES))
        self.color_head = nn.Linear(4 * width, len(COLORS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, 3, H, W] in [−1, 1]
        h = self.features(images)
        return self.shape_head(h), self.color_head(h)


def _labels(dataset: PriorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    colors = list(COLORS)
    shape = torch.tensor([SHAPES.index(o.shape) for o in dataset.objects])
    color = torch.tensor([colors.index(o.color) for o in dataset.objects])
    return shape, color


def train_classifier(
    config: ClassifierConfig, device: str = "cpu"
) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train on renders of all 30 objects; report accuracy on a fresh set of renders."""
    torch.manual_seed(config.seed)
    train_set = render_dataset(config.data, all_objects(), device)
    test_set = render_dataset(
        PriorDataConfig(**{**config.data.__dict__, "seed": config.seed + 1, "views_per_object": 20}),
        all_objects(), device,
    )  # fmt: skip
    shape, color = _labels(train_set)
    images = train_set.images.to(device)
    shape, color = shape.to(device), color.to(device)
    model = AttributeClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    n = len(train_set)
    # The learning rate decays to zero (cosine) so that the final weights are not one noisy iterate:
    # the judge's accuracy on ground truth then varies less from run to run.
    total = config.epochs * -(-n // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total) if config.cosine else None
    for _ in range(config.epochs):
        for idx in torch.randperm(n, generator=g).split(config.batch_size):
            idx = idx.to(device)
            s_logits, c_logits = model(images[idx])
            loss = F.cross_entropy(s_logits, shape[idx]) + F.cross_entropy(c_logits, color[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    model.eval()
    return model, evaluate(model, test_set)


@torch.no_grad()
def predict(model: AttributeClassifier, images: torch.Tensor) -> tuple[list[str], list[str]]:
    """(shape, colour) names for images [B, 3, H, W] in [0, 1]."""
    s_logits, c_logits = model(images * 2 - 1)
    colors = list(COLORS)
    return [SHAPES[i] for i in s_logits.argmax(1).tolist()], [colors[i] for i in c_logits.argmax(1).tolist()]


@torch.no_grad()
def evaluate(model: AttributeClassifier, dataset: PriorDataset) -> dict[str, float]:
    device = next(model.parameters()).device
    shape, color = (x.to(device) for x in _labels(dataset))
    s_logits, c_logits = model(dataset.images.to(device))
    return {
        "shape_accuracy": float((s_logits.argmax(1) == shape).float().mean()),
        "color_accuracy": float((c_logits.argmax(1) == color).float().mean()),
    }
