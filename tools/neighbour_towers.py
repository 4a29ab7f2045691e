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
        --backbones results/fluxnet/models --out /tmp/ne3

The development split's version (how the prior's one-year rule was checked before US-Ne3 was
run with it): US-Ne2 from US-Ne1 with the development backbones, which never trained on US-Ne2
(``configs/fluxnet-dev.toml``):

    python tools/neighbour_towers.py --data data/fluxnet-meta.parquet \\
        --backbones results/fluxnet-dev/models --tower US-Ne2 --neighbours US-Ne1 --out /tmp/ne2
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
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.predict import predict_table
from kgml_peft.store.adapter import read_adapter
from kgml_peft.store.checkpoint import load_backbone



def _mse(pred, obs) -> float:
    p = pred.set_index(schema.DATE)["NEE"]
    o = obs.set_index(schema.DATE)["NEE"].reindex(p.index)
    ok = o.notna().to_numpy()
    return float(np.mean((p.to_numpy()[ok] - o.to_numpy()[ok]) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbones", required=True, help="folder of observed__s<seed>.safetensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tower", default="US-Ne3", help="the tower calibrated and tested")
    parser.add_argument("--neighbours", default="US-Ne1,US-Ne2", help="its neighbours (comma-separated)")
    parser.add_argument("--first", type=int, default=2001, help="the one calibration year; later years test")
    args = parser.parse_args()
    tower_id, neighbours, first = args.tower, tuple(args.neighbours.split(",")), args.first
    out = Path(args.out)
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
        row = {"seed": seed, "global": _mse(predict_table(bank, test).frame, test)}
        blended = predict_table(bank, test, site_column=schema.SITE, neighbours=len(neighbours))
        row["blend_0y"] = _mse(blended.frame, test)
        row["blend_sources"] = blended.blended[tower_id]["sources"]
        for method in ("adapter", "prior"):
            prior = "none" if method == "adapter" else "neighbours"
            folder = calibrate_beside(store, root / f"{method}_1y", [tower_id],
                                      tower[tower[schema.DATE].dt.year == first], path,
                                      CalibrationConfig(seed=seed, prior=prior, prior_k=len(neighbours)))
            bank = AdapterBank(backbone, folder)
            served = predict_table(bank, test, site_column=schema.SITE)
            row[f"{method}_1y"] = _mse(served.frame, test)
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


if __name__ == "__main__":
    main()
