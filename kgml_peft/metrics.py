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


#: days of the running mean that smooths the day-of-year mean into a seasonal cycle (anomaly R^2)
SEASONAL_DAYS = 31


def seasonal_cycle(observed: np.ndarray, days: int = SEASONAL_DAYS) -> np.ndarray:
    """The seasonal cycle of daily values [N, 365] (NaN = not observed): the day-of-year mean over
    the rows, smoothed by a centred running mean of ``days`` days around the year (so one test
    year still has a cycle to be an anomaly from); NaN where a window holds no observation."""
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(observed).sum(axis=0).astype(float)
        sums = np.nansum(observed, axis=0)
    half = days // 2
    ring = lambda v: np.concatenate([v[-half:], v, v[:half]])  # noqa: E731
    kernel = np.ones(days)
    total, count = np.convolve(ring(sums), kernel, "valid"), np.convolve(ring(counts), kernel, "valid")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def anomaly_reference(observed: np.ndarray) -> np.ndarray:
    """Per row of daily values [N, 365]: the sum over its observed days of the squared distance
    from the rows' :func:`seasonal_cycle` (the reference of :func:`anomaly_r2`)."""
    cycle = np.broadcast_to(seasonal_cycle(observed), observed.shape)
    ok = np.isfinite(observed) & np.isfinite(cycle)
    return np.where(ok, (np.where(ok, observed, 0.0) - np.where(ok, cycle, 0.0)) ** 2, 0.0).sum(axis=1)


def anomaly_r2(predicted: np.ndarray, observed: np.ndarray) -> float | None:
    """R^2 of daily values on their anomalies from the observations' :func:`seasonal_cycle`:
    ``1 - SSE / sum((observed - cycle)^2)`` over the observed days (the cycle exists wherever a
    day is observed). The errors are those of the plain R^2; only the reference changes, from the
    mean to the seasonal cycle, so a model scores above 0 only where it follows the weather, not
    the calendar. None without observed days."""
    reference = float(anomaly_reference(observed).sum())
    if not np.isfinite(observed).any() or reference <= 0:
        return None
    return 1.0 - float(sum(window_errors(predicted, observed)["sse"])) / reference


def window_errors(predicted: np.ndarray, observed: np.ndarray) -> dict[str, list]:
    """Per window (row of [N, 365]): the sum of squared errors over its observed days (``sse``) and
    the number of those days (``n``): what a bootstrap over site-years resamples."""
    seen = np.isfinite(observed)
    squared = np.where(seen, (predicted - np.where(seen, observed, 0.0)) ** 2, 0.0)
    return {"sse": [float(v) for v in squared.sum(axis=1)], "n": [int(v) for v in seen.sum(axis=1)]}


def site_year_errors(windows: YearWindows, preds: dict[str, np.ndarray],
                     names: tuple[str, ...] = ("NEE", "Reco")) -> dict:
    """Per window (a site-year) and target in ``names``: the squared-error sum and observed days
    (:func:`window_errors`) and ``sst_anomaly``, the squared distance of the observations from their
    site's :func:`seasonal_cycle` over that site's windows here. Summed over any set of units,
    ``sse / n`` is their MSE and ``1 - sse / sst_anomaly`` their R^2 on anomalies, so both pool and
    bootstrap over site-years. ``units`` names each window ``site:year``."""
    out: dict = {"units": [f"{site}:{int(year)}" for site, year in zip(windows.sites, windows.years)]}
    for name in names:
        observed = windows.target(name)
        sst = np.zeros(len(observed))
        for site in dict.fromkeys(windows.sites):
            rows = windows.sites == site
            sst[rows] = anomaly_reference(observed[rows])
        out[name] = {**window_errors(preds[name], observed), "sst_anomaly": [float(v) for v in sst]}
    return out
