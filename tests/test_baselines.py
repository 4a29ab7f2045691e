"""The benchmark's baselines (kgml_peft.experiments.baselines) against hand-built tables and an
independent least-squares solve."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kgml_peft import schema
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.baselines import Climatology, RecoRegression, air_temperature

FEATURES = schema.FLUXNET_FEATURES
COEF = (0.8, 0.05, 0.004, 0.3)


def _table(years=(2005, 2006), seed: int = 0, noise: float = 0.0) -> pd.DataFrame:
    """A tower-like table whose Reco follows COEF exactly (plus optional noise), NEE = Reco - GPP."""
    rng = np.random.default_rng(seed)
    dates = pd.date_range(f"{years[0]}-01-01", f"{years[-1]}-12-31", freq="D")
    doy = dates.day_of_year.to_numpy()
    ta = 12 - 14 * np.cos(2 * np.pi * doy / 365) + rng.normal(0, 3, len(dates))
    gpp = np.clip(8 * np.sin(np.pi * (doy - 100) / 180), 0, None) + rng.uniform(0, 0.5, len(dates))
    reco = COEF[0] + COEF[1] * ta + COEF[2] * ta**2 + COEF[3] * gpp + rng.normal(0, noise, len(dates))
    frame = pd.DataFrame({
        schema.SITE: "US-Xyz", schema.REGION: "NE", schema.DATE: dates,
        "RADN": 15.0, "TMAX_AIR": ta + 5, "TDIF_AIR": 10.0, "TAVG_AIR": ta, "VPD_AIR": 8.0,
        "VPDMAX_AIR": 15.0, "GPP": gpp, "NEE": reco - gpp, "Reco": reco})
    return frame[[c for c in frame.columns if c in (schema.SITE, schema.REGION, schema.DATE, *FEATURES, "NEE", "Reco")]]


def _windows(frame: pd.DataFrame):
    return make_windows(validate_table(frame, FEATURES, targets=["NEE", "Reco"]), FEATURES)


def test_regression_recovers_exact_coefficients_and_the_identity() -> None:
    windows = _windows(_table())
    fit = RecoRegression.fit(windows)
    assert np.allclose(fit.coef, COEF, atol=1e-8) and fit.parameters == 4
    assert fit.days == 2 * 365  # every day observed, 29 February dropped by the windows
    pred = fit.predict(windows)
    assert np.allclose(pred["Reco"], windows.target("Reco"), atol=1e-8)
    assert np.allclose(pred["NEE"], pred["Reco"] - windows.gpp)


def test_regression_matches_an_independent_solve_on_observed_days_only() -> None:
    frame = _table(noise=0.4, seed=3)
    frame.loc[frame.index[::3], "Reco"] = np.nan  # unobserved days must not enter the fit
    fit = RecoRegression.fit(_windows(frame))
    rows = frame[frame["Reco"].notna() & ~((frame.date.dt.month == 2) & (frame.date.dt.day == 29))]
    x = np.column_stack([np.ones(len(rows)), rows.TAVG_AIR, rows.TAVG_AIR**2, rows.GPP])
    # normal equations: an independent route to the least-squares solution
    expected = np.linalg.solve(x.T @ x, x.T @ rows.Reco.to_numpy())
    assert np.allclose(fit.coef, expected, rtol=1e-6, atol=1e-9) and fit.days == len(rows)


def test_regression_reads_the_midpoint_of_the_day_without_tavg_and_refuses_too_few_days() -> None:
    frame = _table(years=(2005,))
    demo_features = tuple(f for f in FEATURES if f != "TAVG_AIR")
    windows = make_windows(validate_table(frame.drop(columns="TAVG_AIR"), demo_features,
                                          targets=["NEE", "Reco"]), demo_features)
    # TMAX_AIR = TA + 5, TDIF_AIR = 10: the midpoint is TA itself
    assert np.allclose(air_temperature(windows), frame.TAVG_AIR.to_numpy()[None, :])
    few = frame.assign(Reco=np.where(np.arange(len(frame)) < 15, frame.Reco, np.nan))
    with pytest.raises(KgmlPeftError, match="at least 16 observed Reco days, got 15"):
        RecoRegression.fit(_windows(few))


def test_climatology_is_the_day_of_year_mean_with_gaps_closed_around_the_year() -> None:
    frame = _table(years=(2005, 2006))
    first, second = frame.date.dt.year == 2005, frame.date.dt.year == 2006
    frame.loc[first, "NEE"] = 1.0
    frame.loc[second, "NEE"] = 3.0
    # day 10 observed in 2005 only; days 1-3 and 364-365 observed in neither year
    frame.loc[second & (frame.date.dt.day_of_year == 10), "NEE"] = np.nan
    ends = frame.date.dt.day_of_year.isin([1, 2, 3, 364, 365])
    frame.loc[ends, "NEE"] = np.nan
    frame.loc[first & (frame.date.dt.day_of_year == 4), "NEE"] = 5.0  # 2005: 5, 2006: 3 -> mean 4
    clim = Climatology.fit(_windows(frame))
    nee = clim.means["NEE"]
    assert nee[9] == 1.0 and nee[100] == 2.0 and nee[3] == 4.0
    # days 364, 365, 1, 2, 3 (indices 363, 364, 0, 1, 2) lie between day 363 (2.0) and day 4 (4.0):
    # six steps of (4 - 2) / 6 across new year
    assert np.allclose(nee[[363, 364, 0, 1, 2]], 2.0 + np.arange(1, 6) * 2.0 / 6)
    test = _windows(_table(years=(2007, 2008, 2009)))
    pred = clim.predict(test)
    assert pred["NEE"].shape == (3, 365) and (pred["NEE"] == nee).all()
    assert clim.parameters == 2 * 365


def test_climatology_needs_observations() -> None:
    frame = _table(years=(2005,)).assign(NEE=np.nan)
    with pytest.raises(KgmlPeftError, match="observed NEE"):
        Climatology.fit(_windows(frame))


def test_seasonal_cycle_and_anomaly_r2_by_hand() -> None:
    from kgml_peft.metrics import anomaly_r2, seasonal_cycle

    days = np.arange(365)
    cycle = 5 * np.sin(2 * np.pi * days / 365)
    weather = np.where(days % 2 == 0, 1.0, -1.0)  # day-to-day swings the cycle does not know
    observed = np.stack([cycle + weather, cycle - weather])
    # the day-of-year mean of the two years is the cycle itself; the 31-day running mean of a sine
    # is the sine scaled by sin(31 pi / 365) / (31 sin(pi / 365))
    scale = np.sin(31 * np.pi / 365) / (31 * np.sin(np.pi / 365))
    assert np.allclose(seasonal_cycle(observed), scale * cycle, atol=1e-9)
    smooth = np.broadcast_to(scale * cycle, observed.shape)
    reference = ((observed - smooth) ** 2).sum()
    # predicting the cycle scores 1 - SSE / reference; predicting the observations scores 1
    assert anomaly_r2(observed, observed) == 1.0
    expected = 1 - ((smooth - observed) ** 2).sum() / reference
    assert anomaly_r2(smooth.copy(), observed) == pytest.approx(expected, rel=1e-12) and expected <= 0.01
    gappy = observed.copy()
    gappy[:, 100:200] = np.nan  # gaps: the cycle comes from the days around them, scored days only
    assert np.isfinite(seasonal_cycle(gappy)[[99, 200]]).all() and np.isnan(seasonal_cycle(gappy)[150])
    assert anomaly_r2(observed, np.full_like(observed, np.nan)) is None
