"""``kgml-peft predict`` as functions: a site-day table in, daily fluxes and annual yield out.

Each complete site-year of the table is predicted with the adapter its rows select (one adapter
for every row, or the adapter named by each row's site or region) through an
:class:`~kgml_peft.serve.bank.AdapterBank`, so a table of many sites runs as mixed-site batches.
The output has one row per predicted day: ``site``, ``date``, ``Ra``, ``Rh``, ``Reco``, ``NEE``
(gC m-2 d-1), ``Yield`` (t ha-1, on each year's last day, empty elsewhere) and ``adapter`` (the
adapter used, empty where the backbone served the row).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kgml_peft import schema
from kgml_peft.data.tables import load_table, table_format, validate_table, write_table
from kgml_peft.data.windows import make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.store.library import writable_target

#: Output columns, in order.
OUTPUT_COLUMNS: tuple[str, ...] = ("site", "date", "Ra", "Rh", "Reco", "NEE", "Yield", "adapter")
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


def predict_table(bank: AdapterBank, table: pd.DataFrame, *, site: str | None = None,
                  site_column: str | None = None, require_adapter: bool = False,
                  batch_size: int = 64, strategy: str | None = None,
                  progress: bool = False) -> Prediction:
    """Predict every complete site-year of ``table`` (a DataFrame in the data contract).

    ``site`` applies that adapter to every row (it must exist); ``site_column`` (``site`` or
    ``region``) takes each row's adapter from that column, and rows whose adapter does not exist
    use the backbone (or raise with ``require_adapter``); neither predicts with the backbone.
    """
    if site is not None and site_column is not None:
        raise KgmlPeftError("give --site or --site-column, not both")
    if site_column is not None and site_column not in SITE_COLUMNS:
        raise KgmlPeftError(f"--site-column must be one of {', '.join(SITE_COLUMNS)}, got {site_column!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KgmlPeftError(f"batch size must be a positive integer, got {batch_size!r}")
    features = bank.backbone.config.features
    table = validate_table(table, features, targets=[])
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
    if absent and require_adapter:
        raise KgmlPeftError(
            f"{len(absent)} of {len(names)} adapters named by column {site_column} are not in the "
            f"store (first: {absent[0]}); add them or drop --require-adapter to use the backbone there")
    missing_set = set(absent)
    served = np.array([None if n in missing_set else n for n in wanted], dtype=object)
    out = bank.predict_windows(windows, list(served), batch_size=batch_size, strategy=strategy,
                               progress=progress)

    n, days = windows.dates.shape
    yield_daily = np.full((n, days), np.nan)
    yield_daily[:, -1] = out["Yield"]
    frame = pd.DataFrame({
        "site": np.repeat(windows.sites, days),
        "date": pd.to_datetime(windows.dates.reshape(-1)),
        **{name: out[name].reshape(-1) for name in ("Ra", "Rh", "Reco", "NEE")},
        "Yield": yield_daily.reshape(-1),
        "adapter": pd.array(np.repeat(served, days), dtype="string"),
    })
    counts = Counter(n for n in wanted if n is not None)
    used = {name: counts[name] for name in names if name not in missing_set}
    missing = {name: counts[name] for name in absent}
    return Prediction(frame=frame[list(OUTPUT_COLUMNS)], used=used, missing=missing,
                      dropped=list(windows.dropped), site_years=n)


def run_predict(*, data: str | os.PathLike | pd.DataFrame, backbone: str | os.PathLike,
                out: str | os.PathLike, site: str | None = None, site_column: str | None = None,
                store: str | os.PathLike = "adapters", require_adapter: bool = False,
                batch_size: int = 64, strategy: str | None = None, device: str = "cpu",
                force: bool = False, progress: bool = False) -> Prediction:
    """``kgml-peft predict``: read ``data`` (a table path or DataFrame), predict with the adapters
    of ``store`` on ``backbone`` and write ``out`` (.csv or .parquet) atomically. Every check runs
    before the output is written; an existing ``out`` is replaced only with ``force``."""
    target = Path(out)
    table_format(target)
    writable_target(target, force)
    store_path = Path(store)
    needs_store = site is not None or site_column is not None or store_path.is_dir()
    bank = AdapterBank(backbone, store_path if needs_store else None, device=device)  # checks the folder
    features = bank.backbone.config.features
    table = data if isinstance(data, pd.DataFrame) else load_table(data, features, targets=[])
    prediction = predict_table(bank, table, site=site, site_column=site_column,
                               require_adapter=require_adapter, batch_size=batch_size,
                               strategy=strategy, progress=progress)
    write_table(prediction.frame, target)
    return prediction
