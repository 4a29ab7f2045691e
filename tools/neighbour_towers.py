"""US-Ne3 from its neighbours: the real-tower cells of docs/neighbours.md (reported only).

US-Ne3 (rainfed maize/soybean) lies 3.0-3.5 km from US-Ne1 and US-Ne2 (irrigated maize and
maize/soybean): near, but managed differently, a hard and honest case for a blend. With the
real-site benchmark's held-out backbones (tower GPP; they trained on the development towers,
US-Ne1 and US-Ne2 among them), per seed:

* the neighbour adapters: US-Ne1 and US-Ne2 calibrated on all their years (plain calibration);
* 0 years of US-Ne3: the function-space blend of the two at US-Ne3's coordinates, against the
  global model, on US-Ne3's years 2002-2012;
* 1 year (2001): the default (cross-validated) calibration, plain and with ``--prior neighbours``,
  on the same test years (served as predict serves them: calibration crops only).

    kgml-peft import fluxnet ../shared/data/fluxnet2015/daily --site-meta ../shared/data/fluxnet2015/sites.csv \\
        --crops ../shared/data/fluxnet2015/crops.csv --out data/fluxnet-meta.parquet
    python tools/neighbour_towers.py --data data/fluxnet-meta.parquet \\
        --backbones results/fluxnet-tower/models --out /tmp/ne3

The development split's version (how the prior's one-year rule was checked before US-Ne3 was
run with it): US-Ne2 from US-Ne1 with the development backbones, which never trained on US-Ne2
(``configs/fluxnet-dev-tower.toml``):

    python tools/neighbour_towers.py --data data/fluxnet-meta.parquet \\
        --backbones results/fluxnet-dev-tower/models --tower US-Ne2 --neighbours US-Ne1 --out /tmp/ne2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kgml_peft import schema
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.data.tables import read_table, validate_table
from kgml_peft.experiments.neighbours import calibrate_beside, neighbour_store
from kgml_peft.experiments.new_fields import site_mse
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.predict import predict_table
from kgml_peft.store.adapter import read_adapter
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.data.places import distance_km, site_points

METHODS = {"blend_0y": "blend, 0 years", "adapter_1y": "adapter, 1 year", "prior_1y": "prior, 1 year"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbones", required=True, help="folder of observed__s<seed>.safetensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tower", default="US-Ne3", help="the tower calibrated and tested")
    parser.add_argument("--neighbours", default="US-Ne1,US-Ne2", help="its neighbours (comma-separated)")
    parser.add_argument("--first", type=int, default=2001, help="the one calibration year; later years test")
    parser.add_argument("--map", help="also draw the map (sites, blend weights, MSE changes) to this PNG")
    parser.add_argument("--redraw", action="store_true", help="only draw --map from OUT/results.json")
    args = parser.parse_args()
    tower_id, neighbours, first = args.tower, tuple(args.neighbours.split(",")), args.first
    out = Path(args.out)
    if args.redraw:
        draw_map(json.loads((out / "results.json").read_text()), read_table(args.data), tower_id, args.map)
        return
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        path = Path(args.backbones) / f"observed__s{seed}.safetensors"
        backbone = load_backbone(path)
        table = validate_table(read_table(args.data), backbone.config.features)
        tower = table[table[schema.SITE] == tower_id]
        test = tower[tower[schema.DATE].dt.year > first]
        root = out / f"seed{seed}"
        store = neighbour_store(root, neighbours, table, path, CalibrationConfig(seed=seed, cv="none"))
        bank = AdapterBank(backbone, store)
        row = {"seed": seed, "global": site_mse(predict_table(bank, test).frame, test, tower_id, "NEE")}
        blended = predict_table(bank, test, site_column=schema.SITE, neighbours=len(neighbours))
        row["blend_0y"] = site_mse(blended.frame, test, tower_id, "NEE")
        row["blend_sources"] = blended.blended[tower_id]["sources"]
        for method in ("adapter", "prior"):
            prior = "none" if method == "adapter" else "neighbours"
            folder = calibrate_beside(store, root / f"{method}_1y", [tower_id],
                                      tower[tower[schema.DATE].dt.year == first], path,
                                      CalibrationConfig(seed=seed, prior=prior, prior_k=len(neighbours)))
            bank = AdapterBank(backbone, folder)
            served = predict_table(bank, test, site_column=schema.SITE)
            row[f"{method}_1y"] = site_mse(served.frame, test, tower_id, "NEE")
            cv = read_adapter(bank.path(tower_id)).info["metrics"]["cv"]
            row[f"{method}_1y_chosen"] = {"shape": cv["shape"], "epochs": cv["epochs"],
                                          "strength": cv["strength"], "change_mean": cv["change_mean"]}
        rows.append(row)
        print(json.dumps(row))
    means = {k: float(np.mean([r[k] for r in rows])) for k in ("global", "blend_0y", "adapter_1y", "prior_1y")}
    ratios = {k: float(np.mean([r[k] / r["global"] for r in rows])) for k in ("blend_0y", "adapter_1y", "prior_1y")}
    result = {"rows": rows, "mean_mse": means, "mean_ratio_vs_global": ratios}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"mean_mse": means, "mean_ratio_vs_global": ratios}))
    if args.map:
        draw_map(result, table, tower_id, args.map)


def draw_map(result: dict, table, tower_id: str, path: str) -> None:
    """The tower, its neighbours (line width = blend weight, with distances) and the NEE test-MSE
    change of each method against the global model (mean of the per-seed ratios), in km east and
    north of the tower."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = site_points(table)
    lat0, lon0 = points[tower_id]

    def km(site):  # east and north of the tower, along the great circles through it
        lat, lon = points[site]
        east = distance_km(lat0, lon0, lat0, lon) * (1 if lon >= lon0 else -1)
        north = distance_km(lat0, lon0, lat, lon0) * (1 if lat >= lat0 else -1)
        return east, north

    weights = result["rows"][0]["blend_sources"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for i, (site, weight) in enumerate(weights.items()):
        x, y = km(site)
        ax.plot([0, x], [0, y], color="0.55", lw=1 + 8 * weight, zorder=1)
        ax.scatter([x], [y], marker="^", s=90, color="0.3", zorder=2)
        ax.annotate(f"{site}\nweight {weight:.2f}, {distance_km(lat0, lon0, *points[site]):.1f} km", (x, y),
                    fontsize=8, xytext=(0, -30 if i % 2 else 10), textcoords="offset points", ha="center")
    ax.scatter([0], [0], s=200, color="tab:blue", edgecolor="k", zorder=3)
    ax.annotate(tower_id, (0, 0), fontsize=9, xytext=(0, 12), textcoords="offset points", ha="center",
                weight="bold")
    change = "\n".join(f"{label}: {100 * (result['mean_ratio_vs_global'][key] - 1):+.0f} %"
                       for key, label in METHODS.items())
    ax.text(0.02, 0.98, f"{tower_id}, NEE test MSE vs the global model\n{change}", transform=ax.transAxes,
            fontsize=8, va="top", bbox={"facecolor": "white", "edgecolor": "0.7"})
    ax.set_xlabel("km east of the tower")
    ax.set_ylabel("km north of the tower")
    ax.set_aspect("equal", adjustable="datalim")
    ax.margins(0.6)
    ax.set_title(f"{tower_id} from its calibrated neighbours (mean of {len(result['rows'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
