"""Cross-validation folds over one unit's calibration data, for out-of-sample decisions.

Every choice a calibration makes for a site (how long to train, which adapter shape, how strong an
adapter) is taken on these folds, never on data it then reports as held out:

* **two or more years**: leave one calendar year out. Fold ``y`` validates on every site-year of
  year ``y`` and trains on the others; a flux year is one season cycle, so neighbouring days of
  the validation year never train. With more than :data:`MAX_YEARS` calendar years (a region
  pooling many sites) the years are cut into :data:`MAX_FOLDS` contiguous groups of about equal
  site-years, and a fold leaves one group out (the cost of cross-validation grows with the folds:
  this keeps a region's calibration within about 3 times the plain one).
* **one year**: contiguous blocks of days. The year is cut into ``blocks`` contiguous blocks
  holding about equally many observed days (a tower year that starts in autumn, or a QC-thin
  winter, still gives every block observations); fold ``k`` validates on block ``k``'s days and
  trains on the rest, except ``gap_days`` on either side of the block, which neither train nor
  validate (daily fluxes are autocorrelated
  over days to weeks: without a gap the days next to the block would leak its answer). The
  inputs of the whole year stay (the GRUs read the year in order); only daily targets are masked.
  The annual yield trains in every fold and validates in none.

A fold whose validation part has no observation of the calibrated targets is left out; fewer than
:data:`MIN_FOLDS` usable folds is an error that says what is missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kgml_peft import schema
from kgml_peft.data.windows import YearWindows
from kgml_peft.errors import KgmlPeftError

#: fewest usable folds a cross-validation needs
MIN_FOLDS = 2
#: calendar years up to which every year is a fold of its own
MAX_YEARS = 5
#: folds when there are more calendar years (a pooled region): contiguous groups of years
MAX_FOLDS = 3
#: a year is cut into this many contiguous validation blocks when there is only one
BLOCKS = 4
#: days on either side of a validation block that neither train nor validate
GAP_DAYS = 14


@dataclass(frozen=True)
class Fold:
    """One fold: a name (``year 2005`` or ``days 92-182``), its training and validation windows."""

    name: str
    train: YearWindows
    val: YearWindows


def _observed(windows: YearWindows, targets: Sequence[str]) -> bool:
    return len(windows) > 0 and any(np.isfinite(windows.target(t)).any() for t in targets)


def _mask_days(windows: YearWindows, keep: np.ndarray, annual: bool) -> YearWindows:
    """``windows`` with daily targets outside ``keep`` [365] set to NaN (and annual ones unless
    ``annual``)."""
    daily = np.where(keep[None, :, None], windows.daily, np.nan)
    return dataclasses.replace(windows, daily=daily,
                               annual=windows.annual if annual else np.full_like(windows.annual, np.nan))


def year_folds(windows: YearWindows, max_folds: int = MAX_FOLDS, max_years: int = MAX_YEARS) -> list[Fold]:
    """Leave one calendar year out; with more than ``max_years`` years, leave out one of
    ``max_folds`` contiguous groups of years holding about equal numbers of site-years (see module
    docstring)."""
    years = np.asarray(windows.years)
    distinct = sorted(set(years.tolist()))
    if len(distinct) <= max_years:
        groups = [[y] for y in distinct]
    else:  # cut the years where the running count of site-years passes each k / max_folds share
        counts = np.array([(years == y).sum() for y in distinct])
        share = np.cumsum(counts) / counts.sum()
        cut = np.minimum(np.floor(share * max_folds - 1e-9).astype(int), max_folds - 1)
        cut = np.maximum.accumulate(cut)
        groups = [[y for y, c in zip(distinct, cut) if c == k] for k in range(max_folds)]
        groups = [g for g in groups if g]
    folds = []
    for group in groups:
        held = np.isin(years, group)
        name = f"year {group[0]}" if len(group) == 1 else f"years {group[0]}-{group[-1]}"
        folds.append(Fold(name, windows.subset(np.flatnonzero(~held)), windows.subset(np.flatnonzero(held))))
    return folds


def block_folds(windows: YearWindows, blocks: int = BLOCKS, gap_days: int = GAP_DAYS) -> list[Fold]:
    """Contiguous day blocks with a gap, of about equal numbers of observed days (see module
    docstring)."""
    if blocks < 2 or gap_days < 0:
        raise KgmlPeftError(f"block folds need blocks >= 2 and gap_days >= 0, got {blocks}, {gap_days}")
    day = np.arange(schema.DAYS_PER_YEAR)
    observed = np.flatnonzero(np.isfinite(windows.daily).any(axis=(0, 2)))
    if len(observed) < blocks:  # nothing to balance: calendar blocks (make_folds reports the lack)
        edges = np.linspace(0, schema.DAYS_PER_YEAR, blocks + 1).round().astype(int)
    else:  # block k starts at the first observed day of its share; the first at day 1, the last ends at 365
        starts = [observed[round(k * len(observed) / blocks)] for k in range(1, blocks)]
        edges = np.array([0, *starts, schema.DAYS_PER_YEAR])
    folds = []
    for first, stop in zip(edges[:-1], edges[1:]):
        val = (day >= first) & (day < stop)
        near = (day >= first - gap_days) & (day < stop + gap_days)
        folds.append(Fold(f"days {first + 1}-{stop}", _mask_days(windows, ~near, annual=True),
                          _mask_days(windows, val, annual=False)))
    return folds


def make_folds(windows: YearWindows, targets: Sequence[str], name: str = "the unit") -> list[Fold]:
    """The folds of one unit's calibration windows (see module docstring): by year when they span
    two years or more, by day blocks otherwise; folds without validation observations of
    ``targets`` are left out."""
    if len(windows) == 0:
        raise KgmlPeftError(f"{name}: no complete site-year to cross-validate on")
    by_year = len(set(np.asarray(windows.years).tolist())) >= 2
    folds = year_folds(windows) if by_year else block_folds(windows)
    usable = [f for f in folds if _observed(f.val, targets) and _observed(f.train, targets)]
    if len(usable) < MIN_FOLDS:
        what = ("years with observations of " if by_year else "blocks of days with observations of ")
        raise KgmlPeftError(
            f"{name}: cross-validation needs at least {MIN_FOLDS} {what}{', '.join(targets)} "
            f"(found {len(usable)} of {len(folds)} {'years' if by_year else 'blocks'}); give more "
            "data or calibrate with --cv none")
    return usable
