"""``kgml-peft predict`` as functions: a site-day table in, daily fluxes and annual yield out.

Each complete site-year of the table is predicted with the adapter its rows select (one adapter
for every row, or the adapter named by each row's site or region) through an
:class:`~kgml_peft.serve.bank.AdapterBank`, so a table of many sites runs as mixed-site batches.
The output has one row per predicted day: ``site``, ``date``, ``Ra``, ``Rh``, ``Reco``, ``NEE``
(gC m-2 d-1), ``Yield`` (t ha-1, on each year's last day, empty elsewhere) and ``adapter`` (the
adapter used, empty where the backbone served the row).

With ``interval`` (a coverage level such as 0.9) every adapter's members run as rows of one mixed
batch and ``NEE_lo``, ``NEE_hi``, ``Reco_lo``, ``Reco_hi`` bound each day; the annual table
(:func:`annual_table`) sums NEE and Reco per site-year, with bounds at the same level
(:mod:`kgml_peft.uncertainty`). Intervals need adapters written by a cross-validated calibration
(they carry the conformal widths); any other row is refused.

With ``neighbours`` (k) and ``site_column = "site"``, a site without an adapter of its own gets a
blend of the k calibrated adapters nearest to it (its ``lat``/``lon`` in the table; see
:mod:`kgml_peft.store.blend`), flagged in the ``adapter`` column as ``blend:A+B+C``; a site with no
adapter within ``max_km`` keeps the backbone (or raises with ``require_adapter``).

A cross-validated adapter records the crops (``Crop_Type``) of its calibration years; a site-year
whose table documents another crop is served by the backbone (``adapter`` empty; with intervals,
the global model's widths that the adapter stores). Tables without ``Crop_Type``, or with NaN
there, put no limit.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from kgml_peft import schema, uncertainty
from kgml_peft.atomic import check_outputs
from kgml_peft.data.tables import load_table, table_format, validate_table, write_table
from kgml_peft.data.windows import YearWindows, make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.data.places import NoneInRange, check_neighbour_settings, site_points
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.store.probe import backbone_name, check_backbone_outputs, check_windows
from kgml_peft.store.blend import blend_adapters, choose_neighbours, located_adapters

#: Output columns, in order.
OUTPUT_COLUMNS: tuple[str, ...] = ("site", "date", "Ra", "Rh", "Reco", "NEE", "Yield", "adapter")
#: Interval columns added with an interval level, after ``adapter``.
INTERVAL_COLUMNS: tuple[str, ...] = tuple(f"{t}_{side}" for t in uncertainty.INTERVAL_TARGETS
                                          for side in ("lo", "hi"))
#: Columns of the annual table (``*_lo``/``*_hi`` only with an interval level).
ANNUAL_COLUMNS: tuple[str, ...] = ("site", "year", "adapter", "days", "NEE", "NEE_lo", "NEE_hi",
                                   "Reco", "Reco_lo", "Reco_hi", "level")
#: Columns whose value may pick each row's adapter.
SITE_COLUMNS: tuple[str, ...] = (schema.SITE, schema.REGION)


@dataclass
class Prediction:
    """A prediction table and what served it.

    ``used`` maps adapter names to the site-years they predicted, ``missing`` the adapter names
    that did not exist to the site-years the backbone predicted instead; ``dropped`` lists the
    incomplete (site, year, days) left out.
    """

    frame: pd.DataFrame
    used: dict[str, int] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    dropped: list[tuple[str, int, int]] = field(default_factory=list)
    site_years: int = 0
    #: per site-year annual NEE and Reco sums (gC m-2 yr-1), with bounds when ``level`` is set
    annual: pd.DataFrame | None = None
    level: float | None = None
    #: adapter name -> site-years of crops it was not calibrated on (the backbone served them)
    other_crop: dict[str, int] = field(default_factory=dict)
    #: site -> the blend of neighbours that served it (``neighbours``), with its sources' weights
    blended: dict[str, dict] = field(default_factory=dict)

#: Most site-years in one forward pass (a bound, so that a typo is refused, not allocated)
MAX_BATCH = 100_000


def predict_table(bank: AdapterBank, table: pd.DataFrame, *, site: str | None = None,
                  site_column: str | None = None, require_adapter: bool = False,
                  batch_size: int = 64, strategy: str | None = None,
                  progress: bool = False, interval: float | None = None,
                  neighbours: int | None = None, max_km: float | None = None) -> Prediction:
    """Predict every complete site-year of ``table`` (a DataFrame in the data contract).

    ``site`` applies that adapter to every row (it must exist); ``site_column`` (``site`` or
    ``region``) takes each row's adapter from that column, and rows whose adapter does not exist
    use the backbone (or raise with ``require_adapter``); neither predicts with the backbone.
    ``interval`` (a level in (0, 1)) adds daily and annual bounds; ``neighbours`` serves sites
    without an adapter with a blend of their nearest ones, pinned in ``bank`` under their
    ``blend:...`` labels (see module docstring).
    """
    if interval is not None:
        interval = uncertainty.check_level(interval)
    if site is not None and site_column is not None:
        raise KgmlPeftError("give --site or --site-column, not both")
    if site_column is not None and site_column not in SITE_COLUMNS:
        raise KgmlPeftError(f"--site-column must be one of {', '.join(SITE_COLUMNS)}, got {site_column!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise KgmlPeftError(f"batch size must be an integer in [1, {MAX_BATCH}], got {batch_size!r}")
    if neighbours is not None:
        check_neighbour_settings(neighbours, max_km)
        if site_column != schema.SITE:
            raise KgmlPeftError("--neighbours needs --site-column site: each field is blended from "
                                "the adapters nearest to its own coordinates")
        if bank.store is None:
            raise KgmlPeftError("--neighbours needs an adapter store to take the neighbours from")
    elif max_km is not None:
        raise KgmlPeftError("--max-km applies to --neighbours; give both")
    features = bank.backbone.config.features
    table = validate_table(table, features, targets=[])
    points = site_points(table) if neighbours is not None else {}
    if neighbours is not None and not points:
        raise KgmlPeftError("--neighbours needs the table's lat and lon columns (each field's coordinates)")
    if site is not None:
        bank.get(site)  # must be a safe name, exist and fit the backbone, before any work
    windows = make_windows(table, features)
    if site is not None:
        wanted = np.full(len(windows), site, dtype=object)
    elif site_column is not None:
        wanted = (windows.sites if site_column == schema.SITE else windows.regions).astype(object)
    else:
        wanted = np.full(len(windows), None, dtype=object)
    names = list(dict.fromkeys(n for n in wanted if n is not None))
    # a name that is not a safe site id (a region label "Corn Belt") cannot have an adapter file
    absent = [n for n in names if not bank.has(n)]
    blended = neighbour_blends(bank, {n: points[n] for n in absent}, neighbours, max_km) if neighbours else {}
    absent = [n for n in absent if n not in blended]
    if absent and require_adapter:
        raise KgmlPeftError(
            f"{len(absent)} of {len(names)} adapters named by column {site_column} are not in the "
            f"store (first: {absent[0]}){' or a neighbour within --max-km' if neighbours else ''}; "
            "add them or drop --require-adapter to use the backbone there")
    missing_set = set(absent)
    served = np.array([None if n in missing_set else blended[n]["adapter"] if n in blended else n
                       for n in wanted], dtype=object)
    served_windows = serve_windows(bank, windows, served, interval=interval, batch_size=batch_size,
                                   strategy=strategy, progress=progress)
    out, chosen, outside, widths = (served_windows.out, served_windows.chosen, served_windows.outside,
                                    served_windows.widths)
    check_windows(out, list(chosen), lambda name: _culprit(bank, name))  # nothing inf/NaN is written

    n, days = windows.dates.shape
    yield_daily = np.full((n, days), np.nan)
    yield_daily[:, -1] = out["Yield"]
    frame = pd.DataFrame({
        "site": np.repeat(windows.sites, days),
        "date": pd.to_datetime(windows.dates.reshape(-1)),
        **{name: out[name].reshape(-1) for name in ("Ra", "Rh", "Reco", "NEE")},
        "Yield": yield_daily.reshape(-1),
        "adapter": pd.array(np.repeat(chosen, days), dtype="string"),
        **({name: out[name].reshape(-1) for name in INTERVAL_COLUMNS} if interval is not None else {}),
    })
    used = Counter(n for n in chosen if n is not None)
    names = list(dict.fromkeys(n for n in served if n is not None))
    missing = Counter(n for n in wanted if n in missing_set)
    columns = list(OUTPUT_COLUMNS) + (list(INTERVAL_COLUMNS) if interval is not None else [])
    annual = annual_table(windows.sites, windows.years, served, outside, out, days, widths, interval)
    return Prediction(frame=frame[columns], used={k: used[k] for k in names if k in used},
                      missing={k: missing[k] for k in absent}, dropped=list(windows.dropped),
                      site_years=n, annual=annual, level=interval,
                      other_crop=dict(Counter(served[outside])), blended=blended)


def _culprit(bank: AdapterBank, name: str | None) -> str:
    """How an error names what computed a window: its adapter (file) or the backbone."""
    if name is None:
        return backbone_name(bank.backbone)
    path = bank.get(name).path
    return f"adapter {path if path is not None else name}"


def neighbour_blends(bank: AdapterBank, points: dict[str, tuple[float, float]], k: int,
                     max_km: float | None) -> dict[str, dict]:
    """For each site of ``points`` (site -> (lat, lon)) the function-space blend of its ``k``
    nearest adapters in ``bank.store`` within ``max_km``, pinned in ``bank`` as
    ``blend:A+B+C`` (``@site`` appended when another site's blend of the same sources differs):
    site -> {adapter, sources: {site: weight}}. Sites without a neighbour in range are left out."""
    located = located_adapters(bank.store)  # read once for every site (none: an error below)
    out: dict[str, dict] = {}
    made: dict[str, tuple[float, ...]] = {}
    for site, (lat, lon) in points.items():
        try:
            neighbours = choose_neighbours(located, bank.backbone, lat, lon, k, max_km)
        except NoneInRange:
            continue  # nothing within max_km: the backbone serves it (reported as missing)
        weights = tuple(n.weight for n in neighbours)
        label = "blend:" + "+".join(n.adapter.site for n in neighbours)
        if label in made and made[label] != weights:
            label = f"{label}@{site}"
        if label not in made:
            blend = blend_adapters(neighbours, site, bank.backbone, lat=lat, lon=lon,
                                   settings={"k": k, "max_km": max_km})
            bank.add(replace(blend, site=label))
            made[label] = weights
        out[site] = {"adapter": label, "sources": {n.adapter.site: round(n.weight, 6) for n in neighbours}}
    return out


@dataclass
class ServedWindows:
    """What :func:`serve_windows` computed: outputs per window (``*_lo``/``*_hi`` with an
    interval), the adapter each window used (None: backbone), which windows were of another crop
    than their adapter's, and the widths of each (adapter, other crop) group."""

    out: dict[str, np.ndarray]
    chosen: np.ndarray
    outside: np.ndarray
    widths: dict[tuple[str, bool], dict] | None


def serve_windows(bank: AdapterBank, windows: YearWindows, served: np.ndarray, *,
                  interval: float | None = None, batch_size: int = 64, strategy: str | None = None,
                  progress: bool = False) -> ServedWindows:
    """Predict ``windows`` with adapter ``served[i]`` on window i (None: backbone), keeping each
    cross-validated adapter to its calibration crops (another documented crop: the backbone), and
    with ``interval`` the members' daily bounds (see module docstring)."""
    served = np.asarray(served, dtype=object)
    outside = np.array([n is not None and _other_crop(bank.get(n).crops, c)
                        for n, c in zip(served, windows.crops)], dtype=bool)
    chosen = np.where(outside, None, served)
    if interval is None:
        out = bank.predict_windows(windows, list(chosen), batch_size=batch_size, strategy=strategy,
                                   progress=progress)
        return ServedWindows(out, chosen, outside, None)
    widths = _row_widths(bank, served, outside, interval)
    out = bank.predict_members(windows, list(chosen), batch_size=batch_size, strategy=strategy,
                               progress=progress)
    for target in uncertainty.INTERVAL_TARGETS:
        lo, hi = np.empty_like(out[target]), np.empty_like(out[target])
        for (name, other_crop), record in widths.items():
            rows = (served == name) & (outside == other_crop)
            lo[rows], hi[rows] = uncertainty.daily_interval(
                out[target][rows], out[f"{target}_spread"][rows], record["daily"][target], interval,
                f"adapter {name}")
        out[f"{target}_lo"], out[f"{target}_hi"] = lo, hi
    return ServedWindows(out, chosen, outside, widths)


def _other_crop(crops: tuple[float, ...] | None, crop: float) -> bool:
    """Whether a site-year of ``crop`` (NaN: not documented) lies outside an adapter's crops."""
    return crops is not None and bool(np.isfinite(crop)) and float(crop) not in crops


def _row_widths(bank: AdapterBank, served: np.ndarray, outside: np.ndarray,
                level: float) -> dict[tuple[str, bool], dict]:
    """The interval widths of each (adapter, other crop) group of rows: the adapter's own, or the
    global model's widths it stores for years of other crops. Rows without an adapter, or an
    adapter without widths, are refused; so is a level the widths cannot reach."""
    bare = int(sum(n is None for n in served))
    if bare:
        raise KgmlPeftError(
            f"--interval needs an adapter with interval widths on every row; {bare} site-years have "
            "no adapter (the backbone alone has none: calibrate those sites with --cv folds)")
    widths = {}
    for name, other_crop in dict.fromkeys(zip(served, outside)):
        record = bank.get(name).intervals
        if record is None and bank.get(name).member_weights is not None:
            raise KgmlPeftError(f"adapter {name} is a blend of neighbours; blends carry no interval widths, "
                                "so --interval cannot serve it")
        if record is None:
            raise KgmlPeftError(
                f"adapter {name} has no members or interval widths; recalibrate it with --cv folds "
                "to predict with --interval")
        if other_crop:
            record = record.get("global")
            if record is None:
                raise KgmlPeftError(f"adapter {name} has no widths for years of other crops")
        for kind in ("daily", "annual"):
            for target in uncertainty.INTERVAL_TARGETS:
                uncertainty.quantile_at(record[kind][target]["quantiles"], level, f"adapter {name}")
        widths[(name, bool(other_crop))] = record
    return widths


def annual_table(sites: np.ndarray, years: np.ndarray, served: np.ndarray, outside: np.ndarray,
                 out: dict[str, np.ndarray], days: int, widths: dict[tuple[str, bool], dict] | None,
                 level: float | None) -> pd.DataFrame:
    """One row per site-year: annual NEE and Reco sums (gC m-2 yr-1) of the daily predictions in
    ``out``, and their bounds at ``level`` from the annual widths of each row's group (see
    :func:`_row_widths`); ``adapter`` is the adapter used (empty where the backbone served)."""
    chosen = np.where(outside, None, served)
    frame = pd.DataFrame({"site": sites, "year": np.asarray(years, dtype=int),
                          "adapter": pd.array(chosen, dtype="string"), "days": days})
    for target in uncertainty.INTERVAL_TARGETS:
        total = out[target].sum(axis=1)
        frame[target] = total
        lo, hi = np.full_like(total, np.nan), np.full_like(total, np.nan)
        for (name, other_crop), record in (widths or {}).items():
            rows = (served == name) & (outside == other_crop)
            lo[rows], hi[rows] = uncertainty.annual_interval(total[rows], days, record["annual"][target],
                                                             level, f"adapter {name}")
        frame[f"{target}_lo"], frame[f"{target}_hi"] = lo, hi
    frame["level"] = np.nan if level is None else level
    return frame[list(ANNUAL_COLUMNS)]


def run_predict(*, data: str | os.PathLike | pd.DataFrame, backbone: str | os.PathLike,
                out: str | os.PathLike, site: str | None = None, site_column: str | None = None,
                store: str | os.PathLike = "adapters", require_adapter: bool = False,
                batch_size: int = 64, strategy: str | None = None, device: str = "cpu",
                force: bool = False, progress: bool = False, interval: float | None = None,
                annual: str | os.PathLike | None = None, neighbours: int | None = None,
                max_km: float | None = None) -> Prediction:
    """``kgml-peft predict``: read ``data`` (a table path or DataFrame), predict with the adapters
    of ``store`` on ``backbone`` and write ``out`` (.csv or .parquet) atomically, and the annual
    table to ``annual`` if given. ``interval`` adds bounds at that level and ``neighbours``/``max_km``
    blend the nearest adapters for sites without one (see :func:`predict_table`). Every check runs
    before an output is written; an existing output is replaced only with ``force``, and no output
    may be the input table or the other output."""
    if interval is not None:
        interval = uncertainty.check_level(interval)
    if neighbours is not None:
        check_neighbour_settings(neighbours, max_km)
    target = Path(out)
    targets = [target] + ([Path(annual)] if annual is not None else [])
    for path in targets:
        table_format(path)
    check_outputs(targets, [backbone, *([data] if not isinstance(data, pd.DataFrame) else [])], force)
    store_path = Path(store)
    needs_store = site is not None or site_column is not None or store_path.is_dir()
    bank = AdapterBank(backbone, store_path if needs_store else None, device=device)  # checks the folder
    check_backbone_outputs(bank.backbone)
    features = bank.backbone.config.features
    table = data if isinstance(data, pd.DataFrame) else load_table(data, features, targets=[])
    prediction = predict_table(bank, table, site=site, site_column=site_column,
                               require_adapter=require_adapter, batch_size=batch_size,
                               strategy=strategy, progress=progress, interval=interval,
                               neighbours=neighbours, max_km=max_km)
    write_table(prediction.frame, target)
    if annual is not None:
        write_table(prediction.annual, Path(annual))
    return prediction
