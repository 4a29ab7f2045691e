"""Aggregate finished runs into ``results.json``, ``results.md`` and the figures.

Every number is a mean ± standard deviation over seeds (population std; 0 with one seed) of the
test MSE: the mean of the scaled MSEs of the observed daily flux targets (Ra, Rh, NEE, Reco as
present), each scaled by the standard deviation of that target over the training years of all
regions (:attr:`Experiment.scalers`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from kgml_peft import schema
from kgml_peft.experiments.config import MAIN_REGIMES
from kgml_peft.experiments.runs import Experiment, Plan
from kgml_peft.atomic import atomic_path
from kgml_peft.provenance import provenance

#: Physics figures the audit compares (the keys of ``held_out_metrics(...)["physics"]``).
AUDIT_KEYS = ("l_phys", "mass_balance_violation_rate", "mass_balance_violation_rate_relative",
              "mass_balance_mae", "negative_ra_rate", "negative_rh_rate")


def seed_stats(values: list[float]) -> dict:
    """Mean, population std (0 for one value) and n over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def aggregate(experiment: Experiment) -> dict:
    """results.json's content from the runs of ``experiment`` (all must be finished)."""
    records = {run.key: experiment.load(run) for run in experiment.plan.runs}
    regimes: dict = {}
    for regime, by_region in experiment.plan.regimes.items():
        regimes[regime] = {}
        for region, keys in by_region.items():
            tests = [records[k]["test"][region] for k in keys]
            mse = seed_stats([t["mse"] for t in tests])
            entry = {"mse_mean": mse["mean"], "mse_std": mse["std"], "seeds": mse["n"],
                     "trainable_parameters": records[keys[0]]["trainable_parameters"],
                     "backbone_parameters": records[keys[0]]["backbone_parameters"],
                     "targets": {t: seed_stats([x["targets"][t] for x in tests])["mean"] for t in tests[0]["targets"]},
                     "physics": {k: seed_stats([x["physics"][k] for x in tests])["mean"] for k in AUDIT_KEYS},
                     "seconds_mean": seed_stats([records[k]["seconds"] for k in keys])["mean"],
                     "runs": keys}
            if "adapter_bytes" in records[keys[0]]:
                entry["adapter_bytes"] = records[keys[0]]["adapter_bytes"]
            regimes[regime][region] = entry
    cross = {unit: {region: {"mse_mean": seed_stats([records[k]["test"][region]["mse"] for k in keys])["mean"],
                             "mse_std": seed_stats([records[k]["test"][region]["mse"] for k in keys])["std"]}
                    for region, keys in by_region.items()}
             for unit, by_region in experiment.plan.cross.items()}
    relative = {}
    for regime in ("full_finetune", "adapters"):
        relative[regime] = {
            region: {f"vs_{base}_pct": 100 * (regimes[regime][region]["mse_mean"] / regimes[base][region]["mse_mean"] - 1)
                     for base in ("site_only", "global_only")}
            for region in experiment.regions}
    global_runs = [records[k] for k in experiment.plan.regimes["global_only"][experiment.regions[0]]]
    new = new_site_results(experiment.plan, records)
    return {
        "config": experiment.config.to_dict(),
        "regions": list(experiment.regions),
        "scaling": {"description": "test MSE = mean over the observed daily flux targets of MSE / std^2, std "
                                   "of that target over the training years of the known sites (all but the "
                                   "new fields)",
                    "std": {t: experiment.scalers.std[t] for t in experiment.weights},
                    "targets": [t for t in experiment.weights if t in schema.DAILY_TARGETS],
                    "trained_on": list(experiment.weights)},
        "split": {part: len(getattr(experiment.split, part)) for part in ("train", "val", "test")},
        "regimes": regimes,
        "relative": relative,
        "cross_regional": cross,
        "new_sites": new,
        "new_sites_relative": {
            method: {region: {k: {"vs_global_only_pct": _change_pct(entry, new["global_only"][region][k])}
                              for k, entry in by_k.items()} for region, by_k in by_region.items()}
            for method, by_region in new.items() if method != "global_only"},
        "new_site_ids": {region: list(sites) for region, sites in experiment.new_sites.items() if sites},
        "global_curves": global_runs[0].get("curve", []),
        "runs": len(records),
        "seconds_total": sum(r["seconds"] for r in records.values()),
    }


def _change_pct(entry: dict, base: dict) -> float:
    return 100 * (entry["mse_mean"] / base["mse_mean"] - 1)


def _new_site_test(record: dict, site: str) -> dict:
    return record["new_sites"][site] if "new_sites" in record else record["test"]["site"]


def new_site_results(plan: Plan, records: dict) -> dict:
    """``new_sites.<method>.<region>.k<k>``: the test MSE of the region's new fields, averaged over
    the fields per seed, then mean ± std over seeds; with per-field means (``sites``), and for
    calibrated methods the share of runs whose early stopping kept epoch 0 (the global model)."""
    out: dict = {}
    for method, by_region in plan.new_sites.items():
        for region, by_k in by_region.items():
            for k, pairs in by_k.items():
                per_seed: dict[int, list[float]] = {}
                per_site: dict[str, list[float]] = {}
                kept_start = []
                for key, site in pairs:
                    record = records[key]
                    mse = _new_site_test(record, site)["mse"]
                    per_seed.setdefault(record["seed"], []).append(mse)
                    per_site.setdefault(site, []).append(mse)
                    if "site" in record and record["method"] != "scratch":
                        kept_start.append(record["best_epoch"][0] == 0)
                stats = seed_stats([statistics.fmean(v) for v in per_seed.values()])
                entry = {"mse_mean": stats["mean"], "mse_std": stats["std"], "seeds": stats["n"],
                         "sites": {site: statistics.fmean(v) for site, v in sorted(per_site.items())}}
                if kept_start:
                    entry["kept_global_share"] = sum(kept_start) / len(kept_start)
                out.setdefault(method, {}).setdefault(region, {})[f"k{k}"] = entry
    return out


def _fmt(entry: dict) -> str:
    return f"{entry['mse_mean']:.4f} ± {entry['mse_std']:.4f}"


def markdown(results: dict) -> str:
    """results.md: the tables the paper reports, plus ablations, sensitivity, scarcity, physics."""
    regions, regimes = results["regions"], results["regimes"]
    lines = ["# Experiment results", "",
             f"Test MSE ({results['scaling']['description']}; targets {', '.join(results['scaling']['targets'])}), "
             f"mean ± std over {len(results['config']['seeds'])} seed(s). "
             f"{results['runs']} runs, {results['seconds_total'] / 60:.1f} min of training.", "",
             "## Regimes per region", "",
             "| regime | " + " | ".join(regions) + " | trainable parameters | adapter bytes |",
             "|---|" + "---|" * (len(regions) + 2)]
    for regime in MAIN_REGIMES:
        row = regimes[regime]
        first = row[regions[0]]
        share = 100 * first["trainable_parameters"] / first["backbone_parameters"]
        lines.append(f"| {regime} | " + " | ".join(_fmt(row[r]) for r in regions)
                     + f" | {first['trainable_parameters']} ({share:.1f} %) | {first.get('adapter_bytes', '-')} |")
    lines += ["", "## Relative MSE change (as the paper reports it)", "",
              "| regime | vs | " + " | ".join(regions) + " |", "|---|---|" + "---|" * len(regions)]
    for regime, by_region in results["relative"].items():
        for base in ("site_only", "global_only"):
            lines.append(f"| {regime} | {base} | " + " | ".join(
                f"{by_region[r][f'vs_{base}_pct']:+.1f} %" for r in regions) + " |")
    lines += ["", "## Cross-regional (rows: trained on; columns: tested on)", "",
              "| trained on | " + " | ".join(regions) + " |", "|---|" + "---|" * len(regions)]
    for unit, by_region in results["cross_regional"].items():
        lines.append(f"| {unit} | " + " | ".join(_fmt(by_region[r]) for r in regions) + " |")
    for title, prefix in (("Adapter ablations", "ablation_"), ("LoRA rank (all components)", "rank_"),
                          ("Sensitivity (lr, batch size)", "sensitivity_"), ("Data scarcity", "scarcity_")):
        names = [n for n in regimes if n.startswith(prefix)]
        if not names:
            continue
        lines += ["", f"## {title}", "", "| variant | " + " | ".join(regions) + " | trainable | adapter bytes |",
                  "|---|" + "---|" * (len(regions) + 2)]
        for name in names:
            first = regimes[name][regions[0]]
            lines.append(f"| {name[len(prefix):]} | " + " | ".join(_fmt(regimes[name][r]) for r in regions)
                         + f" | {first['trainable_parameters']} | {first.get('adapter_bytes', '-')} |")
    new = results.get("new_sites") or {}
    if new:
        ks = list(next(iter(new["global_only"].values())))
        lines += ["", "## New fields (left out of the global model entirely)", "",
                  "Test MSE on each new field's years after the largest k, after calibrating on its "
                  "first k years; mean over the region's new fields, then mean ± std over seeds.", "",
                  "| method | k | " + " | ".join(regions) + " |", "|---|---|" + "---|" * len(regions)]
        for method, by_region in new.items():
            for k in ks:
                lines.append(f"| {method} | {k[1:]} | " + " | ".join(_fmt(by_region[r][k]) for r in regions) + " |")
        lines += ["", "| method | k | vs global_only: " + " | ".join(regions) + " |",
                  "|---|---|" + "---|" * len(regions)]
        for method, by_region in results["new_sites_relative"].items():
            for k in ks:
                lines.append(f"| {method} | {k[1:]} | " + " | ".join(
                    f"{by_region[r][k]['vs_global_only_pct']:+.1f} %" for r in regions) + " |")
    lines += ["", "## Physics audit (test years, mean over regions and seeds)", "",
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
