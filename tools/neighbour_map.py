"""The map of docs/neighbours.md: the demo's training sites, its new fields, each field's 3 nearest
neighbours (line width = blend weight) and the blend's NEE test-MSE change against the global
model (colour; mean over seeds), from the neighbourhood suite's results.json.

    python tools/neighbour_map.py docs/neighbours-results.json docs/figures/neighbours-map.png
"""

from __future__ import annotations

import argparse
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kgml_peft.calibration.runs import demo_table  # noqa: E402
from kgml_peft.data.places import nearest, site_points  # noqa: E402
from kgml_peft.store.blend import distance_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("out")
    args = parser.parse_args()
    results = json.load(open(args.results))
    fields, k = results["fields"], results["config"]["k"]
    points = site_points(demo_table())
    training = {s: p for s, p in points.items() if s not in fields}
    change = {}
    for field in fields:
        rows = [r for r in results["rows"] if r["site"] == field and r["target"] == "NEE"]
        glob = statistics.fmean(r["mse"] for r in rows if r["method"] == "global")
        blend = statistics.fmean(r["mse"] for r in rows if r["method"] == "blend")
        change[field] = 100 * (blend / glob - 1)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for field in fields:
        lat, lon = points[field]
        chosen = nearest(training, lat, lon, k)
        for (site, _), w in zip(chosen, distance_weights([km for _, km in chosen])):
            ax.plot([lon, training[site][1]], [lat, training[site][0]], color="0.55", lw=0.5 + 5 * w, zorder=1)
    ax.scatter([p[1] for p in training.values()], [p[0] for p in training.values()], marker="^", s=50,
               color="0.3", label="calibrated training site", zorder=2)
    for site, (lat, lon) in training.items():
        ax.annotate(site, (lon, lat), fontsize=7, xytext=(3, 3), textcoords="offset points", color="0.3")
    limit = max(abs(v) for v in change.values())
    dots = ax.scatter([points[f][1] for f in fields], [points[f][0] for f in fields], c=[change[f] for f in fields],
                      cmap="RdBu_r", vmin=-limit, vmax=limit, s=160, edgecolor="k", zorder=3,
                      label="new field (colour: blend vs global)")
    for field in fields:
        lat, lon = points[field]
        ax.annotate(f"{field} {change[field]:+.0f}%", (lon, lat), fontsize=8, xytext=(6, -12),
                    textcoords="offset points", weight="bold")
    fig.colorbar(dots, ax=ax, label="NEE test MSE, blend (0 years) vs global model, %")
    ax.set_xlabel("longitude (°E)")
    ax.set_ylabel("latitude (°N)")
    ax.set_title(f"Demo new fields and their {k} nearest calibrated sites (line width = weight)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: " + ", ".join(f"{f} {change[f]:+.1f}%" for f in fields))


if __name__ == "__main__":
    main()
