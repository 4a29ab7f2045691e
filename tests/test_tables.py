"""Table reading details: date spellings, atomic writes and their file modes."""

import os
import stat

import pandas as pd
import pytest

from kgml_peft import schema
from kgml_peft.data.tables import read_table, validate_table, write_table
from kgml_peft.store.atomic import atomic_path

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
