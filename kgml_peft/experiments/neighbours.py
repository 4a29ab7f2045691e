"""Fields without a tower on the demo data: neighbour blends and the neighbour prior, measured.

The shipped demo backbone left six new fields out of its pretraining (two per state). For each
seed this suite

1. calibrates the twelve training sites (plain calibration, side by side) into a neighbour store:
   the "calibrated fields around" a new field;
2. for each new field, tests on its last year:
   * ``global``: the backbone alone;
   * ``blend``, 0 years of the field's data: the function-space blend of its ``k`` nearest
     neighbour adapters (``predict --neighbours k``);
   * for ``years`` = 1, 2 years before the test year (the most recent ones, one of them of the
     test year's crop, see :func:`_years_before_test`): ``adapter`` (the default,
     cross-validated calibration of those years) and ``prior`` (the same with
     ``--prior neighbours``).

Nothing is chosen on the new fields: the kernel, k and every calibration setting are the
toolkit's defaults. The report gives NEE and Reco test MSE per field, the mean over fields and
seeds, and per state, and the spatial correlation the simulator puts between sites (how alike the
global model's errors are for near and far pairs of training sites), because a blend can only
help as much as near fields resemble each other.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kgml_peft import schema
from kgml_peft.atomic import atomic_path
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.runs import run_calibration
from kgml_peft.data.places import distance_km, site_points
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import CROP
from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.new_fields import SCORED, new_field_sites, site_mse
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.predict import predict_table
from kgml_peft.store.blend import blend_adapters, find_neighbours
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.provenance import provenance

METHODS: tuple[str, ...] = ("global", "blend", "adapter", "prior")


@dataclass(frozen=True)
class NeighbourConfig:
    """What the neighbourhood suite runs (``quick`` shrinks it for tests)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    k: int = 3
    years: tuple[int, ...] = (1, 2)
    #: calibration epochs (None: the calibration default)
    epochs: int | None = None

    @classmethod
    def quick(cls) -> NeighbourConfig:
        """One seed, one year, two epochs: the suite's shape in about a minute."""
        return cls(seeds=(0,), years=(1,), epochs=2)


def _years_before_test(rows: pd.DataFrame, fields: tuple[str, ...], years: int) -> pd.DataFrame:
    """Each field's ``years`` calibration years before its last (test) year: the most recent
    ``years - 1`` years and the most recent year of the test year's crop (or simply the ``years``
    most recent, without documented crops). A cross-validated adapter serves only the crops it
    was calibrated on, so on a maize/soybean rotation the year just before the test year alone
    would leave the test year to the global model and measure nothing."""
    year = rows[schema.DATE].dt.year
    keep = pd.Series(False, index=rows.index)
    for field in fields:
        mine = rows[schema.SITE] == field
        if not mine.any():
            continue
        crops = (rows.loc[mine, CROP].groupby(year[mine]).first() if CROP in rows
                 else pd.Series(dtype=float))
        before = sorted(set(year[mine].tolist()))[:-1][::-1]  # most recent first, the test year left out
        chosen = before[:max(years - 1, 0)]
        test_crop = crops.get(max(year[mine].tolist()), float("nan"))
        same = [y for y in before if y not in chosen and crops.get(y) == test_crop] if pd.notna(test_crop) else []
        rest = [y for y in before if y not in chosen]
        chosen += (same or rest)[:years - len(chosen)]
        keep |= mine & year.isin(chosen)
    return rows[keep].reset_index(drop=True)


def spatial_correlation(backbone_path: str | os.PathLike, observed: pd.DataFrame,
                        sites: list[str], near_km: float = 150.0) -> dict:
    """How alike the global model's errors are at near and far site pairs: the correlation over
    pairs of the training sites of their mean NEE residuals per calendar month (years pooled),
    averaged over pairs closer and farther than ``near_km``."""
    backbone = load_backbone(backbone_path)
    rows = observed[observed[schema.SITE].isin(sites)]
    pred = predict_table(AdapterBank(backbone), rows).frame.set_index([schema.SITE, schema.DATE])
    obs = rows.set_index([schema.SITE, schema.DATE])["NEE"].reindex(pred.index)
    residual = (pred["NEE"] - obs).rename("NEE").dropna().reset_index()
    residual["month"] = residual[schema.DATE].dt.month
    monthly = residual.groupby([schema.SITE, "month"])["NEE"].mean().unstack()
    points = site_points(rows)
    near, far = [], []
    for a, b in itertools.combinations(sorted(monthly.index), 2):
        r = float(np.corrcoef(monthly.loc[a], monthly.loc[b])[0, 1])
        (near if distance_km(*points[a], *points[b]) <= near_km else far).append(r)
    return {"near_km": near_km, "near_pairs": len(near), "far_pairs": len(far),
            "near_mean_r": statistics.fmean(near) if near else None,
            "far_mean_r": statistics.fmean(far) if far else None}


def merge_error(backbone_path: str | os.PathLike, store: str | os.PathLike, test: pd.DataFrame,
                fields: tuple[str, ...], k: int) -> list[dict]:
    """Per field: how far the weight-space merge of its ``k`` nearest adapters in ``store`` is from
    the function-space blend on the test rows: RMS difference of daily NEE (gC m-2 d-1) and each
    one's NEE test MSE."""
    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone)
    out = []
    for field in fields:
        rows = test[test[schema.SITE] == field]
        (lat, lon), = site_points(rows).values()
        neighbours = find_neighbours(store, backbone, lat, lon, k)  # read once, blended both ways
        preds = {}
        for merge in ("function", "weights"):
            bank.add(blend_adapters(neighbours, f"{merge}-{field}", backbone, lat=lat, lon=lon, merge=merge))
            preds[merge] = predict_table(bank, rows, site=f"{merge}-{field}").frame
        diff = preds["weights"]["NEE"].to_numpy() - preds["function"]["NEE"].to_numpy()
        out.append({"site": field, "nee_rms_difference": float(np.sqrt(np.mean(diff ** 2))),
                    "mse_function": site_mse(preds["function"], test, field, "NEE"),
                    "mse_weights": site_mse(preds["weights"], test, field, "NEE")})
    return out


def neighbour_store(root: Path, sites: Sequence[str], data: pd.DataFrame, backbone_path: str | os.PathLike,
                    config: CalibrationConfig, *, cpu: bool = True, progress: bool = False) -> Path:
    """``root`` rebuilt, with ``sites`` calibrated on ``data`` with ``config`` into
    ``root/neighbours``: the calibrated fields around the ones under test. Returns that store."""
    if root.exists():
        shutil.rmtree(root)
    store = root / "neighbours"
    store.mkdir(parents=True)
    run_calibration(",".join(sites), backbone_path=backbone_path, data=data, out_dir=store, config=config,
                    cpu=cpu, progress=progress)
    return store


def calibrate_beside(store: Path, folder: Path, sites: Sequence[str], data: pd.DataFrame,
                     backbone_path: str | os.PathLike, config: CalibrationConfig, *, cpu: bool = True,
                     progress: bool = False) -> Path:
    """Calibrate ``sites`` on ``data`` with ``config`` into ``folder``, a copy of the neighbour
    ``store`` (a neighbour prior takes its neighbours from the output store). Returns ``folder``."""
    shutil.copytree(store, folder)
    run_calibration(",".join(sites), backbone_path=backbone_path, data=data, out_dir=folder, config=config,
                    cpu=cpu, progress=progress)
    return folder


def run_neighbour_experiment(backbone_path: str | os.PathLike, observed: pd.DataFrame,
                             out: str | os.PathLike, config: NeighbourConfig = NeighbourConfig(), *,
                             cpu: bool = True, progress: bool = True) -> dict:
    """Run the suite (see module docstring) into ``out`` (created; its stores are rebuilt) and
    write ``results.json`` and ``results.md``; returns the results."""
    backbone = load_backbone(backbone_path)
    fields = new_field_sites(backbone)
    if not fields:
        raise KgmlPeftError(f"backbone {backbone_path} left no new fields out of its pretraining")
    observed = validate_table(observed, backbone.config.features)
    if not site_points(observed):
        raise KgmlPeftError("the neighbourhood suite needs the table's lat and lon columns")
    training = sorted(s for s in observed[schema.SITE].unique() if s not in fields)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    year = observed[schema.DATE].dt.year
    last = year.groupby(observed[schema.SITE]).transform("max")
    test = observed[observed[schema.SITE].isin(fields) & (year == last)].reset_index(drop=True)
    base = {} if config.epochs is None else {"epochs": config.epochs}
    rows, merges = [], []
    for seed in config.seeds:
        root = out / f"seed{seed}"
        store = neighbour_store(root, training, observed, backbone_path,
                                CalibrationConfig(seed=seed, cv="none", batch_sites=6, **base),
                                cpu=cpu, progress=progress)
        bank = AdapterBank(backbone, store)
        merges += [{"seed": seed, **m} for m in merge_error(backbone_path, store, test, fields, config.k)]
        served = {"global": predict_table(bank, test).frame,
                  "blend": predict_table(bank, test, site_column=schema.SITE, neighbours=config.k).frame}
        per_years = {}
        for years, method in itertools.product(config.years, ("adapter", "prior")):
            folder = calibrate_beside(store, root / f"{method}_{years}y", fields,
                                      _years_before_test(observed, fields, years), backbone_path,
                                      CalibrationConfig(seed=seed, prior="none" if method == "adapter" else
                                                        "neighbours", prior_k=config.k, **base),
                                      cpu=cpu, progress=progress)
            per_years[(method, years)] = predict_table(AdapterBank(backbone, folder), test,
                                                       site_column=schema.SITE, require_adapter=True).frame
        for field in fields:
            region = str(test.loc[test[schema.SITE] == field, schema.REGION].iloc[0])
            for target in SCORED:
                scored = [("global", 0, served["global"]), ("blend", 0, served["blend"]),
                          *((method, years, frame) for (method, years), frame in per_years.items())]
                for method, years, frame in scored:
                    rows.append({"seed": seed, "site": field, "region": region, "target": target,
                                 "method": method, "years": years, "mse": site_mse(frame, test, field, target)})
    table = pd.DataFrame(rows)
    results = summarise(table, config)
    results["spatial_correlation"] = spatial_correlation(backbone_path, observed, training)
    results["weight_space_merge"] = {
        "rows": merges, "nee_rms_difference_mean": statistics.fmean(m["nee_rms_difference"] for m in merges),
        "mse_function_mean": statistics.fmean(m["mse_function"] for m in merges),
        "mse_weights_mean": statistics.fmean(m["mse_weights"] for m in merges)}
    results["fields"] = list(fields)
    results["config"] = dataclasses.asdict(config)
    results["provenance"] = provenance()
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(report(results))
    return results


def summarise(table: pd.DataFrame, config: NeighbourConfig) -> dict:
    """Mean test MSE per method and years (over fields and seeds), the change against the global
    model and, per state, for the blend; ``rows`` keeps every field's figures."""
    def mean(frame: pd.DataFrame) -> float:
        return float(frame["mse"].mean())

    out: dict = {"rows": table.to_dict("records"), "means": {}, "by_region": {}}
    for target in SCORED:
        t = table[table["target"] == target]
        glob = t[t["method"] == "global"]
        entry = {"global": mean(glob), "blend_0y": mean(t[t["method"] == "blend"])}
        for years in config.years:
            for method in ("adapter", "prior"):
                entry[f"{method}_{years}y"] = mean(t[(t["method"] == method) & (t["years"] == years)])
        # the mean over fields and seeds of each field's own ratio (scale-free, as the real-site
        # benchmark reports), besides the ratio of means
        paired = t.pivot_table(index=["seed", "site"], columns=["method", "years"], values="mse")
        ratios = {}
        for method, years in paired.columns:
            if method != "global":
                ratios[f"{method}_{years}y"] = float((paired[(method, years)] / paired[("global", 0)]).mean())
        entry["mean_ratio_vs_global"] = ratios
        out["means"][target] = entry
        out["by_region"][target] = {
            region: {"global": mean(g[g["method"] == "global"]), "blend_0y": mean(g[g["method"] == "blend"])}
            for region, g in t.groupby("region")}
    return out


def report(results: dict) -> str:
    """results.md: the mean table, the per-state blend table and the spatial correlation."""
    lines = ["# Neighbourhood adapters on the demo's new fields", "",
             f"Fields: {', '.join(results['fields'])}; seeds {results['config']['seeds']}, "
             f"k = {results['config']['k']}.", "",
             "| target | method | test MSE (mean) | mean ratio to global |", "|---|---|---|---|"]
    for target, entry in results["means"].items():
        for name, value in entry.items():
            if name == "mean_ratio_vs_global":
                continue
            ratio = entry["mean_ratio_vs_global"].get(name)
            lines.append(f"| {target} | {name} | {value:.4f} | {'' if ratio is None else f'{ratio:.3f}'} |")
    lines += ["", "| target | state | global | blend (0 years) | change |", "|---|---|---|---|---|"]
    for target, regions in results["by_region"].items():
        for region, e in regions.items():
            lines.append(f"| {target} | {region} | {e['global']:.4f} | {e['blend_0y']:.4f} | "
                         f"{100 * (e['blend_0y'] / e['global'] - 1):+.1f}% |")
    m = results["weight_space_merge"]
    lines += ["", f"Weight-space merge against the function-space blend (0 years): RMS difference of daily "
                  f"NEE {m['nee_rms_difference_mean']:.4f} gC m-2 d-1; NEE test MSE {m['mse_weights_mean']:.4f} "
                  f"(weights) vs {m['mse_function_mean']:.4f} (function)."]
    c = results["spatial_correlation"]
    lines += ["", f"Spatial correlation of the global model's monthly NEE errors between training sites: "
                  f"{c['near_mean_r']} (pairs within {c['near_km']:g} km, n = {c['near_pairs']}), "
                  f"{c['far_mean_r']} (farther, n = {c['far_pairs']}).", ""]
    return "\n".join(lines)
