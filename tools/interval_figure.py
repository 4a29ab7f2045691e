"""Figure: a held-out tower's test years predicted with 90 % intervals, through the real
``kgml-peft predict --interval --annual`` on an adapter the real-site benchmark wrote.

    python tools/interval_figure.py --results results/fluxnet --data data/fluxnet.parquet \
        --site US-Ne3 --years 2 --route observed --seed 0 --out docs/figures/intervals-us-ne3.png

Top: daily NEE of one test year (QC-passing observations, prediction, 90 % band). Bottom: annual
NEE of every test year, gap-filled record against the prediction with its 90 % interval.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--results", "--data", "--site", "--route", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--years", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--show-year", type=int, default=None, help="test year of the daily panel")
    args = parser.parse_args()
    results = Path(args.results)
    key = f"adapter_cv__{args.route}__{args.site}__{args.years}y__s{args.seed}"
    # the run's own record says which backbone it was calibrated from and which years it tested on
    record = json.loads((results / "runs" / f"{key}.json").read_text())
    scope = record.get("scope", "dev")
    backbone = results / "models" / (f"{args.route}__s{args.seed}.safetensors" if scope == "dev"
                                     else f"{args.route}__{scope}__s{args.seed}.safetensors")
    frame = pd.read_parquet(args.data)
    if record.get("gpp_route") == "satellite-like":  # served on the GPP the benchmark scored it on
        from kgml_peft.data.gpp import satellite_like_gpp

        frame = satellite_like_gpp(frame, seed=0)  # seeded per site-year: filtering after is the same
    frame = frame[frame["site"] == args.site]
    test = frame[frame["date"].dt.year.isin(record["test"]["years"])]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        store.mkdir()
        shutil.copy(results / "adapters" / f"{key}.safetensors", store / f"{args.site}.safetensors")
        table, daily, annual = Path(tmp) / "test.parquet", Path(tmp) / "daily.csv", Path(tmp) / "annual.csv"
        test.to_parquet(table, index=False)
        subprocess.run([sys.executable, "-m", "kgml_peft", "predict", "--data", str(table), "--backbone",
                        str(backbone),
                        "--adapters", str(store), "--site", args.site, "--interval", str(args.level),
                        "--annual", str(annual), "--out", str(daily), "--quiet", "--cpu"], check=True)
        daily, annual = pd.read_csv(daily, parse_dates=["date"]), pd.read_csv(annual)
    observed = test.set_index("date")
    year = args.show_year or int(annual["year"].iloc[0])
    day = daily[daily["date"].dt.year == year]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7))
    top.fill_between(day["date"], day["NEE_lo"], day["NEE_hi"], color="tab:orange", alpha=0.3,
                     label=f"{args.level:.0%} interval")
    top.plot(day["date"], day["NEE"], color="tab:orange", lw=1, label="adapter (cross-validated)")
    obs = observed.loc[day["date"], "NEE"]
    top.scatter(obs.index, obs.values, s=4, color="k", label="observed (QC-passing)")
    top.set_ylabel("NEE (gC m-2 d-1)")
    top.set_title(f"{args.site}, calibrated on {args.years} year(s), test year {year} ({args.route} route)")
    top.legend(fontsize=7)
    gap = observed["NEE_gapfilled"].groupby(observed.index.year).sum()
    x = annual["year"]
    bottom.errorbar(x, annual["NEE"], yerr=[annual["NEE"] - annual["NEE_lo"], annual["NEE_hi"] - annual["NEE"]],
                    fmt="o", color="tab:orange", capsize=3, label=f"predicted, {args.level:.0%} interval")
    bottom.scatter(x, gap.reindex(x).values, color="k", marker="x", label="gap-filled record")
    bottom.set_ylabel("annual NEE (gC m-2 yr-1)")
    bottom.set_xlabel("test year")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    inside = ((gap.reindex(x).values >= annual["NEE_lo"]) & (gap.reindex(x).values <= annual["NEE_hi"])).mean()
    print(f"wrote {args.out}; annual coverage {inside:.2f} over {len(x)} test years")


if __name__ == "__main__":
    main()
