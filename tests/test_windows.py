"""Year windows, leap days, scalers fitted on training data only, splits, masks."""

import numpy as np
import pytest

from kgml_peft import schema
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import (
    Scalers,
    WindowDataset,
    make_windows,
    split_by_site,
    split_by_year,
)
from kgml_peft.errors import KgmlPeftError

from conftest import make_frame

FEATURES = schema.DEFAULT_FEATURES


def windows_of(frame):
    return make_windows(validate_table(frame, FEATURES), FEATURES)


def test_leap_day_is_dropped_and_every_window_has_365_days():
    frame = make_frame(years=(2003, 2004))  # 2004 is a leap year
    w = windows_of(frame)
    assert len(w) == 4
    assert w.inputs.shape == (4, 365, len(FEATURES))
    leap = np.flatnonzero(w.years == 2004)[0]
    dates = w.dates[leap]
    assert np.datetime64("2004-02-29") not in dates
    assert dates[59] == np.datetime64("2004-03-01")
    assert dates[-1] == np.datetime64("2004-12-31")


def test_incomplete_year_is_dropped_and_reported():
    frame = make_frame(years=(2003, 2004))
    frame = frame[~((frame.site == "IA-001") & (frame.date >= "2004-12-01"))]
    w = windows_of(frame)
    assert len(w) == 3
    assert ("IA-001", 2004, 334) in w.dropped


def test_site_without_a_complete_year_is_an_error():
    frame = make_frame(sites={"IA-001": "IA"}, years=(2003, 2004))
    frame = frame[(frame.date >= "2003-07-01") & (frame.date < "2004-07-31")]
    with pytest.raises(KgmlPeftError, match="site IA-001 has no complete calendar year"):
        windows_of(frame)


def test_scalers_are_fitted_on_training_windows_only():
    frame = make_frame(years=(2003, 2004, 2005))
    frame.loc[frame.date.dt.year == 2005, "TMAX_AIR"] += 20.0  # validation year is much warmer
    w = windows_of(frame)
    train, val = split_by_year(w, val_fraction=0.3)
    assert set(w.years[val]) == {2005} and set(w.years[train]) == {2003, 2004}
    scalers = Scalers.fit(w.subset(train))
    j = FEATURES.index("TMAX_AIR")
    expected = w.inputs[train][..., j]
    assert scalers.mean["TMAX_AIR"] == pytest.approx(expected.mean())
    assert scalers.std["TMAX_AIR"] == pytest.approx(expected.std())
    assert scalers.mean["TMAX_AIR"] < Scalers.fit(w).mean["TMAX_AIR"] - 5
    # a constant column gets std 1 instead of a division by zero
    assert Scalers.fit(w.subset(train)).std["TBKDS"] > 0
    round_trip = Scalers.from_dict(scalers.to_dict())
    assert round_trip == scalers


def test_missing_targets_are_masked():
    frame = make_frame()
    frame.loc[frame.date.dt.month == 7, "NEE"] = np.nan
    frame["Ra"] = np.nan
    w = windows_of(frame)
    scalers = Scalers.fit(make_windows(validate_table(make_frame(), FEATURES), FEATURES))
    data = WindowDataset(w, scalers)
    nee = schema.DAILY_TARGETS.index("NEE")
    ra = schema.DAILY_TARGETS.index("Ra")
    july = (w.dates[0].astype("datetime64[M]").astype(int) % 12) == 6
    assert not data.daily_mask[0, july, nee].any()
    assert data.daily_mask[0, ~july, nee].all()
    assert not data.daily_mask[..., ra].any()
    assert np.isfinite(data.daily.numpy()).all()


def test_split_by_year_and_by_site():
    w = windows_of(make_frame(years=(2001, 2002, 2003, 2004, 2005)))
    train, val = split_by_year(w, 0.2)
    assert len(val) == 2 and set(w.years[val]) == {2005}
    assert not set(train) & set(val)
    train, val = split_by_site(w, ["IL-001"])
    assert set(w.sites[val]) == {"IL-001"} and set(w.sites[train]) == {"IA-001"}
    with pytest.raises(KgmlPeftError, match="unknown validation site"):
        split_by_site(w, ["XX"])
    one = windows_of(make_frame(sites={"IA-001": "IA"}, years=(2003,)))
    train, val = split_by_year(one, 0.5)
    assert len(train) == 1 and len(val) == 0
