"""Satellite-like GPP (the real-site benchmark's second GPP route): 8-day means, a per-site-year
bias of 15 % sd, 10 % daily noise, seeded per site-year."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kgml_peft.data.gpp import BIAS_SD, PERIOD_DAYS, satellite_like_gpp
from tests.conftest import make_frame


def _frame(sites: int = 40, years=(2003, 2004)) -> pd.DataFrame:
    return make_frame({f"S-{i:03d}": "IA" for i in range(sites)}, years=years)


def test_only_gpp_changes_and_it_stays_non_negative():
    frame = _frame(3)
    out = satellite_like_gpp(frame, seed=0)
    assert list(out.columns) == list(frame.columns)
    pd.testing.assert_frame_equal(out.drop(columns="GPP"), frame.drop(columns="GPP"))
    assert (out["GPP"] >= 0).all() and not np.allclose(out["GPP"], frame["GPP"])


def test_bias_has_the_documented_spread_and_noise_sits_on_8_day_means():
    frame = _frame(200, years=(2003,))
    out = satellite_like_gpp(frame, seed=0)
    key = [frame["site"], pd.to_datetime(frame["date"]).dt.year]
    ratio = out.groupby(key)["GPP"].sum() / frame.groupby(key)["GPP"].sum()
    # 200 site-years: the sd of a 15 % log-normal bias, measured with noise of 10 %/sqrt(365)
    assert abs(ratio.mean() - 1) < 0.04 and abs(ratio.std() - BIAS_SD) < 0.03
    one = out[out["site"] == "S-000"].reset_index(drop=True)
    tower = frame[frame["site"] == "S-000"].reset_index(drop=True)
    period = (pd.to_datetime(one["date"]).dt.day_of_year - 1) // PERIOD_DAYS
    # divide out each period's tower mean: what is left is bias x daily noise around 1
    daily = one["GPP"] / tower.groupby(period)["GPP"].transform("mean")
    daily = daily[tower.groupby(period)["GPP"].transform("mean") > 0.5]
    factor = daily.median()
    assert 0.05 < (daily / factor).std() < 0.15


def test_a_site_year_gets_the_same_gpp_whatever_else_is_in_the_table():
    frame = _frame(3)
    alone = satellite_like_gpp(frame[frame["site"] == "S-001"], seed=0)
    together = satellite_like_gpp(frame, seed=0)
    np.testing.assert_array_equal(alone["GPP"].to_numpy(), together.loc[frame["site"] == "S-001", "GPP"].to_numpy())
    assert not np.array_equal(satellite_like_gpp(frame, seed=1)["GPP"], together["GPP"])
