"""The experiment's figures (PNG, matplotlib Agg): training curves, and per target (NEE, Reco) the
cross-regional heatmap, regime bars, sensitivity bars, data-scarcity curves and new-field curves
(daily test MSE in (gC m-2 d-1)^2, error bars the bootstrap intervals over test site-years), and
the physics audit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kgml_peft.experiments.config import MAIN_REGIMES
from kgml_peft.experiments.figures import _pyplot, _save, plot_training_curves
from kgml_peft.experiments.suite_baselines import BASELINES


UNITS = "test MSE (gC m-2 d-1)^2"


def _mean(entry: dict, target: str) -> float:
    return entry[target]["mse"]["mean"]


def _yerr(entries: list[dict], target: str) -> np.ndarray:
    """Error bars [2, n] from the bootstrap intervals (0 where an entry has none)."""
    out = np.zeros((2, len(entries)))
    for i, entry in enumerate(entries):
        ci = entry[target]["mse_ci"]
        if ci is not None:
            out[:, i] = [max(0.0, _mean(entry, target) - ci[0]), max(0.0, ci[1] - _mean(entry, target))]
    return out


def _bars(results: dict, names: list[str], path: Path, title: str, target: str) -> Path:
    """Grouped bars of the mean test MSE of ``target`` per region for the regimes ``names``."""
    plt = _pyplot()
    regions = results["regions"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(regions) * len(names) / 2), 3.6), dpi=120)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        entries = [results["regimes"][name][r] for r in regions]
        ax.bar(np.arange(len(regions)) + i * width, [_mean(e, target) for e in entries], width,
               yerr=_yerr(entries, target), capsize=2, label=name)
    ax.set_xticks(np.arange(len(regions)) + width * (len(names) - 1) / 2, regions)
    ax.set_ylabel(f"{target} {UNITS}")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _heatmap(results: dict, path: Path, target: str) -> Path:
    plt = _pyplot()
    regions, cross = results["regions"], results["cross_regional"]
    units = list(cross)
    grid = np.array([[_mean(cross[u][r], target) for r in regions] for u in units])
    fig, ax = plt.subplots(figsize=(1.4 * len(regions) + 2, 0.5 * len(units) + 1.5), dpi=120)
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(regions)), regions)
    ax.set_yticks(range(len(units)), units)
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    for i in range(len(units)):
        for j in range(len(regions)):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label=f"{target} {UNITS}")
    ax.set_title(f"Cross-regional test MSE: {target}")
    return _save(fig, path)


def _scarcity(results: dict, path: Path, target: str) -> Path:
    plt = _pyplot()
    regions, regimes = results["regions"], results["regimes"]
    years = sorted({int(n.rsplit("_", 1)[1][:-1]) for n in regimes if n.startswith("scarcity_")})
    fig, axes = plt.subplots(1, len(regions), figsize=(3.2 * len(regions), 3.2), dpi=120, squeeze=False)
    for ax, region in zip(axes[0], regions):
        for name in ("site_only", "full_finetune", "adapters", "regression_site", "climatology"):
            xs = [*years, "all"]
            means = [_mean(regimes[f"scarcity_{name}_{y}y"][region], target) for y in years]
            means.append(_mean(regimes[name][region], target))
            ax.plot(range(len(xs)), means, "-o", ms=3, label=name)
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_title(region)
        ax.set_yscale("log")  # the climatology and one-year site-only are far above the rest
        ax.set_xlabel("training years per site")
    axes[0][0].set_ylabel(f"{target} {UNITS}, log scale")
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


def _new_sites(results: dict, path: Path, target: str) -> Path:
    """Test MSE of the new fields against the calibration years k, per region and method."""
    plt = _pyplot()
    regions, new = results["regions"], results["new_sites"]
    fig, axes = plt.subplots(1, len(regions), figsize=(3.2 * len(regions), 3.2), dpi=120, squeeze=False)
    for ax, region in zip(axes[0], regions):
        for method, by_region in new.items():
            ks = list(by_region[region])
            entries = [by_region[region][k] for k in ks]
            ax.errorbar([int(k[1:]) for k in ks], [_mean(e, target) for e in entries], yerr=_yerr(entries, target),
                        fmt="-o", ms=3, capsize=2, label=method)
        ax.set_xticks([int(k[1:]) for k in by_region[region]])
        ax.set_title(f"{region} new fields")
        ax.set_yscale("log")  # the climatology and one-year site-only are far above the rest
        ax.set_xlabel("calibration years k")
    axes[0][0].set_ylabel(f"{target} {UNITS}, log scale")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def all_figures(results: dict, out: Path) -> list[Path]:
    """Every figure of the report, written into ``out``."""
    regimes = results["regimes"]
    written = []
    if results.get("global_curves"):
        written.append(plot_training_curves(results["global_curves"], out / "global_training.png",
                                            "Global model: staged training (dashed lines: phase boundaries; dotted: training loss)"))
    for t in results["targets"]:
        written.append(_heatmap(results, out / f"cross_regional_{t}.png", t))
        written.append(_bars(results, [*MAIN_REGIMES, *BASELINES], out / f"regimes_{t}.png",
                             f"{t}: site-only, global-only, fine-tuning, adapters and the baselines", t))
        sensitivity = [n for n in regimes if n.startswith("sensitivity_")]
        if sensitivity:
            written.append(_bars(results, ["site_only", *sensitivity], out / f"sensitivity_{t}.png",
                                 f"{t}: sensitivity to learning rate and batch size", t))
        if any(n.startswith("scarcity_") for n in regimes):
            written.append(_scarcity(results, out / f"scarcity_{t}.png", t))
        ablations = [n for n in regimes if n.startswith(("ablation_", "rank_"))]
        if ablations:
            written.append(_bars(results, ablations, out / f"ablations_{t}.png",
                                 f"{t}: adapter components and LoRA rank", t))
        if results.get("new_sites"):
            written.append(_new_sites(results, out / f"new_sites_{t}.png", t))
    written.append(_audit(results, out / "physics_audit.png"))
    return written
