"""Flux-tower weather derived from the simulator's humidity, and the day-block split used to early
stop calibrations on a single year."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kgml_peft import schema
from kgml_peft.data.meteo import add_flux_tower_weather, saturation_vapour_pressure
from kgml_peft.data.synthetic import SynthConfig, simulate
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import make_windows, split_by_day_blocks
from kgml_peft.errors import KgmlPeftError


def test_vpd_by_hand() -> None:
    # 30 degC max, 20 degC min; 90 % humidity at the minimum, 50 % at the maximum
    row = pd.DataFrame({"TMAX_AIR": [30.0], "TDIF_AIR": [10.0], "HMAX_AIR": [90.0], "HDIF_AIR": [40.0]})
    es30 = 6.108 * math.exp(17.27 * 30 / (30 + 237.3))
    es20 = 6.108 * math.exp(17.27 * 20 / (20 + 237.3))
    assert es30 == pytest.approx(42.43, abs=0.01) and es20 == pytest.approx(23.38, abs=0.01)
    out = add_flux_tower_weather(row).iloc[0]
    assert out["TAVG_AIR"] == 25.0
    assert out["VPD_AIR"] == pytest.approx((es30 + es20) / 2 - 0.9 * es20, rel=1e-12)
    assert out["VPDMAX_AIR"] == pytest.approx(0.5 * es30, rel=1e-12)
    assert float(saturation_vapour_pressure(np.array(0.0))) == pytest.approx(6.108)


def test_simulated_tower_weather_fits_the_contract() -> None:
    frame = add_flux_tower_weather(simulate(SynthConfig(max_sites_per_region=1, max_years_per_site=2)))
    table = validate_table(frame, schema.FLUXNET_FEATURES)  # every value in range
    assert (table["VPDMAX_AIR"] >= table["VPD_AIR"]).all()
    assert (table["TAVG_AIR"] < table["TMAX_AIR"]).all()
    # plausible summer VPD for the US Midwest (FLUXNET US-Ne1 July mean is about 10 hPa)
    july = table[table["date"].dt.month == 7]
    assert 3 < july["VPD_AIR"].mean() < 25


def test_day_blocks_split_targets_not_inputs() -> None:
    frame = simulate(SynthConfig(max_sites_per_region=1, max_years_per_site=2, observed=True,
                                 obs_years=(2, 2)))
    features = schema.DEFAULT_FEATURES
    windows = make_windows(validate_table(frame, features), features)
    train, val = split_by_day_blocks(windows, 14, 4)
    day = np.arange(365)
    is_val = (day // 14) % 4 == 3
    assert list(day[is_val][:3]) == [42, 43, 44] and is_val.sum() == 14 * 6  # blocks 3, 7, ..., 23
    np.testing.assert_array_equal(train.inputs, windows.inputs)
    np.testing.assert_array_equal(val.inputs, windows.inputs)
    assert np.isnan(train.daily[:, is_val]).all() and np.isnan(val.daily[:, ~is_val]).all()
    np.testing.assert_array_equal(np.where(is_val[None, :, None], val.daily, train.daily), windows.daily)
    np.testing.assert_array_equal(train.annual, windows.annual)
    assert np.isnan(val.annual).all()
    assert not np.isnan(windows.daily[:, is_val]).all()  # the original is left alone
    with pytest.raises(KgmlPeftError):
        split_by_day_blocks(windows, 14, 1)
