"""New fields of a `kgml-peft experiment` folder, per run: how often a calibrated method beats the
global model on its field, and its change on test years that grow the same crop as the (one)
calibration year against the other crop of the rotation. Per target, from the runs' per-site-year
errors; prints JSON (a table for docs/results.md).

    python tools/new_field_crops.py results/demo            # the default run on the demo data
    python tools/new_field_crops.py results/mine data.parquet  # a run made with --data data.parquet
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kgml_peft.data.tables import read_table
from kgml_peft.experiments.pipeline import demo_table

TARGETS = ("NEE", "Reco")


def _mse(errors: dict, target: str, keep=lambda unit: True) -> tuple[float, float]:
    sse = sum(s for u, s in zip(errors["units"], errors[target]["sse"]) if keep(u))
    n = sum(c for u, c in zip(errors["units"], errors[target]["n"]) if keep(u))
    return sse, n


def main(folder: str, data: str | None = None) -> dict:
    """The figures of the new fields of the experiment in ``folder`` (run on ``data``, default the
    experiment's demo table)."""
    runs = [json.loads(p.read_text()) for p in sorted((Path(folder) / "runs").glob("*.json"))]
    table = demo_table() if data is None else read_table(data)
    crops = table.assign(year=table["date"].dt.year).groupby(["site", "year"])["Crop_Type"].first()
    crop = {f"{site}:{year}": value for (site, year), value in crops.items()}
    globals_ = {r["seed"]: r["new_sites"] for r in runs if "new_sites" in r}
    out: dict = {}
    for r in (r for r in runs if r.get("site") and r["method"] in ("adapter", "full")):
        base = globals_[r["seed"]][r["site"]]["errors"]
        own = r["test"]["site"]["errors"]
        cell = out.setdefault(r["method"], {}).setdefault(f"k{r['years']}", {})
        calibration_crops = {crop[f"{r['site']}:{y}"] for y in r["train_years"]}
        for target in TARGETS:
            entry = cell.setdefault(target, {"runs": 0, "better": 0, "same_crop": [0.0, 0.0, 0.0, 0],
                                             "other_crop": [0.0, 0.0, 0.0, 0]})
            a, b = _mse(own, target), _mse(base, target)
            entry["runs"] += 1
            entry["better"] += int(a[0] / a[1] < b[0] / b[1])
            for name, keep in (("same_crop", lambda u: crop[u] in calibration_crops),
                               ("other_crop", lambda u: crop[u] not in calibration_crops)):
                sa, na = _mse(own, target, keep)
                sb, _ = _mse(base, target, keep)
                units = sum(1 for u in own["units"] if keep(u))
                acc = entry[name]
                acc[0] += sa
                acc[1] += sb
                acc[2] += na
                acc[3] += units
    for by_k in out.values():
        for by_target in by_k.values():
            for entry in by_target.values():
                for name in ("same_crop", "other_crop"):
                    sa, sb, _, units = entry[name]
                    entry[name] = {"site_years": units, "change_pct": 100 * (sa / sb - 1) if sb else None}
    return out


if __name__ == "__main__":
    print(json.dumps(main(*(sys.argv[1:3] or ["results/demo"])), indent=1))
