"""New fields: calibrate sites the global backbone never saw on their earlier years, then compare
backbone and adapter on each field's last year, which neither training nor early stopping used.

This is the toolkit's use case in one call (and what ``kgml-peft demo`` shows): a field joins
after the global model was trained, with a few years of its own tower data. Early stopping
inside the calibration years holds out their last year (the calibration default), so the test
year is untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from kgml_peft import schema
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.runs import CalibrationRun, run_calibration
from kgml_peft.data.tables import validate_table
from kgml_peft.errors import KgmlPeftError
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.predict import predict_table
from kgml_peft.store.checkpoint import Backbone, load_backbone

#: Targets compared on the test year (what flux towers observe).
SCORED: tuple[str, ...] = ("NEE", "Reco")


def new_field_sites(backbone: Backbone) -> tuple[str, ...]:
    """The sites a backbone's pretraining left out (``exclude_sites`` of its training config)."""
    training = backbone.training or {}
    return tuple(training.get("config", {}).get("exclude_sites", ()))


def split_last_year(frame: pd.DataFrame, sites: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of ``sites`` before each site's last year (calibration) and in it (test)."""
    rows = frame[frame[schema.SITE].isin(sites)]
    missing = [s for s in sites if s not in set(rows[schema.SITE])]
    if missing:
        raise KgmlPeftError(f"new field {missing[0]} is not in the data")
    year = rows[schema.DATE].dt.year
    last = year.groupby(rows[schema.SITE]).transform("max")
    counts = year.groupby(rows[schema.SITE]).nunique()
    if (counts < 3).any():
        short = counts[counts < 3].index[0]
        raise KgmlPeftError(f"new field {short} has {counts[short]} year(s); a new field needs at least 3: "
                            "2 to calibrate (the second stops early) and 1 to test")
    return rows[year < last].reset_index(drop=True), rows[year == last].reset_index(drop=True)


def site_mse(pred: pd.DataFrame, obs: pd.DataFrame, site: str, target: str) -> float:
    """MSE of ``target`` of ``site`` between a prediction table and observations, on the
    observed days."""
    return float(_squared_errors(pred, obs, site, target).mean())


def calibrate_new_fields(backbone_path: str | os.PathLike, frame: pd.DataFrame, sites: tuple[str, ...],
                         out_dir: str | os.PathLike, *, config: CalibrationConfig | None = None,
                         progress: bool = True, force: bool = False,
                         cpu: bool = False) -> tuple[pd.DataFrame, list[CalibrationRun]]:
    """Calibrate one adapter per new field on its years before the last (side by side in one
    batched pass) into ``out_dir``, then predict each field's last year with the backbone and with
    its adapter. Returns one row per field (MSE in (gC m-2 d-1)^2) and the calibration runs."""
    backbone = load_backbone(backbone_path)
    frame = validate_table(frame, backbone.config.features)
    calibration, test = split_last_year(frame, sites)
    config = config or CalibrationConfig(batch_sites=len(sites), cv="none")
    runs = run_calibration(",".join(sites), backbone_path=backbone_path, data=calibration,
                           out_dir=out_dir, config=config, cpu=cpu, progress=progress, force=force)
    bank = AdapterBank(backbone, Path(out_dir))
    calibrated = predict_table(bank, test, site_column=schema.SITE, require_adapter=True).frame
    global_only = predict_table(bank, test).frame
    rows = []
    for site in sites:
        years = sorted(calibration.loc[calibration[schema.SITE] == site, schema.DATE].dt.year.unique())
        row = {"site": site, "region": str(test.loc[test[schema.SITE] == site, schema.REGION].iloc[0]),
               "calibration_years": f"{years[0]}-{years[-1]}",
               "test_year": int(test.loc[test[schema.SITE] == site, schema.DATE].dt.year.iloc[0])}
        for target in SCORED:
            row[f"{target}_global"] = site_mse(global_only, test, site, target)
            row[f"{target}_adapter"] = site_mse(calibrated, test, site, target)
            # per target: NEE and Reco are tied by NEE = Reco - GPP, so a sum would count one error twice
            row[f"{target}_change_%"] = 100 * (row[f"{target}_adapter"] / row[f"{target}_global"] - 1)
        rows.append(row)
    return pd.DataFrame(rows), runs


def state_test(backbone_path: str | os.PathLike, store: str | os.PathLike, frame: pd.DataFrame,
               data_seed: int | None = None) -> pd.DataFrame:
    """Per state of ``frame``: test MSE of NEE and Reco of the global backbone and of the state's
    adapter in ``store`` (each row served by the adapter named by its ``region``), on every
    observed day. ``frame`` should hold fields that neither the backbone's pretraining (training or
    early stopping) nor the calibration saw: the demo uses the simulator's fields of another seed
    (``data_seed``, recorded in each row). One row per state, a change per target."""
    backbone = load_backbone(backbone_path)
    frame = validate_table(frame, backbone.config.features)
    bank = AdapterBank(backbone, Path(store))
    adapted = predict_table(bank, frame, site_column=schema.REGION, require_adapter=True).frame
    global_only = predict_table(bank, frame).frame
    rows = []
    for region in sorted(frame[schema.REGION].astype(str).unique()):
        sites = frame.loc[frame[schema.REGION] == region, schema.SITE].unique()
        row = {"state": region, "fields": len(sites), "site_years": int(
            frame[frame[schema.REGION] == region].groupby([schema.SITE, frame[schema.DATE].dt.year]).ngroups)}
        if data_seed is not None:
            row["data_seed"] = data_seed
        for target in SCORED:
            for name, pred in (("global", global_only), ("adapter", adapted)):
                errors = [_squared_errors(pred, frame, site, target) for site in sites]
                row[f"{target}_{name}"] = float(np.concatenate(errors).mean())
            row[f"{target}_change_%"] = 100 * (row[f"{target}_adapter"] / row[f"{target}_global"] - 1)
        rows.append(row)
    return pd.DataFrame(rows)


def _squared_errors(pred: pd.DataFrame, obs: pd.DataFrame, site: str, target: str) -> np.ndarray:
    p = pred[pred[schema.SITE] == site].set_index(schema.DATE)[target]
    o = obs[obs[schema.SITE] == site].set_index(schema.DATE)[target].reindex(p.index)
    ok = o.notna().to_numpy()
    return (p.to_numpy()[ok] - o.to_numpy()[ok]) ** 2


def cross_validated_new_fields(backbone_path: str | os.PathLike, observed: pd.DataFrame,
                               truth: pd.DataFrame, sites: tuple[str, ...], out_dir: str | os.PathLike,
                               *, level: float = 0.9, config: CalibrationConfig | None = None,
                               progress: bool = True, force: bool = False,
                               cpu: bool = False) -> pd.DataFrame:
    """The default calibration (cross-validated, one field at a time) of each new field on its
    years before the last, then its last year predicted with ``level`` intervals, as
    ``predict --interval --annual`` does. One row per field: NEE and Reco test MSE of the global
    model and the adapter, what the folds chose, the share of observed test days inside the daily
    interval, and whether the annual NEE sum of ``truth`` (the complete, noise-free simulator
    output: the demo's analogue of a gap-filled record) is inside the annual interval."""
    backbone = load_backbone(backbone_path)
    observed = validate_table(observed, backbone.config.features)
    calibration, test = split_last_year(observed, sites)
    config = config or CalibrationConfig()
    runs = run_calibration(",".join(sites), backbone_path=backbone_path, data=calibration,
                           out_dir=out_dir, config=config, cpu=cpu, progress=progress, force=force)
    bank = AdapterBank(backbone, Path(out_dir))
    served = predict_table(bank, test, site_column=schema.SITE, require_adapter=True, interval=level)
    global_only = predict_table(bank, test).frame
    truth = truth.set_index([schema.SITE, schema.DATE])
    rows = []
    for run in runs:
        site, cv = run.name, run.summary["metrics"]["cv"]
        day = served.frame[served.frame[schema.SITE] == site].set_index(schema.DATE)
        obs = test[test[schema.SITE] == site].set_index(schema.DATE)["NEE"].reindex(day.index)
        ok = obs.notna().to_numpy()
        inside = (obs >= day["NEE_lo"]) & (obs <= day["NEE_hi"])
        year = served.annual[served.annual[schema.SITE] == site].iloc[0]
        true_sum = float(truth.loc[[(site, d) for d in day.index], "NEE"].sum())
        row = {"site": site, "test_year": int(year["year"]), "shape": cv["shape"],
               "strength": cv["strength"], "fold_change_%": 100 * cv["change_mean"],
               "daily_coverage": float(inside.to_numpy()[ok].mean()), "daily_days": int(ok.sum()),
               "annual_true": true_sum, "annual_lo": float(year["NEE_lo"]), "annual_hi": float(year["NEE_hi"]),
               "annual_inside": bool(year["NEE_lo"] <= true_sum <= year["NEE_hi"])}
        for target in SCORED:
            row[f"{target}_global"] = site_mse(global_only, test, site, target)
            row[f"{target}_adapter"] = site_mse(served.frame, test, site, target)
        row["NEE_change_%"] = 100 * (row["NEE_adapter"] / row["NEE_global"] - 1)
        rows.append(row)
    return pd.DataFrame(rows)
