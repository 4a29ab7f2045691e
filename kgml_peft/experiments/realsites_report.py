"""The real-site benchmark's report: results.json, results.md and figures.

Every figure is a mean ± standard deviation over seeds (population std; 0 with one seed), in
physical units: daily MSE (gC m-2 d-1)^2 and R^2 on QC-passing test days, and the absolute error
and bias of annual sums (gC m-2 yr-1) against ONEFlux's gap-filled record.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kgml_peft.experiments.bootstrap import percentile_interval, resampled_mse, resamples
from kgml_peft.experiments.figures import _pyplot, _save
from kgml_peft.experiments.report import seed_stats
from kgml_peft.experiments.realsites import BASELINES, SCORED, RealRun, RealSiteBenchmark
from kgml_peft.atomic import atomic_path
from kgml_peft.errors import KgmlPeftError
from kgml_peft.provenance import provenance

FIGURES = ("timeseries.png", "mse_by_years.png", "annual_sums.png")


def label(run: RealRun) -> str:
    """The row name of a method: ``site_only``, ``<method>/<route>``, or from the backbones of the
    ``past`` column ``<method>/<route>/past``."""
    if run.route is None:
        return run.method
    return f"{run.method}/{run.route}" + ("" if run.column == "main" else f"/{run.column}")


def backbone_label(run: RealRun) -> str:
    """The name of a pretraining run's backbone: its route, with its scope unless that is ``dev``."""
    return run.route if run.scope == "dev" else f"{run.route}/{run.scope}"


def _stats(values: list) -> dict | None:
    """Mean, std and n of the values that exist (a test with no observed day scores None)."""
    values = [v for v in values if v is not None]
    return seed_stats(values) if values else None


def aggregate_realsites(bench: RealSiteBenchmark) -> dict:
    """results.json's content from the finished runs of ``bench``."""
    records = {run.key: bench.load(run) for run in bench.plan}
    config = bench.config
    backbones: dict = {}
    pretrain = [r for r in bench.plan if r.method == "pretrain"]
    for name in dict.fromkeys(backbone_label(r) for r in pretrain):
        recs = [records[r.key] for r in pretrain if backbone_label(r) == name]
        backbones[name] = {
            "route": recs[0]["route"], "scope": recs[0].get("scope", "dev"),
            "dev_sites": recs[0]["dev_sites"], "dev_years": recs[0].get("dev_years"),
            "dev_val": {t: {"mse": _stats([r["dev_val"][t]["mse"] for r in recs]),
                            "r2": _stats([r["dev_val"][t]["r2"] for r in recs])} for t in SCORED},
            "train_site_years": recs[0]["train_site_years"], "val_site_years": recs[0]["val_site_years"],
            "seconds": _stats([r["seconds"] for r in recs]),
        }
    cells: dict = {}
    series: dict = {}
    for run in bench.plan:
        if run.method == "pretrain":
            continue
        rec = records[run.key]
        cell = cells.setdefault(run.site, {}).setdefault(str(run.years), {})
        cell.setdefault(label(run), []).append(rec)
        if "dates" in rec["test"]:
            series.setdefault(run.site, {}).setdefault(str(run.years), {})[label(run)] = rec["test"]
    out_cells: dict = {}
    for site, by_k in cells.items():
        for k, by_label in by_k.items():
            for name, recs in by_label.items():
                entry = {t: {key: _stats([r["test"][t].get(key) for r in recs])
                             for key in ("mse", "r2", "r2_anomaly", "annual_mae", "annual_bias")} for t in SCORED}
                entry.update(trained_parameters=recs[0]["trained_parameters"],
                             test_years=recs[0]["test"]["years"], train_years=recs[0]["train_years"],
                             seeds=len(recs), seconds=_stats([r["seconds"] for r in recs]))
                if "adapter_bytes" in recs[0]:
                    entry["adapter_bytes"] = recs[0]["adapter_bytes"]
                if any("intervals" in r["test"] for r in recs):
                    entry["intervals"] = _interval_stats([r["test"].get("intervals") or {} for r in recs])
                if any("other_crop_test_years" in r for r in recs):
                    entry["other_crop_test_years"] = recs[0]["other_crop_test_years"]
                out_cells.setdefault(site, {}).setdefault(k, {})[name] = entry
    for site, by_k in out_cells.items():
        for k, rows in by_k.items():
            add_skill(rows)
            add_bootstrap(rows, cells[site][k])
    # the route shown in the figures: the one better on the development sites' validation years
    # (never chosen on the held-out sites), averaged over the main columns' backbones
    main = {scope.name for columns in bench.scopes.values() for scope in [columns["main"]]}
    dev_nee = {route: float(np.mean([b["dev_val"]["NEE"]["mse"]["mean"] for b in backbones.values()
                                     if b["route"] == route and b["scope"] in main])) for route in config.routes}
    scopes = {site: {**{column: scope.name for column, scope in bench.scopes[site].items()},
                     **{column: {"unavailable": why} for column, why in bench.unavailable.get(site, {}).items()}}
              for site in config.held_out}
    return {"config": config.to_dict(), "held_out": list(config.held_out), "dev_sites": bench.dev_sites,
            "scopes": scopes,
            "site_years": bench.site_years, "runs": len(bench.plan),
            "seconds_total": round(sum(r["seconds"] for r in records.values()), 1),
            "backbones": backbones, "figure_route": min(dev_nee, key=dev_nee.get),
            "cells": out_cells, "series": series}


def add_skill(rows: dict[str, dict]) -> None:
    """Give every row of one cell (method name -> entry) its skill against the best baseline, per
    scored target: ``1 - MSE / MSE of the best baseline`` (mean MSEs over seeds; > 0: better than
    every baseline). The best baseline is the one with the lowest test MSE of that target in the
    cell, picked on the test years themselves: the hardest comparison for the other methods. The
    cell's ``best_baseline`` names it; rows without the target's MSE get None."""
    best: dict[str, tuple[float, str]] = {}
    for name in BASELINES:
        for target in SCORED:
            mse = rows.get(name, {}).get(target, {}).get("mse")
            if mse is not None and (target not in best or mse["mean"] < best[target][0]):
                best[target] = (mse["mean"], name)
    if not best:
        return
    for entry in rows.values():
        entry["skill_vs_best_baseline"] = {
            target: (None if entry[target]["mse"] is None or target not in best
                     else 1 - entry[target]["mse"]["mean"] / best[target][0]) for target in SCORED}
        entry["best_baseline"] = {target: best[target][1] for target in best}


def _draw_mse(recs: list[dict], target: str, draws: np.ndarray) -> np.ndarray:
    """The mean over seeds of the test MSE of each resample of test years ``draws`` [B, years]."""
    return resampled_mse([(r["test"][target]["by_year"]["sse"], r["test"][target]["by_year"]["n"])
                          for r in recs], draws)


def add_bootstrap(rows: dict[str, dict], records: dict[str, list[dict]], seed: int = 0) -> None:
    """Give every row of one cell a bootstrap interval over its test years (every method of a
    cell is tested on the same years; one set of resamples, seeded, serves them all, so the
    intervals of skills are paired): per scored target ``mse_ci`` and, with baselines,
    ``skill_ci`` (:mod:`.bootstrap`: percentile intervals over resamples of the mean over
    seeds). None with fewer than two test years: one year cannot be resampled."""
    years = {tuple(r["test"]["years"]) for recs in records.values() for r in recs}
    if len(years) != 1:
        raise KgmlPeftError(f"the runs of one cell were tested on different years: {sorted(years)}")
    n_years = len(years.pop())
    draws = resamples(n_years, seed)
    usable = n_years >= 2 and all("by_year" in recs[0]["test"][t] for recs in records.values() for t in SCORED)

    def interval(values: np.ndarray) -> list[float] | None:
        return percentile_interval(values) if usable else None

    mse = {name: {t: _draw_mse(recs, t, draws) for t in SCORED} for name, recs in records.items()} if usable else {}
    for name, entry in rows.items():
        entry["test_years_n"] = n_years
        entry["mse_ci"] = {t: interval(mse[name][t]) if usable else None for t in SCORED}
        best = entry.get("best_baseline")
        if best is not None:
            # the best baseline's own skill is 0 by definition: no interval
            entry["skill_ci"] = {t: interval(1 - mse[name][t] / mse[best[t]][t])
                                 if usable and t in best and best[t] != name else None for t in SCORED}


def _interval_stats(records: list[dict]) -> dict:
    """Coverage and mean width of the daily and annual intervals over seeds (runs whose widths
    could not reach the level are counted, not averaged)."""
    out: dict = {"level": next((r["level"] for r in records if "level" in r), None),
                 "unavailable": sum(1 for r in records if "unavailable" in r or not r)}
    for target in SCORED:
        for kind in ("daily", "annual"):
            parts = [r[target][kind] for r in records if target in r and "coverage" in r[target][kind]]
            out.setdefault(target, {})[kind] = {
                "coverage": _stats([p["coverage"] for p in parts]),
                "mean_width": _stats([p["mean_width"] for p in parts]),
                "n": sum(p["n"] for p in parts)}
    return out


def _fmt(stats: dict | None, digits: int = 3) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.0f} %"


def skill_text(entry: dict, target: str) -> str:
    """A row's skill against the best baseline for ``target`` as text: ``+12 % [-5, +30]`` (its
    bootstrap interval in brackets where it has one), ``-`` where it has none."""
    value = entry.get("skill_vs_best_baseline", {}).get(target)
    ci = (entry.get("skill_ci") or {}).get(target)
    return _percent(value) + ("" if ci is None or value is None else
                              f" [{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}]")


def reported_targets(results: dict) -> tuple[str, ...]:
    """The targets results.md reports: with tower GPP only Reco, since ONEFlux's night-time
    partitioning makes NEE = Reco - GPP hold exactly for the observations, so a model handed the
    tower's GPP scores NEE through an identity (docs/fluxnet.md)."""
    return ("Reco",) if results["config"].get("gpp_route") == "tower" else SCORED


def _cell_table(rows: dict[str, dict], targets: tuple[str, ...]) -> list[str]:
    """One cell's rows: per target MSE, R², R² on anomalies, annual error and skill vs the best
    baseline with its bootstrap interval."""
    head = ["method"] + [f"{t} {col}" for t in targets for col in ("MSE", "R²", "R² anomalies",
                                                                 "annual abs. error", "skill")] + ["trained values"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in rows.items():
        cols = [name]
        for t in targets:
            cols += [_fmt(e[t]["mse"]), _fmt(e[t]["r2"]), _fmt(e[t].get("r2_anomaly")),
                     _fmt(e[t]["annual_mae"], 0), skill_text(e, t)]
        lines.append("| " + " | ".join(cols + [str(e["trained_parameters"])]) + " |")
    return lines


def markdown(results: dict) -> str:
    """The report as markdown tables."""
    lines = ["# Real-site benchmark (FLUXNET2015)", "",
             f"Held-out sites {', '.join(results['held_out'])}; development sites "
             f"{', '.join(results['dev_sites'])}. {results['runs']} runs, "
             f"{results['seconds_total']:.0f} s of run time in total. Mean ± std over seeds "
             f"{', '.join(map(str, results['config']['seeds']))}.", "",
             "## Backbones on the development sites' validation years", "",
             "| route | NEE MSE | NEE R² | Reco MSE | Reco R² | train / val site-years |", "|---|---|---|---|---|---|"]
    for route, b in results["backbones"].items():
        d = b["dev_val"]
        lines.append(f"| {route} | {_fmt(d['NEE']['mse'])} | {_fmt(d['NEE']['r2'])} | {_fmt(d['Reco']['mse'])} | "
                     f"{_fmt(d['Reco']['r2'])} | {b['train_site_years']} / {b['val_site_years']} |")
    targets = reported_targets(results)
    if targets != SCORED:
        lines += ["", "Tower GPP route: daily and annual NEE are not reported. ONEFlux partitions the tower's "
                  "own NEE into GPP_NT and RECO_NT = GPP_NT + NEE, so with GPP_NT as an input NEE follows from "
                  "Reco by that identity; Reco is the test (results.json keeps every figure)."]
    for site, by_k in results["cells"].items():
        for k, rows in sorted(by_k.items(), key=lambda kv: int(kv[0])):
            first = next(iter(rows.values()))
            lines += ["", f"## {site}: calibrated on {k} year(s) {first['train_years']}, tested on "
                          f"{len(first['test_years'])} ({first['test_years'][0]}-{first['test_years'][-1]})", "",
                      *_cell_table(rows, targets)]
    interval_rows = [(site, k, name, e) for site, by_k in results["cells"].items()
                     for k, rows in sorted(by_k.items(), key=lambda kv: int(kv[0]))
                     for name, e in rows.items() if "intervals" in e]
    if interval_rows:
        level = interval_rows[0][3]["intervals"]["level"]
        lines += ["", f"## Intervals of the cross-validated adapters (level {level})", "",
                  "| tower, k | method | NEE daily coverage | NEE daily width | NEE annual coverage | "
                  "NEE annual width | Reco daily coverage | test years of another crop |",
                  "|---|---|---|---|---|---|---|---|"]
        for site, k, name, e in interval_rows:
            iv = e["intervals"]
            lines.append(f"| {site}, {k} | {name} | {_fmt(iv['NEE']['daily']['coverage'])} | "
                         f"{_fmt(iv['NEE']['daily']['mean_width'], 2)} | {_fmt(iv['NEE']['annual']['coverage'])} | "
                         f"{_fmt(iv['NEE']['annual']['mean_width'], 0)} | {_fmt(iv['Reco']['daily']['coverage'])} | "
                         f"{e.get('other_crop_test_years', '-')} |")
        lines += ["", "Coverage: share of QC-passing test days (daily) or of test site-years' gap-filled "
                  "annual sums (annual) inside the interval; widths in gC m-2 d-1 (daily) and gC m-2 yr-1 "
                  "(annual)."]
    lines += ["", "MSE in (gC m-2 d-1)^2 on test days whose NEE passed the import's QC threshold; annual "
              "errors in gC m-2 yr-1 against the gap-filled record (365-day years). R² anomalies: R² against "
              "the test years' seasonal cycle (31-day running mean of the day-of-year mean) instead of their "
              "mean. Skill: 1 - MSE / MSE of the cell's best baseline for that target (regression_global, "
              "regression_site, climatology; the best picked on the test years), so > 0 beats every "
              "baseline; in brackets its 95 % bootstrap interval over test years (none with one test year)."]
    return "\n".join(lines) + "\n"


def _colors() -> dict[str, str]:
    return {"global": "tab:blue", "site_only": "tab:red", "full": "tab:green", "adapter": "tab:purple",
            "adapter_cv": "tab:orange", "regression_global": "tab:brown", "regression_site": "tab:olive",
            "climatology": "tab:cyan"}


def plot_timeseries(results: dict, path: Path) -> Path:
    """Observed vs predicted daily NEE and Reco of each held-out site's first test year after its
    longest calibration (seed 0; ``figure_route`` for the backbone-based methods)."""
    plt = _pyplot()
    sites = list(results["series"])
    fig, axes = plt.subplots(len(sites), 2, figsize=(12, 3.2 * len(sites)), squeeze=False)
    route = results["figure_route"]
    for i, site in enumerate(sites):
        k = max(results["series"][site], key=int)
        runs = results["series"][site][k]
        for j, target in enumerate(SCORED):
            ax = axes[i, j]
            any_run = next(iter(runs.values()))
            year = any_run["years"][0]
            days = np.arange(1, 366)
            ax.plot(days, [np.nan if v is None else v for v in any_run[target]["daily_gapfilled"][0]],
                    color="0.75", lw=1, label="gap-filled record")
            ax.plot(days, [np.nan if v is None else v for v in any_run[target]["daily_observed"][0]],
                    ".", color="k", ms=2.5, label="observed (QC passed)")
            for name, rec in runs.items():
                method = name.split("/")[0]
                if "/" in name and not name.endswith(route):
                    continue
                ax.plot(days, rec[target]["daily_predicted"][0], color=_colors()[method], lw=1.1, label=name)
            ax.set_title(f"{site} {year} ({target}; calibrated on {k} year(s))", fontsize=9)
            ax.set_xlabel("day of year")
            ax.set_ylabel(f"{target} (gC m-2 d-1)")
            if i == 0 and j == 0:
                ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_mse_by_years(results: dict, path: Path) -> Path:
    """Test MSE of NEE and Reco against the number of calibration years, per site and method (the
    main column's backbones)."""
    plt = _pyplot()
    sites = list(results["cells"])
    fig, axes = plt.subplots(2, len(sites), figsize=(5.5 * len(sites), 6.5), squeeze=False)
    for j, site in enumerate(sites):
        by_k = results["cells"][site]
        ks = sorted(by_k, key=int)
        names = [n for n in by_k[ks[0]] if not n.endswith("/past")]  # the past column: in the tables
        for i, target in enumerate(SCORED):
            ax = axes[i, j]
            for n, name in enumerate(names):
                stats = [by_k[k][name][target]["mse"] for k in ks]
                x = np.array([int(k) for k in ks]) + (n - len(names) / 2) * 0.04
                ok = [i for i, st in enumerate(stats) if st is not None]  # None: no observed test day
                x, stats = x[ok], [stats[i] for i in ok]
                ax.errorbar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o",
                            ms=4, capsize=2, color=_colors()[name.split("/")[0]],
                            ls="-" if name.endswith("observed") or "/" not in name else "--", label=name)
            ax.set_title(f"{site}: {target}", fontsize=9)
            ax.set_yscale("log")  # site-only on one year is an order of magnitude off
            ax.set_xlabel("calibration years")
            ax.set_ylabel("test MSE (gC m-2 d-1)^2, log scale")
            ax.set_xticks([int(k) for k in ks])
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    return _save(fig, path)


def plot_annual(results: dict, path: Path) -> Path:
    """Predicted against gap-filled annual sums of every test year (seed 0, longest calibration):
    NEE, or Reco on the tower-GPP route (:func:`reported_targets`)."""
    target = reported_targets(results)[0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    route = results["figure_route"]
    markers = ["o", "s", "^", "D"]
    values = []
    for s, site in enumerate(results["series"]):
        k = max(results["series"][site], key=int)
        for name, rec in results["series"][site][k].items():
            if "/" in name and not name.endswith(route):
                continue
            obs, pred = rec[target]["annual_observed"], rec[target]["annual_predicted"]
            keep = [(o, p) for o, p in zip(obs, pred) if o is not None]
            values += [v for pair in keep for v in pair]
            ax.scatter([o for o, _ in keep], [p for _, p in keep], marker=markers[s % len(markers)], s=22,
                       color=_colors()[name.split("/")[0]], label=f"{site} {name}")
    if values:
        lo, hi = min(values), max(values)
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8)
    ax.set_xlabel(f"gap-filled annual {target} (gC m-2 yr-1)")
    ax.set_ylabel(f"predicted annual {target} (gC m-2 yr-1)")
    ax.legend(fontsize=6)
    return _save(fig, path)


def write_realsites_report(results: dict, out: str | Path) -> list[Path]:
    """Write results.json, results.md and the figures into ``out``; return the paths."""
    out = Path(out)
    results = {**results, "provenance": provenance()}
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, sort_keys=True, allow_nan=False))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown(results))
    return [out / "results.json", out / "results.md", plot_timeseries(results, out / FIGURES[0]),
            plot_mse_by_years(results, out / FIGURES[1]), plot_annual(results, out / FIGURES[2])]
