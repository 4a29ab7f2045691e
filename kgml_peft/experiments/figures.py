"""Figures from run summaries (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

from kgml_peft.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it atomically as PNG to ``path`` and close it (also on failure)."""
    plt = _pyplot()
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        return Path(path)
    finally:
        plt.close(fig)


def plot_training_curves(curves: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Validation (and training) loss per optimizer step, one colour per phase, phase boundaries
    as dashed lines (the paper's Fig. 2). ``curves`` is a checkpoint's ``training["curves"]``."""
    plt = _pyplot()
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
    return _save(fig, path)


def plot_calibration(runs: dict[str, dict], path: str | os.PathLike, title: str = "") -> Path:
    """Left: validation loss per epoch of each calibration (dotted: training loss; the marker is
    the kept epoch). Right: validation MSE per target, global backbone vs calibrated, relative to
    the global backbone. ``runs`` maps a name to ``{"curve": [...], "metrics": summary metrics}``."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120,
                                      gridspec_kw={"width_ratios": [1.3, 1]})
    for i, (name, run) in enumerate(runs.items()):
        curve, metrics = run["curve"], run["metrics"]
        colour = f"C{i}"
        left.plot([c["epoch"] for c in curve], [c["val_loss"] for c in curve], "-", color=colour,
                  label=name)
        train = [(c["epoch"], c["train_loss"]) for c in curve if c["train_loss"] is not None]
        if train:
            left.plot(*zip(*train), ":", color=colour, alpha=0.6)
        best = next(c for c in curve if c["epoch"] == metrics["best_epoch"])
        left.plot([best["epoch"]], [best["val_loss"]], "o", color=colour)
    left.set_yscale("log")
    left.set_xlabel("epoch (0 = global backbone)")
    left.set_ylabel("validation loss (scaled MSE)")
    left.legend(fontsize=8)
    targets = list(dict.fromkeys(t for run in runs.values() for t in run["metrics"]["after"]["mse"]))
    width = 0.8 / max(len(runs), 1)
    for i, (name, run) in enumerate(runs.items()):
        before, after = run["metrics"]["before"]["mse"], run["metrics"]["after"]["mse"]
        ratios = [after[t] / before[t] if t in after and before.get(t) else float("nan")
                  for t in targets]
        right.bar([j + i * width for j in range(len(targets))], ratios, width, color=f"C{i}",
                  label=name)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(targets))], targets)
    right.set_ylabel("validation MSE, calibrated / global")
    fig.suptitle(title or "Site calibration")
    return _save(fig, path)
