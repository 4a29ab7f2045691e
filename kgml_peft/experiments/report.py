"""Aggregate finished runs into ``results.json``, ``results.md`` and the figures.

Every figure is per target (NEE, Reco; never averaged together), in physical units: the daily
test MSE pooled over a cell's test site-years, as mean ± standard deviation over seeds
(population std; 0 with one seed), with a bootstrap interval over site-years and the skill
against the best of the baselines (:mod:`.suite_baselines`), which every table carries.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.baselines import BASELINE_OUTPUTS
from kgml_peft.experiments.bootstrap import percentile_interval, resampled_mse, resamples
from kgml_peft.experiments.config import MAIN_REGIMES
from kgml_peft.experiments.runs import Experiment
from kgml_peft.experiments.suite_baselines import BASELINES, fit_baselines, fitted_values
from kgml_peft.atomic import atomic_path
from kgml_peft.provenance import provenance

#: Physics figures the audit compares (the keys of ``held_out_metrics(...)["physics"]``).
AUDIT_KEYS = ("l_phys", "mass_balance_violation_rate", "mass_balance_violation_rate_relative",
              "mass_balance_mae", "negative_ra_rate", "negative_rh_rate")


def seed_stats(values: list[float]) -> dict:
    """Mean, population std (0 for one value) and n over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def merge_errors(parts: list[dict]) -> dict:
    """Site-year errors of several test sets as one set (units and per-target lists joined)."""
    out: dict = {"units": [u for p in parts for u in p["units"]]}
    for target in (k for k in parts[0] if k != "units"):
        out[target] = {key: [v for p in parts for v in p[target][key]] for key in parts[0][target]}
    return out


def _ratio(numerator: list[float], denominator: list[float]) -> float:
    total = float(np.sum(denominator))
    return float(np.sum(numerator)) / total if total > 0 else float("nan")


def score_cell(rows: dict[str, list[dict]], seed: int = 0) -> dict[str, dict]:
    """Per-target figures of the rows of one cell (row name -> one errors dict per seed, every row
    tested on the same site-years): ``mse`` (mean ± std over seeds of the pooled MSE), ``mse_ci``
    (bootstrap over site-years of the mean over seeds, :mod:`.bootstrap`), ``r2_anomaly`` (mean over
    seeds) and, where the cell has :data:`~.suite_baselines.BASELINES`, ``skill`` (1 - MSE / MSE of
    the cell's best baseline for that target, picked on the test years themselves) with a paired
    ``skill_ci``. No interval with fewer than two site-years."""
    units = {tuple(e["units"]) for errors in rows.values() for e in errors}
    if len(units) != 1:
        raise KgmlPeftError("the rows of one cell were tested on different site-years")
    n_units = len(units.pop())
    first = next(iter(rows.values()))[0]
    targets = [k for k in first if k != "units"]
    draws = resamples(n_units, seed)
    usable = n_units >= 2
    drawn: dict[tuple[str, str], np.ndarray] = {}
    out: dict[str, dict] = {}
    for name, errors in rows.items():
        entry: dict = {"seeds": len(errors), "site_years": n_units}
        for t in targets:
            per_seed = [(e[t]["sse"], e[t]["n"]) for e in errors]
            drawn[name, t] = resampled_mse(per_seed, draws)
            r2 = [1 - _ratio(e[t]["sse"], e[t]["sst_anomaly"]) for e in errors]
            r2 = [v for v in r2 if np.isfinite(v)]  # none where no observation differs from its cycle
            entry[t] = {"mse": seed_stats([_ratio(sse, n) for sse, n in per_seed]),
                        "mse_ci": percentile_interval(drawn[name, t]) if usable else None,
                        "r2_anomaly": statistics.fmean(r2) if r2 else None}
        out[name] = entry
    baselines = [name for name in BASELINES if name in out]
    if not baselines:
        return out
    best = {t: min(baselines, key=lambda name: out[name][t]["mse"]["mean"]) for t in targets}
    for name, entry in out.items():
        entry["best_baseline"] = best
        for t in targets:
            entry[t]["skill"] = 1 - entry[t]["mse"]["mean"] / out[best[t]][t]["mse"]["mean"]
            # the best baseline's own skill is 0 by definition: no interval
            entry[t]["skill_ci"] = (percentile_interval(1 - drawn[name, t] / drawn[best[t], t])
                                    if usable and name != best[t] else None)
    return out


def aggregate(experiment: Experiment, baselines: dict | None = None) -> dict:
    """results.json's content from the runs of ``experiment`` (all must be finished) and its
    ``baselines`` (:func:`~.suite_baselines.fit_baselines`, fitted here when not given)."""
    baselines = baselines or fit_baselines(experiment)
    plan = experiment.plan
    records = {run.key: experiment.load(run) for run in plan.runs}
    regions = experiment.regions
    cells: dict = {}
    for region in regions:
        rows = {regime: [records[k]["test"][region]["errors"] for k in by_region[region]]
                for regime, by_region in plan.regimes.items()}
        rows.update({f"cross_{unit}": [records[k]["test"][region]["errors"] for k in by_region[region]]
                     for unit, by_region in plan.cross.items()})
        rows.update({name: [errors] for name, errors in baselines["regions"][region].items()})
        cells[region] = score_cell(rows)
    regimes: dict = {}
    for regime, by_region in plan.regimes.items():
        regimes[regime] = {}
        for region, keys in by_region.items():
            tests = [records[k]["test"][region] for k in keys]
            entry = {**cells[region][regime],
                     "trainable_parameters": records[keys[0]]["trainable_parameters"],
                     "backbone_parameters": records[keys[0]]["backbone_parameters"],
                     "targets_scaled": {t: seed_stats([x["targets"][t] for x in tests])["mean"]
                                        for t in tests[0]["targets"]},
                     "physics": {k: seed_stats([x["physics"][k] for x in tests])["mean"] for k in AUDIT_KEYS},
                     "seconds_mean": seed_stats([records[k]["seconds"] for k in keys])["mean"],
                     "runs": keys}
            if "adapter_bytes" in records[keys[0]]:
                entry["adapter_bytes"] = records[keys[0]]["adapter_bytes"]
            regimes[regime][region] = entry
    for name in (n for n in cells[regions[0]] if n not in regimes and not n.startswith("cross_")):
        regimes[name] = {region: {**cells[region][name], "trainable_parameters": fitted_values(name),
                                  "baseline": True} for region in regions}
    targets = [t for t in cells[regions[0]]["site_only"] if t in BASELINE_OUTPUTS]
    cross = {unit: {region: cells[region][f"cross_{unit}"] for region in regions} for unit in plan.cross}
    cross_regression = {unit: {region: cells[region][f"cross_regression_{unit}"] for region in regions}
                        for unit in plan.cross}
    relative = {regime: {region: {t: {f"vs_{base}_pct": _change_pct(regimes[regime][region][t],
                                                                    regimes[base][region][t])
                                      for base in ("site_only", "global_only")} for t in targets}
                         for region in regions}
                for regime in ("full_finetune", "adapters")}
    global_runs = [records[k] for k in plan.regimes["global_only"][regions[0]]]
    new = new_site_results(experiment, records, baselines["new_sites"])
    return {
        "config": experiment.config.to_dict(),
        "regions": list(regions),
        "targets": targets,
        "scaling": {"description": "per-target figures are in physical units: daily MSE in (gC m-2 d-1)^2 on "
                                   "observed test days; the models train on every target scaled by its std over "
                                   "the training years of the known sites (all but the new fields)",
                    "std": {t: experiment.scalers.std[t] for t in experiment.weights},
                    "trained_on": list(experiment.weights)},
        "split": {part: len(getattr(experiment.split, part)) for part in ("train", "val", "test")},
        "regimes": regimes,
        "relative": relative,
        "cross_regional": cross,
        "cross_regional_regression": cross_regression,
        "new_sites": new,
        "new_sites_relative": {
            method: {region: {k: {t: {"vs_global_only_pct": _change_pct(entry[t], new["global_only"][region][k][t])}
                                  for t in targets}
                              for k, entry in by_k.items()} for region, by_k in by_region.items()}
            for method, by_region in new.items() if method not in ("global_only", *BASELINES)},
        "new_site_ids": {region: list(sites) for region, sites in experiment.new_sites.items() if sites},
        "global_curves": global_runs[0].get("curve", []),
        "runs": len(records),
        "seconds_total": sum(r["seconds"] for r in records.values()),
    }


def _change_pct(entry: dict, base: dict) -> float:
    return 100 * (entry["mse"]["mean"] / base["mse"]["mean"] - 1)


def _new_site_test(record: dict, site: str) -> dict:
    return record["new_sites"][site] if "new_sites" in record else record["test"]["site"]


def new_site_results(experiment: Experiment, records: dict, baselines: dict) -> dict:
    """``new_sites.<method>.<region>.k<k>``: per target, the figures of :func:`score_cell` on the
    region's new fields' test site-years pooled (per seed), the ``baselines`` (per ``(site, k)``,
    :func:`~.suite_baselines.fit_baselines`) beside the GRU methods;
    with per-field MSEs (``sites``, mean over seeds) and, for calibrated methods, the share of runs
    whose early stopping kept epoch 0 (the global model)."""
    plan = experiment.plan
    cells: dict = {}
    extras: dict = {}
    for method, by_region in plan.new_sites.items():
        for region, by_k in by_region.items():
            for k, pairs in by_k.items():
                per_seed: dict[int, dict[str, dict]] = {}
                kept_start = []
                for key, site in pairs:
                    record = records[key]
                    per_seed.setdefault(record["seed"], {})[site] = _new_site_test(record, site)["errors"]
                    if "site" in record and record["method"] != "scratch":
                        kept_start.append(record["best_epoch"][0] == 0)
                rows = cells.setdefault((region, k), {})
                rows[method] = [merge_errors([by_site[s] for s in sorted(by_site)]) for by_site in per_seed.values()]
                sites = {s: {t: statistics.fmean(_ratio(v[s][t]["sse"], v[s][t]["n"]) for v in per_seed.values())
                             for t in BASELINE_OUTPUTS if t in next(iter(per_seed.values()))[s]}
                         for s in sorted(next(iter(per_seed.values())))}
                extras[method, region, k] = {"sites": sites, **(
                    {"kept_global_share": sum(kept_start) / len(kept_start)} if kept_start else {})}
    out: dict = {}
    for (region, k), rows in cells.items():
        fields = sorted(experiment.new_sites[region])
        per_field = [baselines[site, k] for site in fields]
        for name in BASELINES:
            rows[name] = [merge_errors([errors[name] for errors in per_field])]
        for name, entry in score_cell(rows).items():
            out.setdefault(name, {}).setdefault(region, {})[f"k{k}"] = {
                **entry, **extras.get((name, region, k), {})}
    return out


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _interval(ci: list[float] | None, digits: int) -> str:
    return "" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _fmt(entry: dict, target: str, digits: int = 3) -> str:
    """``mean ± std [bootstrap interval]`` of a row's MSE for ``target``."""
    stats = entry[target]["mse"]
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}" + _interval(entry[target]["mse_ci"], digits)


def _skill(entry: dict, target: str) -> str:
    value = entry[target].get("skill")
    if value is None:
        return "-"
    ci = entry[target].get("skill_ci")
    return f"{100 * value:+.0f} %" + ("" if ci is None else f" [{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}]")


def _variant_table(results: dict, names: list[str], target: str, label=lambda name: name) -> list[str]:
    """Rows ``names`` of ``regimes``: per region the MSE of ``target`` and the skill, then the
    trained values and adapter bytes."""
    regions, regimes = results["regions"], results["regimes"]
    lines = ["| variant | " + " | ".join(f"{r} MSE | {r} skill" for r in regions) + " | trained values | adapter bytes |",
             "|---|" + "---|" * (2 * len(regions) + 2)]
    for name in names:
        row = regimes[name]
        first = row[regions[0]]
        lines.append(f"| {label(name)} | " + " | ".join(f"{_fmt(row[r], target)} | {_skill(row[r], target)}"
                                                       for r in regions)
                     + f" | {first['trainable_parameters']} | {first.get('adapter_bytes', '-')} |")
    return lines


def markdown(results: dict) -> str:
    """results.md: per target (never averaged together), every table with the baselines' rows and
    bootstrap intervals; ablations, sensitivity, scarcity, new fields and the physics audit."""
    regions, regimes, targets = results["regions"], results["regimes"], results["targets"]
    baselines = [n for n in BASELINES if n in regimes]
    lines = ["# Experiment results", "",
             f"Daily test MSE per target in (gC m-2 d-1)^2 on observed test days, mean ± std over "
             f"{len(results['config']['seeds'])} seed(s), in brackets the 95 % bootstrap interval over test "
             "site-years (of the mean over seeds). Skill: 1 - MSE / MSE of the best baseline of that cell and "
             "target (regression_global, regression_site, climatology; picked on the test years), with its "
             "paired bootstrap interval: > 0 beats every baseline. Trained values: a regression fits 4, a "
             f"climatology 730 per site (365 days x NEE, Reco). {results['runs']} runs, "
             f"{results['seconds_total'] / 60:.1f} min of training.", ""]
    for t in targets:
        lines += [f"## Regimes and baselines per region: {t}", "",
                  *_variant_table(results, [*MAIN_REGIMES, *baselines], t), ""]
    lines += ["## R² on anomalies from each site's seasonal cycle (mean over seeds)", "",
              "| regime | " + " | ".join(f"{r} {t}" for r in regions for t in targets) + " |",
              "|---|" + "---|" * (len(regions) * len(targets))]
    for regime in (*MAIN_REGIMES, *baselines):
        lines.append(f"| {regime} | " + " | ".join(_number(regimes[regime][r][t]["r2_anomaly"])
                                                 for r in regions for t in targets) + " |")
    lines += ["", "## Relative MSE change (as the paper reports it, per target)", "",
              "| regime | vs | " + " | ".join(f"{r} {t}" for r in regions for t in targets) + " |",
              "|---|---|" + "---|" * (len(regions) * len(targets))]
    for regime, by_region in results["relative"].items():
        for base in ("site_only", "global_only"):
            lines.append(f"| {regime} | {base} | " + " | ".join(
                f"{by_region[r][t][f'vs_{base}_pct']:+.1f} %" for r in regions for t in targets) + " |")
    for t in targets:
        lines += ["", f"## Cross-regional: {t} (rows: trained on; columns: tested on)", "",
                  "| trained on | model | " + " | ".join(regions) + " |", "|---|---|" + "---|" * len(regions)]
        for unit, by_region in results["cross_regional"].items():
            for model, source in (("GRU", by_region), ("regression", results["cross_regional_regression"][unit])):
                lines.append(f"| {unit} | {model} | " + " | ".join(_fmt(source[r], t) for r in regions) + " |")
    for title, prefix in (("Adapter ablations", "ablation_"), ("LoRA rank (all components)", "rank_"),
                          ("Sensitivity (lr, batch size)", "sensitivity_"), ("Data scarcity", "scarcity_")):
        names = [n for n in regimes if n.startswith(prefix)]
        if not names:
            continue
        lines += ["", f"## {title}"]
        for t in targets:
            lines += ["", f"### {t}", "", *_variant_table(
                results, [*names, *baselines], t, lambda n: n[len(prefix):] if n.startswith(prefix) else n)]
    new = results.get("new_sites") or {}
    if new:
        ks = list(next(iter(new["global_only"].values())))
        lines += ["", "## New fields (left out of the global model entirely)", "",
                  "Each new field calibrated on its first k years and tested on its years after the largest k; "
                  "the region's new fields' test site-years pooled.", ""]
        for t in targets:
            lines += [f"### {t}", "", "| method | k | " + " | ".join(f"{r} MSE | {r} skill" for r in regions) + " |",
                      "|---|---|" + "---|" * (2 * len(regions))]
            for method, by_region in new.items():
                for k in ks:
                    lines.append(f"| {method} | {k[1:]} | " + " | ".join(
                        f"{_fmt(by_region[r][k], t)} | {_skill(by_region[r][k], t)}" for r in regions) + " |")
            lines.append("")
        lines += ["| method | k | vs global_only: " + " | ".join(f"{r} {t}" for r in regions for t in targets) + " |",
                  "|---|---|" + "---|" * (len(regions) * len(targets))]
        for method, by_region in results["new_sites_relative"].items():
            for k in ks:
                lines.append(f"| {method} | {k[1:]} | " + " | ".join(
                    f"{by_region[r][k][t]['vs_global_only_pct']:+.1f} %" for r in regions for t in targets) + " |")
    lines += ["", "## Physics audit (test years, mean over regions and seeds; the baselines predict no Ra or Rh)", "",
              "| regime | " + " | ".join(AUDIT_KEYS) + " |", "|---|" + "---|" * len(AUDIT_KEYS)]
    for regime in MAIN_REGIMES:
        values = [statistics.fmean(regimes[regime][r]["physics"][k] for r in regions) for k in AUDIT_KEYS]
        lines.append(f"| {regime} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: str | Path) -> list[Path]:
    """Write results.json, results.md and the figures into ``out``; return the paths."""
    from kgml_peft.experiments import plots

    out = Path(out)
    written = []
    results = {**results, "provenance": provenance()}
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True, allow_nan=False))
    written.append(out / "results.json")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown(results))
    written.append(out / "results.md")
    written += plots.all_figures(results, out)
    return written
