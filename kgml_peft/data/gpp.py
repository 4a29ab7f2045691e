"""GPP as a satellite product would see it, made from tower GPP (the real-site benchmark's
``satellite-like`` GPP route).

Tower GPP (``GPP_NT_VUT_REF``) is partitioned from the same tower's NEE (ONEFlux: RECO_NT =
GPP_NT + NEE), so a model given tower GPP in its test years is handed part of the answer. A field
without a tower would have a satellite product instead (MODIS MOD17-like: 8-day composites, a
biome-level light-use efficiency that is off by a site-specific factor, and retrieval noise). This
module degrades tower GPP the same three ways, nothing tuned toward a result:

1. **8-day means**: each calendar year is cut into 8-day periods from 1 January (the last one
   shorter), as MODIS composites are; every day gets its period's mean.
2. **a per-site-year multiplicative bias** with standard deviation :data:`BIAS_SD` (15 %):
   log-normal with mean 1, one draw per site and year.
3. **daily noise**: multiplicative, normal with standard deviation :data:`DAILY_NOISE_SD` (10 %)
   of the day's value; GPP is clipped at 0.

Draws are seeded per (seed, site, year), so a site-year gets the same GPP whatever else is in the
table.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd

from kgml_peft import schema

#: days per composite period
PERIOD_DAYS = 8
#: standard deviation of the per-site-year multiplicative bias
BIAS_SD = 0.15
#: standard deviation of the multiplicative daily noise
DAILY_NOISE_SD = 0.10
#: the GPP routes of the real-site benchmark
GPP_ROUTES: tuple[str, ...] = ("tower", "satellite-like")


def satellite_like_gpp(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """A copy of ``frame`` (the data contract, daily ``GPP``) with GPP degraded as described in
    the module docstring; every other column is unchanged."""
    out = frame.copy()
    dates = pd.to_datetime(out[schema.DATE])
    gpp = pd.to_numeric(out["GPP"], errors="coerce").to_numpy(dtype="float64")
    period = ((dates.dt.day_of_year.to_numpy() - 1) // PERIOD_DAYS).astype(int)
    years = dates.dt.year.to_numpy()
    sites = out[schema.SITE].astype(str).to_numpy()
    # a log-normal factor with mean 1 and standard deviation BIAS_SD
    sigma = math.sqrt(math.log1p(BIAS_SD**2))
    result = np.empty_like(gpp)
    keys = pd.DataFrame({"site": sites, "year": years, "period": period})
    for (site, year), rows in keys.groupby(["site", "year"], sort=False).groups.items():
        index = np.asarray(rows)
        rng = np.random.default_rng([seed, zlib.crc32(site.encode()), int(year)])
        factor = math.exp(rng.normal(-sigma**2 / 2, sigma))
        means = pd.Series(gpp[index]).groupby(period[index]).transform("mean").to_numpy()
        noise = rng.normal(1.0, DAILY_NOISE_SD, len(index))
        result[index] = np.clip(means * factor * noise, 0.0, None)
    out["GPP"] = result
    return out
