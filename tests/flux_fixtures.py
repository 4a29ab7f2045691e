"""Flux-product fixtures built from the shared FLUXNET2015 daily files (tests never download).

Each fixture is a file in one product's documented naming and columns (FLUXNET2015, AmeriFlux
FLUXNET, ICOS ETC L2; see docs/fluxnet.md): a daily file is the shared one re-headed (timestamp
first, columns in another order, extra ONEFlux columns the importer must ignore); a half-hourly or
hourly file splits every shared day into records whose daily aggregates are that day's values:

* temperature follows a diurnal curve with its minimum at 03:00 and maximum at 15:00, shaped (a
  power of a cosine, solved per day) so that its mean, minimum and maximum are the day's TA_F,
  TA_F_MIN and TA_F_MAX; VPD likewise between 0 at 03:00 and VPD_F_MAX at 15:00, mean VPD_F;
* radiation and GPP follow daylight (a sine from 06:00 to 18:00) scaled to the day's mean; RECO is
  constant through the day and NEE = its daily value minus GPP's diurnal departure, so NEE, GPP
  and RECO keep their daily means; fluxes are written in umol CO2 m-2 s-1 (gC m-2 d-1 / factor);
* NEE_VUT_REF_QC: round(QC x 48) half-hours flagged 0 (measured), the others 1, 2, 3 in turn; an
  hourly file can only say whole hours, so it flags floor(half-hours / 2) hours 0, which keeps a
  day on the same side of the 0.5 threshold.

The carbon factor is written out here (12.0107 g mol-1 x 86,400 s / 10^6), not imported from the
importer, so a wrong factor there would fail the comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fluxnet2015"
DAILY = SHARED / "daily"
GC_PER_DAY = 12.0107 * 86400 / 1e6
STEP = {"HH": 30, "HR": 60}


def shared_daily(site: str) -> Path:
    """The shared daily file of ``site``."""
    (path,) = DAILY.glob(f"FLX_{site}_FLUXNET2015_DD-FROM-HH_*.csv")
    return path


def _years(site: str) -> str:
    return shared_daily(site).stem.rsplit("_", 1)[1]


def file_name(product: str, site: str, resolution: str, grouping: str = "FULLSET") -> str:
    """The name a download gives the file: ``product`` is ``FLX``, ``AMF``, ``ICOS`` or
    ``FLUXMET`` (the newest FLUXNET release, from the AmeriFlux network, whose ``HH`` names hold
    half-hourly or hourly records)."""
    if product == "FLUXMET":
        named = "HH" if resolution in ("HH", "HR") else resolution
        y0, y1 = _years(site).split("-")
        return f"AMF_{site}_FLUXNET_FLUXMET_{named}_{y0}-{y1}_v1.3_r1.csv"
    if product == "FLX":
        return f"FLX_{site}_FLUXNET2015_{grouping}_{resolution}_{_years(site)}_1-4.csv"
    if product == "AMF":
        return f"AMF_{site}_FLUXNET_{grouping}_{resolution}_{_years(site)}_3-5.csv"
    if product == "ICOS":
        return f"ICOSETC_{site}_FLUXNET_{resolution}_L2.csv"
    raise ValueError(product)


def _power_shape(curve: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per day (row), ``curve ** p`` with p solved so that the row mean is ``target`` (curve has an
    exact 0 and 1 in every row, which the power keeps); the last rounding is spread over the other
    records so the mean is exact."""
    low, high = np.full(len(target), -25.0), np.full(len(target), 8.0)  # log of p
    for _ in range(200):
        mid = (low + high) / 2
        mean = (curve ** np.exp(mid)[:, None]).mean(axis=1)
        low = np.where(mean > target, mid, low)
        high = np.where(mean > target, high, mid)
    shape = curve ** np.exp((low + high) / 2)[:, None]
    inner = (curve > 0) & (curve < 1)
    shape += inner * ((target - shape.mean(axis=1)) * curve.shape[1] / inner.sum(axis=1))[:, None]
    return shape


def records_from_daily(daily: pd.DataFrame, resolution: str) -> pd.DataFrame:
    """Half-hourly (``HH``) or hourly (``HR``) records whose daily aggregates are ``daily``'s rows
    (a shared daily file as read; see the module docstring)."""
    per_day = 1440 // STEP[resolution]
    hours = np.arange(per_day) * 24 / per_day
    days = pd.to_datetime(daily["TIMESTAMP"].astype(str), format="%Y%m%d")
    start = (np.repeat(days.to_numpy(), per_day)
             + np.tile(pd.to_timedelta(hours, unit="h").to_numpy(), len(days)))
    start = pd.DatetimeIndex(start)
    end = start + pd.Timedelta(minutes=STEP[resolution])
    col = {name: daily[name].to_numpy(dtype="float64")[:, None] for name in daily.columns}

    curve = np.tile((1 - np.cos(2 * np.pi * (hours - 3) / 24)) / 2, (len(daily), 1))
    span = col["TA_F_MAX"] - col["TA_F_MIN"]
    ta = col["TA_F_MIN"] + span * _power_shape(curve, ((col["TA_F"] - col["TA_F_MIN"]) / span)[:, 0])
    vmax = col["VPD_F_MAX"]
    ratio = np.divide(col["VPD_F"], vmax, out=np.zeros_like(vmax), where=vmax > 0)[:, 0]
    vpd = np.where(vmax > 0, vmax * _power_shape(curve, np.clip(ratio, 1e-9, 1 - 1e-9)), 0.0)
    light = np.clip(np.sin(np.pi * (hours - 6) / 12), 0, None)
    light = np.tile(light / light.mean(), (len(daily), 1))

    gpp_nt = col["GPP_NT_VUT_REF"] / GC_PER_DAY
    out = {
        "TIMESTAMP_START": start.strftime("%Y%m%d%H%M"), "TIMESTAMP_END": end.strftime("%Y%m%d%H%M"),
        "TA_F": ta, "TA_F_QC": np.zeros_like(ta),
        "SW_IN_POT": np.tile(np.clip(np.sin(np.pi * (hours - 6) / 12), 0, None) * 1000, (len(daily), 1)),
        "SW_IN_F": col["SW_IN_F"] * light, "VPD_F": vpd,
        "NEE_VUT_REF": col["NEE_VUT_REF"] / GC_PER_DAY - gpp_nt * (light - 1),
        "NEE_VUT_REF_QC": _flags(daily["NEE_VUT_REF_QC"].to_numpy(), per_day),
        "NEE_VUT_REF_RANDUNC": np.full_like(ta, -9999.0),
        "GPP_NT_VUT_REF": gpp_nt * light,
        "GPP_DT_VUT_REF": col["GPP_DT_VUT_REF"] / GC_PER_DAY * light,
        "RECO_NT_VUT_REF": np.repeat(col["RECO_NT_VUT_REF"] / GC_PER_DAY, per_day, axis=1),
        "LE_F_MDS": np.full_like(ta, -9999.0),
    }
    return pd.DataFrame({k: v.ravel() if isinstance(v, np.ndarray) else v for k, v in out.items()})


def _flags(qc: np.ndarray, per_day: int) -> np.ndarray:
    half_hours = np.rint(qc * 48).astype(int)
    measured = half_hours if per_day == 48 else half_hours // 2
    slot = np.arange(per_day)[None, :]
    # measured records first in a scrambled order of the day, the gap-filled ones flagged 1, 2, 3
    order = (slot * 7) % per_day
    return np.where(order < measured[:, None], 0, 1 + order % 3).astype(float)


def write_fixture(folder: Path, product: str, site: str, resolution: str,
                  grouping: str = "FULLSET") -> Path:
    """Write ``site``'s shared daily data as one product's file (``DD``, ``HH`` or ``HR``) into
    ``folder``; returns its path."""
    daily = pd.read_csv(shared_daily(site))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(product, site, resolution, grouping)
    if resolution == "DD":
        frame = daily.assign(TA_F_QC=1.0, SW_IN_POT=300.0, LE_F_MDS=-9999.0)
        first = ["TIMESTAMP", "TA_F_QC", "SW_IN_POT"]
        frame = frame[first + sorted(c for c in frame.columns if c not in first)[::-1]]
    else:
        frame = records_from_daily(daily, resolution)
    frame.to_csv(path, index=False)
    return path
