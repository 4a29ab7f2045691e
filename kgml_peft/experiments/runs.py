"""The experiment's training runs: the shared split, the run plan, and resumable execution.

One :class:`Run` is one model trained once (a seed, a method, its training regions, a variant) and
tested on the test years of every region. Regimes are views over runs (:func:`plan`), so a run
shared by two regimes (the all-components rank-1 adapter is both ``adapters`` and the rank-1 point
of the rank sweep) trains once. Each finished run is written to ``<out>/runs/<key>.json``
atomically; a later invocation skips it (resume). Global models are kept as backbone checkpoints
in ``<out>/models/`` because fine-tuning and adapter runs start from them.

**New fields** (:func:`choose_new_sites`): a second global model per seed trains without them
(``known_only``); a new-field run calibrates one of them on its first k years and is tested on its
years after the largest k only (:meth:`Experiment.new_site_parts`), and the known-only global
model's record carries its test figures on every new field.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kgml_peft import schema
from kgml_peft.calibration.calibrate import CalibrationData, calibrate_unit
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.tuners.config import COMPONENTS, AdapterConfig
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import Scalers, YearWindows, make_windows, split_by_day_blocks
from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.config import ExperimentConfig, Training
from kgml_peft.experiments.baselines import BASELINE_OUTPUTS
from kgml_peft.metrics import flux_mse_scaled, group_metrics, site_year_errors
from kgml_peft.model.backbone import build_backbone
from kgml_peft.model.inference import predict_windows
from kgml_peft.store.adapter import save_adapter
from kgml_peft.atomic import atomic_path
from kgml_peft.store.checkpoint import Backbone, load_backbone, save_backbone
from kgml_peft.train.objectives import physics_loss
from kgml_peft.train.loop import PhaseConfig, deterministic_algorithms
from kgml_peft.train.pretrain import PretrainConfig, frame_hash, train_phases, with_reco


#: the version of a run record's content (2: per-site-year ``errors``); a folder of another is refused
RECORD_FORMAT = 2


@dataclass(frozen=True)
class Split:
    """Per-site year split shared by every regime: train, validation (early stopping), test."""

    train: YearWindows
    val: YearWindows
    test: YearWindows

    def region(self, part: str, regions: tuple[str, ...], years: int | None = None) -> YearWindows:
        """The ``part`` windows of ``regions``; ``years`` keeps each site's most recent ones."""
        windows: YearWindows = getattr(self, part)
        index = np.flatnonzero(np.isin(windows.regions, regions))
        if years is not None:
            keep = []
            for site in dict.fromkeys(windows.sites[index]):
                own = index[windows.sites[index] == site]
                keep.extend(own[np.argsort(windows.years[own])][-years:])
            index = np.array(sorted(keep), dtype=int)
        return windows.subset(index)


def split_years(windows: YearWindows, test_fraction: float, val_fraction: float) -> Split:
    """Per site (years sorted): the last ``ceil(test_fraction * n)`` years test, the
    ``ceil(val_fraction * n)`` before them validate, the rest (at least one) train."""
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for site in dict.fromkeys(windows.sites):
        idx = np.flatnonzero(windows.sites == site)
        idx = idx[np.argsort(windows.years[idx], kind="stable")]
        n_test, n_val = math.ceil(test_fraction * len(idx)), math.ceil(val_fraction * len(idx))
        if len(idx) - n_test - n_val < 1:
            raise KgmlPeftError(f"site {site} has {len(idx)} complete years; the experiment needs at "
                                f"least {n_test + n_val + 1} (train, validation and test years)")
        parts["test"].extend(idx[len(idx) - n_test:])
        parts["val"].extend(idx[len(idx) - n_test - n_val:len(idx) - n_test])
        parts["train"].extend(idx[:len(idx) - n_test - n_val])
    return Split(**{k: windows.subset(sorted(v)) for k, v in parts.items()})


@dataclass(frozen=True)
class Run:
    """One model: ``method`` (scratch, full, adapter) trained on ``regions`` with ``seed``."""

    method: str
    regions: tuple[str, ...]
    seed: int
    training: Training
    components: tuple[str, ...] = COMPONENTS
    rank: int = 1
    #: most recent training years per site (None: all); for a new field, its first years
    years: int | None = None
    #: trained without the new fields: the global model new fields are calibrated from
    known_only: bool = False
    #: a new field, calibrated on its first ``years`` years (``regions`` is its region)
    site: str | None = None

    @property
    def key(self) -> str:
        """A unique, file-name-safe name of the run."""
        t = self.training
        parts = [self.method, self.site or "+".join(self.regions), f"lr{t.lr:g}-bs{t.batch_size}-e{t.epochs}"]
        if self.method == "adapter":
            parts.append(f"{'+'.join(self.components)}-r{self.rank}")
        if self.site is not None:
            parts.append(f"first{self.years}y")
        else:
            parts.append("all" if self.years is None else f"{self.years}y")
        if self.known_only:
            parts.append("known")
        return "__".join(parts) + f"__s{self.seed}"


@dataclass
class Plan:
    """The runs (in execution order, global models first) and the regimes as views of them:
    ``regimes[name][region]`` lists one run key per seed (tested on ``region``), ``cross[a][b]``
    the keys of models trained on ``a`` (a region or a pair ``A+B``) tested on ``b``."""

    runs: list[Run] = field(default_factory=list)
    regimes: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    cross: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: ``new_sites[method][region][k]``: ``(run key, site)`` per seed and new field; ``global_only``
    #: points at the global model trained without the new fields
    new_sites: dict[str, dict[str, dict[int, list[tuple[str, str]]]]] = field(default_factory=dict)
    #: the training regions of each ``cross`` row
    cross_units: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def include(self, run: Run) -> None:
        """Plan ``run`` once (a run several regimes share trains once)."""
        if run.key not in {r.key for r in self.runs}:
            self.runs.append(run)

    def add(self, regime: str, region: str, run: Run) -> None:
        """Plan ``run`` and list it under ``regime`` for ``region``."""
        self.include(run)
        self.regimes.setdefault(regime, {}).setdefault(region, []).append(run.key)


#: Methods of the new-field comparison, as ``results.json`` names them, and the run method of each.
NEW_SITE_METHODS: dict[str, str] = {"global_only": "global", "site_only": "scratch",
                                    "full_finetune": "full", "adapters": "adapter"}


def plan(config: ExperimentConfig, regions: tuple[str, ...],
         new_sites: dict[str, tuple[str, ...]] | None = None) -> Plan:
    """Every run the experiment needs (see module docstring); ``new_sites`` maps a region to its
    new fields."""
    out = Plan()
    everything = tuple(regions)
    trainings = {"scratch": config.scratch, "full": config.finetune, "adapter": config.adapter}
    for seed in config.seeds if any((new_sites or {}).values()) else ():
        known = Run("scratch", everything, seed, config.scratch, known_only=True)
        out.include(known)
        for region in regions:
            for site in (new_sites or {}).get(region, ()):
                for years in config.new_site_years:
                    for name, method in NEW_SITE_METHODS.items():
                        run = known if method == "global" else Run(
                            method, (region,), seed, trainings[method], years=years, site=site)
                        out.include(run)
                        out.new_sites.setdefault(name, {}).setdefault(region, {}).setdefault(
                            years, []).append((run.key, site))
    for seed in config.seeds:
        for region in regions:
            out.add("global_only", region, Run("scratch", everything, seed, config.scratch))
    for seed in config.seeds:
        for region in regions:
            r = (region,)
            out.add("site_only", region, Run("scratch", r, seed, config.scratch))
            out.add("full_finetune", region, Run("full", r, seed, config.finetune))
            out.add("adapters", region, Run("adapter", r, seed, config.adapter))
            for parts in config.ablations:
                out.add(f"ablation_{'+'.join(parts)}", region, Run("adapter", r, seed, config.adapter, parts))
            for rank in config.ranks:
                out.add(f"rank_{rank}", region, Run("adapter", r, seed, config.adapter, rank=rank))
            for lr, bs in config.sensitivity:
                for method, base in (("full", config.finetune), ("adapter", config.adapter)):
                    training = Training(base.epochs, lr, bs, base.patience)
                    out.add(f"sensitivity_{method}_lr{lr:g}_bs{bs}", region, Run(method, r, seed, training))
            for years in config.scarcity:
                for name, method, base in (("site_only", "scratch", config.scratch),
                                           ("full_finetune", "full", config.finetune),
                                           ("adapters", "adapter", config.adapter)):
                    out.add(f"scarcity_{name}_{years}y", region, Run(method, r, seed, base, years=years))
    units = [(r,) for r in regions]
    if config.pairs:
        units += [(a, b) for i, a in enumerate(regions) for b in regions[i + 1:]]
    for unit in units:
        out.cross_units["+".join(unit)] = unit
        for seed in config.seeds:
            run = Run("scratch", unit, seed, config.scratch)
            out.include(run)
            for region in regions:
                out.cross.setdefault("+".join(unit), {}).setdefault(region, []).append(run.key)
    # global models first: fine-tuning and adapter runs start from them
    out.runs.sort(key=lambda r: (r.regions != everything or r.method != "scratch"))
    return out


def held_out_metrics(model: torch.nn.Module, scalers: Scalers, windows: YearWindows, tolerance: float) -> dict:
    """Test figures of ``model`` on ``windows``: ``mse`` (mean scaled MSE of the observed daily flux
    targets; kept for older readers, the report scores each target on its own), per-target scaled
    MSE, per-site-year errors of NEE and Reco in physical units (``errors``:
    :func:`~kgml_peft.metrics.site_year_errors`), physics violations and L_phys."""
    preds = predict_windows(model, scalers, windows)
    group = group_metrics(windows, preds, scalers, np.arange(len(windows)), tolerance)
    phys = {k: torch.as_tensor(preds[k]) for k in ("Ra", "Rh", "NEE")}
    l_phys = float(physics_loss(phys, torch.as_tensor(windows.gpp), scalers, tolerance))
    return {"mse": flux_mse_scaled(group),
            "targets": {k: v["mse_scaled"] for k, v in group["targets"].items()},
            "errors": site_year_errors(windows, preds, BASELINE_OUTPUTS),
            "site_years": len(windows), "physics": {**group["physics"], "l_phys": l_phys}}


def _complete(scalers: Scalers) -> Scalers:
    """Output scalers for outputs the data never observes (flux towers see Reco, not Ra and Rh):
    Ra and Rh get half of Reco's mean and std, a missing Yield mean 0 and std 1. They only set
    the output units of the model; no loss or MSE uses an unobserved target."""
    mean, std = dict(scalers.mean), dict(scalers.std)
    for name in ("Ra", "Rh"):
        if name not in mean and "Reco" in mean:
            mean[name], std[name] = mean["Reco"] / 2, std["Reco"] / 2
    if "Reco" not in mean and "Ra" in mean and "Rh" in mean:
        mean["Reco"], std["Reco"] = mean["Ra"] + mean["Rh"], std["Ra"] + std["Rh"]
    mean.setdefault("Yield", 0.0)
    std.setdefault("Yield", 1.0)
    return Scalers(mean, std)


def scratch_phases(training: Training, weights: dict[str, float],
                   physics_weight: float) -> tuple[PhaseConfig, ...]:
    """The staged schedule of every model trained from random weights (global-only, site-only,
    cross-regional): ``joint`` trains every weight on every observed target (cosine schedule),
    then ``yield_tune`` refits the attention and yield head on Yield alone (KGML-ag's yield step),
    if Yield is observed."""
    phases = [PhaseConfig("joint", "observed", dict(weights), ("*",), epochs=training.epochs,
                          lr=training.lr, batch_size=training.batch_size, patience=training.patience,
                          physics_weight=physics_weight, schedule="cosine")]
    if "Yield" in weights:
        phases.append(PhaseConfig("yield_tune", "observed", {"Yield": 1.0}, ("attn_score", "yield_head"),
                                  epochs=max(1, training.epochs // 4), lr=training.lr / 3,
                                  batch_size=training.batch_size, patience=training.patience,
                                  physics_weight=0.0))
    return tuple(phases)


def _site_years(windows: YearWindows, site: str) -> YearWindows:
    """Every window of ``site``, oldest year first."""
    idx = np.flatnonzero(windows.sites == site)
    return windows.subset(idx[np.argsort(windows.years[idx], kind="stable")])


def choose_new_sites(windows: YearWindows, regions: tuple[str, ...],
                     config: ExperimentConfig) -> dict[str, tuple[str, ...]]:
    """The new fields: the last ``config.new_sites_per_region`` sites (by id) of each region; a
    region must keep at least one known site."""
    out = {}
    for region in regions:
        sites = sorted({str(s) for s in windows.sites[windows.regions == region]})
        n = config.new_sites_per_region
        if n and len(sites) <= n:
            raise KgmlPeftError(f"region {region} has {len(sites)} site(s); holding out {n} new field(s) "
                                "needs at least one more (lower new_sites_per_region; --new-fields 0 switches new fields off)")
        out[region] = tuple(sites[len(sites) - n:]) if n else ()
    return out


class RunFiles:
    """Finished runs as ``<out>/runs/<key>.json``, written atomically: what makes a suite resumable
    (a run whose file exists is done)."""

    out: Path

    def path(self, run) -> Path:
        """Where a finished run's JSON lives."""
        return self.out / "runs" / f"{run.key}.json"

    def done(self, run) -> bool:
        """Whether ``run`` finished in an earlier invocation (its JSON exists)."""
        return self.path(run).is_file()

    def load(self, run) -> dict:
        """A finished run's record."""
        return json.loads(self.path(run).read_text())

    def save(self, run, record: dict, indent: int | None = None) -> dict:
        """Write ``record`` as ``run``'s JSON (strict JSON: no NaN) and return it."""
        self.path(run).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(run)) as tmp:
            tmp.write_text(json.dumps(record, indent=indent, sort_keys=True, allow_nan=False))
        return record

    def save_run_adapter(self, run, adapter) -> int:
        """Write ``run``'s adapter as ``<out>/adapters/<key>.safetensors``; returns its size in bytes."""
        (self.out / "adapters").mkdir(parents=True, exist_ok=True)
        return save_adapter(self.out / "adapters" / f"{run.key}.safetensors", adapter).stat().st_size


class Experiment(RunFiles):
    """Runs a :class:`Plan` on one table into ``out`` (see module docstring)."""

    def __init__(self, frame: pd.DataFrame, config: ExperimentConfig, out: str | Path, *,
                 cpu: bool = True) -> None:
        self.config, self.out, self.cpu = config, Path(out), cpu
        features = config.backbone.features
        table = with_reco(validate_table(frame, features))
        self.table = table
        windows = make_windows(table, features)
        present = tuple(sorted(set(windows.regions)))
        regions = config.regions or present
        unknown = [r for r in regions if r not in present]
        if unknown:
            raise KgmlPeftError(f"region {unknown[0]!r} is not in the data (it has {', '.join(present)})")
        if len(regions) < 2:
            raise KgmlPeftError("the experiment compares regions: the data needs at least two")
        self.regions = tuple(regions)
        windows = windows.subset(np.flatnonzero(np.isin(windows.regions, regions)))
        self.split = split_years(windows, config.test_fraction, config.val_fraction)
        self.new_sites = choose_new_sites(windows, self.regions, config)
        #: every year of each new field, oldest first
        self.new_windows = {site: _site_years(windows, site)
                            for sites in self.new_sites.values() for site in sites}
        for site, years in self.new_windows.items():
            if len(years) <= max(config.new_site_years):
                raise KgmlPeftError(f"new field {site} has {len(years)} complete years; calibrating on up to "
                                    f"{max(config.new_site_years)} needs at least one more to test (lower "
                                    "new_site_years; --new-fields 0 switches new fields off)")
        #: one scaling for every regime: fitted on the training years of the known sites (the new
        #: fields' data stays out of everything the global models see, scaling included)
        self.scalers = _complete(Scalers.fit(self.known(self.split.train)))
        self.scalers.require([*features, *schema.FLUX_OUTPUTS, "Yield", "Reco"])
        observed = [t for t in schema.TARGETS if t in self.scalers.std
                    and np.isfinite(self.split.train.target(t)).any()
                    and np.isfinite(self.split.val.target(t)).any()]
        if not any(t in schema.DAILY_TARGETS for t in observed):
            raise KgmlPeftError("the experiment needs observed daily fluxes (Ra, Rh, NEE or Reco) "
                                "in the training and validation years")
        for target in BASELINE_OUTPUTS:  # the report scores each of them on every cell's test years
            for name, test in [(f"region {r}", self.split.region("test", (r,))) for r in self.regions] + [
                    (f"new field {site}", self.new_site_test(site)) for site in self.new_windows]:
                if not np.isfinite(test.target(target)).any():
                    raise KgmlPeftError(f"{name} has no observed {target} in its test years; the report "
                                        "scores NEE and Reco on every region's and new field's test years")
        self.weights = {t: 1.0 for t in observed}
        #: new fields calibrate on daily fluxes only (one to three annual yields say nothing)
        self.daily_weights = {t: w for t, w in self.weights.items() if t in schema.DAILY_TARGETS}
        self.plan = plan(config, self.regions, self.new_sites)
        self._globals: dict[tuple[int, bool], Backbone] = {}
        self.backbone_parameters = sum(p.numel() for p in build_backbone(config.backbone).parameters())

    def _scratch(self, run: Run, train: YearWindows, val: YearWindows, weights: dict[str, float] | None = None):
        """A backbone from random weights through the staged schedule (:func:`scratch_phases`) on
        ``weights`` (default: every observed target)."""
        config = PretrainConfig(backbone=self.config.backbone, seed=run.seed, tolerance=self.config.tolerance,
                                phases=scratch_phases(run.training, weights or self.weights,
                                                      self.config.physics_weight))
        with deterministic_algorithms():
            model, phases, _ = train_phases({"observed": (train, val)}, self.scalers, config,
                                            cpu=self.cpu, progress=False)
        return model, phases

    def _calibration_config(self, run: Run) -> CalibrationConfig:
        """Eq. 2 / Eq. 3 settings of a full or adapter run (LoRA alpha = 2 r, so alpha / r stays 2)."""
        t = run.training
        return CalibrationConfig(
            method=run.method, cv="none", epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, patience=t.patience,
            rho=self.config.rho, mu=self.config.mu, physics_weight=self.config.physics_weight,
            tolerance=self.config.tolerance, seed=run.seed,
            adapter=AdapterConfig(components=run.components, lora_rank=run.rank, lora_alpha=2.0 * run.rank))

    def identity(self) -> dict:
        """What makes two invocations the same experiment (a folder resumes only its own runs)."""
        return {"config": self.config.to_dict(), "data": frame_hash(self.table), "records": RECORD_FORMAT,
                "scaling": {"mean": self.scalers.mean, "std": self.scalers.std},
                "new_sites": {region: list(sites) for region, sites in self.new_sites.items()}}

    def known(self, windows: YearWindows) -> YearWindows:
        """``windows`` without the new fields."""
        return windows.subset(np.flatnonzero(~np.isin(windows.sites, list(self.new_windows))))

    @staticmethod
    def _model_name(seed: int, known_only: bool) -> str:
        return f"global{'-known' if known_only else ''}__s{seed}.safetensors"

    def _global(self, seed: int, known_only: bool = False) -> Backbone:
        if (seed, known_only) not in self._globals:
            path = self.out / "models" / self._model_name(seed, known_only)
            if not path.is_file():
                raise KgmlPeftError(f"{path} is missing; delete the global run's JSON to retrain it")
            self._globals[(seed, known_only)] = load_backbone(path)
        return self._globals[(seed, known_only)]

    def new_site_test(self, site: str) -> YearWindows:
        """A new field's test years: those after the largest k, the same for every k so the k
        compare."""
        windows = self.new_windows[site]
        return windows.subset(np.arange(max(self.config.new_site_years), len(windows)))

    def new_site_parts(self, site: str, years: int) -> tuple[YearWindows, YearWindows]:
        """A new field's first ``years`` years (calibration) and its test years."""
        return self.new_windows[site].subset(np.arange(years)), self.new_site_test(site)

    def _execute_new_site(self, run: Run, start: float) -> dict:
        """Calibrate a new field on its first ``run.years`` years (observed days split in blocks
        for early stopping, as the real-site benchmark does) and test it on its later years."""
        calibration, test = self.new_site_parts(run.site, run.years)
        train, val = split_by_day_blocks(calibration)
        record: dict = {"key": run.key, "method": run.method, "regions": list(run.regions), "seed": run.seed,
                        "site": run.site, "years": run.years, "train_years": [int(y) for y in calibration.years],
                        "test_years": [int(y) for y in test.years],
                        "backbone_parameters": self.backbone_parameters}
        if run.method == "scratch":
            model, phases = self._scratch(run, train, val, self.daily_weights)
            record.update(trainable_parameters=sum(p.numel() for p in model.parameters()),
                          best_epoch=[r.best_epoch for r in phases])
        else:
            base = self._global(run.seed, known_only=True)
            table = self.table
            rows = table[(table[schema.SITE] == run.site) & table[schema.DATE].dt.year.isin(calibration.years)]
            data = CalibrationData(run.site, "site", rows, train, val, dict(self.daily_weights))
            result = calibrate_unit(base, data, self._calibration_config(run), cpu=self.cpu, progress=False)
            model = result.model
            record.update(trainable_parameters=result.trained_parameters,
                          best_epoch=[result.summary["metrics"]["best_epoch"]])
            if result.adapter is not None:
                record["adapter_bytes"] = self.save_run_adapter(run, result.adapter)
        record["test"] = {"site": held_out_metrics(model, self.scalers, test, self.config.tolerance)}
        record["seconds"] = round(time.perf_counter() - start, 2)
        return self.save(run, record, indent=1)

    def execute(self, run: Run) -> dict:
        """Train ``run``, test it on every region (a new-field run: on its field's test years),
        write its JSON (and model/adapter files)."""
        start = time.perf_counter()
        if run.site is not None:
            return self._execute_new_site(run, start)
        is_global = run.method == "scratch" and run.regions == self.regions
        train = self.split.region("train", run.regions, run.years)
        val = self.split.region("val", run.regions)
        if run.known_only:
            train, val = self.known(train), self.known(val)
        if run.method == "scratch":
            model, phases = self._scratch(run, train, val)
            trained, adapter, best = sum(p.numel() for p in model.parameters()), None, \
                [r.best_epoch for r in phases]
            curve = [entry for r in phases for entry in r.curve]
        else:
            base = self._global(run.seed)
            rows = self.table[self.table[schema.REGION].isin(run.regions)]
            data = CalibrationData("+".join(run.regions), "region", rows, train, val, self.weights)
            result = calibrate_unit(base, data, self._calibration_config(run), cpu=self.cpu, progress=False)
            model, trained, adapter = result.model, result.trained_parameters, result.adapter
            best, curve = [result.summary["metrics"]["best_epoch"]], result.curve
        record = {
            "key": run.key, "method": run.method, "regions": list(run.regions), "seed": run.seed,
            "years": run.years, "train_site_years": len(train), "val_site_years": len(val),
            "trainable_parameters": trained,
            "backbone_parameters": self.backbone_parameters,
            "best_epoch": best,
            "curve": curve if is_global else [],
            "test": {region: held_out_metrics(model, self.scalers, self.split.region("test", (region,)),
                                          self.config.tolerance)
                     for region in self.regions},
        }
        if run.known_only:
            record["new_sites"] = {site: held_out_metrics(model, self.scalers, self.new_site_test(site),
                                                          self.config.tolerance)
                                   for site in self.new_windows}
        if is_global:
            (self.out / "models").mkdir(parents=True, exist_ok=True)
            save_backbone(self.out / "models" / self._model_name(run.seed, run.known_only), model,
                          self.scalers, {"experiment_run": run.key, "curves": curve})
            self._globals.pop((run.seed, run.known_only), None)
        if adapter is not None:
            record["adapter_bytes"] = self.save_run_adapter(run, adapter)
        record["seconds"] = round(time.perf_counter() - start, 2)
        return self.save(run, record, indent=1)
