"""Baselines a flux scientist would try first, scored beside the GRU methods.

* :class:`RecoRegression`: daily ecosystem respiration as a quadratic in air temperature plus a
  linear GPP term, ``Reco = c0 + c1 TA + c2 TA^2 + c3 GPP``, and ``NEE = Reco - GPP`` (the
  identity ONEFlux's night-time partitioning builds in, so with tower GPP it is exact for the
  observations themselves). Fitted by least squares on the observed (QC-passing) Reco days of the
  windows it is given: the development towers' training years (``global``), or a held-out tower's
  calibration years (``site``). Four numbers; nothing to tune.
* :class:`Climatology`: the day-of-year mean of the calibration years' observed NEE and Reco; days
  no calibration year observed are filled by linear interpolation around the year (day 365 is
  next to day 1). It ignores the weather: a model that cannot beat it has learnt nothing a
  tower's own record does not already say.

Both predict from :class:`~kgml_peft.data.windows.YearWindows` in physical units (gC m-2 d-1),
like :func:`~kgml_peft.model.inference.predict_windows`, so the benchmark scores them the same way.
numpy's ``lstsq`` does the fit: a four-column least-squares problem needs no framework.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kgml_peft.data.windows import YearWindows
from kgml_peft.errors import KgmlPeftError

#: the outputs a baseline predicts (and the benchmark scores)
BASELINE_OUTPUTS: tuple[str, ...] = ("NEE", "Reco")


def air_temperature(windows: YearWindows) -> np.ndarray:
    """Daily mean air temperature [N, 365] (degC): ``TAVG_AIR`` where the windows have it, else the
    midpoint of the day's range (``TMAX_AIR - TDIF_AIR / 2``)."""
    features = list(windows.features)
    if "TAVG_AIR" in features:
        return windows.inputs[..., features.index("TAVG_AIR")]
    if {"TMAX_AIR", "TDIF_AIR"} <= set(features):
        return windows.inputs[..., features.index("TMAX_AIR")] - windows.inputs[..., features.index("TDIF_AIR")] / 2
    raise KgmlPeftError("the Reco regression needs TAVG_AIR (or TMAX_AIR and TDIF_AIR) among the features")


def _design(windows: YearWindows) -> np.ndarray:
    ta = air_temperature(windows)
    return np.stack([np.ones_like(ta), ta, ta**2, windows.gpp], axis=-1)


@dataclass(frozen=True)
class RecoRegression:
    """``Reco = c0 + c1 TA + c2 TA^2 + c3 GPP``, ``NEE = Reco - GPP`` (see module docstring)."""

    coef: tuple[float, float, float, float]
    #: observed days the fit used
    days: int

    @classmethod
    def fit(cls, windows: YearWindows) -> RecoRegression:
        """Least squares on the observed Reco days of ``windows``."""
        x, y = _design(windows), windows.target("Reco")
        ok = np.isfinite(y) & np.isfinite(x).all(axis=-1)
        if ok.sum() < 4 * x.shape[-1]:
            raise KgmlPeftError(f"the Reco regression needs at least {4 * x.shape[-1]} observed Reco days, "
                                f"got {int(ok.sum())}")
        coef, *_ = np.linalg.lstsq(x[ok], y[ok], rcond=None)
        return cls(tuple(float(c) for c in coef), int(ok.sum()))

    @property
    def parameters(self) -> int:
        """Fitted values (the benchmark's "trained values")."""
        return len(self.coef)

    def predict(self, windows: YearWindows) -> dict[str, np.ndarray]:
        """Daily NEE and Reco [N, 365] (gC m-2 d-1)."""
        reco = _design(windows) @ np.asarray(self.coef)
        return {"NEE": reco - windows.gpp, "Reco": reco}


def _fill_around_the_year(values: np.ndarray) -> np.ndarray:
    """``values`` [365] with NaN days filled by linear interpolation, the year closed into a ring."""
    ok = np.isfinite(values)
    if ok.all():
        return values
    days = np.arange(len(values))
    known = days[ok]
    # the known days repeated one year before and after, so the ends interpolate across new year
    ring = np.concatenate([known - len(values), known, known + len(values)])
    return np.interp(days, ring, np.tile(values[ok], 3))


@dataclass(frozen=True)
class Climatology:
    """The day-of-year mean of observed NEE and Reco (see module docstring)."""

    #: per output, [365] gC m-2 d-1
    means: dict[str, np.ndarray]

    @classmethod
    def fit(cls, windows: YearWindows) -> Climatology:
        """Day-of-year means of the observed days of ``windows`` (all rows pooled)."""
        means = {}
        for name in BASELINE_OUTPUTS:
            observed = windows.target(name)
            if not np.isfinite(observed).any():
                raise KgmlPeftError(f"a climatology needs observed {name} days; the calibration years have none")
            counts = np.isfinite(observed).sum(axis=0)
            with np.errstate(invalid="ignore"):
                mean = np.where(counts > 0, np.nansum(observed, axis=0) / np.maximum(counts, 1), np.nan)
            means[name] = _fill_around_the_year(mean)
        return cls(means)

    @property
    def parameters(self) -> int:
        """Fitted values (the benchmark's "trained values")."""
        return sum(len(mean) for mean in self.means.values())

    def predict(self, windows: YearWindows) -> dict[str, np.ndarray]:
        """The same day-of-year means for every window [N, 365]."""
        return {name: np.tile(mean, (len(windows), 1)) for name, mean in self.means.items()}
