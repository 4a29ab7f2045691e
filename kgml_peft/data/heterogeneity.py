"""Between-site spread of annual carbon fluxes: towers and simulated neighbouring fields side by side.

The statistic behind the simulator's hidden-management spread (docs/simulator.md). For a pair of
sites and a year in which both grew maize, the pair differs by |delta Reco/GPP| (annual sums), by
|delta Reco| relative to the pair's mean Reco, and by |delta NEE| (gC m-2 yr-1). The spread of a set
of pairs is the mean of these over pair-years. Only years with every day present count.
"""

from __future__ import annotations

import calendar
import itertools
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from kgml_peft import schema
from kgml_peft.data.fluxnet import read_crops, read_daily
from kgml_peft.data.places import distance_km
from kgml_peft.data.synthetic import SITE_LAYOUT, SynthConfig, simulate, site_parameters
from kgml_peft.data.tables import parse_yyyymmdd
from kgml_peft.errors import KgmlPeftError

#: The development tower pair: 1.6 km apart, same weather (US-Ne3 and US-CRT are held out and are
#: never used here).
TOWER_PAIR: tuple[str, str] = ("US-Ne1", "US-Ne2")


def annual_sums(frame: pd.DataFrame, gpp: str = "GPP", reco: str = "Reco",
                nee: str = "NEE") -> pd.DataFrame:
    """Per site-year sums of GPP, Reco and NEE (gC m-2 yr-1) over complete years (no missing day
    of any of the three), with the year's crop where the table has ``Crop_Type``."""
    days = frame.assign(year=frame[schema.DATE].dt.year)
    grouped = days.groupby([schema.SITE, "year"])
    sums = grouped[[gpp, reco, nee]].sum(min_count=1)
    in_year = [366 if calendar.isleap(year) else 365 for year in sums.index.get_level_values("year")]
    complete = grouped[[gpp, reco, nee]].count().min(axis=1).to_numpy() >= in_year
    out = sums[complete].rename(columns={gpp: "GPP", reco: "Reco", nee: "NEE"})
    if "Crop_Type" in frame.columns:
        out["Crop_Type"] = grouped["Crop_Type"].first()[complete]
    return out


def pair_spread(annual: pd.DataFrame, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Mean differences of ``pairs`` of sites over the years both have as maize (Crop_Type 1)."""
    rows = []
    for a, b in pairs:
        if a not in annual.index.get_level_values(0) or b not in annual.index.get_level_values(0):
            continue
        x, y = annual.loc[a], annual.loc[b]
        years = x.index.intersection(y.index)
        maize = years[(x.loc[years, "Crop_Type"] == 1).to_numpy() & (y.loc[years, "Crop_Type"] == 1).to_numpy()]
        for year in maize:
            p, q = x.loc[year], y.loc[year]
            rows.append((abs(p.Reco / p.GPP - q.Reco / q.GPP),
                         abs(p.Reco - q.Reco) / (0.5 * (p.Reco + q.Reco)), abs(p.NEE - q.NEE)))
    if not rows:
        return {"pair_years": 0}
    values = np.array(rows)
    return {"pair_years": len(rows), "reco_gpp_abs_diff": float(values[:, 0].mean()),
            "reco_rel_abs_diff": float(values[:, 1].mean()), "nee_abs_diff": float(values[:, 2].mean())}


def tower_spread(daily: str | os.PathLike, crops: str | os.PathLike) -> dict[str, float]:
    """The spread of the development tower pair (:data:`TOWER_PAIR`) from FLUXNET2015 daily files
    (``daily`` folder, ONEFlux NT partitioning, gap-filled NEE) and a crops table (site, year, crop;
    see :func:`~kgml_peft.data.fluxnet.read_crops`)."""
    frames = []
    for site in TOWER_PAIR:
        found = sorted(Path(daily).glob(f"FLX_{site}_*.csv"))
        if len(found) != 1:
            raise KgmlPeftError(f"{daily}: expected one FLUXNET2015 daily file of {site}, found {len(found)}")
        raw = read_daily(found[0]).replace(-9999, np.nan)
        frames.append(pd.DataFrame({
            schema.SITE: site, schema.DATE: parse_yyyymmdd(raw["TIMESTAMP"]),
            "GPP": raw["GPP_NT_VUT_REF"], "Reco": raw["RECO_NT_VUT_REF"], "NEE": raw["NEE_VUT_REF"]}))
    annual = annual_sums(pd.concat(frames, ignore_index=True))
    annual["Crop_Type"] = read_crops(crops).reindex(annual.index).to_numpy()
    return pair_spread(annual, [TOWER_PAIR])


def neighbour_pairs(sites: pd.DataFrame, max_km: float) -> list[tuple[str, str]]:
    """Pairs of sites of the same region at most ``max_km`` apart (``sites``: site, region, lat, lon)."""
    pairs = []
    for (_, a), (_, b) in itertools.combinations(sites.iterrows(), 2):
        if a[schema.REGION] == b[schema.REGION] and \
                distance_km(a["lat"], a["lon"], b["lat"], b["lon"]) <= max_km:
            pairs.append((a[schema.SITE], b[schema.SITE]))
    return pairs


def simulated_spread(config: SynthConfig | None = None, max_km: float = 100.0) -> dict[str, float]:
    """The spread of simulated neighbouring fields (same state, at most ``max_km`` apart), from the
    observed flavour's true fluxes (no tower noise or gaps; every simulated year)."""
    config = config or SynthConfig()
    longest = max(max(v) for v in SITE_LAYOUT.values())
    clean = replace(config, observed=True, gap_fraction=0.0, nee_noise=0.0, nee_noise_rel=0.0,
                    gpp_noise_rel=0.0, obs_years=(longest, longest))
    annual = annual_sums(simulate(clean))
    return pair_spread(annual, neighbour_pairs(site_parameters(clean), max_km))
