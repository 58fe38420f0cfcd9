"""Small shared plots for output folders: loss and gradient norm per step (DreamFlow Fig. 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping


def plot_loss(history: Iterable[Any], path: str | Path, title: str = "") -> Path:
    """Write ``loss.png``-style curves of loss and gradient norm against step.

    ``history`` holds StepReport objects or dicts with ``index``, ``loss`` and ``grad_norm``
    (and optionally ``t``, drawn on a second axis).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r if isinstance(r, Mapping) else vars(r) for r in history]
    steps = [int(r["index"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "grad_norm", "gradient norm ||x - x_hat||")):
        values = [float(r[key]) for r in rows]
        ax.plot(steps, values, lw=1.0, color="C0")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if values and min(values) > 0:
            ax.set_yscale("log")
        if rows and "t" in rows[0]:
            twin = ax.twinx()
            twin.plot(steps, [float(r["t"]) for r in rows], lw=0.8, color="C1", alpha=0.6)
            twin.set_ylabel("t", color="C1")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
