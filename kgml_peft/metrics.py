"""Metrics on predictions: MSE (scaled and physical units), R^2 and physics violations by group.

Inputs are numpy arrays in physical units; missing observations are NaN and left out.
"""

from __future__ import annotations

import numpy as np
import torch

from kgml_peft import schema
from kgml_peft.data.windows import Scalers, YearWindows
from kgml_peft.model.physics import violation_metrics

METRIC_TARGETS = ("Ra", "Rh", "NEE", "Reco", "Yield")


def target_metrics(pred: np.ndarray, obs: np.ndarray, std: float) -> dict[str, float | int]:
    """n, MSE in physical units, MSE in scaled units (MSE / std^2) and R^2 of non-missing pairs."""
    ok = np.isfinite(obs)
    n = int(ok.sum())
    if n == 0:
        return {"n": 0}
    p, o = pred[ok], obs[ok]
    mse = float(np.mean((p - o) ** 2))
    var = float(np.var(o))
    return {
        "n": n,
        "mse": mse,
        "mse_scaled": mse / std**2,
        "r2": 1.0 - mse / var if n > 1 and var > 0 else None,
    }


def group_metrics(
    windows: YearWindows,
    preds: dict[str, np.ndarray],
    scalers: Scalers,
    index: np.ndarray,
    tolerance: float,
    response: dict[str, np.ndarray] | None = None,
) -> dict:
    """Metrics of the windows at ``index``: per target, physics violations, GPP response.
    Targets missing from ``preds`` are skipped, and physics needs Ra, Rh and NEE (a baseline that
    predicts NEE and Reco only gets no ``physics`` entry)."""
    out: dict = {"site_years": int(len(index)), "targets": {}}
    for name in METRIC_TARGETS:
        if name not in scalers.std or name not in preds:
            continue
        m = target_metrics(preds[name][index], windows.target(name)[index], scalers.std[name])
        if m["n"]:
            out["targets"][name] = m
    if not all(k in preds for k in ("Ra", "Rh", "NEE")):
        return out
    t = {k: torch.as_tensor(preds[k][index]) for k in ("Ra", "Rh", "NEE")}
    out["physics"] = violation_metrics(t["Ra"], t["Rh"], t["NEE"],
                                       torch.as_tensor(windows.gpp[index]), tolerance)
    if response is not None:
        dra = response["Ra"][index]
        drh = response["Rh"][index]
        # Expected physics: more GPP -> more substrate -> Ra does not fall.
        out["physics"]["ra_gpp_response_mean"] = float(dra.mean())
        out["physics"]["ra_gpp_response_negative_rate"] = float((dra.mean(axis=1) < 0).mean())
        out["physics"]["rh_gpp_response_mean"] = float(drh.mean())
    return out


def flux_mse_scaled(group: dict, names: tuple[str, ...] = schema.DAILY_TARGETS) -> float | None:
    """Mean of the scaled MSEs of the observed daily flux targets of a group (None if none)."""
    values = [group["targets"][n]["mse_scaled"] for n in names if n in group["targets"]]
    return float(np.mean(values)) if values else None
