"""The experiment's figures (PNG, matplotlib Agg): training curves, cross-regional heatmap,
regime bars, sensitivity bars, data-scarcity curves and the physics audit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kgml_peft.experiments.config import MAIN_REGIMES
from kgml_peft.experiments.figures import _pyplot, _save, plot_training_curves


def _bars(results: dict, names: list[str], path: Path, title: str, labels: list[str] | None = None) -> Path:
    """Grouped bars of mean test MSE (± std) per region for the regimes ``names``."""
    plt = _pyplot()
    regions = results["regions"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(regions) * len(names) / 2), 3.6), dpi=120)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [results["regimes"][name][r]["mse_mean"] for r in regions]
        stds = [results["regimes"][name][r]["mse_std"] for r in regions]
        ax.bar(np.arange(len(regions)) + i * width, means, width, yerr=stds, capsize=2,
               label=(labels or names)[i])
    ax.set_xticks(np.arange(len(regions)) + width * (len(names) - 1) / 2, regions)
    ax.set_ylabel("test MSE (scaled)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _heatmap(results: dict, path: Path) -> Path:
    plt = _pyplot()
    regions, cross = results["regions"], results["cross_regional"]
    units = list(cross)
    grid = np.array([[cross[u][r]["mse_mean"] for r in regions] for u in units])
    fig, ax = plt.subplots(figsize=(1.4 * len(regions) + 2, 0.5 * len(units) + 1.5), dpi=120)
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(regions)), regions)
    ax.set_yticks(range(len(units)), units)
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    for i in range(len(units)):
        for j in range(len(regions)):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label="test MSE (scaled)")
    ax.set_title("Cross-regional validation MSE")
    return _save(fig, path)


def _scarcity(results: dict, path: Path) -> Path:
    plt = _pyplot()
    regions, regimes = results["regions"], results["regimes"]
    years = sorted({int(n.rsplit("_", 1)[1][:-1]) for n in regimes if n.startswith("scarcity_")})
    fig, axes = plt.subplots(1, len(regions), figsize=(3.2 * len(regions), 3.2), dpi=120, squeeze=False)
    for ax, region in zip(axes[0], regions):
        for name in ("site_only", "full_finetune", "adapters"):
            xs = [*years, "all"]
            means = [regimes[f"scarcity_{name}_{y}y"][region]["mse_mean"] for y in years]
            means.append(regimes[name][region]["mse_mean"])
            ax.plot(range(len(xs)), means, "-o", ms=3, label=name)
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_title(region)
        ax.set_xlabel("training years per site")
    axes[0][0].set_ylabel("test MSE (scaled)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _audit(results: dict, path: Path) -> Path:
    plt = _pyplot()
    regions, regimes = results["regions"], results["regimes"]
    keys = ("l_phys", "mass_balance_violation_rate", "negative_ra_rate", "negative_rh_rate")
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3.2), dpi=120)
    for ax, key in zip(axes, keys):
        values = [float(np.mean([regimes[m][r]["physics"][key] for r in regions])) for m in MAIN_REGIMES]
        ax.bar(range(len(MAIN_REGIMES)), values, color=[f"C{i}" for i in range(len(MAIN_REGIMES))])
        ax.set_xticks(range(len(MAIN_REGIMES)), MAIN_REGIMES, rotation=30, ha="right", fontsize=7)
        ax.set_title(key, fontsize=8)
    fig.suptitle("Physics audit on the test years (mean over regions)")
    return _save(fig, path)


def _new_sites(results: dict, path: Path) -> Path:
    """Test MSE of the new fields against the calibration years k, per region and method."""
    plt = _pyplot()
    regions, new = results["regions"], results["new_sites"]
    fig, axes = plt.subplots(1, len(regions), figsize=(3.2 * len(regions), 3.2), dpi=120, squeeze=False)
    for ax, region in zip(axes[0], regions):
        for method, by_region in new.items():
            ks = list(by_region[region])
            means = [by_region[region][k]["mse_mean"] for k in ks]
            stds = [by_region[region][k]["mse_std"] for k in ks]
            ax.errorbar([int(k[1:]) for k in ks], means, yerr=stds, fmt="-o", ms=3, capsize=2, label=method)
        ax.set_xticks([int(k[1:]) for k in by_region[region]])
        ax.set_title(f"{region} new fields")
        ax.set_xlabel("calibration years k")
    axes[0][0].set_ylabel("test MSE (scaled)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def all_figures(results: dict, out: Path) -> list[Path]:
    """Every figure of the report, written into ``out``."""
    regimes = results["regimes"]
    written = []
    if results.get("global_curves"):
        written.append(plot_training_curves(results["global_curves"], out / "global_training.png",
                                            "Global model: staged training (dashed lines: phase boundaries; dotted: training loss)"))
    written.append(_heatmap(results, out / "cross_regional.png"))
    written.append(_bars(results, list(MAIN_REGIMES), out / "regimes.png",
                         "Test MSE per region: site-only, global-only, fine-tuning, adapters"))
    sensitivity = [n for n in regimes if n.startswith("sensitivity_")]
    if sensitivity:
        written.append(_bars(results, ["site_only", *sensitivity], out / "sensitivity.png",
                             "Sensitivity to learning rate and batch size"))
    if any(n.startswith("scarcity_") for n in regimes):
        written.append(_scarcity(results, out / "scarcity.png"))
    ablations = [n for n in regimes if n.startswith(("ablation_", "rank_"))]
    if ablations:
        written.append(_bars(results, ablations, out / "ablations.png", "Adapter components and LoRA rank"))
    if results.get("new_sites"):
        written.append(_new_sites(results, out / "new_sites.png"))
    written.append(_audit(results, out / "physics_audit.png"))
    return written
