"""Prediction intervals from out-of-sample residuals: split-conformal, daily and annual.

A calibration with cross-validation folds has, for every observed calibration day, a prediction by
a model that did not train on that day (its fold's adapter). Those out-of-fold residuals decide
how wide an interval must be (split-conformal prediction; Vovk et al. 2005, Lei et al. 2018):

* **daily**: the score of a day is ``|observed - out-of-fold prediction| / (a * spread + b)``,
  where ``spread`` is the standard deviation of the adapter's members on that day. A 90 % interval
  is ``point +- q_0.9 * (a * spread + b)`` with ``q_0.9`` the conformal quantile of the scores, so
  the members decide where the interval is wide and the residuals decide how wide: members that
  agree too much only make ``q`` larger. ``b`` is the mean spread over the calibration days (an
  interval never collapses where members agree); with one member, or members that are all equal,
  ``a = 0, b = 1`` and the scores are absolute residuals.
* **annual**: an annual sum's error is the sum of daily errors, which are correlated over weeks,
  and one to three calibration years give too few annual residuals. The scores are the absolute
  mean out-of-fold residuals over blocks of :data:`BLOCK_DAYS` consecutive days (blocks with fewer
  than :data:`MIN_BLOCK_DAYS` observed days are skipped; shorter blocks when a QC-thin year gives
  too few), scaled to what a year's mean would be: mean errors shrink with the averaging length
  ``L`` as ``L ** slope``, with ``slope`` measured on the same residuals from block means of 10,
  30 and 91 days (aggregated-variance method) and kept in [-0.5, 0] (-0.5: independent daily
  errors; 0: a persistent bias, no shrinking, also used when it cannot be measured). The annual
  half-width is ``days * q`` of those scaled scores. What the blocks cannot see is a bias that
  changes from year to year; the held-out tests in docs/fluxnet.md report how often that matters.

The conformal quantile at level ``L`` of ``n`` scores is the ``ceil((n + 1) L)``-th smallest; when
that exceeds ``n`` there are too few scores for level ``L`` (stored as ``None``). Quantiles are
stored for the levels of :data:`LEVELS`, and an interval at level ``L`` uses the smallest stored
level ``>= L`` (never narrower than asked).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from kgml_peft.errors import KgmlPeftError

#: the levels whose conformal quantiles an adapter stores: 0.01, 0.02, ..., 0.99
LEVELS: tuple[float, ...] = tuple(round(k / 100, 2) for k in range(1, 100))
#: days per block of the annual scores
BLOCK_DAYS = 30
#: fewest observed days a block needs to give an annual score
MIN_BLOCK_DAYS = 10
#: shorter blocks tried when there are fewer than ENOUGH_BLOCKS scores
SHORTER_BLOCKS: tuple[int, ...] = (15, 10)
#: scores a 95 % conformal quantile needs (ceil(0.95 (n + 1)) <= n)
ENOUGH_BLOCKS = 19
#: averaging lengths (days) whose block means measure how errors shrink when summed over longer spans
AGGREGATION_DAYS: tuple[int, ...] = (10, 30, 91)
#: the outputs that get intervals
INTERVAL_TARGETS: tuple[str, ...] = ("NEE", "Reco")


def conformal_quantiles(scores: np.ndarray) -> list[float | None]:
    """The split-conformal quantile of ``scores`` at every level of :data:`LEVELS` (``None``
    where there are too few scores for that level)."""
    s = np.sort(np.asarray(scores, dtype=float)[np.isfinite(scores)])
    n = len(s)
    out: list[float | None] = []
    for level in LEVELS:
        k = math.ceil((n + 1) * level - 1e-9)
        out.append(None if k > n or n == 0 else float(s[k - 1]))
    return out


def check_level(level: float) -> float:
    """``level`` as a float in (0, 1), or a one-line error."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise KgmlPeftError(f"--interval must be a coverage level between 0 and 1 (exclusive), got {level!r}")
    return float(level)


def quantile_at(table: Sequence[float | None], level: float, what: str) -> float:
    """The stored conformal quantile for ``level`` (the smallest stored level at or above it)."""
    level = check_level(level)
    index = next(i for i, stored in enumerate(LEVELS) if stored >= level - 1e-9) \
        if level <= LEVELS[-1] + 1e-9 else None
    value = None if index is None else table[index]
    if value is None:
        raise KgmlPeftError(f"{what}: too few out-of-sample residuals for a {level:g} interval; "
                            "ask for a lower level")
    return float(value)


def member_spread(members: np.ndarray) -> np.ndarray:
    """Standard deviation over the member axis (axis 0); zeros with one member."""
    members = np.asarray(members, dtype=float)
    return members.std(axis=0) if members.shape[0] > 1 else np.zeros(members.shape[1:])


def daily_table(observed: np.ndarray, out_of_fold: np.ndarray, spread: np.ndarray) -> dict:
    """The daily interval record of one output: scale ``[a, b]``, score count and quantiles.

    ``observed`` and ``out_of_fold`` are daily values (NaN where not observed), ``spread`` the
    members' standard deviation on the same days (see module docstring)."""
    observed, out_of_fold, spread = (np.asarray(v, dtype=float) for v in (observed, out_of_fold, spread))
    ok = np.isfinite(observed) & np.isfinite(out_of_fold)
    mean_spread = float(spread[ok].mean()) if ok.any() else 0.0
    a, b = (1.0, mean_spread) if mean_spread > 1e-6 else (0.0, 1.0)
    scores = np.abs(observed[ok] - out_of_fold[ok]) / (a * spread[ok] + b)
    return {"scale": [a, b], "n": int(ok.sum()), "quantiles": _rounded(conformal_quantiles(scores))}


def block_scores(residuals: np.ndarray, block_days: int = BLOCK_DAYS,
                 min_days: int = MIN_BLOCK_DAYS) -> np.ndarray:
    """|mean residual| of each block of ``block_days`` consecutive days of each row of
    ``residuals`` [N, days] (NaN = not observed) with at least ``min_days`` observed days."""
    residuals = np.atleast_2d(np.asarray(residuals, dtype=float))
    scores = []
    for row in residuals:
        for start in range(0, row.shape[0] - block_days + 1, block_days):
            block = row[start:start + block_days]
            ok = np.isfinite(block)
            if ok.sum() >= min_days:
                scores.append(abs(float(block[ok].mean())))
    return np.asarray(scores)


def aggregation_slope(residuals: np.ndarray) -> float:
    """How the size of mean residuals shrinks with the averaging length ``L``: the slope of
    log RMS(block mean) against log L over the blocks of :data:`AGGREGATION_DAYS` (each with at
    least 3 blocks of a third observed days), clipped to [-0.5, 0]. -0.5 is independent daily
    errors, 0 a persistent bias that no averaging removes (also the answer when it cannot be
    measured: the conservative one)."""
    points = []
    for days in AGGREGATION_DAYS:
        means = block_scores(residuals, days, max(3, days // 3))
        if len(means) >= 3:
            points.append((math.log(days), math.log(max(float(np.sqrt(np.mean(means**2))), 1e-12))))
    if len(points) < 2:
        return 0.0
    x, y = np.array(points).T
    return float(np.clip(np.polyfit(x, y, 1)[0], -0.5, 0.0))


def annual_table(residuals: np.ndarray, days: int = 365) -> dict:
    """The annual interval record of one output from out-of-fold daily residuals [N, days]
    (see module docstring): |mean residual| of blocks of :data:`BLOCK_DAYS` days (of
    :data:`SHORTER_BLOCKS` days in turn when a QC-thin year gives too few for a 95 % interval),
    scaled to a year's mean by ``(days / block_days) ** slope`` (:func:`aggregation_slope`)."""
    for block_days in (BLOCK_DAYS, *SHORTER_BLOCKS):
        scores = block_scores(residuals, block_days, max(3, round(block_days * MIN_BLOCK_DAYS / BLOCK_DAYS)))
        if len(scores) >= ENOUGH_BLOCKS:
            break
    slope = aggregation_slope(residuals)
    factor = (days / block_days) ** slope
    return {"block_days": block_days, "slope": round(slope, 4), "factor": round(factor, 6),
            "n": int(len(scores)), "quantiles": _rounded(conformal_quantiles(scores * factor))}


def daily_interval(point: np.ndarray, spread: np.ndarray, record: Mapping, level: float,
                   what: str) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper daily bounds at ``level`` around ``point`` (see module docstring)."""
    q = quantile_at(record["quantiles"], level, what)
    a, b = record["scale"]
    half = q * (a * np.asarray(spread) + b)
    return point - half, point + half


def annual_interval(total: np.ndarray, days: int, record: Mapping, level: float,
                    what: str) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds at ``level`` of annual sums ``total`` over ``days`` days."""
    half = days * quantile_at(record["quantiles"], level, what)
    return total - half, total + half


def coverage(observed: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> dict[str, float | int]:
    """The share of observed values inside [lower, upper] and how many were checked."""
    observed = np.asarray(observed, dtype=float)
    ok = np.isfinite(observed)
    inside = (observed >= lower) & (observed <= upper)
    n = int(ok.sum())
    return {"n": n, "coverage": float(inside[ok].mean()) if n else float("nan"),
            "mean_width": float(np.mean((np.asarray(upper) - np.asarray(lower))[ok])) if n else float("nan")}


def _rounded(values: Sequence[float | None]) -> list[float | None]:
    # 6 significant digits: the JSON stays small and the widths change by < 1e-6 relative
    return [None if v is None else float(f"{v:.6g}") for v in values]


def check_record(record: object, where: str) -> dict:
    """An adapter's ``metrics.intervals`` record, checked (a hand-edited or foreign one is refused
    in one line)."""
    def bad(why: str) -> KgmlPeftError:
        return KgmlPeftError(f"{where}: interval widths are malformed ({why})")

    if not isinstance(record, dict):
        raise bad("not a JSON object")
    if "global" in record:  # the global model's widths on the same folds (crops outside the adapter's)
        check_record(record["global"], f"{where} (global)")
    for kind in ("daily", "annual"):
        part = record.get(kind)
        if not isinstance(part, dict) or set(part) != set(INTERVAL_TARGETS):
            raise bad(f"{kind} must name {', '.join(INTERVAL_TARGETS)}")
        for target, entry in part.items():
            quantiles = entry.get("quantiles") if isinstance(entry, dict) else None
            if not isinstance(quantiles, list) or len(quantiles) != len(LEVELS) or not all(
                    q is None or (isinstance(q, (int, float)) and not isinstance(q, bool) and q >= 0
                                  and math.isfinite(q)) for q in quantiles):
                raise bad(f"{kind} {target} needs {len(LEVELS)} non-negative quantiles")
            if kind == "daily":
                scale = entry.get("scale")
                if not (isinstance(scale, list) and len(scale) == 2 and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in scale)
                        and scale[1] > 0):
                    raise bad(f"daily {target} scale must be [a >= 0, b > 0]")
            elif entry.get("block_days") not in (BLOCK_DAYS, *SHORTER_BLOCKS) or not (
                    isinstance(entry.get("factor"), (int, float)) and 0 < entry["factor"] <= 1):
                raise bad(f"annual {target} needs block_days in {(BLOCK_DAYS, *SHORTER_BLOCKS)} and a "
                          "factor in (0, 1]")
    return record
