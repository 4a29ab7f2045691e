"""One calibration unit's data and result: what ``--site`` selects, the checked and split site-years
with the targets to fit (:class:`CalibrationData`), the metrics a calibrated model is measured by,
and the result a calibration returns (:class:`CalibrationResult`, with the adapter to save)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from kgml_peft import schema
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.folds import make_folds
from kgml_peft.data.tables import select_sites
from kgml_peft.data.places import table_location
from kgml_peft.data.windows import YearWindows, make_windows, split_by_year
from kgml_peft.errors import KgmlPeftError
from kgml_peft.metrics import group_metrics
from kgml_peft.model.inference import predict_windows
from kgml_peft.store.adapter import Adapter
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.train.pretrain import frame_hash, with_reco
from kgml_peft.train.state import PhaseResult
from kgml_peft.tuners.site_model import SiteModel


#: what a unit's summary may record next to its config: the units it was calibrated with
#: (``--batch-sites``), and the adapter asked for when cross-validation chose another shape
PROVENANCE: tuple[str, ...] = ("batched_with", "requested_adapter", "prior_sources")


@dataclass
class CalibrationResult:
    """What one calibration produced.

    ``model`` is the calibrated model (a :class:`SiteModel` for the adapter method, a
    :class:`KGMLag` otherwise), ``adapter`` the adapter to save (adapter method only), ``metrics``
    the validation metrics ``before`` (global backbone) and ``after``, ``summary`` the provenance
    stored in the output file, ``curve`` the per-epoch losses.
    """

    name: str
    method: str
    model: torch.nn.Module
    adapter: Adapter | None
    metrics: dict
    summary: dict
    curve: list[dict] = field(default_factory=list)

    @property
    def trained_parameters(self) -> int:
        """Number of values the run trained (adapter size, or the whole backbone)."""
        if self.adapter is not None:
            return self.adapter.parameters
        return sum(p.numel() for p in self.model.parameters())


def calibration_units(frame: pd.DataFrame, site: str) -> list[tuple[str, str, pd.DataFrame]]:
    """What ``--site`` selects: ``[(name, scope, rows)]``. A site id gives that site, a region
    label all sites of the region (one pooled unit), ``all`` one unit per region, and a
    comma-separated list of site ids and region labels one unit per entry."""
    if isinstance(site, str) and "," in site:
        names = [part.strip() for part in site.split(",")]
        if "all" in names or "" in names:
            raise KgmlPeftError(f"--site {site!r}: a list names sites or regions, each once, "
                                "without 'all' or empty entries")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise KgmlPeftError(f"--site lists {repeated[0]!r} twice")
        return [unit for name in names for unit in calibration_units(frame, name)]
    schema.check_site_id(site, "site")
    if site == "all":
        for region in frame[schema.REGION].unique():
            schema.check_site_id(region, "region label (it names the adapter file)")
        return [(str(region), "region", rows.reset_index(drop=True))
                for region, rows in frame.groupby(schema.REGION, sort=True)]
    rows = select_sites(frame, site)
    scope = "site" if (frame[schema.SITE] == site).any() else "region"
    return [(site, scope, rows)]


def validation_metrics(model: torch.nn.Module, backbone: Backbone, windows: YearWindows,
                       weights: dict[str, float], tolerance: float) -> dict:
    """Metrics of ``model`` on ``windows``: ``loss`` (the weighted scaled MSE early stopping
    uses), per-target ``n``/``mse``/``mse_scaled``/``r2`` and physics violations."""
    preds = predict_windows(model, backbone.scalers, windows)
    group = group_metrics(windows, preds, backbone.scalers, np.arange(len(windows)), tolerance)
    scored = {n: group["targets"][n]["mse_scaled"] for n in weights if n in group["targets"]}
    total = sum(weights[n] for n in scored)
    group["loss"] = sum(weights[n] * v for n, v in scored.items()) / total if total else None
    return group


def _targets(config: CalibrationConfig, train: YearWindows, val: YearWindows,
             name: str) -> dict[str, float]:
    observed = [t for t in schema.TARGETS if np.isfinite(train.target(t)).any()]
    if config.targets is None:
        if not observed:
            raise KgmlPeftError(f"{name}: the training years have no observed target "
                                f"({', '.join(schema.TARGETS)})")
        weights = {t: 1.0 for t in observed}
    else:
        empty = [t for t in config.targets if t not in observed]
        if empty:
            raise KgmlPeftError(f"{name}: target {empty[0]} has no observations in the training years")
        weights = dict(config.targets)
    if not any(np.isfinite(val.target(t)).any() for t in weights):
        raise KgmlPeftError(
            f"{name}: the validation years ({', '.join(map(str, sorted(set(val.years))))}) have no "
            f"observation of {', '.join(weights)}; early stopping and the before/after metrics "
            "need some (lower --val-fraction or provide observations)"
        )
    return weights


@dataclass
class CalibrationData:
    """One unit's data, checked and split: training and validation windows and target weights."""

    name: str
    scope: str
    rows: pd.DataFrame
    train: YearWindows
    val: YearWindows
    weights: dict[str, float]
    #: where the adapter starts and what rho pulls it towards (None: zero, Eq. 3); file names of
    #: tensors, see :mod:`kgml_peft.calibration.prior`; ``prior_record`` says where it came from
    prior: dict[str, torch.Tensor] | None = None
    prior_record: dict | None = None


def prepare_unit(backbone: Backbone, rows: pd.DataFrame, name: str, scope: str,
                 config: CalibrationConfig) -> CalibrationData:
    """Split validated ``rows`` by year (``cv = "folds"``: keep them all, the folds split them) and
    choose the targets; every data problem that would stop a calibration is raised here, before
    any training."""
    rows = with_reco(rows)
    windows = make_windows(rows, backbone.config.features)
    if config.cv == "folds":  # every site-year is cut into folds; before/after are in-sample
        if len(windows) == 0:
            raise KgmlPeftError(f"{name} has no complete site-year to calibrate on")
        weights = _targets(config, windows, windows, name)
        make_folds(windows, list(weights), name)  # too little data for folds stops before any training
        return CalibrationData(name, scope, rows, windows, windows, weights)
    train_idx, val_idx = split_by_year(windows, config.val_fraction)
    if len(val_idx) == 0:
        raise KgmlPeftError(
            f"{name} has a single complete year per site; calibration needs at least two "
            "(the last year of each site is held out for early stopping)"
        )
    train, val = windows.subset(train_idx), windows.subset(val_idx)
    return CalibrationData(name, scope, rows, train, val, _targets(config, train, val, name))


def finish_unit(backbone: Backbone, data: CalibrationData, config: CalibrationConfig,
                model: torch.nn.Module, result: PhaseResult, before: dict,
                provenance: dict | None = None, metrics: dict | None = None,
                members: list[dict[str, torch.Tensor]] | None = None) -> CalibrationResult:
    """Measure a unit's trained ``model`` (CPU, its best weights) and put together its result:
    metrics, summary and, for the adapter method, the adapter to save. ``provenance`` adds
    entries to the summary's ``calibration`` record (e.g. the units trained alongside),
    ``metrics`` to its ``metrics`` record (e.g. cross-validation); ``members`` are the adapter's
    members 2..M."""
    name, scope, rows = data.name, data.scope, data.rows
    train, val, weights = data.train, data.val, data.weights
    if isinstance(model, SiteModel) and config.storage_dtype == "float16":
        model.round_adapter(torch.float16)
    after = validation_metrics(model, backbone, val, weights, config.tolerance)
    location = table_location(rows)  # where the data came from: adapters are found by location

    summary = {
        "site": name,
        "scope": scope,
        "sites": sorted(set(train.sites) | set(val.sites)),
        "regions": sorted(set(train.regions) | set(val.regions)),
        "targets": weights,
        "calibration": {**config.to_dict(), **(provenance or {}),
                        **({} if data.prior_record is None else {"prior_sources": data.prior_record})},
        "data": {
            "hash": frame_hash(rows),
            "train_site_years": len(train),
            "val_site_years": len(val),
            "train_years": sorted({int(y) for y in train.years}),
            "val_years": sorted({int(y) for y in val.years}),
            "first_date": str(rows[schema.DATE].min().date()),
            "last_date": str(rows[schema.DATE].max().date()),
            "dropped_site_years": len(train.dropped),
            **({} if location is None else {"location": location}),
        },
        "metrics": {
            "before": _compact(before),
            "after": _compact(after),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.curve) - 1,
            "steps": result.steps,
            **(metrics or {}),
        },
        "backbone_fingerprint": backbone.fingerprint,
    }
    adapter = None
    if isinstance(model, SiteModel):
        info = {k: summary[k] for k in ("scope", "sites", "regions", "data", "metrics")}
        # the adapter architecture has its own metadata field (adapter_config)
        calibration = {k: v for k, v in summary["calibration"].items() if k != "adapter"}
        info.update(features=list(backbone.config.features), targets=weights, calibration=calibration)
        adapter = Adapter(site=name, config=config.adapter, tensors=model.adapter_tensors(),
                          backbone_fingerprint=backbone.fingerprint, info=info,
                          members=[{k: v.detach().clone() for k, v in m.items()} for m in members or []])
    return CalibrationResult(name=name, method=config.method, model=model, adapter=adapter,
                             metrics={"before": before, "after": after}, summary=summary,
                             curve=result.curve)


def _compact(metrics: dict) -> dict:
    """The part of a metrics dict an adapter file keeps: loss, per-target n and MSE, mass balance."""
    out = {"loss": metrics["loss"],
           "mse": {k: v["mse"] for k, v in metrics["targets"].items()},
           "n": {k: v["n"] for k, v in metrics["targets"].items()}}
    out["mass_balance_violation_rate"] = metrics["physics"].get("mass_balance_violation_rate")
    return out

