"""Table reading details: date spellings, atomic writes and their file modes, site coordinates
(lat, lon) and unknown crops."""

import os
import stat

import numpy as np
import pandas as pd
import pytest

from kgml_peft import schema
from kgml_peft.data.tables import read_table, validate_table, write_table
from kgml_peft.data.windows import make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.atomic import atomic_path

from conftest import make_frame

FEATURES = schema.DEFAULT_FEATURES


def test_local_times_with_utc_offsets_keep_the_local_date():
    frame = make_frame(sites={"IA-001": "IA"}, years=(2003,))
    expected = frame["date"].copy()
    # local noon across a daylight-saving change: two different offsets in one column
    local = (frame["date"] + pd.Timedelta(hours=12)).dt.tz_localize("US/Central")
    frame["date"] = local.map(lambda t: t.isoformat())
    assert frame["date"].str[-6:].nunique() == 2
    out = validate_table(frame, FEATURES)
    assert (out["date"].to_numpy() == expected.to_numpy()).all()


def test_integer_yyyymmdd_dates(tmp_path):
    frame = make_frame(sites={"IA-001": "IA"}, years=(2003,))
    expected = frame["date"].copy()
    frame["date"] = frame["date"].dt.strftime("%Y%m%d").astype(int)
    write_table(frame, tmp_path / "t.csv")
    out = validate_table(read_table(tmp_path / "t.csv"), FEATURES)
    assert (out["date"].to_numpy() == expected.to_numpy()).all()


def test_atomic_path_keeps_the_old_file_when_the_body_fails(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_atomic_writes_get_normal_file_modes(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = write_table(make_frame(years=(2003,)), tmp_path / "new.parquet")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "kept.csv"
        kept.write_text("x")
        kept.chmod(0o640)
        write_table(make_frame(years=(2003,)), kept)
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(old)


# --- site coordinates (lat, lon) and unknown crops ---------------------------------------------

#: Two sites 1.6 km apart (the Mead towers) as (lat, lon).
COORDINATES = {"IA-001": (41.1651, -96.4766), "IL-001": (41.1649, -96.4701)}


def with_coordinates(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with constant ``lat``/``lon`` per site, right after the soil columns (where the
    simulator writes them)."""
    frame = frame.copy()
    at = frame.columns.get_loc("TCEC") + 1
    frame.insert(at, "lat", frame["site"].map(lambda s: COORDINATES[s][0]))
    frame.insert(at + 1, "lon", frame["site"].map(lambda s: COORDINATES[s][1]))
    return frame


def test_coordinates_are_optional_inputs_never_default_features():
    assert schema.SITE_INPUTS == ("lat", "lon")
    for name in schema.SITE_INPUTS:
        assert name in schema.ALL_INPUTS
        assert name not in schema.DEFAULT_FEATURES and name not in schema.KGML_AG_INPUTS
        column = schema.COLUMNS[name]
        assert column.static
    assert (schema.COLUMNS["lat"].low, schema.COLUMNS["lat"].high) == (-90.0, 90.0)
    assert (schema.COLUMNS["lon"].low, schema.COLUMNS["lon"].high) == (-180.0, 180.0)
    assert schema.check_feature_names([*FEATURES, "lat", "lon"])[-2:] == ("lat", "lon")


def test_validation_keeps_coordinates_and_windows_ignore_them():
    frame = with_coordinates(make_frame())
    out = validate_table(frame, FEATURES)
    assert {"lat", "lon"} <= set(out.columns)
    for site, (lat, lon) in COORDINATES.items():
        rows = out[out["site"] == site]
        assert (rows["lat"] == lat).all() and (rows["lon"] == lon).all()
    plain = make_windows(validate_table(make_frame(), FEATURES), FEATURES)
    windows = make_windows(out, FEATURES)
    assert windows.inputs.shape == plain.inputs.shape
    np.testing.assert_array_equal(windows.inputs, plain.inputs)
    # as features, by choice: one constant column each per site
    used = make_windows(validate_table(frame, [*FEATURES, "lat", "lon"]), [*FEATURES, "lat", "lon"])
    assert used.inputs.shape[-1] == len(FEATURES) + 2
    lats = used.inputs[..., -2]
    assert sorted({float(v) for v in np.unique(lats)}) == sorted(lat for lat, _ in COORDINATES.values())


def _set(frame: pd.DataFrame, column: str, value, site: str = "IL-001", start: str = "2003-05-02",
         n: int = 1) -> pd.DataFrame:
    first = frame.index[(frame["site"] == site) & (frame["date"] == pd.Timestamp(start))][0]
    frame.loc[first:first + n - 1, column] = value
    return frame


@pytest.mark.parametrize("features", [FEATURES, (*FEATURES, "lat", "lon")], ids=["unused", "features"])
@pytest.mark.parametrize("column, value, n, words", [
    ("lat", 95.0, 731, ("column lat", "outside [-90, 90] degrees north", "e.g. 95", "site IL-001")),
    ("lon", -200.0, 731, ("column lon", "outside [-180, 180] degrees east", "e.g. -200", "site IL-001")),
    ("lat", np.nan, 3, ("column lat has 3 NaN values", "site IL-001, first 2003-05-02", "every row")),
    ("lon", 41.2, 10, ("column lon changes within site IL-001", "-96.4701 on 2003-01-01",
                       "41.2 on 2003-05-02")),
], ids=["lat-95", "lon-minus-200", "lat-nan", "lon-changes"])
def test_bad_coordinates_are_refused_in_one_line(features, column, value, n, words):
    frame = _set(with_coordinates(make_frame()), column, value, n=n,
                 start="2003-01-01" if n == 731 else "2003-05-02")
    with pytest.raises(KgmlPeftError) as info:
        validate_table(frame, features)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_unknown_crop_type_is_fine_unless_it_is_a_feature():
    frame = _set(make_frame(), "Crop_Type", np.nan, site="IA-001", start="2004-01-01", n=366)
    no_crop = tuple(f for f in FEATURES if f != "Crop_Type")
    out = validate_table(frame, no_crop)
    # kept as a site-year attribute (cross-validated adapters keep to their crops), NaN allowed
    assert out["Crop_Type"].isna().sum() == 366 and out["Crop_Type"].notna().any()
    windows = make_windows(out, no_crop)
    assert np.isnan(windows.crops[(windows.sites == "IA-001") & (windows.years == 2004)]).all()
    assert np.isfinite(windows.crops[windows.sites != "IA-001"]).all()
    with pytest.raises(KgmlPeftError, match="column Crop_Type has 1 values outside"):
        validate_table(_set(make_frame(), "Crop_Type", 3.0, site="IA-001", start="2004-01-01", n=1), no_crop)
    with pytest.raises(KgmlPeftError, match=r"column Crop_Type has 366 NaN values \(site IA-001, "
                                            r"first 2004-01-01\); the crop of these site-years is unknown"):
        validate_table(frame, FEATURES)


@pytest.mark.usefixtures("isolated_globals")
def test_commands_work_on_tables_with_coordinates(tmp_path, backbone_path):
    """evaluate, predict and calibrate read a table with lat/lon columns (not features of the
    backbone) as they read one without; the coordinates change nothing in the predictions."""
    from click.testing import CliRunner

    from kgml_peft.cli import cli

    write_table(make_frame(), tmp_path / "plain.csv")
    write_table(with_coordinates(make_frame()), tmp_path / "coords.csv")
    outputs = {}
    for name in ("plain", "coords"):
        data = str(tmp_path / f"{name}.csv")
        result = CliRunner().invoke(cli, ["evaluate", "--backbone", str(backbone_path), "--data", data,
                                          "--json"])
        assert result.exit_code == 0, result.output
        out = str(tmp_path / f"pred-{name}.csv")
        result = CliRunner().invoke(cli, ["predict", "--backbone", str(backbone_path), "--data", data,
                                          "--out", out, "--quiet", "--cpu", "--adapters",
                                          str(tmp_path / "none")])
        assert result.exit_code == 0, result.output
        outputs[name] = pd.read_csv(out)
    pd.testing.assert_frame_equal(outputs["plain"], outputs["coords"])
    store = tmp_path / "adapters"
    store.mkdir()
    result = CliRunner().invoke(cli, ["calibrate", "--data", str(tmp_path / "coords.csv"), "--backbone",
                                      str(backbone_path), "--site", "IA-001", "--out", str(store),
                                      "--epochs", "1", "--quiet", "--cpu"])
    assert result.exit_code == 0, result.output
    assert (store / "IA-001.safetensors").is_file()
