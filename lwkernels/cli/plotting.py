"""Training curves (loss and accuracy per epoch, train and test) as a PNG, drawn with matplotlib
from the optional `train` extra (``pip install 'lwkernels[train]'``)."""
from __future__ import annotations

import math
from typing import Dict, Sequence

#: Line colours of the train and test series (tests look for them in the image).
TRAIN_COLOR, TEST_COLOR = "#1f77b4", "#d62728"
#: Figure size in pixels (width, height).
SIZE_PX = (840, 320)


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_training_curves(path, history: Sequence[Dict[str, float]], title: str = "") -> None:
    """Loss and accuracy per epoch from `lwkernels train`'s metrics history, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no GUI backend
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dpi = 100
    fig = Figure(figsize=(SIZE_PX[0] / dpi, SIZE_PX[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    epochs = [h["epoch"] for h in history]
    for ax, key, scale, name in zip(fig.subplots(1, 2), ("loss", "acc"), (1.0, 100.0), ("loss", "accuracy (%)")):
        for split, color in (("train", TRAIN_COLOR), ("test", TEST_COLOR)):
            values = [h.get(f"{split}_{key}", math.nan) * scale for h in history]
            ax.plot(epochs, values, color=color, marker="o", label=split)
        ax.set_title(f"{title} {name}".strip())
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
