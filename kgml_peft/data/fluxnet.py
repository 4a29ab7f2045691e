"""FLUXNET files -> a long site-day table in the data contract.

Reads the ONEFlux products a flux scientist downloads (see :mod:`kgml_peft.data.flux_files` for
the names: FLUXNET2015, AmeriFlux FLUXNET and ICOS ETC L2 FLUXNET files, FULLSET or SUBSET), daily
(``DD``) files as they are and half-hourly or hourly ones aggregated to days first
(:mod:`kgml_peft.data.subdaily`), and converts the daily values:

=====================  ==============================  =========================================
FLUXNET column         contract column                 conversion
=====================  ==============================  =========================================
``TIMESTAMP``          ``date``                        YYYYMMDD, local standard time
``SW_IN_F``            ``RADN``                        W m-2 daily mean x 0.0864 = MJ m-2 d-1
``TA_F``               ``TAVG_AIR``                    degC
``TA_F_MAX``           ``TMAX_AIR``                    degC
``TA_F_MAX/_MIN``      ``TDIF_AIR``                    max - min, degC
``VPD_F``              ``VPD_AIR``                     hPa
``VPD_F_MAX``          ``VPDMAX_AIR``                  hPa
``P_F``                ``PRECN``                       mm d-1 (daily sum in DD files)
``WS_F``               ``WIND``                        m s-1
``GPP_NT_VUT_REF``     ``GPP`` (input, as in KGML-ag)  gC m-2 d-1 (``gpp="DT"``: ``GPP_DT_VUT_REF``)
``NEE_VUT_REF``        ``NEE`` (target)                gC m-2 d-1, masked where QC < ``min_qc``
``RECO_NT_VUT_REF``    ``Reco`` (target)               gC m-2 d-1, masked with NEE
``NEE_VUT_REF_QC``     ``NEE_QC``                      share of the day measured (0..1; see below)
=====================  ==============================  =========================================

Site metadata adds each site's region, static soil columns and coordinates (``lat``, ``lon``); a
crops table (``site``, ``year``, ``crop``) adds ``Crop_Type`` per site-year, NaN where the crop is
not documented (a backbone with ``Crop_Type`` among its features refuses such a table).

``-9999`` is missing. Targets stay missing (masked in losses and metrics). Inputs must be complete
for a backbone, so a gap of at most ``max_gap`` days is filled by linear interpolation and a year
with a longer gap is left out; both are recorded in the import report. ``NEE_gapfilled`` and
``Reco_gapfilled`` keep ONEFlux's gap-filled values of every day (for annual sums); the contract
ignores them. Columns the importer does not know are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kgml_peft import schema
from kgml_peft.data.flux_files import FluxFile, expand_paths
from kgml_peft.data.subdaily import QC_COLUMN, SubDailyInfo, check_years, flux_values, read_sub_daily
from kgml_peft.data.tables import (check_text_columns, empty_cells, parse_yyyymmdd, read_table,
                                   validate_table)
from kgml_peft.errors import KgmlPeftError

#: W m-2 averaged over a day -> MJ m-2 d-1 (86400 s / 1e6).
W_M2_TO_MJ_DAY = 0.0864

#: Inputs copied (after a unit conversion) from one FLUXNET column.
_DIRECT = {"RADN": ("SW_IN_F", W_M2_TO_MJ_DAY), "TAVG_AIR": ("TA_F", 1.0),
           "TMAX_AIR": ("TA_F_MAX", 1.0), "VPD_AIR": ("VPD_F", 1.0),
           "VPDMAX_AIR": ("VPD_F_MAX", 1.0), "PRECN": ("P_F", 1.0), "WIND": ("WS_F", 1.0)}
_REQUIRED = ("TIMESTAMP", "NEE_VUT_REF")
GAPFILLED = ("NEE_gapfilled", "Reco_gapfilled")


#: ``ImportOptions.qc_counts`` -> the highest sub-daily QC flag counted as measured
_QC_COUNTS = {"measured": 0, "good": 1}


@dataclass(frozen=True)
class ImportOptions:
    """How to import: QC threshold, GPP partitioning and the longest input gap to fill."""

    #: NEE and Reco are masked on days whose NEE QC (share of the day measured) is below this.
    min_qc: float = 0.5
    #: ``NT`` (night-time partitioning, consistent with RECO_NT = GPP_NT + NEE) or ``DT``.
    gpp: str = "NT"
    #: longest run of missing input days filled by linear interpolation; longer gaps drop the year.
    max_gap: int = 7
    #: sub-daily files: which records the daily NEE QC counts as measured: ``measured`` (flag 0,
    #: as the ../shared files) or ``good`` (flags 0 and 1, as official daily files count).
    qc_counts: str = "measured"

    def __post_init__(self) -> None:
        if isinstance(self.min_qc, bool) or not isinstance(self.min_qc, (int, float)) \
                or not 0.0 <= self.min_qc <= 1.0:
            raise KgmlPeftError(f"min_qc must be a number in [0, 1], got {self.min_qc!r}")
        if self.gpp not in ("NT", "DT"):
            raise KgmlPeftError(f"gpp must be NT or DT, got {self.gpp!r}")
        if isinstance(self.max_gap, bool) or not isinstance(self.max_gap, int) or self.max_gap < 0:
            raise KgmlPeftError(f"max_gap must be a non-negative integer, got {self.max_gap!r}")
        if self.qc_counts not in _QC_COUNTS:
            raise KgmlPeftError(f"qc_counts must be measured or good, got {self.qc_counts!r}")


@dataclass
class SiteReport:
    """What the import did to one file: rows, what was missing, masked, filled and dropped."""

    site: str
    region: str
    file: str
    rows: int
    first_date: str
    last_date: str
    inputs: list[str]
    #: FLUXNET columns the file lacks (among those the importer reads)
    absent_columns: list[str]
    #: -9999 (or empty) cells per FLUXNET column read, in the whole file (records of a sub-daily one)
    missing_values: dict[str, int]
    #: days absent from the file between its first and last day
    missing_days: int
    #: rows written whose NEE and Reco were masked because NEE QC < min_qc
    qc_masked_days: int
    #: rows written with an observed (unmasked) NEE
    observed_nee_days: int
    #: rows written with an interpolated value, per input column
    filled_days: dict[str, int]
    #: calendar years left out because an input gap was longer than max_gap
    dropped_years: list[int] = field(default_factory=list)
    #: years written whose crop the crops table does not give (Crop_Type NaN); empty without one
    unknown_crop_years: list[int] = field(default_factory=list)
    #: what the file is, e.g. ``AmeriFlux FLUXNET FULLSET, half-hourly``
    product: str = ""
    #: sub-daily files: records read (0 for a daily file)
    records: int = 0
    #: sub-daily files: days whose values are missing because a record was absent or -9999
    incomplete_days: int = 0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def read_site_meta(path: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """Per-site metadata (a table file or a DataFrame), checked: ``site`` and ``region`` columns,
    optionally static soil inputs (``TSAND``, ...) and coordinates (``lat``, ``lon``, in range),
    one row per site; other columns (``igbp``, ``management``, ...) are ignored. Returns it indexed
    by site."""
    meta = path.reset_index(drop=schema.SITE in path.columns) if isinstance(path, pd.DataFrame) \
        else read_table(path)
    path = "site metadata" if isinstance(path, pd.DataFrame) else path
    for name in (schema.SITE, schema.REGION):
        if name not in meta.columns:
            raise KgmlPeftError(f"{path}: missing column {name} (site metadata needs site and region)")
    check_text_columns(meta, path)
    if any(empty_cells(meta[name]).any() for name in (schema.SITE, schema.REGION)):
        raise KgmlPeftError(f"{path}: empty site or region values")
    meta = meta.assign(site=meta[schema.SITE].astype(str), region=meta[schema.REGION].astype(str))
    dup = meta[schema.SITE].duplicated()
    if dup.any():
        raise KgmlPeftError(f"{path}: site {meta.loc[dup, schema.SITE].iloc[0]} is listed twice")
    for site in meta[schema.SITE]:
        schema.check_site_id(site)
    for region in meta[schema.REGION]:
        if not region.strip():
            raise KgmlPeftError(f"{path}: empty region label")
    static = [c for c in meta.columns if c in schema.COLUMNS and schema.COLUMNS[c].static]
    for name in static:
        values = pd.to_numeric(meta[name], errors="coerce")
        bad = values.isna()
        if bad.any():
            raise KgmlPeftError(f"{path}: column {name} needs a number for every site; site "
                                f"{meta.loc[bad, schema.SITE].iloc[0]} has {meta.loc[bad, name].iloc[0]!r}")
        meta[name] = values.astype("float64")
    for name in (c for c in static if c in schema.SITE_INPUTS):
        _check_coordinate(meta, name, path)
    return meta[[schema.SITE, schema.REGION, *static]].set_index(schema.SITE)


def _check_coordinate(meta: pd.DataFrame, name: str, path: object) -> None:
    """Refuse a coordinate out of range here, naming the metadata file, rather than later in the
    imported table, where the message could only name the site."""
    spec = schema.COLUMNS[name]
    values = meta[name]
    out = (values < spec.low) | (values > spec.high) | np.isinf(values)
    if out.any():
        raise KgmlPeftError(f"{path}: column {name} must be in [{spec.low:g}, {spec.high:g}] "
                            f"({spec.unit}, WGS84); site {meta.loc[out, schema.SITE].iloc[0]} has "
                            f"{values[out].iloc[0]:g}")


def read_crops(path: str | os.PathLike | pd.DataFrame) -> pd.Series:
    """The crop of each documented site-year (a table file or a DataFrame with ``site``, ``year``,
    ``crop``), as ``Crop_Type`` codes (see :data:`kgml_peft.schema.CROP_CODES`; names are case
    insensitive), indexed by (site, year). Unknown crop names, site-years listed twice, years that
    are not whole numbers and unsafe site ids are refused: a wrong crop would silently change an
    input of the backbone."""
    table = path.reset_index(drop=True) if isinstance(path, pd.DataFrame) else read_table(path)
    source = "crops table" if isinstance(path, pd.DataFrame) else path
    for name in (schema.SITE, "year", "crop"):
        if name not in table.columns:
            raise KgmlPeftError(f"{source}: missing column {name} (a crops table needs site, year, crop)")
    check_text_columns(table, source)
    for name in (schema.SITE, "year", "crop"):
        empty = empty_cells(table[name])
        if empty.any():
            where = "" if name == schema.SITE else f", first at site {table.loc[empty, schema.SITE].iloc[0]}"
            raise KgmlPeftError(f"{source}: column {name} has {empty.sum()} empty values{where}")
    sites = table[schema.SITE].astype(str)
    for site in sites.unique():
        try:
            schema.check_site_id(site)
        except KgmlPeftError as exc:
            raise KgmlPeftError(f"{source}: {exc}") from None
    years = _whole_years(table, sites, source)
    crops = table["crop"].astype(str).str.strip().str.lower()
    unknown = ~crops.isin(list(schema.CROP_CODES))
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        known = ", ".join(f"{name} ({code:g})" for name, code in schema.CROP_CODES.items())
        raise KgmlPeftError(f"{source}: unknown crop {table['crop'].iloc[i]!r} (site {sites.iloc[i]}, "
                            f"year {years.iloc[i]}); known crops (Crop_Type): {known}; leave other "
                            "crops out, their Crop_Type is unknown")
    index = pd.MultiIndex.from_arrays([sites, years], names=[schema.SITE, "year"])
    twice = index.duplicated()
    if twice.any():
        site, year = index[twice][0]
        raise KgmlPeftError(f"{source}: site {site}, year {year} is listed twice; give one crop per "
                            "site-year")
    return pd.Series(crops.map(schema.CROP_CODES).to_numpy(dtype="float64"), index=index,
                     name="Crop_Type")


def _whole_years(table: pd.DataFrame, sites: pd.Series, source: object) -> pd.Series:
    """The ``year`` column as integers; text, fractions and years outside the contract's ``Year``
    range are refused (a year that matches no data would just leave its crop unknown)."""
    spec = schema.COLUMNS["Year"]
    numbers = pd.to_numeric(table["year"], errors="coerce").astype("float64")
    bad = ~(np.isfinite(numbers) & (numbers == np.round(numbers))
            & (numbers >= spec.low) & (numbers <= spec.high))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise KgmlPeftError(f"{source}: column year needs whole years in [{spec.low:g}, {spec.high:g}]; "
                            f"site {sites.iloc[i]} has {str(table['year'].iloc[i])!r}")
    return numbers.astype("int64")


def read_daily(path: str | os.PathLike) -> pd.DataFrame:
    """One daily FLUXNET CSV as read (``-9999`` still in place); unreadable files are refused."""
    source = Path(path)
    if source.suffix.lower() != ".csv":
        raise KgmlPeftError(f"{source.name}: FLUXNET files are .csv")
    frame = read_table(source)  # refuses missing, empty, header-only and unreadable files
    if "TIMESTAMP_START" in frame.columns and "TIMESTAMP" not in frame.columns:
        raise KgmlPeftError(f"{source.name} is named daily (DD) but has TIMESTAMP_START (sub-daily "
                            "records); keep the name it was downloaded with (_HH_ or _HR_)")
    for name in _REQUIRED:
        if name not in frame.columns:
            raise KgmlPeftError(f"{source.name}: missing column {name}")
    return frame


def read_flux_file(flux: FluxFile, options: ImportOptions = ImportOptions()) -> tuple[pd.DataFrame, SubDailyInfo | None]:
    """A file's daily values under the daily files' column names: a daily file as read, a
    half-hourly or hourly one aggregated (with what the aggregation found; None for a daily file)."""
    if flux.sub_daily:
        return read_sub_daily(flux.path, flux.resolution, _QC_COUNTS[options.qc_counts])
    return read_daily(flux.path), None


def _dates(frame: pd.DataFrame, file: str) -> pd.Series:
    dates = parse_yyyymmdd(frame["TIMESTAMP"])
    bad = dates.isna()
    if bad.any():
        raise KgmlPeftError(f"{file}: column TIMESTAMP has {bad.sum()} values that are not days "
                            f"(YYYYMMDD), e.g. {str(frame.loc[bad, 'TIMESTAMP'].iloc[0])!r}")
    check_years(dates, "TIMESTAMP", file)
    dup = dates.duplicated()
    if dup.any():
        raise KgmlPeftError(f"{file}: day {dates[dup].iloc[0].date()} appears twice")
    return dates


def _fill(values: pd.Series, max_gap: int) -> pd.Series:
    """Fill runs of at most ``max_gap`` missing days: linear interpolation inside the record, the
    nearest value at its first or last days."""
    missing = values.isna()
    if not missing.any() or max_gap == 0:
        return values
    run = (missing != missing.shift()).cumsum()
    length = missing.groupby(run).transform("size")
    fillable = missing & (length <= max_gap)
    filled = values.interpolate(limit_area="inside").ffill().bfill()
    return values.where(~fillable, filled)


def convert(raw: pd.DataFrame, site: str, region: str, options: ImportOptions = ImportOptions(),
            file: str = "") -> tuple[pd.DataFrame, SiteReport]:
    """One site's FLUXNET2015 daily rows -> contract rows and the import report (see module
    docstring). Every input that can be derived from the file is written."""
    file = file or site
    dates = _dates(raw, file)
    order = np.argsort(dates.to_numpy(), kind="stable")
    raw, dates = raw.iloc[order].reset_index(drop=True), dates.iloc[order].reset_index(drop=True)
    gpp_col = f"GPP_{options.gpp}_VUT_REF"
    reco_col = f"RECO_{options.gpp}_VUT_REF"
    if gpp_col not in raw.columns:
        raise KgmlPeftError(f"{file}: missing column {gpp_col} (GPP is an input of every backbone)")
    if reco_col not in raw.columns:
        other = "NT" if options.gpp == "DT" else "DT"
        raise KgmlPeftError(f"{file}: missing column {reco_col} (the Reco target of the {options.gpp} "
                            f"partitioning, which also gives GPP); try --gpp {other}")
    if options.min_qc > 0 and QC_COLUMN not in raw.columns:
        raise KgmlPeftError(f"{file}: missing column {QC_COLUMN}; import with min_qc 0 "
                            "(--min-qc 0) to keep every NEE value unmasked")
    wanted = ["NEE_VUT_REF", QC_COLUMN, gpp_col, reco_col, "TA_F_MIN",
              *(col for col, _ in _DIRECT.values())]
    read = {name: flux_values(raw, name, file) for name in dict.fromkeys(wanted) if name in raw.columns}
    absent = [name for name in dict.fromkeys(wanted) if name not in raw.columns]

    if QC_COLUMN in read:
        qc_values = read[QC_COLUMN]
        outside = (qc_values < 0) | (qc_values > 1)
        if outside.any():
            raise KgmlPeftError(f"{file}: column {QC_COLUMN} has {outside.sum()} values outside [0, 1], "
                                f"e.g. {qc_values[outside].iloc[0]:g} on {dates[outside].iloc[0].date()} "
                                "(it is the share of the day measured, 0-1, not a percentage)")
    if "TA_F_MAX" in read and "TA_F_MIN" in read:
        reversed_ = read["TA_F_MAX"] < read["TA_F_MIN"]
        if reversed_.any():
            raise KgmlPeftError(f"{file}: TA_F_MAX is below TA_F_MIN on {reversed_.sum()} days, first "
                                f"{dates[reversed_].iloc[0].date()}")
    # every day from the first to the last, so gaps in the file become missing days
    index = pd.date_range(dates.iloc[0], dates.iloc[-1], freq="D")
    cols = {name: pd.Series(values.to_numpy(), index=dates).reindex(index)
            for name, values in read.items()}
    missing_days = len(index) - len(dates)
    out = pd.DataFrame(index=index)
    for target, (source, factor) in _DIRECT.items():
        if source in cols:
            out[target] = cols[source] * factor
    if "TMAX_AIR" in out and "TA_F_MIN" in cols:
        out["TDIF_AIR"] = cols["TA_F_MAX"] - cols["TA_F_MIN"]
    out["GPP"] = cols[gpp_col]
    inputs = [c for c in schema.ALL_INPUTS if c in out.columns]

    nee, reco = cols["NEE_VUT_REF"], cols[reco_col]
    qc = cols.get(QC_COLUMN, pd.Series(np.nan, index=index))
    low_qc = (qc < options.min_qc) | (qc.isna() & (options.min_qc > 0))
    out["NEE"] = nee.mask(low_qc)
    out["Reco"] = reco.mask(low_qc)
    out["NEE_QC"] = qc
    out[GAPFILLED[0]], out[GAPFILLED[1]] = nee, reco

    was_filled = pd.DataFrame(False, index=index, columns=inputs)
    for name in inputs:
        before = out[name].isna()
        out[name] = _fill(out[name], options.max_gap)
        was_filled[name] = before & out[name].notna()
    incomplete = out[inputs].isna().any(axis=1)
    dropped = sorted({int(y) for y in out.index[incomplete].year})
    kept = ~out.index.year.isin(dropped)
    out, was_filled, low_qc, nee = out[kept], was_filled[kept], low_qc[kept], nee[kept]
    filled = {name: int(n) for name, n in was_filled.sum().items() if n}
    if out.empty:
        raise KgmlPeftError(f"{file}: every year has an input gap longer than {options.max_gap} days")
    out = out.rename_axis(schema.DATE).reset_index()
    out.insert(0, schema.REGION, region)
    out.insert(0, schema.SITE, site)
    report = SiteReport(
        site=site, region=region, file=file, rows=len(out),
        first_date=str(out[schema.DATE].iloc[0].date()), last_date=str(out[schema.DATE].iloc[-1].date()),
        inputs=inputs, absent_columns=absent,
        missing_values={name: int(values.isna().sum()) for name, values in read.items()},
        missing_days=int(missing_days), qc_masked_days=int((low_qc & nee.notna()).sum()),
        observed_nee_days=int(out["NEE"].notna().sum()), filled_days=filled, dropped_years=dropped)
    return out, report


def import_fluxnet(
    paths: Sequence[str | os.PathLike | FluxFile],
    site_meta: str | os.PathLike | pd.DataFrame | None = None,
    options: ImportOptions = ImportOptions(),
    crops: str | os.PathLike | pd.DataFrame | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, list[SiteReport]]:
    """Import FLUXNET files (or folders of them) into one validated contract table.

    Files are FLUXNET2015, AmeriFlux FLUXNET, ICOS L2 FLUXNET or FLUXNET FLUXMET files, daily or
    sub-daily (see :func:`~kgml_peft.data.flux_files.expand_paths`; a folder gives one file per
    site). The site id comes from each file name; the region from ``site_meta`` (a table with ``site``
    and ``region``, optionally static soil columns and ``lat``/``lon``) or, for a site it does not
    list, the site id. ``crops`` (see :func:`read_crops`) adds ``Crop_Type``: the documented crop of
    each site-year, NaN where it is unknown. Only inputs every file provides are kept (coordinates
    too: a site without a metadata row leaves them out of the table). Returns the table (sorted by
    site, date) and one :class:`SiteReport` per file. ``progress``: a bar over the files.
    """
    files = expand_paths(paths)
    meta = None if site_meta is None else read_site_meta(site_meta)
    crop_codes = None if crops is None else read_crops(crops)
    crop_sites = None if crop_codes is None else crop_codes.index.get_level_values(schema.SITE).unique()
    # soil must be known at every site; coordinates may be missing (then they are left out)
    soil = [] if meta is None else [c for c in meta.columns.drop(schema.REGION)
                                    if c not in schema.SITE_INPUTS]
    frames, reports = [], []
    for flux in (tqdm(files, desc="import", unit="file", leave=False) if progress else files):
        site = flux.site
        listed = meta is not None and site in meta.index
        if meta is not None and not listed:
            _check_case(site, meta.index, "the site metadata")
        if crop_sites is not None and site not in crop_sites:
            _check_case(site, crop_sites, "the crops table")
        if soil and not listed:
            raise KgmlPeftError(f"the site metadata gives {', '.join(soil)} "
                                f"but has no row for site {site}; add one")
        region = str(meta.loc[site, schema.REGION]) if listed else site
        raw, info = read_flux_file(flux, options)
        frame, report = convert(raw, site, region, options, flux.path.name)
        report.product = flux.label
        if info is not None:  # a half-hourly or hourly file: what its records were
            report.product = replace(flux, resolution=info.resolution).label
            report.records, report.incomplete_days = info.records, info.incomplete_days
            report.missing_values = info.missing_records
        if listed:
            for name in meta.columns.drop(schema.REGION):
                frame[name] = float(meta.loc[site, name])
                report.inputs.append(name)
        if crop_codes is not None:
            _add_crop_type(frame, report, crop_codes)
        frames.append(frame)
        reports.append(report)
    common = [c for c in schema.ALL_INPUTS if all(c in f.columns for f in frames)]
    for frame, report in zip(frames, reports):
        report.inputs = [c for c in report.inputs if c in common]
    # Crop_Type may be unknown (NaN): checked as an input only where a backbone uses it
    checked_inputs = [c for c in common if c != "Crop_Type"]
    extra = [*(["Crop_Type"] if "Crop_Type" in common else []), *GAPFILLED, "NEE_QC"]
    table = pd.concat([f[[*schema.ID_COLUMNS, *common, "NEE", "Reco", *GAPFILLED, "NEE_QC"]]
                       for f in frames], ignore_index=True)
    checked = validate_table(table, checked_inputs, targets=["NEE", "Reco"])
    extra = [c for c in extra if c not in checked.columns]  # validate_table keeps Crop_Type
    joined = checked.join(table.set_index([schema.SITE, schema.DATE])[extra], on=[schema.SITE, schema.DATE])
    return joined[[*schema.ID_COLUMNS, *common, "NEE", "Reco", *GAPFILLED, "NEE_QC"]], reports


def _check_case(site: str, listed: pd.Index, table: str) -> None:
    """Refuse a table that spells ``site`` in another case only: ids are matched literally, so its
    rows would silently not apply (no region, coordinates or crop)."""
    other = [str(s) for s in listed if str(s) != site and str(s).upper() == site.upper()]
    if other:
        raise KgmlPeftError(f"{table} lists site {other[0]}, the file's name has {site}: ids are matched "
                            "literally; spell them the same")


def _add_crop_type(frame: pd.DataFrame, report: SiteReport, crop_codes: pd.Series) -> None:
    """Write one site's ``Crop_Type`` (the crop of each day's year; NaN where the crops table does
    not list the year) and record the unknown years in its report."""
    site = str(frame[schema.SITE].iloc[0])
    years = frame[schema.DATE].dt.year
    keys = pd.MultiIndex.from_arrays([np.full(len(frame), site, dtype=object), years])
    frame["Crop_Type"] = crop_codes.reindex(keys).to_numpy(dtype="float64")
    report.inputs.append("Crop_Type")
    report.unknown_crop_years = sorted({int(y) for y in years[frame["Crop_Type"].isna()]})
