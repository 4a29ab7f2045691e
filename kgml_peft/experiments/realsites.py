"""The real-site benchmark: calibrate on a flux tower's first years, test on its later ones.

Data: a FLUXNET2015 table from ``kgml-peft import fluxnet``. The held-out sites (US-Ne3 and
US-CRT by default) are never seen before calibration; every other site is a development site.

1. **Backbones** (one per route, seed and scope), built for the tower features
   (``FLUXNET_FEATURES``). A held-out tower's backbones never see the development towers within
   ``exclude_within_km`` of it (``main`` column) and, in a second column (``past``), also none of
   the years from its first calibration year on (:class:`Scope`):

   * ``observed``: trained from random weights on the scope's observed NEE and Reco
     (their last ``val_fraction`` of years steer early stopping);
   * ``simulated``: the KGML-ag route: first the process-model simulator's Ra, Rh, NEE and Reco
     (its weather converted to the tower features by
     :func:`~kgml_peft.data.meteo.add_flux_tower_weather`), then the development observations.

2. **Per held-out site and k** in ``calibration_years`` (k < the site's years): the first k years
   calibrate; the years after the site's largest k test, the same for every k. Methods: ``global`` (the backbone as it is), ``site_only``
   (random weights, the k years only), ``full`` (Eq. 2, every weight from the backbone) and
   ``adapter`` (Eq. 3), and ``adapter_cv`` (Eq. 3 with ``cv = "folds"``: epochs, shape and
   strength chosen on folds of the k years, see :mod:`kgml_peft.calibration.selection`; the
   global model is kept when no adapter beats it there); the last three from each route's backbone.
   Baselines (:mod:`.baselines`, run once, they draw nothing at random): ``regression_global``
   (Reco ~ 1 + TA + TA^2 + GPP, NEE = Reco - GPP, fitted on the development towers' training
   years), ``regression_site`` (the same fitted on the k years) and ``climatology`` (the k years'
   day-of-year mean). With one to three years there is
   no year to spare for early stopping, so the calibration years' observed days are split in
   blocks (:func:`~kgml_peft.data.windows.split_by_day_blocks`: every 4th fortnight validates, the
   model still reads every day's weather); early stopping keeps the epoch with the lowest loss on
   the validation blocks, epoch 0 (the backbone itself) included. No setting is chosen by looking
   at the held-out sites: they were set on a development split (US-Ne2 and US-IB2 held out,
   US-Ne3 and US-CRT removed; see docs/fluxnet.md).

Test figures, in physical units: MSE and R^2 of daily NEE and Reco on the days whose observations
passed the import's QC threshold, and the error of annual sums (365-day windows) against ONEFlux's
gap-filled NEE and Reco (``NEE_gapfilled``, ``Reco_gapfilled``). Runs are written to
``<out>/runs/<key>.json`` and skipped when present (resume), as in :mod:`.runs`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kgml_peft import schema
from kgml_peft.calibration.calibrate import CalibrationData, calibrate_unit
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.config_files import read_toml
from kgml_peft.data.fluxnet import GAPFILLED
from kgml_peft.data.gpp import GPP_ROUTES, satellite_like_gpp
from kgml_peft.data.places import distance_km, site_points
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import (
    Scalers,
    YearWindows,
    make_windows,
    split_by_day_blocks,
    split_by_year,
)
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.experiments.baselines import Climatology, RecoRegression
from kgml_peft.experiments.config import Training, config_from_dict
from kgml_peft.experiments.runs import RunFiles, _complete, scratch_phases
from kgml_peft.metrics import anomaly_r2, group_metrics, window_errors
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.predict import ServedWindows, annual_table, serve_windows
from kgml_peft.store.adapter import Adapter
from kgml_peft.uncertainty import check_level, coverage
from kgml_peft.model.backbone import BackboneConfig
from kgml_peft.model.inference import predict_windows
from kgml_peft.store.checkpoint import Backbone, load_backbone, save_backbone
from kgml_peft.train.loop import PhaseConfig, deterministic_algorithms
from kgml_peft.train.pretrain import PretrainConfig, frame_hash, train_phases, with_reco

ROUTES: tuple[str, ...] = ("observed", "simulated")
#: Methods per held-out site and k; ``global``, ``full`` and ``adapter`` exist once per route.
METHODS: tuple[str, ...] = ("global", "site_only", "full", "adapter", "adapter_cv")
#: fewest observed days of each scored target a held-out tower's calibration years need (the Reco
#: regression's four coefficients want four times their number)
MIN_CALIBRATION_DAYS = 16
#: Baselines per held-out site and k (:mod:`.baselines`), run once (they are deterministic, so
#: seeds would repeat them): the Reco regression fitted on the development towers' training years
#: or on the calibration years, and the calibration years' day-of-year climatology.
BASELINES: tuple[str, ...] = ("regression_global", "regression_site", "climatology")
#: the methods that start from a route's backbone
BACKBONE_METHODS: tuple[str, ...] = ("global", "full", "adapter", "adapter_cv")
SCORED: tuple[str, ...] = ("NEE", "Reco")
WEIGHTS: dict[str, float] = {"NEE": 1.0, "Reco": 1.0}


@dataclass(frozen=True)
class RealSiteConfig:
    """The benchmark's settings (see the module docstring); every field has a default."""

    held_out: tuple[str, ...] = ("US-Ne3", "US-CRT")
    #: sites removed from the table before anything else (the development split removes the real
    #: held-out towers, see docs/fluxnet.md)
    exclude: tuple[str, ...] = ()
    calibration_years: tuple[int, ...] = (1, 2, 3)
    seeds: tuple[int, ...] = (0, 1, 2)
    routes: tuple[str, ...] = ROUTES
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(
        features=schema.FLUXNET_FEATURES, hidden_size=16, attention_size=8, yield_hidden=16))
    #: development sites: the last ``val_fraction`` of each site's years steer early stopping
    val_fraction: float = 0.2
    physics_weight: float = 0.1
    tolerance: float = 0.05
    #: the observed route (and its second step in the simulated route), from random weights
    pretrain: Training = Training(epochs=60, lr=1e-2, batch_size=8, patience=10)
    #: the simulated route's first step, on process-model output
    simulated: Training = Training(epochs=20, lr=5e-3, batch_size=32, patience=5)
    #: the simulated route's second step, on the development observations
    transfer: Training = Training(epochs=40, lr=1e-3, batch_size=8, patience=8)
    #: held-out site, first k years; early stopping on day blocks of those years
    site_only: Training = Training(epochs=60, lr=1e-2, batch_size=1, patience=10)
    finetune: Training = Training(epochs=30, lr=5e-4, batch_size=1, patience=8)
    adapter: Training = Training(epochs=30, lr=1e-2, batch_size=1, patience=8)
    #: calibration years: every ``val_every``-th block of ``val_block_days`` days validates
    val_block_days: int = 14
    val_every: int = 4
    mu: float = 1.0
    rho: float = 1e-3
    #: simulator size for the simulated route (sites per state, years per site; None = all)
    sim_sites_per_region: int | None = 6
    sim_years_per_site: int | None = None
    #: GPP input: ``satellite-like`` (every site's tower GPP degraded as a satellite product would
    #: see it, :mod:`kgml_peft.data.gpp`; the default: a field without a tower has such a product)
    #: or ``tower`` (GPP_NT, partitioned from the tower's own NEE: NEE then follows from Reco by
    #: ONEFlux's identity, an upper bound scored on Reco)
    gpp_route: str = "satellite-like"
    #: coverage level of the intervals scored for ``adapter_cv``
    interval: float = 0.9
    #: leave-neighbours-out: a held-out tower's backbones train without the development towers
    #: closer than this (km, great circle; 0: none left out). Needs ``lat``/``lon`` in the table
    #: (``kgml-peft import fluxnet --site-meta``).
    exclude_within_km: float = 10.0
    #: a second column per held-out tower: backbones trained only on the development towers' years
    #: before the tower's first calibration year (no test-year weather or flux at all)
    past_only: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for key in ("held_out", "calibration_years", "seeds", "routes"):
            expect_type(getattr(self, key), (list, tuple), key)
            set_(self, key, tuple(getattr(self, key)))
            if not getattr(self, key) or len(set(getattr(self, key))) != len(getattr(self, key)):
                raise KgmlPeftError(f"{key} must list at least one value, each once")
        expect_type(self.exclude, (list, tuple), "exclude")
        set_(self, "exclude", tuple(self.exclude))
        for site in (*self.held_out, *self.exclude):
            schema.check_site_id(site, "held-out or excluded site id")
        if set(self.held_out) & set(self.exclude):
            raise KgmlPeftError("a site cannot be both held out and excluded")
        for value in (*self.calibration_years, *self.seeds):
            expect_type(value, int, "calibration years / seed")
            if value < 0 or (value == 0 and value in self.calibration_years):
                raise KgmlPeftError("calibration years must be >= 1 and seeds >= 0")
        unknown = [r for r in self.routes if r not in ROUTES]
        if unknown:
            raise KgmlPeftError(f"unknown route {unknown[0]!r}; choose from {', '.join(ROUTES)}")
        for key in ("sim_sites_per_region", "sim_years_per_site"):
            value = getattr(self, key)
            if value is not None:
                expect_type(value, int, key)
                if value < 1:
                    raise KgmlPeftError(f"{key} must be >= 1 (or left out for all), got {value}")
        expect_type(self.val_fraction, (int, float), "val_fraction")
        if not 0 < self.val_fraction < 0.5:
            raise KgmlPeftError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        for key in ("physics_weight", "tolerance", "mu", "rho"):
            value = getattr(self, key)
            expect_type(value, (int, float), key)
            if not (math.isfinite(value) and value >= 0):
                raise KgmlPeftError(f"{key} must be a finite number >= 0, got {value}")
        if self.gpp_route not in GPP_ROUTES:
            raise KgmlPeftError(f"gpp_route must be one of {', '.join(GPP_ROUTES)}, got {self.gpp_route!r}")
        check_level(self.interval)
        expect_type(self.exclude_within_km, (int, float), "exclude_within_km")
        if not (math.isfinite(self.exclude_within_km) and self.exclude_within_km >= 0):
            raise KgmlPeftError(f"exclude_within_km must be a distance >= 0 (0: none), got {self.exclude_within_km!r}")
        expect_type(self.past_only, bool, "past_only")
        for key, low in (("val_block_days", 1), ("val_every", 2)):
            expect_type(getattr(self, key), int, key)
            if getattr(self, key) < low:
                raise KgmlPeftError(f"{key} must be >= {low}, got {getattr(self, key)}")

    @classmethod
    def quick(cls) -> RealSiteConfig:
        """Every method and route, small (CI): one seed, k = 1, hidden size 8, a few epochs."""
        small = Training(epochs=2, lr=1e-2, batch_size=8, patience=0)
        return cls(seeds=(0,), calibration_years=(1,),
                   backbone=BackboneConfig(features=schema.FLUXNET_FEATURES, hidden_size=8,
                                           attention_size=4, yield_hidden=8),
                   pretrain=small, simulated=dataclasses.replace(small, batch_size=32),
                   transfer=dataclasses.replace(small, lr=1e-3),
                   site_only=dataclasses.replace(small, batch_size=1),
                   finetune=dataclasses.replace(small, lr=5e-4, batch_size=1),
                   adapter=dataclasses.replace(small, batch_size=1),
                   sim_sites_per_region=1, sim_years_per_site=3)

    def to_dict(self) -> dict:
        """JSON-ready form (stored in results.json)."""
        data = dataclasses.asdict(self)
        data["backbone"] = self.backbone.to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> RealSiteConfig:
        """Build from a dict shaped like :meth:`to_dict` (every key optional)."""
        return config_from_dict(cls, data, "real-site benchmark config",
                                {"features": list(schema.FLUXNET_FEATURES)})

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> RealSiteConfig:
        """Read a TOML file whose keys are those of :meth:`to_dict`."""
        return cls.from_dict(read_toml(path))


#: The backbones a held-out tower is calibrated from, one column each: ``main`` (every development
#: tower but its neighbours within ``exclude_within_km``) and ``past`` (the same towers, only
#: their years before the tower's first calibration year; with ``past_only``).
COLUMNS: tuple[str, ...] = ("main", "past")


@dataclass(frozen=True)
class Scope:
    """The development data a backbone trains on: every development tower except ``without``,
    and with ``before`` only their years before that one."""

    without: tuple[str, ...] = ()
    before: int | None = None

    @property
    def name(self) -> str:
        """File-name-safe: ``dev`` (everything), ``without-US-Ne1+US-Ne2``, ``before-2011``."""
        parts = (["without-" + "+".join(self.without)] if self.without else []) + \
            ([f"before-{self.before}"] if self.before is not None else [])
        return "+".join(parts) or "dev"


@dataclass(frozen=True)
class RealRun:
    """One unit of work: a backbone (``pretrain``, on ``scope``), or one method on one held-out
    site and k, from the backbones of one of :data:`COLUMNS`."""

    method: str  # pretrain, one of METHODS or BASELINES
    seed: int
    route: str | None = None
    site: str | None = None
    years: int | None = None
    column: str = "main"
    #: pretraining runs: the name of their :class:`Scope`
    scope: str = "dev"

    @property
    def key(self) -> str:
        """A unique, file-name-safe name of the run within one results folder (a folder holds one
        config and table: :meth:`RealSiteBenchmark.identity`)."""
        parts = [self.method, self.route or "none"]
        if self.scope != "dev":
            parts.append(self.scope)
        if self.site is not None:
            parts += [self.site, f"{self.years}y"]
        if self.column != "main":
            parts.append(self.column)
        return "__".join(parts) + f"__s{self.seed}"


def plan_runs(config: RealSiteConfig, site_years: dict[str, int],
              scopes: dict[str, dict[str, Scope]] | None = None) -> list[RealRun]:
    """Every run, backbones first; k is skipped for a site without a year left to test.
    ``scopes`` gives each held-out site's backbone scope per column (default: the ``main`` column
    on every development tower); a column a site lacks has no runs."""
    if scopes is None:
        scopes = {site: {"main": Scope()} for site in config.held_out}
    needed = list(dict.fromkeys(scope for site in config.held_out for scope in scopes[site].values()))
    runs = [RealRun("pretrain", seed, route, scope=scope.name)
            for seed in config.seeds for scope in needed for route in config.routes]
    for seed in config.seeds:
        for site in config.held_out:
            for k in config.calibration_years:
                if k >= site_years[site]:
                    continue
                runs.append(RealRun("site_only", seed, None, site, k))
                if seed == config.seeds[0]:
                    runs += [RealRun(m, seed, None, site, k) for m in BASELINES]
                for column in (c for c in COLUMNS if c in scopes[site]):
                    for route in config.routes:
                        runs += [RealRun(m, seed, route, site, k, column) for m in BACKBONE_METHODS]
    return runs


def score(model: torch.nn.Module | None, scalers: Scalers, windows: YearWindows,
          gapfilled: dict[str, np.ndarray], tolerance: float, keep_series: bool = False,
          preds: dict[str, np.ndarray] | None = None) -> dict:
    """Test figures of ``model`` on ``windows`` (physical units): per scored target n, MSE and
    R^2 of the QC-passing days, annual sums against the gap-filled record, physics violations;
    ``keep_series`` adds the daily predictions and observations (for figures). ``preds`` are the
    predictions when they were served otherwise (default: ``model`` on every window; a baseline
    gives NEE and Reco only, and no physics figures)."""
    if preds is None:
        preds = predict_windows(model, scalers, windows)
    group = group_metrics(windows, preds, scalers, np.arange(len(windows)), tolerance)
    out: dict = {"site_years": len(windows), "years": [int(y) for y in windows.years],
                 "physics": group.get("physics")}
    for name in SCORED:
        m = group["targets"].get(name, {"n": 0})
        observed = gapfilled[name].sum(axis=1)  # NaN where a gap-filled day is missing
        predicted = preds[name].sum(axis=1)
        ok = np.isfinite(observed)
        err = predicted[ok] - observed[ok]
        daily = windows.target(name)
        out[name] = {"n": m["n"], "mse": m.get("mse"), "r2": m.get("r2"),
                     "r2_anomaly": anomaly_r2(preds[name], daily),
                     # per test year: the sum of squared daily errors and the days scored (bootstrap)
                     "by_year": window_errors(preds[name], daily),
                     "annual_observed": [float(v) if np.isfinite(v) else None for v in observed],
                     "annual_predicted": [float(v) for v in predicted],
                     "annual_mae": float(np.abs(err).mean()) if ok.any() else None,
                     "annual_bias": float(err.mean()) if ok.any() else None}
        if keep_series:
            out[name]["daily_predicted"] = np.round(preds[name], 4).tolist()
    if keep_series:
        out["dates"] = [str(d) for d in windows.dates[:, 0]]
        for name in SCORED:
            out[name]["daily_observed"] = _json_rows(windows.target(name))
            out[name]["daily_gapfilled"] = _json_rows(gapfilled[name])
    return out


def served_with_intervals(bank: AdapterBank, windows: YearWindows, served: np.ndarray,
                          gapfilled: dict[str, np.ndarray], level: float) -> tuple[ServedWindows, dict]:
    """Test ``windows`` served as ``predict --interval`` serves them (members in one mixed batch,
    other crops' years by the global model with its widths), and the coverage of the intervals
    at ``level``: per scored target, the share of QC-passing days inside the daily interval and of
    site-years whose gap-filled annual sum is inside the annual interval, with mean widths. A
    calibration with too few residuals for ``level`` is served without intervals and its coverage
    recorded as unavailable, not fatal."""
    try:
        got = serve_windows(bank, windows, served, interval=level)
    except KgmlPeftError as exc:
        return serve_windows(bank, windows, served), {"level": level, "unavailable": str(exc)}
    annual = annual_table(windows.sites, windows.years, served, got.outside, got.out,
                          windows.dates.shape[1], got.widths, level)
    scores: dict = {"level": level, "members": max(len(bank.get(n).all_members) for n in set(served))}
    for name in SCORED:
        scores[name] = {
            "daily": coverage(windows.target(name), got.out[f"{name}_lo"], got.out[f"{name}_hi"]),
            "annual": coverage(gapfilled[name].sum(axis=1), annual[f"{name}_lo"].to_numpy(),
                               annual[f"{name}_hi"].to_numpy())}
    return got, scores


def _json_rows(values: np.ndarray) -> list[list[float | None]]:
    """[N, 365] values as JSON lists, 4 decimals, None where missing."""
    return [[round(float(v), 4) if np.isfinite(v) else None for v in row] for row in values]


class RealSiteBenchmark(RunFiles):
    """Runs the benchmark's plan on one imported FLUXNET table into ``out`` (see module docstring)."""

    def __init__(self, frame: pd.DataFrame, config: RealSiteConfig, out: str | Path, *,
                 cpu: bool = True) -> None:
        self.config, self.out, self.cpu = config, Path(out), cpu
        features = config.backbone.features
        missing = [c for c in GAPFILLED if c not in frame.columns]
        if missing:
            raise KgmlPeftError(f"the data has no {missing[0]} column; use a table written by "
                                "kgml-peft import fluxnet")
        if config.exclude:
            frame = frame[~frame[schema.SITE].astype(str).isin(config.exclude)]
            if frame.empty:
                raise KgmlPeftError("every site of the data is excluded")
        if config.gpp_route == "satellite-like":
            frame = satellite_like_gpp(frame, seed=0)
        table = validate_table(frame, features, targets=list(SCORED))
        self.windows = make_windows(table, features)
        present = set(self.windows.sites)
        absent = [s for s in config.held_out if s not in present]
        if absent:
            raise KgmlPeftError(f"held-out site {absent[0]} is not in the data (it has "
                                f"{', '.join(sorted(present))})")
        dev = np.flatnonzero(~np.isin(self.windows.sites, config.held_out))
        if len(dev) == 0:
            raise KgmlPeftError("the data has no development site besides the held-out ones")
        self.dev_sites = sorted(set(self.windows.sites[dev]))
        self._dev_windows = self.windows.subset(dev)
        self._splits: dict[Scope, tuple[YearWindows, YearWindows]] = {}
        self._dev: dict[Scope, tuple[tuple[YearWindows, YearWindows], Scalers]] = {}
        self._regressions: dict[Scope, RecoRegression] = {}
        self.table = table
        self._gapfilled = self._gapfilled_lookup(frame)
        self.site_years = {s: int((self.windows.sites == s).sum()) for s in config.held_out}
        for site, n in self.site_years.items():
            if min(config.calibration_years) >= n:
                raise KgmlPeftError(
                    f"held-out site {site} has {n} complete years; calibrating on "
                    f"{min(config.calibration_years)} would leave no test year (use fewer calibration years)")
        for site in config.held_out:
            for k in (k for k in config.calibration_years if k < self.site_years[site]):
                years, _ = self.site_split(site, k)
                for target in SCORED:
                    days = int(np.isfinite(years.target(target)).sum())
                    if days < MIN_CALIBRATION_DAYS:
                        raise KgmlPeftError(
                            f"held-out site {site}: its first {k} year(s) have {days} observed {target} days; "
                            f"calibrating (and the per-tower baselines) needs at least {MIN_CALIBRATION_DAYS}")
        #: per held-out site: the backbone scope of each column it has, and why a column is missing
        self.scopes, self.unavailable = self._scopes(frame)
        self._scope_names = {scope.name: scope for columns in self.scopes.values() for scope in columns.values()}
        self.plan = plan_runs(config, self.site_years, self.scopes)
        self._backbones: dict[tuple[str, int, str], Backbone] = {}

    def _scopes(self, frame: pd.DataFrame) -> tuple[dict[str, dict[str, Scope]], dict[str, dict[str, str]]]:
        """Each held-out site's backbone scope per column (see :data:`COLUMNS`), checked to leave
        development data to train and validate on; a ``past`` column without it is recorded as
        unavailable (with why), a ``main`` column without it is an error."""
        c = self.config
        near: dict[str, tuple[str, ...]] = {site: () for site in c.held_out}
        if c.exclude_within_km > 0:
            points = site_points(frame.drop_duplicates(schema.SITE)) if all(
                col in frame.columns for col in schema.SITE_INPUTS) else {}
            lacking = [s for s in (*c.held_out, *self.dev_sites) if s not in points]
            if lacking:
                raise KgmlPeftError(
                    f"leaving out neighbours within {c.exclude_within_km:g} km needs lat/lon of every tower "
                    f"({lacking[0]} has none): import with --site-meta (e.g. ../shared/data/fluxnet2015/sites.csv), "
                    "or set exclude_within_km = 0")
            near = {site: tuple(d for d in self.dev_sites
                                if distance_km(*points[site], *points[d]) < c.exclude_within_km)
                    for site in c.held_out}
        scopes: dict[str, dict[str, Scope]] = {}
        unavailable: dict[str, dict[str, str]] = {}
        for site in c.held_out:
            first = int(self.windows.years[self.windows.sites == site].min())
            columns = {"main": Scope(without=near[site])}
            if c.past_only:  # the neighbours stay out too: past differs from main in time alone
                columns["past"] = Scope(without=near[site], before=first)
            for column, scope in columns.items():
                why = self._scope_problem(scope)
                if why is None:
                    scopes.setdefault(site, {})[column] = scope
                elif column == "main":
                    raise KgmlPeftError(f"held-out site {site}: {why}")
                else:
                    unavailable.setdefault(site, {})[column] = why
        return scopes, unavailable

    def _scope_windows(self, scope: Scope) -> YearWindows:
        w = self._dev_windows
        keep = ~np.isin(w.sites, scope.without)
        if scope.before is not None:
            keep &= w.years < scope.before
        return w.subset(np.flatnonzero(keep))

    def _scope_split(self, scope: Scope) -> tuple[YearWindows, YearWindows]:
        """The development (training, validation) windows of ``scope``: the last ``val_fraction``
        of each tower's years validate (computed once per scope)."""
        if scope not in self._splits:
            windows = self._scope_windows(scope)
            train, val = split_by_year(windows, self.config.val_fraction)
            self._splits[scope] = (windows.subset(train), windows.subset(val))
        return self._splits[scope]

    def _scope_problem(self, scope: Scope) -> str | None:
        """Why ``scope`` leaves too little to pretrain on (None when it is enough)."""
        split = self._scope_split(scope)
        what = ("the development towers" + (f" without {', '.join(scope.without)}" if scope.without else "")
                + (f" before {scope.before}" if scope.before is not None else ""))
        if not any(len(part) for part in split):
            return f"{what} have no complete year"
        if not all(np.isfinite(part.target(t)).any() for part in split for t in SCORED):
            return f"{what} need observed NEE and Reco in their training and validation years"
        return None

    def dev_data(self, scope: Scope = Scope()) -> tuple[tuple[YearWindows, YearWindows], Scalers]:
        """The development (training, validation) windows of ``scope`` (:meth:`_scope_split`) and
        their scaling: the observed route's, fitted on the training years only."""
        if scope not in self._dev:
            split = self._scope_split(scope)
            scalers = _complete(Scalers.fit(split[0]))
            scalers.require([*self.config.backbone.features, *schema.FLUX_OUTPUTS, "Reco", "Yield"])
            self._dev[scope] = (split, scalers)
        return self._dev[scope]

    def main_scalers(self, site: str) -> Scalers:
        """The scaling of a held-out site's ``main`` scope: what its site-only model and its
        baselines' scores use (the development training years it may see)."""
        return self.dev_data(self.scopes[site]["main"])[1]

    def scope_of(self, run: RealRun) -> Scope:
        """The backbone scope of a pretraining run, or of a held-out run's site and column."""
        if run.method == "pretrain":
            return self._scope_names[run.scope]
        return self.scopes[run.site][run.column]

    def identity(self, frame: pd.DataFrame) -> dict:
        """What the runs of a results folder depend on (``<out>/experiment.json``): the suite, the
        config, the imported table's hash and each held-out tower's scopes. A folder written with
        another radius, route or table is refused instead of resumed (run keys do not name them)."""
        return {"suite": "fluxnet", "config": self.config.to_dict(), "data": frame_hash(frame),
                "scopes": {site: {column: scope.name for column, scope in columns.items()}
                           for site, columns in self.scopes.items()}}

    # -- data -------------------------------------------------------------------------------------

    @staticmethod
    def _gapfilled_lookup(frame: pd.DataFrame) -> pd.DataFrame:
        dates = pd.to_datetime(frame[schema.DATE]).dt.normalize()
        index = pd.MultiIndex.from_arrays([frame[schema.SITE].astype(str), dates])
        return pd.DataFrame({name: pd.to_numeric(frame[col], errors="coerce").to_numpy()
                             for name, col in zip(SCORED, GAPFILLED)}, index=index)

    def gapfilled(self, windows: YearWindows) -> dict[str, np.ndarray]:
        """ONEFlux's gap-filled NEE and Reco on the days of ``windows`` [N, 365]."""
        index = pd.MultiIndex.from_arrays([np.repeat(windows.sites, windows.dates.shape[1]),
                                           pd.to_datetime(windows.dates.ravel())])
        values = self._gapfilled.reindex(index)
        return {n: values[n].to_numpy(dtype="float64").reshape(windows.dates.shape) for n in SCORED}

    def test_from(self, site: str) -> int:
        """How many of a held-out site's first years may calibrate (its largest planned k): every
        k is tested on the years after those, so all k share one set of test years."""
        return max(k for k in self.config.calibration_years if k < self.site_years[site])

    def site_split(self, site: str, years: int) -> tuple[YearWindows, YearWindows]:
        """A held-out site's first ``years`` years (calibration) and its test years (those after
        its largest k, the same for every k: :meth:`test_from`)."""
        idx = np.flatnonzero(self.windows.sites == site)
        idx = idx[np.argsort(self.windows.years[idx], kind="stable")]
        return self.windows.subset(idx[:years]), self.windows.subset(idx[self.test_from(site):])

    # -- training ---------------------------------------------------------------------------------

    def _train(self, data: dict, scalers: Scalers, phases: tuple[PhaseConfig, ...], seed: int):
        config = PretrainConfig(backbone=self.config.backbone, seed=seed, tolerance=self.config.tolerance,
                                phases=phases)
        with deterministic_algorithms():
            return train_phases(data, scalers, config, cpu=self.cpu, progress=False)[:2]

    @functools.cached_property
    def _simulated(self) -> tuple[tuple[YearWindows, YearWindows], Scalers]:
        """The simulator's (train, validation) windows in the tower features and their scalers
        (built once per process, for the first simulated-route backbone)."""
        from kgml_peft.data.meteo import add_flux_tower_weather
        from kgml_peft.data.synthetic import SynthConfig, simulate

        sim = simulate(SynthConfig(seed=0, max_sites_per_region=self.config.sim_sites_per_region,
                                   max_years_per_site=self.config.sim_years_per_site))
        features = self.config.backbone.features
        sim = with_reco(validate_table(add_flux_tower_weather(sim), features))
        windows = make_windows(sim, features)
        train, val = split_by_year(windows, self.config.val_fraction)
        split = (windows.subset(train), windows.subset(val))
        return split, Scalers.fit(split[0])

    def _pretrain(self, run: RealRun) -> tuple[torch.nn.Module, Scalers, list]:
        c = self.config
        dev, dev_scalers = self.dev_data(self.scope_of(run))
        observed = scratch_phases(c.pretrain, WEIGHTS, c.physics_weight)
        if run.route == "observed":
            model, results = self._train({"observed": dev}, dev_scalers, observed, run.seed)
            return model, dev_scalers, results
        split, scalers = self._simulated
        t, o = c.simulated, c.transfer
        phases = (
            PhaseConfig("simulated", "synthetic", {"Ra": 1.0, "Rh": 1.0, "NEE": 1.0, "Reco": 0.5},
                        ("*",), epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, patience=t.patience,
                        physics_weight=c.physics_weight, schedule="cosine"),
            PhaseConfig("transfer", "observed", dict(WEIGHTS), ("*",), epochs=o.epochs, lr=o.lr,
                        batch_size=o.batch_size, patience=o.patience, physics_weight=c.physics_weight),
        )
        model, results = self._train({"synthetic": split, "observed": dev}, scalers, phases, run.seed)
        return model, scalers, results

    def model_path(self, route: str, seed: int, scope: str = "dev") -> Path:
        """Where the backbone of ``route``, ``seed`` and scope name ``scope`` is written."""
        middle = "" if scope == "dev" else f"__{scope}"
        return self.out / "models" / f"{route}{middle}__s{seed}.safetensors"

    def backbone(self, route: str, seed: int, scope: str = "dev") -> Backbone:
        """A finished pretraining run's backbone (from ``<out>/models``)."""
        if (route, seed, scope) not in self._backbones:
            path = self.model_path(route, seed, scope)
            if not path.is_file():
                raise KgmlPeftError(f"{path} is missing; delete its pretrain run's JSON to retrain it")
            self._backbones[(route, seed, scope)] = load_backbone(path)
        return self._backbones[(route, seed, scope)]

    def baseline(self, method: str, site: str, years: YearWindows) -> RecoRegression | Climatology:
        """The baseline ``method`` (one of :data:`BASELINES`) fitted for held-out ``site`` whose
        calibration years are ``years`` (the global regression: on the development training years
        of the site's ``main`` scope, what its backbones train on)."""
        if method == "regression_global":
            return self._global_regression(self.scopes[site]["main"])
        if method == "regression_site":
            return RecoRegression.fit(years)
        if method == "climatology":
            return Climatology.fit(years)
        raise KgmlPeftError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")

    def _global_regression(self, scope: Scope) -> RecoRegression:
        if scope not in self._regressions:
            self._regressions[scope] = RecoRegression.fit(self.dev_data(scope)[0][0])
        return self._regressions[scope]

    def _calibrate(self, run: RealRun, years: YearWindows) -> tuple[torch.nn.Module, Scalers, dict, Adapter | None]:
        c = self.config
        train, val = split_by_day_blocks(years, c.val_block_days, c.val_every)
        if run.method == "site_only":
            scalers = self.main_scalers(run.site)  # the only thing it takes from the development towers
            phases = scratch_phases(c.site_only, WEIGHTS, c.physics_weight)
            model, results = self._train({"observed": (train, val)}, scalers, phases, run.seed)
            return model, scalers, {"trained_parameters": sum(p.numel() for p in model.parameters()),
                                    "best_epoch": [r.best_epoch for r in results]}, None
        base = self.backbone(run.route, run.seed, self.scope_of(run).name)
        if run.method == "global":
            return base.model, base.scalers, {"trained_parameters": 0}, None
        t = c.finetune if run.method == "full" else c.adapter
        table = self.table
        rows = table[(table[schema.SITE] == run.site) & table[schema.DATE].dt.year.isin(years.years)]
        cv = run.method == "adapter_cv"
        # cross-validation cuts all calibration years into its own folds (day blocks for one year)
        data = CalibrationData(run.site, "site", rows, years if cv else train, years if cv else val,
                               dict(WEIGHTS))
        config = CalibrationConfig(method="adapter" if cv else run.method, cv="folds" if cv else "none",
                                   epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, patience=t.patience,
                                   rho=c.rho, mu=c.mu, physics_weight=c.physics_weight,
                                   tolerance=c.tolerance, seed=run.seed)
        result = calibrate_unit(base, data, config, cpu=self.cpu, progress=False)
        info = {"trained_parameters": result.trained_parameters,
                "best_epoch": [result.summary["metrics"]["best_epoch"]]}
        if cv:
            record = result.summary["metrics"]["cv"]
            info["cv"] = {k: record[k] for k in ("folds", "shape", "epochs", "strength", "change_mean",
                                                 "change_sd", "best_adapter_change_mean")}
        if result.adapter is not None:
            info["adapter_bytes"] = self.save_run_adapter(run, result.adapter)
        return result.model, base.scalers, info, result.adapter

    # -- execution --------------------------------------------------------------------------------

    def execute(self, run: RealRun) -> dict:
        """Train (or load) ``run``'s model, score it, write its JSON (and model/adapter files)."""
        start = time.perf_counter()
        record: dict = {"key": run.key, "method": run.method, "route": run.route, "seed": run.seed,
                        "site": run.site, "years": run.years}
        if run.method != "pretrain" and run.route is not None:
            record.update(column=run.column, scope=self.scope_of(run).name)
        if run.method in BASELINES:
            train, test = self.site_split(run.site, run.years)
            baseline = self.baseline(run.method, run.site, train)
            record.update(trained_parameters=baseline.parameters, train_years=[int(y) for y in train.years],
                          test=score(None, self.main_scalers(run.site), test, self.gapfilled(test),
                                     self.config.tolerance, keep_series=True, preds=baseline.predict(test)))
        elif run.method == "pretrain":
            model, scalers, results = self._pretrain(run)
            scope = self.scope_of(run)
            (train, val), _ = self.dev_data(scope)
            record.update(scope=scope.name, dev_sites=sorted(set(train.sites) | set(val.sites)),
                          dev_years=[int(train.years.min()), int(max(train.years.max(), val.years.max()))],
                          train_site_years=len(train), val_site_years=len(val),
                          phases=[{"name": r.name, "best_epoch": r.best_epoch,
                                   "best_val_loss": r.best_val_loss, "steps": r.steps} for r in results],
                          dev_val=score(model, scalers, val, self.gapfilled(val), self.config.tolerance))
            path = self.model_path(run.route, run.seed, run.scope)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_backbone(path, model, scalers,
                          {"benchmark_run": run.key, "curves": [e for r in results for e in r.curve]})
            self._backbones.pop((run.route, run.seed, run.scope), None)
        else:
            train, test = self.site_split(run.site, run.years)
            model, scalers, info, adapter = self._calibrate(run, train)
            gapfilled, preds, intervals = self.gapfilled(test), None, None
            if adapter is not None and adapter.intervals is not None:
                # served as predict serves a cross-validated adapter: its calibration crops only
                bank = AdapterBank(self.backbone(run.route, run.seed, self.scope_of(run).name))
                bank.add(adapter)
                got, intervals = served_with_intervals(bank, test, np.full(len(test), adapter.site, dtype=object),
                                                       gapfilled, self.config.interval)
                preds = {k: v for k, v in got.out.items() if not k.endswith(("_lo", "_hi"))}
                info["other_crop_test_years"] = int(got.outside.sum())
            record.update(info, train_years=[int(y) for y in train.years],
                          test=score(model, scalers, test, gapfilled, self.config.tolerance,
                                     keep_series=run.seed == self.config.seeds[0], preds=preds))
            if intervals is not None:
                record["test"]["intervals"] = intervals
        record["gpp_route"] = self.config.gpp_route
        record["seconds"] = round(time.perf_counter() - start, 2)
        return self.save(run, record)
