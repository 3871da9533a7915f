"""Pictures for the built-in prior's model card: the training loss curve.

python -m sds3d.prior.card TRAIN_LOG.json OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

PLOT_SIZE = (480, 240)  # pixels
MARGIN = 40


def loss_curve(log: list[dict], size: tuple[int, int] = PLOT_SIZE) -> np.ndarray:
    """A line plot of loss against step (log-scale loss) as an RGB image."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    steps = np.array([e["step"] for e in log], dtype=float)
    loss = np.log10(np.array([e["loss"] for e in log], dtype=float))
    x = MARGIN + (steps - steps.min()) / max(np.ptp(steps), 1) * (w - 2 * MARGIN)
    y = h - MARGIN - (loss - loss.min()) / max(np.ptp(loss), 1e-9) * (h - 2 * MARGIN)
    draw.line(list(zip(x.tolist(), y.tolist(), strict=True)), fill=(30, 80, 200), width=2)
    draw.rectangle([MARGIN, MARGIN, w - MARGIN, h - MARGIN], outline="black")
    draw.text(
        (MARGIN, 8), f"training loss (log10), {10 ** loss.max():.3g} -> {10 ** loss[-1]:.3g}", fill="black"
    )
    draw.text((MARGIN, h - MARGIN + 8), f"step {int(steps.min())}", fill="black")
    draw.text((w - MARGIN - 60, h - MARGIN + 8), f"step {int(steps.max())}", fill="black")
    return np.asarray(img)


def main(argv: list[str] | None = None) -> int:
    import imageio.v2 as imageio

    args = sys.argv[1:] if argv is None else argv
    log = json.loads(Path(args[0]).read_text())["log"]
    imageio.imwrite(args[1], loss_curve(log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
