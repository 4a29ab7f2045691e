"""Evaluate a backbone on a table: metrics overall, per region and per site."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kgml_peft.data.tables import select_sites, validate_table
from kgml_peft.data.windows import make_windows
from kgml_peft.metrics import group_metrics
from kgml_peft.model.inference import gpp_response, predict_windows
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.store.probe import backbone_name, check_backbone_outputs, check_values


def evaluate(
    backbone: Backbone,
    frame: pd.DataFrame,
    site: str | None = None,
    tolerance: float = 0.05,
) -> dict:
    """Validate ``frame``, predict every complete site-year and report metrics.

    Returns ``{"overall": ..., "regions": {region: ...}, "sites": {site: ...}}`` where each group
    has per-target ``n``, ``mse`` (physical units), ``mse_scaled`` and ``r2``, and ``physics``
    violation metrics (mass balance, negative fluxes, response of Ra to GPP).
    ``site`` restricts the table to one site id or region label.
    """
    features = backbone.config.features
    check_backbone_outputs(backbone)
    frame = validate_table(frame, features)
    frame = select_sites(frame, site)
    windows = make_windows(frame, features)
    preds = predict_windows(backbone.model, backbone.scalers, windows)
    check_values(preds, backbone_name(backbone))  # no inf in the report
    response = gpp_response(backbone.model, backbone.scalers, windows, base=preds)

    def metrics(index: np.ndarray) -> dict:
        return group_metrics(windows, preds, backbone.scalers, index, tolerance, response)

    report = {
        "backbone": str(backbone.path) if backbone.path else None,
        "fingerprint": backbone.fingerprint,
        "dropped_site_years": [{"site": s, "year": y, "days": n} for s, y, n in windows.dropped],
        "overall": metrics(np.arange(len(windows))),
        "regions": {r: metrics(np.flatnonzero(windows.regions == r))
                    for r in sorted(set(windows.regions))},
        "sites": {s: metrics(np.flatnonzero(windows.sites == s)) for s in sorted(set(windows.sites))},
    }
    return report


def region_table(report: dict, level: str = "regions") -> pd.DataFrame:
    """One row per region (or site): site-years, MSE and R^2 of NEE and Reco, mass-balance MAE."""
    rows = []
    for name, group in report[level].items():
        row: dict = {level[:-1]: name, "site_years": group["site_years"]}
        for target in ("NEE", "Reco", "Ra", "Rh", "Yield"):
            m = group["targets"].get(target)
            if m:
                row[f"{target}_mse"] = m["mse"]
                row[f"{target}_r2"] = m["r2"]
        row["mass_balance_mae"] = group["physics"]["mass_balance_mae"]
        row["negative_flux_rate"] = (group["physics"]["negative_ra_rate"]
                                     + group["physics"]["negative_rh_rate"]) / 2
        rows.append(row)
    return pd.DataFrame(rows)



def calibration_table(summaries: list[dict]) -> pd.DataFrame:
    """One row per calibration summary (see :func:`~kgml_peft.calibration.calibrate.calibrate`):
    size, validation loss and per-target MSE before and after, and the relative change."""
    rows = []
    for s in summaries:
        before, after = s["metrics"]["before"], s["metrics"]["after"]
        row: dict = {"site": s["site"], "val_site_years": s["data"]["val_site_years"]}
        if "bytes" in s:
            row["KiB"] = s["bytes"] / 1024
        row["loss_global"], row["loss_adapter"] = before["loss"], after["loss"]
        row["loss_change_%"] = 100 * (after["loss"] - before["loss"]) / before["loss"]
        for target, mse in after["mse"].items():
            row[f"{target}_global"], row[f"{target}_adapter"] = before["mse"][target], mse
        if "seconds" in s:
            row["seconds"] = s["seconds"]
        rows.append(row)
    return pd.DataFrame(rows)
