"""Long site-day tables: read CSV/Parquet, validate against the data contract, write atomically.

Validation errors name the column, the site and the first offending date, so a user can find the
row, e.g. ``column TMAX_AIR has 3 NaN values (site IA-004, first 2003-07-14)``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kgml_peft import schema
from kgml_peft.errors import KgmlPeftError
from kgml_peft.readable import check_regular_file
from kgml_peft.atomic import atomic_path

_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

# What a value out of range usually means: the column was given in another unit.
_UNIT_HINTS = {
    "RADN": "W m-2 instead of MJ m-2 d-1? multiply W m-2 by 0.0864",
    "TMAX_AIR": "Kelvin or Fahrenheit instead of degC?",
    "TAVG_AIR": "Kelvin or Fahrenheit instead of degC?",
    "VPD_AIR": "Pa instead of hPa? divide by 100",
    "VPDMAX_AIR": "Pa instead of hPa? divide by 100",
    "HMAX_AIR": "a fraction instead of percent, or absolute humidity?",
    "HDIF_AIR": "a fraction instead of percent, or absolute humidity?",
    "GPP": "umol m-2 s-1 instead of gC m-2 d-1? multiply by 1.0377 (ONEFlux: 12.0107 g mol-1 x 0.0864)",
    "NEE": "umol m-2 s-1 instead of gC m-2 d-1? multiply by 1.0377 (ONEFlux: 12.0107 g mol-1 x 0.0864)",
    "Reco": "umol m-2 s-1 instead of gC m-2 d-1? multiply by 1.0377 (ONEFlux: 12.0107 g mol-1 x 0.0864)",
    "TSOC": "percent instead of g kg-1? multiply by 10",
    "lat": "lat and lon swapped, or not decimal degrees?",
    "lon": "degrees east from 0 to 360? subtract 360 from values above 180",
}

# What a NaN usually means where it is allowed as long as the column is not a feature.
_NAN_HINTS = {
    "Crop_Type": "the crop of these site-years is unknown: give it, or use a backbone without "
                 "Crop_Type among its features",
    "lat": "a table with site coordinates needs them on every row of every site",
    "lon": "a table with site coordinates needs them on every row of every site",
}


def table_format(path: str | os.PathLike) -> str:
    """Return ``"csv"`` or ``"parquet"`` for a table path, from its extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise KgmlPeftError(f"{path}: unknown table format {suffix or '(none)'!r}; use .csv or .parquet")
    return _FORMATS[suffix]


# pandas' default spellings of a missing value (read_csv's ``na_values`` documentation): kept for
# numeric columns, so that ``NA`` or ``nan`` in a number column still reads as NaN as it always did.
_NA_SPELLINGS: tuple[str, ...] = (
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
)


#: Columns read as the text they are written as: flux-file timestamps (YYYYMMDDHHMM) are checked
#: digit by digit, and a float would turn ``201101010030`` into ``2.0110101003e+11``.
_AS_WRITTEN: tuple[str, ...] = ("TIMESTAMP", "TIMESTAMP_START", "TIMESTAMP_END")


def _read_csv(source: Path, columns: Collection[str] | None = None) -> pd.DataFrame:
    """A CSV with its text columns (:data:`kgml_peft.schema.TEXT_COLUMNS`) read as written: pandas
    would guess ``001`` to be the number 1, ``1e3`` 1000.0, ``TRUE`` a boolean and ``NA`` or
    ``null`` missing, merging or losing sites. Only an empty cell is missing there; every other
    column keeps pandas' type guessing and missing-value spellings."""
    first = pd.read_csv(source, nrows=1, header=None, dtype=str, keep_default_na=False)
    names = first.iloc[0].tolist() if len(first) else []
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # pandas would rename the second copy (X.1) and a reader would silently use one of them
        raise KgmlPeftError(f"{source}: column {twice[0]} appears {names.count(twice[0])} times in the "
                            "header; keep one")
    header = pd.read_csv(source, nrows=0).columns
    if columns is not None:
        header = [c for c in header if c in columns]
        if not header:  # none of them: the caller names the column it misses
            return pd.DataFrame()
    text = [c for c in header if c in schema.TEXT_COLUMNS or c in _AS_WRITTEN]
    missing = {c: [""] if c in text else list(_NA_SPELLINGS) for c in header}
    return pd.read_csv(source, dtype={c: str for c in text}, keep_default_na=False, na_values=missing,
                       usecols=None if columns is None else header)


def _is_text(column: pd.Series) -> bool:
    """Whether every value present in ``column`` is a string (missing values are checked later)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        values = pd.Series(column.cat.categories)
    else:
        values = column.dropna()
    return values.empty or pd.api.types.infer_dtype(values, skipna=True) == "string"


def empty_cells(column: pd.Series) -> pd.Series:
    """Missing cells of an id column: NaN, or the empty string (the one spelling of missing in a
    text column)."""
    return column.isna() | (column.astype(object) == "")


def check_text_columns(frame: pd.DataFrame, source: object = None) -> None:
    """Refuse an id column (site, region, crop, adapter) stored as numbers, booleans or dates.

    Such a column cannot be turned back into the ids it came from: a site ``001`` written as an
    integer is 1, as a float 1.0, and ``1e3`` became 1000.0; converting back (even ``str(1)``,
    exact for integers) would silently give the adapter of another site or merge ``01`` with
    ``1``. So ids must be stored as text; CSV files are always read that way.
    """
    prefix = f"{source}: " if source is not None else ""
    for name in schema.TEXT_COLUMNS:
        if name in frame.columns and not _is_text(frame[name]):
            column = frame[name]
            values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
            example = next(v for v in values if not isinstance(v, str) and not pd.isna(v))
            raise KgmlPeftError(
                f"{prefix}column {name} holds {column.dtype} values such as {example!r}, not text; "
                f"store {name} ids as strings (001 and 1 are different ids) and write the table again"
            )


def read_table(path: str | os.PathLike, columns: Collection[str] | None = None) -> pd.DataFrame:
    """Read a long site-day table from CSV or Parquet (by extension), without validating it;
    ``columns``: read only those of them the file has (a file of hundreds of columns reads faster).

    Id columns (site, region, crop, adapter) come back as text exactly as written (see :func:`_read_csv`);
    a Parquet file that stores them as numbers is refused (see :func:`check_text_columns`)."""
    source = Path(path)
    check_regular_file(source, "data file")  # a FIFO would block the reader for ever
    kind = table_format(source)
    try:
        if kind == "csv":
            frame = _read_csv(source, columns)
        else:
            frame = pd.read_parquet(source)
            if columns is not None:
                frame = frame[[c for c in frame.columns if c in columns]]
    except pd.errors.EmptyDataError:
        raise KgmlPeftError(f"{source} is empty") from None
    except Exception as exc:  # pandas, csv and pyarrow each raise their own types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KgmlPeftError(f"cannot read {source} as {kind}: {first}") from None
    if frame.empty and (columns is None or len(frame.columns)):
        raise KgmlPeftError(f"{source} has no rows")
    check_text_columns(frame, source)
    return frame


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` as CSV or Parquet (by extension), atomically."""
    kind = table_format(path)
    with atomic_path(path) as tmp:
        if kind == "csv":
            frame.to_csv(tmp, index=False, date_format="%Y-%m-%d")
        else:
            frame.to_parquet(tmp, index=False)
    return Path(path)


def _missing_column(name: str, columns: Sequence[str], why: str) -> KgmlPeftError:
    # Only suggest columns that are not already contract columns under their right name
    # (``TMAX_AIR`` missing must not suggest renaming the present ``HMAX_AIR``); a match that
    # differs only in case wins over a merely similar name.
    known = {*schema.ID_COLUMNS, *schema.COLUMNS}
    candidates = [str(c) for c in columns if str(c) not in known]
    close = [c for c in candidates if c.lower() == name.lower()]
    close = close or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean to rename {close[0]!r}?" if close else ""
    return KgmlPeftError(f"missing column {name} ({why}){hint}")


def _where(frame: pd.DataFrame, bad: pd.Series) -> str:
    row = frame.loc[bad.to_numpy()].iloc[0]
    return f"site {row[schema.SITE]}, first {pd.Timestamp(row[schema.DATE]).date()}"


def _check_numeric(frame: pd.DataFrame, name: str, allow_nan: bool) -> None:
    column = frame[name]
    if column.dtype == bool or not pd.api.types.is_numeric_dtype(column):
        converted = pd.to_numeric(column, errors="coerce")
        bad = converted.isna() & column.notna()
        if bad.any():
            value = column[bad].iloc[0]
            raise KgmlPeftError(
                f"column {name} is not numeric: {bad.sum()} values such as {value!r} "
                f"({_where(frame, bad)})"
            )
        frame[name] = converted.astype("float64")
    else:
        frame[name] = column.astype("float64")
    values = frame[name]
    nan = values.isna()
    if nan.any() and not allow_nan:
        hint = f"; {_NAN_HINTS[name]}" if name in _NAN_HINTS else ""
        raise KgmlPeftError(f"column {name} has {nan.sum()} NaN values ({_where(frame, nan)}){hint}")
    inf = np.isinf(values.to_numpy())
    if inf.any():
        bad = pd.Series(inf, index=frame.index)
        raise KgmlPeftError(f"column {name} has {inf.sum()} infinite values ({_where(frame, bad)})")
    spec = schema.COLUMNS[name]
    out = (values < spec.low) | (values > spec.high)
    if out.any():
        value = values[out].iloc[0]
        hint = _UNIT_HINTS.get(name)
        unit_hint = f"; {hint}" if hint else ""
        raise KgmlPeftError(
            f"column {name} has {out.sum()} values outside [{spec.low:g}, {spec.high:g}] {spec.unit}, "
            f"e.g. {value:g} ({_where(frame, out)}){unit_hint}"
        )


def _check_constant_per_site(frame: pd.DataFrame, name: str) -> None:
    """A site property (coordinates) must have one value per site: two values mean two places, or
    two sites under one id, and every later per-site summary would pick one of them silently."""
    distinct = frame.groupby(schema.SITE, sort=False)[name].nunique()
    changing = distinct[distinct > 1]
    if len(changing):
        site = changing.index[0]
        rows = frame[frame[schema.SITE] == site].sort_values(schema.DATE, kind="stable")
        first = rows[name].iloc[0]
        other = rows[rows[name] != first].iloc[0]
        raise KgmlPeftError(  # shortest exact spelling: 41.16511 and 41.16512 must not look alike
            f"column {name} changes within site {site}: {float(first)} on "
            f"{pd.Timestamp(rows[schema.DATE].iloc[0]).date()}, {float(other[name])} on "
            f"{pd.Timestamp(other[schema.DATE]).date()}; a site is one place: give every row of the "
            f"site the same {name}, or split it into two sites"
        )


_OFFSET = r"(?:Z|[+-]\d{2}:?\d{2})$"


def parse_yyyymmdd(values: pd.Series) -> pd.Series:
    """Whole numbers YYYYMMDD (FLUXNET's TIMESTAMP) as timestamps; NaT for anything else (text,
    fractions, impossible days such as 20120231)."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    whole = np.isfinite(numbers) & (numbers == np.round(numbers)) & (numbers >= 1e7) & (numbers < 1e8)
    text = pd.Series(np.where(whole, numbers, 0).astype("int64").astype(str), index=values.index)
    return pd.to_datetime(text.where(whole), format="%Y%m%d", errors="coerce")


def _parse_dates(frame: pd.DataFrame) -> pd.Series:
    """Dates as midnight timestamps. Accepts datetimes, ISO 8601 strings (a time of day and a UTC
    offset are dropped, keeping the local date) and integers YYYYMMDD (FLUXNET's TIMESTAMP).
    Other spellings (``01/02/2003``) are refused rather than guessed: day/month order is
    ambiguous."""
    raw = frame[schema.DATE]
    if pd.api.types.is_datetime64_any_dtype(raw):
        dates = raw.dt.tz_localize(None) if raw.dt.tz is not None else raw
    elif pd.api.types.is_numeric_dtype(raw) and raw.dtype != bool:
        dates = parse_yyyymmdd(raw)
    else:
        text = raw.astype("string").str.strip().str.replace(_OFFSET, "", regex=True)
        dates = pd.to_datetime(text, format="ISO8601", errors="coerce")
    bad = dates.isna()
    if bad.any():
        row = frame.loc[bad].iloc[0]
        raise KgmlPeftError(
            f"column date has {bad.sum()} values that are not dates, e.g. '{row[schema.DATE]}' "
            f"(site {row[schema.SITE]}); use YYYY-MM-DD or YYYYMMDD"
        )
    return dates.dt.normalize()


def validate_table(
    frame: pd.DataFrame,
    features: Sequence[str],
    targets: Sequence[str] | None = None,
    require_targets: Sequence[str] = (),
) -> pd.DataFrame:
    """Check a site-day table against the data contract and return a clean, sorted copy.

    ``features`` must all be present, numeric, finite, without NaN and in physical range.
    ``targets`` (default: every known target present in the table) may hold NaN (missing
    observations are masked later) but not inf or out-of-range values. ``require_targets`` must be
    present as columns. Site coordinates (``lat``, ``lon``) are kept and checked whenever the
    table has them, features or not: in range, never NaN, one value per site. ``Crop_Type`` is
    kept whenever present (NaN allowed where it is no feature: the crop is not documented). Other
    columns are dropped. Raises :class:`KgmlPeftError` naming the column, site and date of the first problem.
    """
    columns = list(frame.columns)
    for name in schema.ID_COLUMNS:
        if name not in frame.columns:
            raise _missing_column(name, columns, "every table needs site, region and date")
    for name in features:
        if name not in frame.columns:
            raise _missing_column(name, columns, "an input of the backbone")
    for name in require_targets:
        if name not in frame.columns:
            raise _missing_column(name, columns, "a target this command needs")
    if targets is None:
        targets = [t for t in schema.TARGETS if t in frame.columns]
    coordinates = [c for c in schema.SITE_INPUTS if c in frame.columns]
    # the crop of each site-year is kept even when no feature (NaN = not documented): adapters
    # record the crops they were calibrated on and are not applied to others
    crop = ["Crop_Type"] if "Crop_Type" in frame.columns else []
    keep = list(schema.ID_COLUMNS) + list(dict.fromkeys([*features, *coordinates, *targets, *crop]))
    frame = frame[keep].copy()

    check_text_columns(frame)
    for name in (schema.SITE, schema.REGION):
        empty = empty_cells(frame[name])
        if empty.any():
            raise KgmlPeftError(f"column {name} has {empty.sum()} empty values")
        frame[name] = frame[name].astype(str)
    for site in frame[schema.SITE].unique():
        schema.check_site_id(site)
    for region in frame[schema.REGION].unique():
        if not region.strip():
            raise KgmlPeftError("column region has empty values")

    frame[schema.DATE] = _parse_dates(frame)

    dup = frame.duplicated([schema.SITE, schema.DATE], keep="first")
    if dup.any():
        raise KgmlPeftError(f"{dup.sum()} duplicate site-dates ({_where(frame, dup)})")
    regions = frame.groupby(schema.SITE)[schema.REGION].nunique()
    if (regions > 1).any():
        site = regions[regions > 1].index[0]
        raise KgmlPeftError(f"site {site} has more than one region")

    for name in features:
        _check_numeric(frame, name, allow_nan=False)
    for name in coordinates:
        if name not in features:
            _check_numeric(frame, name, allow_nan=False)
        _check_constant_per_site(frame, name)
    for name in [*targets, *crop]:
        if name not in features:
            _check_numeric(frame, name, allow_nan=True)

    days = frame.groupby(schema.SITE).size()
    short = days[days < schema.DAYS_PER_YEAR]
    if len(short):
        site = short.index[0]
        raise KgmlPeftError(
            f"site {site} has only {short.iloc[0]} days; at least one complete year "
            f"({schema.DAYS_PER_YEAR} days) is needed"
        )
    return frame.sort_values([schema.SITE, schema.DATE], kind="stable").reset_index(drop=True)


def load_table(
    path: str | os.PathLike,
    features: Sequence[str],
    targets: Sequence[str] | None = None,
    require_targets: Sequence[str] = (),
) -> pd.DataFrame:
    """Read and validate a table in one call (see :func:`read_table`, :func:`validate_table`)."""
    return validate_table(read_table(path), features, targets, require_targets)


def select_sites(frame: pd.DataFrame, selector: str | None) -> pd.DataFrame:
    """Rows of one site id or of one region label; ``None`` or ``"all"`` keeps every row."""
    if selector is None or selector == "all":
        return frame
    by_site = frame[frame[schema.SITE] == selector]
    by_region = frame[frame[schema.REGION] == selector]
    if len(by_site) and len(by_region) and set(by_region[schema.SITE]) != {selector}:
        # both readings are possible and select different rows (and both would write the adapter
        # file <selector>.safetensors): guessing would calibrate or score the wrong thing
        others = by_region[schema.SITE].nunique() - (1 if (by_region[schema.SITE] == selector).any() else 0)
        raise KgmlPeftError(f"{selector!r} is both a site and a region (of {others} other sites); "
                            "rename the site or the region in the data")
    if len(by_site):
        return by_site.reset_index(drop=True)
    if len(by_region):
        return by_region.reset_index(drop=True)
    sites = sorted(frame[schema.SITE].unique())
    regions = sorted(frame[schema.REGION].unique())
    raise KgmlPeftError(
        f"unknown site or region {selector!r}; the data has regions {', '.join(regions)} "
        f"and {len(sites)} sites (e.g. {', '.join(sites[:3])})"
    )
