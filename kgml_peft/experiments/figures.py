"""Figures from run summaries (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

from kgml_peft.store.atomic import atomic_path


def plot_training_curves(curves: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Validation (and training) loss per optimizer step, one colour per phase, phase boundaries
    as dashed lines (the paper's Fig. 2). ``curves`` is a checkpoint's ``training["curves"]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    phases = list(dict.fromkeys(c["phase"] for c in curves))
    for i, phase in enumerate(phases):
        points = [c for c in curves if c["phase"] == phase]
        steps = [c["step"] for c in points]
        colour = f"C{i}"
        ax.plot(steps, [c["val_loss"] for c in points], "-o", ms=2.5, color=colour,
                label=f"{phase} (validation)")
        train = [(c["step"], c["train_loss"]) for c in points if c["train_loss"] is not None]
        if train:
            ax.plot(*zip(*train), ":", color=colour, alpha=0.7)
        ax.axvline(steps[0], color="grey", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (scaled MSE of the phase's targets)")
    ax.set_title(title or "Staged pretraining (dotted: training loss)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
