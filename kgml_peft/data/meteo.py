"""Weather conversions between what process models and what flux towers record.

KGML-ag's weather has relative humidity (daily maximum and range); flux towers record vapour
pressure deficit (FLUXNET2015 ``VPD_F``). :func:`add_flux_tower_weather` derives the tower columns
from a process-model table, so that a backbone for tower features can be pretrained on simulator
output restricted to those features (the KGML-ag route: process model first, observations after).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def saturation_vapour_pressure(t: np.ndarray | pd.Series) -> np.ndarray | pd.Series:
    """Saturation vapour pressure over water, hPa, at air temperature ``t`` in degC (Tetens)."""
    return 6.108 * np.exp(17.27 * t / (t + 237.3))


def add_flux_tower_weather(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` plus ``TAVG_AIR`` (degC), ``VPD_AIR`` and ``VPDMAX_AIR`` (hPa), derived from
    ``TMAX_AIR``, ``TDIF_AIR``, ``HMAX_AIR`` and ``HDIF_AIR``.

    The humidity maximum is taken at the daily minimum temperature and the minimum
    (``HMAX_AIR - HDIF_AIR``) at the maximum temperature, with the actual vapour pressure constant
    through the day; the mean VPD uses the mean of the saturation pressures at the two extremes
    (FAO-56's daily mean).
    """
    tmax = frame["TMAX_AIR"]
    tmin = tmax - frame["TDIF_AIR"]
    es_max, es_min = saturation_vapour_pressure(tmax), saturation_vapour_pressure(tmin)
    actual = es_min * frame["HMAX_AIR"] / 100.0
    hmin = (frame["HMAX_AIR"] - frame["HDIF_AIR"]).clip(lower=0.0)
    return frame.assign(
        TAVG_AIR=(tmax + tmin) / 2.0,
        VPD_AIR=((es_max + es_min) / 2.0 - actual).clip(lower=0.0),
        VPDMAX_AIR=(es_max * (1.0 - hmin / 100.0)).clip(lower=0.0),
    )
