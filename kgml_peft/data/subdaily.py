"""Half-hourly and hourly FLUXNET records -> daily values, the way the ../shared daily files were made.

A sub-daily file (any product of :mod:`kgml_peft.data.flux_files`, ``HH`` or ``HR``) is aggregated to a
daily frame with the daily files' column names, which :func:`kgml_peft.data.fluxnet.convert` then
reads like any daily file:

=====================  ====================  ===============================================
daily column           from records of       aggregate
=====================  ====================  ===============================================
``TA_F``               ``TA_F``              mean, degC
``TA_F_MIN/_MAX``      ``TA_F``              minimum / maximum, degC
``SW_IN_F``            ``SW_IN_F``           mean, W m-2
``VPD_F``              ``VPD_F``             mean, hPa
``VPD_F_MAX``          ``VPD_F``             maximum, hPa
``P_F``                ``P_F``               sum, mm per record -> mm d-1
``WS_F``               ``WS_F``              mean, m s-1
``NEE_VUT_REF``,       same names            mean x 1.03772448: umol CO2 m-2 s-1 -> gC m-2 d-1
``GPP_*``, ``RECO_*``
``NEE_VUT_REF_QC``     ``NEE_VUT_REF_QC``    share of the day's records flagged 0 (measured)
=====================  ====================  ===============================================

A record belongs to the day of its ``TIMESTAMP_START`` (local standard time, as in every ONEFlux
file). A day's value needs all of that day's records (48 half-hours or 24 hours): a missing record
or a ``-9999`` leaves the value missing, and the daily gap rules of the import (interpolate a short
run of days, drop the year of a long one) decide what happens to it; a day without any record is
a missing day. Official daily files count good-quality gap-filling (flag 1) as measured in their
QC fraction; the ../shared files, and this module by default, count measured records only
(``counted=1`` counts both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kgml_peft import schema
from kgml_peft.data.tables import read_table
from kgml_peft.errors import KgmlPeftError

#: umol CO2 m-2 s-1 averaged over a day -> gC m-2 d-1: 12.0107e-6 g C per umol x 86,400 s, the
#: factor ONEFlux uses for its daily files.
UMOL_S_TO_GC_DAY = 1.03772448
#: minutes per record of each sub-daily resolution
STEP_MINUTES = {"HH": 30, "HR": 60}
MISSING = -9999.0
QC_COLUMN = "NEE_VUT_REF_QC"
_CARBON = ("NEE_VUT_REF", "GPP_NT_VUT_REF", "GPP_DT_VUT_REF", "RECO_NT_VUT_REF", "RECO_DT_VUT_REF")

#: daily column -> (column of the records, how a day's records make it)
DAILY_FROM_RECORDS: dict[str, tuple[str, str]] = {
    "TA_F": ("TA_F", "mean"), "TA_F_MIN": ("TA_F", "min"), "TA_F_MAX": ("TA_F", "max"),
    "SW_IN_F": ("SW_IN_F", "mean"), "VPD_F": ("VPD_F", "mean"), "VPD_F_MAX": ("VPD_F", "max"),
    "P_F": ("P_F", "sum"), "WS_F": ("WS_F", "mean"),
    **{name: (name, "carbon") for name in _CARBON},
    QC_COLUMN: (QC_COLUMN, "measured"),
}
#: the columns of a sub-daily file that are read
RECORD_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys(src for src, _ in DAILY_FROM_RECORDS.values()))


@dataclass
class SubDailyInfo:
    """What aggregating one sub-daily file found: records read, -9999 records per column, and days
    whose values are missing because a record was absent or missing."""

    records: int
    missing_records: dict[str, int] = field(default_factory=dict)
    incomplete_days: int = 0
    #: ``HH`` or ``HR``: what the records are (a FLUXNET ``HH`` name can mean either)
    resolution: str = "HH"


def flux_values(frame: pd.DataFrame, name: str, file: str) -> pd.Series:
    """A FLUXNET column as floats with ``-9999`` (and empty cells) as NaN; text and infinite
    values are refused."""
    values = pd.to_numeric(frame[name], errors="coerce")
    bad = values.isna() & frame[name].notna()
    if bad.any():
        raise KgmlPeftError(f"{file}: column {name} is not numeric: {bad.sum()} values such as "
                            f"{frame.loc[bad, name].iloc[0]!r}")
    values = values.astype("float64")
    if np.isinf(values).any():
        raise KgmlPeftError(f"{file}: column {name} has infinite values")
    return values.mask(values == MISSING)


def _record_starts(frame: pd.DataFrame, name: str, file: str) -> pd.Series:
    """``name`` (YYYYMMDDHHMM, as written) as timestamps; anything else is refused."""
    text = frame[name].astype("string").str.strip()
    times = pd.to_datetime(text.where(text.str.fullmatch(r"\d{12}", na=False)), format="%Y%m%d%H%M",
                           errors="coerce")
    bad = times.isna()
    if bad.any():
        raise KgmlPeftError(f"{file}: column {name} has {bad.sum()} values that are not times "
                            f"(YYYYMMDDHHMM), e.g. {frame.loc[bad, name].iloc[0]!r}")
    check_years(times, name, file)
    return times


def check_years(times: pd.Series, name: str, file: str) -> None:
    """Refuse times outside the contract's years: a stray year 9999 would make every later step
    walk thousands of empty years before saying so."""
    spec = schema.COLUMNS["Year"]
    out = (times.dt.year < spec.low) | (times.dt.year > spec.high)
    if out.any():
        raise KgmlPeftError(f"{file}: column {name} has {out.sum()} times outside the years "
                            f"{spec.low:g}-{spec.high:g}, e.g. {times[out].iloc[0]:%Y%m%d%H%M}")


def _record_minutes(start: pd.Series, end: pd.Series | None) -> float:
    """How long the records are: ``TIMESTAMP_END - TIMESTAMP_START`` where the file has it (the
    most common length), else the most common step between consecutive records."""
    if end is not None:
        lengths = (end - start) / pd.Timedelta(minutes=1)
    else:
        lengths = start.sort_values().diff().dropna() / pd.Timedelta(minutes=1)
    return float(lengths.mode().iloc[0]) if len(lengths) else float("nan")


def _check_times(start: pd.Series, end: pd.Series | None, resolution: str, file: str) -> str:
    """Records on the file's grid, each one step long, none twice; returns the resolution (``HH``
    or ``HR``; ``SD``, half-hourly or hourly by name, is decided by the records)."""
    usual = _record_minutes(start, end)
    if resolution == "SD":
        if usual not in (30.0, 60.0):
            raise KgmlPeftError(f"{file}: records are {usual:g} minutes long; a FLUXNET HH file holds "
                                "half-hours or hours")
        resolution = "HH" if usual == 30.0 else "HR"
    step = STEP_MINUTES[resolution]
    kind = {"HH": "half-hourly (HH)", "HR": "hourly (HR)"}[resolution]
    # without TIMESTAMP_END only the usual step between records says how long they are
    length = (end - start) / pd.Timedelta(minutes=1) if end is not None else pd.Series(usual, index=start.index)
    wrong = length != step
    if wrong.any():
        raise KgmlPeftError(f"{file}: records are {length[wrong].iloc[0]:g} minutes "
                            f"{'long' if end is not None else 'apart'} (TIMESTAMP_START "
                            f"{start[wrong].iloc[0]:%Y%m%d%H%M}), but the file is {kind}, "
                            f"{step} minutes; keep the name it was downloaded with")
    minutes = start.dt.hour * 60 + start.dt.minute
    off = minutes % step != 0
    if off.any():
        raise KgmlPeftError(f"{file}: TIMESTAMP_START {start[off].iloc[0]:%Y%m%d%H%M} is not on the "
                            f"{step}-minute grid of {'an' if resolution == 'HR' else 'a'} {kind} file")
    twice = start.duplicated()
    if twice.any():
        raise KgmlPeftError(f"{file}: record {start[twice].iloc[0]:%Y%m%d%H%M} appears twice")
    return resolution


def _check_flags(flags: pd.Series, file: str) -> None:
    odd = flags.notna() & ~flags.isin([0.0, 1.0, 2.0, 3.0])
    if odd.any():
        raise KgmlPeftError(f"{file}: column {QC_COLUMN} of a sub-daily file holds the flags 0-3 "
                            f"(measured, gap-filled good / medium / poor), not {flags[odd].iloc[0]:g}")


def aggregate_days(start: pd.Series, records: dict[str, pd.Series], resolution: str,
                   counted: int = 0) -> tuple[pd.DataFrame, int]:
    """Daily values (see the module table) from records starting at ``start`` (on the file's grid,
    none twice; ``records``: the columns of :data:`RECORD_COLUMNS` present, -9999 already NaN).
    Returns the daily frame (a ``TIMESTAMP`` YYYYMMDD column, one row per day with a record) and
    the number of those days with some record absent or missing. ``counted``: the highest QC flag
    counted as measured. Memory grows with the records, not with the span of days they cover."""
    per_day = 1440 // STEP_MINUTES[resolution]
    codes, days = pd.factorize(start.dt.floor("D"), sort=True)
    complete = pd.Series(codes).value_counts().sort_index().to_numpy() == per_day
    out = {"TIMESTAMP": pd.DatetimeIndex(days).strftime("%Y%m%d").astype(int)}
    gaps = ~complete
    grouped = {}  # per record column: its groups by day, and the days with all records present
    for source, column in records.items():
        values = pd.Series(column.to_numpy(dtype="float64"))
        groups = values.groupby(codes)
        full = complete & (groups.count().to_numpy() == per_day)  # count leaves NaN out
        grouped[source] = values, groups, full
        gaps |= ~full
    for daily, (source, how) in DAILY_FROM_RECORDS.items():
        if source not in grouped:
            continue
        values, groups, full = grouped[source]
        if how == "measured":
            value = (values <= counted).groupby(codes).sum().to_numpy() / per_day
        elif how == "carbon":
            value = groups.mean().to_numpy() * UMOL_S_TO_GC_DAY
        else:
            value = getattr(groups, how)().to_numpy()
        out[daily] = np.where(full, value, np.nan)
    return pd.DataFrame(out), int(gaps.sum())


def read_sub_daily(path: str | Path, resolution: str, counted: int = 0) -> tuple[pd.DataFrame, SubDailyInfo]:
    """One half-hourly (``HH``) or hourly (``HR``) FLUXNET file as daily values (see the module
    docstring) and what the aggregation found; ``SD``: either, as the records say. Only the columns
    used are read."""
    source = Path(path)
    file = source.name
    frame = read_table(source, columns=("TIMESTAMP", "TIMESTAMP_START", "TIMESTAMP_END", *RECORD_COLUMNS))
    if "TIMESTAMP_START" not in frame.columns:
        if "TIMESTAMP" in frame.columns:
            named = "HH" if resolution == "SD" else resolution  # SD: the name's HH, half-hours or hours
            raise KgmlPeftError(f"{file} is named {named} but has TIMESTAMP, not TIMESTAMP_START "
                                "(daily records); keep the name it was downloaded with")
        raise KgmlPeftError(f"{file}: missing column TIMESTAMP_START")
    if "NEE_VUT_REF" not in frame.columns:
        raise KgmlPeftError(f"{file}: missing column NEE_VUT_REF")
    start = _record_starts(frame, "TIMESTAMP_START", file)
    end = _record_starts(frame, "TIMESTAMP_END", file) if "TIMESTAMP_END" in frame.columns else None
    resolution = _check_times(start, end, resolution, file)
    records = {name: flux_values(frame, name, file) for name in RECORD_COLUMNS if name in frame.columns}
    if QC_COLUMN in records:
        _check_flags(records[QC_COLUMN], file)
    daily, incomplete = aggregate_days(start, records, resolution, counted)
    info = SubDailyInfo(records=len(frame), incomplete_days=incomplete, resolution=resolution,
                        missing_records={name: int(v.isna().sum()) for name, v in records.items()})
    return daily, info
