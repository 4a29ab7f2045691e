"""Bootstrap intervals over test units (site-years), shared by both benchmark reports.

A model's test MSE over a set of units is ``sum(sse) / sum(n)`` of the units' squared daily errors
and observed days (:func:`kgml_peft.metrics.window_errors`). Resampling units with replacement,
with one seeded set of resamples for every method scored on the same units, gives intervals for
each method's MSE and *paired* intervals for ratios between methods (the same resample on both
sides), which is what a skill against a baseline needs. numpy does the arithmetic; a percentile
bootstrap over a few dozen units needs no statistics package.
"""

from __future__ import annotations

import numpy as np

#: bootstrap resamples of the test units, and the level of the intervals drawn from them
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_LEVEL = 0.95


def resamples(n_units: int, seed: int = 0, draws: int = BOOTSTRAP_DRAWS) -> np.ndarray:
    """``draws`` resamples [draws, n_units] of unit indices, with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n_units, size=(draws, n_units))


def resampled_mse(per_seed: list[tuple[list[float], list[int]]], draws: np.ndarray) -> np.ndarray:
    """The mean over seeds of ``sum(sse) / sum(n)`` on each resample ``draws`` [B, units];
    ``per_seed`` holds each seed's per-unit ``(sse, n)`` (NaN where a resample has no observed day)."""
    values = []
    for sse, n in per_seed:
        sse, n = np.asarray(sse, dtype=float), np.asarray(n, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            values.append(sse[draws].sum(axis=1) / n[draws].sum(axis=1))
    return np.mean(values, axis=0)


def percentile_interval(values: np.ndarray, level: float = BOOTSTRAP_LEVEL) -> list[float] | None:
    """The central ``level`` percentile interval of the finite ``values`` (None if none)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]
