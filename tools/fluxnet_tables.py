"""The summary tables of docs/fluxnet.md, generated from a real-site benchmark's results folder.

    python tools/fluxnet_tables.py results/fluxnet            # satellite-like GPP (the default)
    python tools/fluxnet_tables.py results/fluxnet-tower      # tower GPP: Reco only

Prints markdown: (1) per tower and k, the baselines and the GRU methods on each reported target
(MSE, skill against the best baseline with its 95 % bootstrap interval over test years); (2) the
cross-validated adapter against the global model of the same backbone, with what the folds chose
per seed (from the run records, in seed order); (3) its interval coverage per tower. The figures
are the benchmark's own (results.json); nothing is recomputed but means over cells.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kgml_peft.experiments.realsites import BACKBONE_METHODS, BASELINES
from kgml_peft.experiments.realsites_report import reported_targets, skill_text


def _columns(results: dict, site: str) -> list[str]:
    """The backbone columns a tower has: ``""`` (main) and ``/past`` when it has that column."""
    return [""] + (["/past"] if isinstance(results["scopes"][site].get("past"), str) else [])


def skill_table(results: dict) -> list[str]:
    """Per tower and k: every baseline and GRU method, MSE and skill vs the best baseline."""
    targets = reported_targets(results)
    head = ["tower, k", "method"] + [f"{t} {c}" for t in targets for c in ("MSE", "skill [95 % CI]")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for site, by_k in results["cells"].items():
        for k, rows in sorted(by_k.items(), key=lambda kv: int(kv[0])):
            names = list(BASELINES) + [f"{m}/{route}{col}" for col in _columns(results, site)
                                       for route in results["config"]["routes"] for m in BACKBONE_METHODS]
            for name in (n for n in names if n in rows):
                e = rows[name]
                cells = [f"{e[t]['mse']['mean']:.3f}" if e[t]["mse"] else "-" for t in targets]
                lines.append("| " + " | ".join([f"{site}, {k}", name] + [v for t, m in zip(targets, cells)
                                                                      for v in (m, skill_text(e, t))]) + " |")
    return lines


def cv_table(results: dict, folder: Path, target: str) -> tuple[list[str], list[str]]:
    """adapter_cv against the global model of the same backbone, per tower, k, route and column,
    with the folds' choice per seed; and one line per route and column with the mean change over
    cells and the worst cell."""
    lines = [f"| tower, k | backbone | adapter / global ({target}) | adapter_cv / global | folds chose (per seed: shape, t) |",
             "|---|---|---|---|---|"]
    ratios: dict[str, list[tuple[float, str]]] = {}
    seeds = results["config"]["seeds"]
    for site, by_k in results["cells"].items():
        for k, rows in sorted(by_k.items(), key=lambda kv: int(kv[0])):
            for col in _columns(results, site):
                for route in results["config"]["routes"]:
                    mses = [rows[f"{m}/{route}{col}"][target]["mse"] for m in ("global", "adapter", "adapter_cv")]
                    if any(m is None for m in mses):  # no observed test day of this target
                        continue
                    g, a, c = (m["mean"] for m in mses)
                    suffix = "__past" if col else ""
                    chose = []
                    for seed in seeds:
                        run = json.loads((folder / "runs" / f"adapter_cv__{route}__{site}__{k}y{suffix}__s{seed}.json")
                                         .read_text())["cv"]
                        chose.append("global" if run["strength"] == 0 else f"{run['shape']}, {run['strength']:g}")
                    ratios.setdefault(f"{route}{col}", []).append((c / g, f"{site} {k}"))
                    lines.append(f"| {site}, {k} | {route}{col} | {a / g:.3f} | {c / g:.3f} | {'; '.join(chose)} |")
    summary = [f"{name}: mean change {100 * (statistics.fmean(r for r, _ in values) - 1):+.1f} %, worst cell "
               f"{max(values)[0]:.3f} ({max(values)[1]})" for name, values in ratios.items()]
    return lines, summary


def interval_lines(results: dict) -> list[str]:
    """Daily and annual coverage of adapter_cv's intervals per tower, route and column (mean over
    its cells and seeds)."""
    out = []
    for site, by_k in results["cells"].items():
        for col in _columns(results, site):
            for route in results["config"]["routes"]:
                parts = [by_k[k][f"adapter_cv/{route}{col}"].get("intervals") for k in by_k]
                parts = [p for p in parts if p]
                for target in reported_targets(results):
                    daily = [p[target]["daily"]["coverage"]["mean"] for p in parts if p[target]["daily"]["coverage"]]
                    annual = [p[target]["annual"]["coverage"]["mean"] for p in parts if p[target]["annual"]["coverage"]]
                    if daily:
                        annual_text = f"{statistics.fmean(annual):.2f}" if annual else "-"
                        out.append(f"- {site} {route}{col} {target}: daily {statistics.fmean(daily):.2f}, "
                                   f"annual {annual_text}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results folder of kgml-peft experiment --suite fluxnet")
    args = parser.parse_args()
    results = json.loads((args.results / "results.json").read_text())
    print(f"<!-- generated by tools/fluxnet_tables.py from {args.results} "
          f"(commit {results.get('provenance', {}).get('commit')}) -->")
    print("\n".join(skill_table(results)))
    # the headline target: NEE, or Reco where NEE comes through the identity (tower GPP)
    lines, summary = cv_table(results, args.results, reported_targets(results)[0])
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in summary))
    print("\n" + "\n".join(interval_lines(results)))


if __name__ == "__main__":
    main()
