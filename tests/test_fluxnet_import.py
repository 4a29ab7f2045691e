"""The FLUXNET2015 importer (``kgml_peft.data.fluxnet`` and ``kgml-peft import fluxnet``) on the
real daily files in ../shared/data/fluxnet2015.

Expected values come from the raw CSV files (read with pandas, or parsed by hand from the CSV
text), never from the importer's own output. Broken inputs are edited copies of a real file that
keep the FLUXNET2015 file-name pattern.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kgml_peft import schema
from kgml_peft.cli import cli
from kgml_peft.data.fluxnet import ImportOptions, import_fluxnet
from kgml_peft.data.tables import load_table, validate_table
from kgml_peft.data.windows import make_windows
from kgml_peft.errors import KgmlPeftError
from tests.test_cli_validation import _runner, _snapshot, check_user_error

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fluxnet2015"
DAILY = SHARED / "daily"
MONTHLY = SHARED / "monthly"
AMERIFLUX_HH = SHARED / "AMF_US-CRT_BASE_HH_2-5.csv"

pytestmark = pytest.mark.skipif(not DAILY.is_dir(), reason=f"real FLUXNET2015 data not found at {DAILY}")

#: The ten sites and their years (first, last), as the README and the file names give them.
SITE_YEARS = {
    "US-ARM": (2003, 2012), "US-CRT": (2011, 2013), "US-IB2": (2004, 2011), "US-Lin": (2009, 2010),
    "US-Ne1": (2001, 2012), "US-Ne2": (2001, 2012), "US-Ne3": (2001, 2012), "US-Tw2": (2012, 2013),
    "US-Tw3": (2013, 2014), "US-Twt": (2009, 2014),
}
SITE_YEAR_TOTAL = 69
FLUX_INPUTS = list(schema.FLUXNET_FEATURES)
TOL = 1e-9
#: The file the -9999 / broken-input cases copy and edit (three years, 2011-2013).
EDIT_SITE = "US-CRT"
_FILE_NAME = re.compile(r"^FLX_(?P<site>[A-Za-z0-9-]+)_FLUXNET2015_DD-FROM-HH_(?P<y0>\d{4})-(?P<y1>\d{4})\.csv$")


def daily_file(site: str) -> Path:
    (path,) = DAILY.glob(f"FLX_{site}_FLUXNET2015_DD*.csv")
    return path


def raw_frame(site: str) -> pd.DataFrame:
    """The raw daily CSV, with a ``day`` column (Timestamp) parsed from TIMESTAMP."""
    raw = pd.read_csv(daily_file(site))
    raw["day"] = pd.to_datetime(raw["TIMESTAMP"].astype(str), format="%Y%m%d")
    return raw


def site_rows(table: pd.DataFrame, site: str) -> pd.DataFrame:
    return table[table[schema.SITE] == site].sort_values(schema.DATE).reset_index(drop=True)


def row_on(table: pd.DataFrame, site: str, day: str) -> pd.Series:
    rows = table[(table[schema.SITE] == site) & (table[schema.DATE] == pd.Timestamp(day))]
    assert len(rows) == 1, f"{site} {day}: {len(rows)} rows"
    return rows.iloc[0]


class CsvText:
    """A real daily file as text cells, to edit cell by cell and write back verbatim."""

    def __init__(self, site: str = EDIT_SITE) -> None:
        self.name = daily_file(site).name
        lines = daily_file(site).read_text().splitlines()
        self.header = lines[0].split(",")
        self.rows = [line.split(",") for line in lines[1:]]

    def index(self, day: str) -> int:
        key = day.replace("-", "")
        for i, row in enumerate(self.rows):
            if row[0] == key:
                return i
        raise KeyError(day)

    def cell(self, day: str, column: str) -> str:
        return self.rows[self.index(day)][self.header.index(column)]

    def set(self, day: str, column: str, value: str, n: int = 1) -> CsvText:
        first, col = self.index(day), self.header.index(column)
        for i in range(first, first + n):
            self.rows[i][col] = value
        return self

    def drop_days(self, day: str, n: int = 1) -> CsvText:
        first = self.index(day)
        del self.rows[first:first + n]
        return self

    def drop_column(self, column: str) -> CsvText:
        col = self.header.index(column)
        del self.header[col]
        for row in self.rows:
            del row[col]
        return self

    def text(self) -> str:
        return "\n".join(",".join(r) for r in [self.header, *self.rows]) + "\n"

    def write(self, folder: Path, name: str | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (name or self.name)
        path.write_text(self.text())
        return path


@pytest.fixture(scope="module")
def imported() -> tuple[pd.DataFrame, list]:
    """Every daily file through the Python API with the default options."""
    return import_fluxnet([DAILY])


def invoke(args: list[str]):
    return _runner().invoke(cli, args, catch_exceptions=True)


def assert_ok(result, args) -> None:
    detail = f"args={args}\nstdout={result.stdout!r}\nstderr={result.stderr!r}\nexc={result.exception!r}"
    assert result.exit_code == 0, detail
    assert result.exception is None or isinstance(result.exception, SystemExit), detail


# ---------------------------------------------------------------------------------------------
# 1. every real file imports


def test_shared_folder_holds_the_ten_daily_files() -> None:
    names = sorted(p.name for p in DAILY.glob("*.csv"))
    assert len(names) == 10
    found = {}
    for name in names:
        match = _FILE_NAME.match(name)
        assert match, name
        found[match["site"]] = (int(match["y0"]), int(match["y1"]))
    assert found == SITE_YEARS
    assert sum(y1 - y0 + 1 for y0, y1 in found.values()) == SITE_YEAR_TOTAL


def test_cli_imports_every_daily_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["import", "fluxnet", str(DAILY), "--out", "x.parquet", "--json"]
    result = invoke(args)
    assert_ok(result, args)
    report = json.loads(result.stdout)
    assert report["out"] == "x.parquet"
    assert report["options"] == {"min_qc": 0.5, "gpp": "NT", "max_gap": 7, "qc_counts": "measured"}
    assert sorted(s["site"] for s in report["sites"]) == sorted(SITE_YEARS)

    table = load_table(tmp_path / "x.parquet", schema.FLUXNET_FEATURES)
    assert report["rows"] == len(table)
    assert sorted(table[schema.SITE].unique()) == sorted(SITE_YEARS)
    windows = make_windows(table, schema.FLUXNET_FEATURES)
    assert len(windows) == SITE_YEAR_TOTAL
    assert windows.dropped == []
    for site, (y0, y1) in SITE_YEARS.items():
        years = sorted(int(y) for y in windows.years[windows.sites == site])
        assert years == list(range(y0, y1 + 1)), site
        entry = next(s for s in report["sites"] if s["site"] == site)
        raw_days = len(daily_file(site).read_text().splitlines()) - 1
        assert entry["rows"] == raw_days == len(site_rows(table, site))
        assert entry["first_date"] == f"{y0}-01-01" and entry["last_date"] == f"{y1}-12-31"
        assert entry["region"] == site
        assert entry["dropped_years"] == [] and entry["filled_days"] == {}
        assert entry["missing_days"] == 0
        assert sorted(entry["inputs"]) == sorted(FLUX_INPUTS)
    assert windows.inputs.shape == (SITE_YEAR_TOTAL, schema.DAYS_PER_YEAR, len(FLUX_INPUTS))
    assert np.isfinite(windows.inputs).all()


@pytest.mark.parametrize("site", sorted(SITE_YEARS))
def test_api_imports_each_file(site: str) -> None:
    table, reports = import_fluxnet([daily_file(site)])
    y0, y1 = SITE_YEARS[site]
    raw = raw_frame(site)
    assert len(reports) == 1
    report = reports[0]
    assert (report.site, report.region, report.file) == (site, site, daily_file(site).name)
    assert report.rows == len(table) == len(raw)
    assert list(table[schema.SITE].unique()) == [site]
    assert table[schema.DATE].min() == pd.Timestamp(f"{y0}-01-01")
    assert table[schema.DATE].max() == pd.Timestamp(f"{y1}-12-31")
    assert table[schema.DATE].is_monotonic_increasing and table[schema.DATE].is_unique
    assert report.missing_values == {name: 0 for name in report.missing_values}
    assert set(report.absent_columns) == {"P_F", "WS_F"}
    for name in FLUX_INPUTS:
        assert table[name].notna().all(), name
    windows = make_windows(table, schema.FLUXNET_FEATURES)
    assert sorted(windows.years.tolist()) == list(range(y0, y1 + 1))


# ---------------------------------------------------------------------------------------------
# 2. units against raw rows


@pytest.mark.parametrize("site, day", [("US-Ne1", "2005-07-15"), ("US-Ne1", "2005-07-16"),
                                       ("US-CRT", "2011-01-01"), ("US-ARM", "2008-04-30")])
def test_units_of_single_raw_rows(imported, site: str, day: str) -> None:
    table, _ = imported
    raw = raw_frame(site)
    src = raw[raw["day"] == pd.Timestamp(day)].iloc[0]
    got = row_on(table, site, day)
    assert got[schema.SITE] == site and got[schema.REGION] == site
    assert got[schema.DATE] == pd.Timestamp(day)
    assert abs(got["RADN"] - src["SW_IN_F"] * 0.0864) < TOL
    assert abs(got["TAVG_AIR"] - src["TA_F"]) < TOL
    assert abs(got["TMAX_AIR"] - src["TA_F_MAX"]) < TOL
    assert abs(got["TDIF_AIR"] - (src["TA_F_MAX"] - src["TA_F_MIN"])) < TOL
    assert abs(got["VPD_AIR"] - src["VPD_F"]) < TOL
    assert abs(got["VPDMAX_AIR"] - src["VPD_F_MAX"]) < TOL
    assert abs(got["GPP"] - src["GPP_NT_VUT_REF"]) < TOL
    assert abs(got["NEE_QC"] - src["NEE_VUT_REF_QC"]) < TOL
    assert abs(got["NEE_gapfilled"] - src["NEE_VUT_REF"]) < TOL
    assert abs(got["Reco_gapfilled"] - src["RECO_NT_VUT_REF"]) < TOL
    if src["NEE_VUT_REF_QC"] >= 0.5:
        assert abs(got["NEE"] - src["NEE_VUT_REF"]) < TOL
        assert abs(got["Reco"] - src["RECO_NT_VUT_REF"]) < TOL
    else:
        assert np.isnan(got["NEE"]) and np.isnan(got["Reco"])


def test_qc_of_chosen_rows() -> None:
    """The rows above cover both sides of the QC threshold, including QC exactly 0.5 (kept)."""
    ne1 = raw_frame("US-Ne1").set_index("day")["NEE_VUT_REF_QC"]
    assert ne1[pd.Timestamp("2005-07-15")] < 0.5 <= ne1[pd.Timestamp("2005-07-16")]
    assert ne1[pd.Timestamp("2005-07-13")] == 0.5


def test_qc_exactly_at_threshold_is_kept(imported) -> None:
    table, _ = imported
    got = row_on(table, "US-Ne1", "2005-07-13")
    assert abs(got["NEE"] - (-14.8621)) < TOL
    assert abs(got["Reco"] - 9.9554) < TOL


def test_hand_computed_row(tmp_path: Path) -> None:
    """US-CRT, 2011-01-01, parsed here from the CSV text; expected numbers worked out by hand."""
    line = "20110101,6.4169,-3.9757,12.9899,27.1492,2.0737,4.0993,0.6286,0.0833,0.3828,0.0,1.0113"
    assert line in daily_file("US-CRT").read_text().splitlines()
    cells = dict(zip(CsvText("US-CRT").header, line.split(",")))
    assert cells["SW_IN_F"] == "27.1492" and cells["TA_F_MIN"] == "-3.9757"
    table, (report,) = import_fluxnet([daily_file("US-CRT")])
    got = row_on(table, "US-CRT", "2011-01-01")
    expected = {
        "RADN": 2.34569088,        # 27.1492 W m-2 * 86400 s / 1e6
        "TAVG_AIR": 6.4169,
        "TMAX_AIR": 12.9899,
        "TDIF_AIR": 16.9656,       # 12.9899 - (-3.9757)
        "VPD_AIR": 2.0737,
        "VPDMAX_AIR": 4.0993,
        "GPP": 0.3828,
        "NEE_QC": 0.0833,
        "NEE_gapfilled": 0.6286,
        "Reco_gapfilled": 1.0113,
    }
    for name, value in expected.items():
        assert abs(got[name] - value) < TOL, (name, got[name], value)
    # QC 0.0833 < 0.5: the targets are masked on this day
    assert np.isnan(got["NEE"]) and np.isnan(got["Reco"])
    assert report.first_date == "2011-01-01"
    # with GPP day-time partitioning the GPP input is GPP_DT_VUT_REF (0.0 here)
    dt, _ = import_fluxnet([_with_reco_dt("US-CRT", tmp_path)], options=ImportOptions(gpp="DT"))
    assert row_on(dt, "US-CRT", "2011-01-01")["GPP"] == 0.0
    assert abs(row_on(dt, "US-CRT", "2011-01-02")["GPP"] - 0.0) < TOL
    assert abs(row_on(table, "US-CRT", "2011-01-02")["GPP"] - (-0.6232)) < TOL


def test_units_of_every_row(imported) -> None:
    table, _ = imported
    for site in SITE_YEARS:
        raw, got = raw_frame(site), site_rows(table, site)
        assert (got[schema.DATE].to_numpy() == raw["day"].to_numpy()).all(), site
        assert (got[schema.REGION] == site).all()
        pairs = {"RADN": raw["SW_IN_F"] * 0.0864, "TAVG_AIR": raw["TA_F"], "TMAX_AIR": raw["TA_F_MAX"],
                 "TDIF_AIR": raw["TA_F_MAX"] - raw["TA_F_MIN"], "VPD_AIR": raw["VPD_F"],
                 "VPDMAX_AIR": raw["VPD_F_MAX"], "GPP": raw["GPP_NT_VUT_REF"],
                 "NEE_QC": raw["NEE_VUT_REF_QC"], "NEE_gapfilled": raw["NEE_VUT_REF"],
                 "Reco_gapfilled": raw["RECO_NT_VUT_REF"]}
        for name, want in pairs.items():
            np.testing.assert_allclose(got[name].to_numpy(), want.to_numpy(), rtol=0, atol=TOL,
                                       err_msg=f"{site} {name}")


def _with_reco_dt(site: str, folder: Path) -> Path:
    """A copy of a real file with a RECO_DT_VUT_REF column (the shared files have none): GPP_DT +
    NEE + 0.25, so it differs from RECO_NT by construction."""
    csv = CsvText(site)
    gpp, nee = csv.header.index("GPP_DT_VUT_REF"), csv.header.index("NEE_VUT_REF")
    csv.header.append("RECO_DT_VUT_REF")
    for row in csv.rows:
        row.append(repr(float(row[gpp]) + float(row[nee]) + 0.25))
    return csv.write(folder)


def test_gpp_dt_through_api_and_cli(tmp_path: Path, monkeypatch) -> None:
    files = [_with_reco_dt("US-Ne1", tmp_path / "in"), _with_reco_dt("US-CRT", tmp_path / "in")]
    table, _ = import_fluxnet(files, options=ImportOptions(gpp="DT"))
    monkeypatch.chdir(tmp_path)
    args = ["import", "fluxnet", *map(str, files), "--out", "dt.csv", "--gpp", "DT"]
    result = invoke(args)
    assert_ok(result, args)
    from_cli = load_table(tmp_path / "dt.csv", schema.FLUXNET_FEATURES)
    for site in ("US-Ne1", "US-CRT"):
        raw = raw_frame(site)
        kept = (raw["NEE_VUT_REF_QC"] >= 0.5).to_numpy()
        for got in (site_rows(table, site), site_rows(from_cli, site)):
            np.testing.assert_allclose(got["GPP"].to_numpy(), raw["GPP_DT_VUT_REF"].to_numpy(),
                                       rtol=0, atol=TOL)
            assert not np.allclose(got["GPP"].to_numpy(), raw["GPP_NT_VUT_REF"].to_numpy())
            # Reco comes from the same (day-time) partitioning, masked like NEE
            reco_dt = raw["GPP_DT_VUT_REF"].to_numpy() + raw["NEE_VUT_REF"].to_numpy() + 0.25
            np.testing.assert_allclose(got["Reco"].to_numpy()[kept], reco_dt[kept], rtol=0, atol=1e-6)
            assert got["Reco"][~kept].isna().all()
            # the other inputs do not depend on the partitioning
            np.testing.assert_allclose(got["RADN"].to_numpy(), raw["SW_IN_F"].to_numpy() * 0.0864,
                                       rtol=0, atol=TOL)


def test_edge_gaps_take_the_nearest_value(tmp_path: Path) -> None:
    """A short input gap on the first or last days of the record is filled, not a reason to drop
    the year."""
    csv = CsvText().set("2011-01-01", "TA_F", "-9999", n=2).set("2013-12-29", "VPD_F", "-9999", n=3)
    table, (report,) = import_fluxnet([csv.write(tmp_path)])
    assert report.dropped_years == [] and report.filled_days == {"TAVG_AIR": 2, "VPD_AIR": 3}
    rows = site_rows(table, EDIT_SITE)
    assert (rows["TAVG_AIR"].iloc[:2] == float(csv.cell("2011-01-03", "TA_F"))).all()
    assert (rows["VPD_AIR"].iloc[-3:] == float(csv.cell("2013-12-28", "VPD_F"))).all()


def test_site_meta_as_a_dataframe_is_checked_like_a_file() -> None:
    meta = pd.DataFrame({"site": ["US-CRT"], "region": ["OH"], "TSAND": [12.5]})
    table, _ = import_fluxnet([daily_file("US-CRT")], site_meta=meta)
    assert (table["region"] == "OH").all() and (table["TSAND"] == 12.5).all()
    with pytest.raises(KgmlPeftError, match="TSAND needs a number"):
        import_fluxnet([daily_file("US-CRT")], site_meta=meta.assign(TSAND=["sandy"]))


# ---------------------------------------------------------------------------------------------
# 3. QC masking


@pytest.mark.parametrize("site", sorted(SITE_YEARS))
def test_qc_masking_default(imported, site: str) -> None:
    table, reports = imported
    raw, got = raw_frame(site), site_rows(table, site)
    report = next(r for r in reports if r.site == site)
    low = (raw["NEE_VUT_REF_QC"] < 0.5).to_numpy()
    assert 0 < low.sum() < len(raw), "the data should have days on both sides of the threshold"
    nee, reco = got["NEE"].to_numpy(), got["Reco"].to_numpy()
    assert (np.isnan(nee) == low).all()
    assert (np.isnan(reco) == low).all()
    np.testing.assert_array_equal(nee[~low], raw["NEE_VUT_REF"].to_numpy()[~low])
    np.testing.assert_array_equal(reco[~low], raw["RECO_NT_VUT_REF"].to_numpy()[~low])
    np.testing.assert_array_equal(got["NEE_gapfilled"].to_numpy(), raw["NEE_VUT_REF"].to_numpy())
    np.testing.assert_array_equal(got["Reco_gapfilled"].to_numpy(), raw["RECO_NT_VUT_REF"].to_numpy())
    assert report.qc_masked_days == int(low.sum())
    assert report.observed_nee_days == int((~low).sum())
    for name in FLUX_INPUTS:
        assert got[name].notna().all(), name


def test_min_qc_option_through_cli(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    site = "US-Ne1"
    raw = raw_frame(site)
    qc = raw["NEE_VUT_REF_QC"].to_numpy()
    tables, reports = {}, {}
    for min_qc in ("0", "0.5", "0.9"):
        out = f"qc{min_qc}.parquet"
        args = ["import", "fluxnet", str(daily_file(site)), "--out", out, "--min-qc", min_qc, "--json"]
        result = invoke(args)
        assert_ok(result, args)
        reports[min_qc] = json.loads(result.stdout)["sites"][0]
        tables[min_qc] = load_table(tmp_path / out, schema.FLUXNET_FEATURES)
    assert reports["0"]["qc_masked_days"] == 0
    assert tables["0"]["NEE"].notna().all() and tables["0"]["Reco"].notna().all()
    np.testing.assert_array_equal(tables["0"]["NEE"].to_numpy(), raw["NEE_VUT_REF"].to_numpy())
    assert reports["0.5"]["qc_masked_days"] == int((qc < 0.5).sum())
    assert reports["0.9"]["qc_masked_days"] == int((qc < 0.9).sum())
    assert reports["0.9"]["qc_masked_days"] > reports["0.5"]["qc_masked_days"] > 0
    assert (tables["0.9"]["NEE"].isna().to_numpy() == (qc < 0.9)).all()
    assert tables["0.9"]["NEE"].isna().sum() > tables["0.5"]["NEE"].isna().sum()
    for min_qc in ("0.5", "0.9"):  # the inputs are never masked
        pd.testing.assert_frame_equal(tables[min_qc][FLUX_INPUTS], tables["0"][FLUX_INPUTS])


# ---------------------------------------------------------------------------------------------
# 4. -9999 and missing days


def test_missing_nee_value(tmp_path: Path) -> None:
    path = CsvText().set("2012-06-15", "NEE_VUT_REF", "-9999").write(tmp_path)
    assert float(CsvText().cell("2012-06-15", "NEE_VUT_REF_QC")) >= 0.5  # would otherwise be kept
    table, (report,) = import_fluxnet([path])
    got = row_on(table, EDIT_SITE, "2012-06-15")
    assert np.isnan(got["NEE"]) and np.isnan(got["NEE_gapfilled"])
    assert report.missing_values["NEE_VUT_REF"] == 1
    assert sum(report.missing_values.values()) == 1
    assert report.dropped_years == [] and report.rows == 1096
    assert not (table[["NEE", "NEE_gapfilled"]] == -9999).any().any()
    # the neighbouring days are untouched
    assert abs(row_on(table, EDIT_SITE, "2012-06-14")["NEE_gapfilled"]
               - float(CsvText().cell("2012-06-14", "NEE_VUT_REF"))) < TOL


def test_short_input_gap_is_interpolated(tmp_path: Path) -> None:
    csv = CsvText()
    before, after = float(csv.cell("2012-06-09", "TA_F")), float(csv.cell("2012-06-13", "TA_F"))
    path = csv.set("2012-06-10", "TA_F", "-9999", n=3).write(tmp_path)
    table, (report,) = import_fluxnet([path])
    assert report.filled_days == {"TAVG_AIR": 3}
    assert report.missing_values["TA_F"] == 3
    assert report.dropped_years == [] and report.rows == 1096
    step = (after - before) / 4
    for k, day in enumerate(("2012-06-10", "2012-06-11", "2012-06-12"), start=1):
        assert abs(row_on(table, EDIT_SITE, day)["TAVG_AIR"] - (before + k * step)) < TOL, day
    assert abs(row_on(table, EDIT_SITE, "2012-06-11")["TAVG_AIR"] - (before + after) / 2) < TOL
    assert row_on(table, EDIT_SITE, "2012-06-09")["TAVG_AIR"] == before
    assert row_on(table, EDIT_SITE, "2012-06-13")["TAVG_AIR"] == after
    # other inputs of those days are the raw values
    assert abs(row_on(table, EDIT_SITE, "2012-06-11")["TMAX_AIR"]
               - float(CsvText().cell("2012-06-11", "TA_F_MAX"))) < TOL


def test_long_input_gap_drops_its_year(tmp_path: Path, monkeypatch) -> None:
    path = CsvText().set("2012-06-10", "SW_IN_F", "-9999", n=10).write(tmp_path / "in")
    table, (report,) = import_fluxnet([path])
    assert report.dropped_years == [2012]
    assert report.missing_values["SW_IN_F"] == 10
    years = table[schema.DATE].dt.year
    assert 2012 not in set(years)
    assert (years == 2011).sum() == 365 and (years == 2013).sum() == 365
    assert report.rows == 730 and report.first_date == "2011-01-01" and report.last_date == "2013-12-31"
    windows = make_windows(table, schema.FLUXNET_FEATURES)
    assert sorted(windows.years.tolist()) == [2011, 2013]
    # the same through the CLI
    monkeypatch.chdir(tmp_path)
    args = ["import", "fluxnet", str(path), "--out", "gap.parquet", "--json"]
    result = invoke(args)
    assert_ok(result, args)
    assert json.loads(result.stdout)["sites"][0]["dropped_years"] == [2012]
    written = load_table(tmp_path / "gap.parquet", schema.FLUXNET_FEATURES)
    assert 2012 not in set(written[schema.DATE].dt.year) and len(written) == 730


@pytest.mark.parametrize("max_gap, dropped", [(0, [2012]), (2, [2012]), (3, []), (7, [])])
def test_max_gap_limit(tmp_path: Path, max_gap: int, dropped: list[int]) -> None:
    path = CsvText().set("2012-06-10", "TA_F", "-9999", n=3).write(tmp_path)
    table, (report,) = import_fluxnet([path], options=ImportOptions(max_gap=max_gap))
    assert report.dropped_years == dropped
    assert (2012 in set(table[schema.DATE].dt.year)) == (not dropped)
    assert report.filled_days == ({} if dropped else {"TAVG_AIR": 3})
    assert table[FLUX_INPUTS].notna().all().all()


def test_max_gap_zero_through_cli(tmp_path: Path, monkeypatch) -> None:
    path = CsvText().set("2012-06-10", "TA_F", "-9999", n=3).write(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    args = ["import", "fluxnet", str(path), "--out", "g.csv", "--max-gap", "0", "--json"]
    result = invoke(args)
    assert_ok(result, args)
    assert json.loads(result.stdout)["sites"][0]["dropped_years"] == [2012]


def test_missing_days_are_counted_and_filled(tmp_path: Path) -> None:
    csv = CsvText()
    before = {c: float(csv.cell("2012-06-09", c)) for c in ("TA_F", "SW_IN_F", "GPP_NT_VUT_REF")}
    after = {c: float(csv.cell("2012-06-13", c)) for c in ("TA_F", "SW_IN_F", "GPP_NT_VUT_REF")}
    path = csv.drop_days("2012-06-10", 3).write(tmp_path)
    assert len(path.read_text().splitlines()) == 1 + 1096 - 3
    table, (report,) = import_fluxnet([path])
    assert report.missing_days == 3
    assert report.rows == 1096 == len(table)
    assert report.dropped_years == []
    assert report.filled_days == {name: 3 for name in FLUX_INPUTS}
    # the absent days have no NEE, so they are not counted as QC-masked
    kept = raw_frame(EDIT_SITE)
    kept = kept[~kept["day"].between(pd.Timestamp("2012-06-10"), pd.Timestamp("2012-06-12"))]
    assert report.qc_masked_days == int((kept["NEE_VUT_REF_QC"] < 0.5).sum())
    assert report.observed_nee_days == int((kept["NEE_VUT_REF_QC"] >= 0.5).sum())
    mid = row_on(table, EDIT_SITE, "2012-06-11")
    assert abs(mid["TAVG_AIR"] - (before["TA_F"] + after["TA_F"]) / 2) < TOL
    assert abs(mid["RADN"] - 0.0864 * (before["SW_IN_F"] + after["SW_IN_F"]) / 2) < TOL
    assert abs(mid["GPP"] - (before["GPP_NT_VUT_REF"] + after["GPP_NT_VUT_REF"]) / 2) < TOL
    for day in ("2012-06-10", "2012-06-11", "2012-06-12"):
        got = row_on(table, EDIT_SITE, day)
        for name in ("NEE", "Reco", "NEE_gapfilled", "Reco_gapfilled", "NEE_QC"):
            assert np.isnan(got[name]), (day, name)


def test_long_run_of_missing_days_drops_its_year(tmp_path: Path) -> None:
    path = CsvText().drop_days("2013-03-01", 10).drop_days("2012-06-10", 3).write(tmp_path)
    table, (report,) = import_fluxnet([path])
    assert report.missing_days == 13
    assert report.dropped_years == [2013]
    assert sorted(set(table[schema.DATE].dt.year)) == [2011, 2012]
    assert len(table) == 365 + 366


# ---------------------------------------------------------------------------------------------
# 5. site metadata


def test_site_meta_region_and_static_column(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"site": ["US-CRT", "US-Lin", "US-XXX"], "region": ["OH", "CA", "ZZ"],
                  "TSAND": [35.5, 20.25, 50.0], "colour": ["red", "green", "blue"]}
                 ).to_csv("meta.csv", index=False)
    files = [str(daily_file("US-CRT")), str(daily_file("US-Lin"))]
    args = ["import", "fluxnet", *files, "--out", "m.parquet", "--site-meta", "meta.csv", "--json"]
    result = invoke(args)
    assert_ok(result, args)
    regions = {s["site"]: s["region"] for s in json.loads(result.stdout)["sites"]}
    assert regions == {"US-CRT": "OH", "US-Lin": "CA"}
    table = load_table(tmp_path / "m.parquet", [*schema.FLUXNET_FEATURES, "TSAND"])
    assert "colour" not in pd.read_parquet(tmp_path / "m.parquet").columns
    crt, lin = site_rows(table, "US-CRT"), site_rows(table, "US-Lin")
    assert len(crt) == 1096 and len(lin) == 730
    assert (crt[schema.REGION] == "OH").all() and (lin[schema.REGION] == "CA").all()
    assert (crt["TSAND"] == 35.5).all() and (lin["TSAND"] == 20.25).all()


def test_site_missing_from_meta_keeps_its_id_as_region(tmp_path: Path) -> None:
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"site": ["US-CRT"], "region": ["OH"]}).to_csv(meta, index=False)
    table, reports = import_fluxnet([daily_file("US-CRT"), daily_file("US-Tw2")], site_meta=meta)
    assert {r.site: r.region for r in reports} == {"US-CRT": "OH", "US-Tw2": "US-Tw2"}
    assert set(site_rows(table, "US-CRT")[schema.REGION]) == {"OH"}
    assert set(site_rows(table, "US-Tw2")[schema.REGION]) == {"US-Tw2"}


def test_site_meta_static_column_for_a_single_site(tmp_path: Path) -> None:
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"site": ["US-CRT"], "region": ["OH"], "TSAND": [12.5], "unknown": [1]}
                 ).to_csv(meta, index=False)
    table, _ = import_fluxnet([daily_file("US-CRT")], site_meta=meta)
    assert "unknown" not in table.columns
    assert (table["TSAND"] == 12.5).all() and len(table) == 1096


SITES_CSV = SHARED / "sites.csv"
CROPS_CSV = SHARED / "crops.csv"
#: Small files: US-Tw2 (every year listed in crops.csv), US-Tw3 (none listed); US-Ne2 (rotation:
#: both crops) is imported through the API only.
CROP_SITES = ("US-Tw2", "US-Tw3")


def test_real_site_meta_and_crops_through_cli(tmp_path: Path, monkeypatch) -> None:
    """sites.csv and crops.csv as shipped: lat/lon per site and Crop_Type per listed site-year as
    the CSVs say (read here with pandas), Crop_Type empty (NaN) for the years crops.csv leaves out."""
    monkeypatch.chdir(tmp_path)
    args = ["import", "fluxnet", *(str(daily_file(s)) for s in CROP_SITES), "--out", "c.csv",
            "--site-meta", str(SITES_CSV), "--crops", str(CROPS_CSV), "--json"]
    result = invoke(args)
    assert_ok(result, args)
    report = {s["site"]: s for s in json.loads(result.stdout)["sites"]}
    sites = pd.read_csv(SITES_CSV).set_index("site")
    crops = pd.read_csv(CROPS_CSV)
    written = pd.read_csv(tmp_path / "c.csv", parse_dates=["date"])
    assert {"lat", "lon", "Crop_Type"} <= set(written.columns)
    assert not {"igbp", "irrigated", "management"} & set(written.columns)
    for site in CROP_SITES:
        rows = site_rows(written, site)
        assert len(rows) == len(raw_frame(site))
        assert (rows["region"] == sites.loc[site, "region"]).all()
        assert (rows["lat"] == sites.loc[site, "lat"]).all() and (rows["lon"] == sites.loc[site, "lon"]).all()
        mine = crops[crops["site"] == site]
        listed = dict(zip(mine["year"].astype(int), mine["crop"]))
        for year, year_rows in rows.groupby(rows["date"].dt.year):
            if year in listed:
                assert (year_rows["Crop_Type"] == {"maize": 1.0, "soybean": 0.0}[listed[year]]).all()
            else:
                assert year_rows["Crop_Type"].isna().all(), (site, year)
        unknown = sorted(set(rows["date"].dt.year) - set(listed))
        assert report[site]["unknown_crop_years"] == unknown
    assert report["US-Tw2"]["unknown_crop_years"] == []
    assert report["US-Tw3"]["unknown_crop_years"] == [2013, 2014]
    # the written table is a contract table: coordinates survive validation, Crop_Type is usable
    # where it is known and refused as a feature where it is not
    table = load_table(tmp_path / "c.csv", schema.FLUXNET_FEATURES)
    assert {"lat", "lon", "Crop_Type"} <= set(table.columns)  # Crop_Type kept as a site-year attribute
    windows = make_windows(table, schema.FLUXNET_FEATURES)
    assert len(windows) == 4
    assert np.isfinite(windows.crops[windows.sites == "US-Tw2"]).all()
    assert np.isnan(windows.crops[(windows.sites == "US-Tw3") & (windows.years >= 2013)]).all()
    tw2 = written[written["site"] == "US-Tw2"]
    assert len(validate_table(tw2, [*schema.FLUXNET_FEATURES, "Crop_Type", "lat", "lon"])) == 731
    with pytest.raises(KgmlPeftError, match="column Crop_Type has 730 NaN values .site US-Tw3"):
        load_table(tmp_path / "c.csv", [*schema.FLUXNET_FEATURES, "Crop_Type"])


def test_crop_rotation_through_api() -> None:
    """US-Ne2's maize-soybean rotation: both codes, each on every day of its year; crop names are
    case-insensitive and corn/soy are synonyms."""
    crops = pd.read_csv(CROPS_CSV)
    table, (report,) = import_fluxnet([daily_file("US-Ne2")], crops=CROPS_CSV)
    expected = crops[crops["site"] == "US-Ne2"].set_index("year")["crop"].map({"maize": 1.0, "soybean": 0.0})
    got = table.groupby(table[schema.DATE].dt.year)["Crop_Type"].agg(["min", "max"])
    assert (got["min"] == got["max"]).all()
    pd.testing.assert_series_equal(got["min"], expected, check_names=False, check_index_type=False)
    assert report.unknown_crop_years == [] and "Crop_Type" in report.inputs
    spelt = crops.assign(crop=crops["crop"].map({"maize": "Corn", "soybean": "SOY"}))
    again, _ = import_fluxnet([daily_file("US-Ne2")], crops=spelt)
    np.testing.assert_array_equal(again["Crop_Type"].to_numpy(), table["Crop_Type"].to_numpy())


def test_site_without_meta_row_keeps_region_and_drops_coordinates(tmp_path: Path) -> None:
    """A site sites.csv does not list is its own region, as without coordinates; coordinates known
    for some sites only are left out of the table (the contract has no NaN coordinates)."""
    meta = tmp_path / "meta.csv"
    pd.read_csv(SITES_CSV).query("site != 'US-Tw3'").to_csv(meta, index=False)
    table, reports = import_fluxnet([daily_file("US-Tw2"), daily_file("US-Tw3")], site_meta=meta)
    assert {r.site: r.region for r in reports} == {"US-Tw2": "CA", "US-Tw3": "US-Tw3"}
    assert not {"lat", "lon", "Crop_Type"} & set(table.columns)
    assert all("lat" not in r.inputs for r in reports)


# ---------------------------------------------------------------------------------------------
# 6. bad input: exit 2, one error line, nothing written


def _good_output(work: Path, name: str = "x.parquet") -> str:
    """An existing output file the failing command must leave as it is."""
    (work / name).write_bytes(b"previous output, must stay unchanged\n")
    return name


def _cmd(*paths, out: str = "x.parquet", extra: tuple[str, ...] = (), force: bool = True) -> list[str]:
    """The import command; with --force by default, so that a failing run had every right to
    replace the existing output it must leave unchanged."""
    return ["import", "fluxnet", *map(str, paths), "--out", out, *extra, *(["--force"] if force else [])]


def _edited(work: Path, edit, name: str | None = None) -> Path:
    return edit(CsvText()).write(work / "in", name)


def _sub_daily(work: Path) -> list[str]:
    folder = work / "in"
    folder.mkdir()
    path = folder / daily_file(EDIT_SITE).name
    lines = ["TIMESTAMP_START,TIMESTAMP_END,TA_F,SW_IN_F,NEE_VUT_REF,NEE_VUT_REF_QC,GPP_NT_VUT_REF"]
    for half_hour in range(96):
        start = pd.Timestamp("2011-01-01") + pd.Timedelta(minutes=30 * half_hour)
        end = start + pd.Timedelta(minutes=30)
        lines.append(f"{start:%Y%m%d%H%M},{end:%Y%m%d%H%M},1.5,10.0,0.5,1,0.2")
    path.write_text("\n".join(lines) + "\n")
    return _cmd(path, out=_good_output(work))


def _empty_folder(work: Path) -> list[str]:
    folder = work / "nothing"
    folder.mkdir()
    (folder / "notes.txt").write_text("no data here\n")
    return _cmd(folder)


def _text_cell(c: CsvText) -> CsvText:
    return c.set("2012-06-15", "TA_F", "abc")


def _duplicate_day(c: CsvText) -> CsvText:
    i = c.index("2012-06-15")
    c.rows.insert(i + 1, list(c.rows[i]))
    return c


def _same_site_twice(work: Path) -> list[str]:
    copy = CsvText().write(work / "in", "FLX_US-CRT_FLUXNET2015_FULLSET_DD_2011-2013_1-4.csv")
    return _cmd(daily_file(EDIT_SITE), copy, out=_good_output(work))


def _empty_file(work: Path) -> list[str]:
    folder = work / "in"
    folder.mkdir()
    path = folder / daily_file(EDIT_SITE).name
    path.write_bytes(b"")
    return _cmd(path)


def _header_only(work: Path) -> list[str]:
    folder = work / "in"
    folder.mkdir()
    path = folder / daily_file(EDIT_SITE).name
    path.write_text(",".join(CsvText().header) + "\n")
    return _cmd(path, out=_good_output(work))


def _meta(frame: pd.DataFrame):
    def setup(work: Path) -> list[str]:
        frame.to_csv(work / "meta.csv", index=False)
        return _cmd(daily_file(EDIT_SITE), out=_good_output(work), extra=("--site-meta", "meta.csv"))
    return setup


def _crops_file(work: Path, text: str) -> str:
    (work / "crops.csv").write_text(text)
    return "crops.csv"


def _crops(text: str):
    """A crops table ``text`` with the real US-CRT file, into an existing output (with --force)."""
    def setup(work: Path) -> list[str]:
        return _cmd(daily_file(EDIT_SITE), out=_good_output(work), extra=("--crops", _crops_file(work, text)))
    return setup


def _joules(c: CsvText) -> CsvText:
    col = c.header.index("SW_IN_F")
    for row in c.rows:  # J m-2 d-1 (x 86400) in the column that should hold W m-2
        row[col] = repr(float(row[col]) * 86400)
    return c


def _gap_every_year(c: CsvText) -> CsvText:
    for year in (2011, 2012, 2013):
        c.set(f"{year}-05-01", "VPD_F", "-9999", n=10)
    return c


def _file_case(edit, *, good_output: bool = False, extra: tuple[str, ...] = ()):
    def setup(work: Path) -> list[str]:
        path = _edited(work, edit)
        return _cmd(path, out=_good_output(work) if good_output else "x.parquet", extra=extra)
    return setup


CASES = [
    pytest.param(lambda w: _cmd(daily_file(EDIT_SITE), out=_good_output(w), force=False),
                 ("x.parquet exists", "--force"), id="existing-output-without-force"),
    pytest.param(lambda w: _cmd(next(MONTHLY.glob("FLX_US-CRT_*_MM_*.csv")), out=_good_output(w)),
                 ("monthly", "DD"), id="monthly-file"),
    pytest.param(lambda w: _cmd(MONTHLY), ("monthly: no file of site US-ARM can be imported",
                                           "monthly FLUXNET2015 file", "(DD)", "(HH)"), id="monthly-folder"),
    pytest.param(lambda w: _cmd(AMERIFLUX_HH, out=_good_output(w)),
                 ("AMF_US-CRT_BASE_HH_2-5.csv", "AmeriFlux BASE file", "AMF_US-CRT_FLUXNET_FULLSET"),
                 id="ameriflux-base-hh"),
    pytest.param(_sub_daily, ("TIMESTAMP_START", "sub-daily"), id="sub-daily-named-daily"),
    pytest.param(lambda w: _cmd(w / "FLX_US-CRT_FLUXNET2015_DD-FROM-HH_2011-2013.csv"),
                 ("does not exist",), id="missing-path"),
    pytest.param(_empty_folder, ("nothing", "no FLUXNET daily, half-hourly or hourly files", "AMF_<site>"),
                 id="folder-without-daily"),
    pytest.param(_file_case(lambda c: c.drop_column("NEE_VUT_REF"), good_output=True),
                 ("missing column NEE_VUT_REF",), id="no-NEE"),
    pytest.param(_file_case(lambda c: c.drop_column("GPP_NT_VUT_REF")),
                 ("missing column GPP_NT_VUT_REF",), id="no-GPP-NT"),
    pytest.param(_file_case(lambda c: c.drop_column("GPP_DT_VUT_REF"), extra=("--gpp", "DT")),
                 ("missing column GPP_DT_VUT_REF",), id="no-GPP-DT"),
    pytest.param(_file_case(lambda c: c.drop_column("NEE_VUT_REF_QC"), good_output=True),
                 ("NEE_VUT_REF_QC", "--min-qc 0"), id="no-QC"),
    pytest.param(_file_case(_text_cell), ("TA_F", "not numeric", "abc"), id="text-in-TA_F"),
    pytest.param(_file_case(_duplicate_day, good_output=True), ("2012-06-15", "twice"),
                 id="duplicate-day"),
    pytest.param(_file_case(lambda c: c.set("2012-06-15", "TIMESTAMP", "2012-13-01")),
                 ("TIMESTAMP", "2012-13-01"), id="iso-month-13"),
    pytest.param(_file_case(lambda c: c.set("2012-06-15", "TIMESTAMP", "20121301"), good_output=True),
                 ("TIMESTAMP", "20121301"), id="month-13"),
    pytest.param(_same_site_twice, ("US-CRT", "two files"), id="same-site-twice"),
    pytest.param(_empty_file, ("empty",), id="empty-file"),
    pytest.param(_header_only, ("no rows",), id="header-only"),
    pytest.param(_meta(pd.DataFrame({"site": ["US-CRT"], "area": ["OH"]})),
                 ("meta.csv", "missing column region"), id="meta-without-region"),
    pytest.param(_meta(pd.DataFrame({"site": ["../evil"], "region": ["OH"]})),
                 ("unsafe", "../evil"), id="meta-unsafe-site"),
    pytest.param(_meta(pd.DataFrame({"site": ["US-CRT", "US-CRT"], "region": ["OH", "IN"]})),
                 ("US-CRT", "twice"), id="meta-site-twice"),
    pytest.param(lambda w: _cmd(daily_file(EDIT_SITE), out="x.txt"), ("x.txt", ".csv or .parquet"),
                 id="out-txt"),
    pytest.param(lambda w: _cmd(daily_file(EDIT_SITE), out=_good_output(w), extra=("--min-qc", "1.5")),
                 ("--min-qc", "1.5"), id="min-qc-1.5"),
    pytest.param(lambda w: _cmd(daily_file(EDIT_SITE), extra=("--max-gap", "-1")),
                 ("--max-gap", "-1"), id="max-gap-negative"),
    pytest.param(lambda w: _cmd(daily_file(EDIT_SITE), extra=("--gpp", "XX")), ("--gpp", "XX"),
                 id="gpp-unknown"),
    pytest.param(_file_case(_joules, good_output=True), ("RADN",), id="radiation-in-joules"),
    pytest.param(_file_case(_gap_every_year), ("every year", "longer than 7 days"),
                 id="gap-every-year"),
    pytest.param(_file_case(lambda c: c.set("2012-06-15", "TIMESTAMP", "20120615.5"), good_output=True),
                 ("TIMESTAMP", "20120615.5"), id="fractional-timestamp"),
    pytest.param(_meta(pd.DataFrame({"site": ["US-CRT"], "region": ["OH"], "TSAND": ["sandy"]})),
                 ("TSAND", "sandy"), id="meta-text-static"),
    pytest.param(lambda w: (pd.DataFrame({"site": ["US-CRT"], "region": ["OH"], "TSAND": [12.5]})
                            .to_csv(w / "meta.csv", index=False),
                            _cmd(daily_file("US-CRT"), daily_file("US-Lin"), out=_good_output(w),
                                 extra=("--site-meta", "meta.csv")))[1],
                 ("TSAND", "US-Lin"), id="meta-static-without-every-site"),
    pytest.param(lambda w: _cmd(daily_file(EDIT_SITE), out=_good_output(w), extra=("--gpp", "DT")),
                 ("RECO_DT_VUT_REF", "--gpp NT"), id="dt-without-reco-dt"),
    pytest.param(_meta(pd.DataFrame({"site": ["US-CRT"], "region": ["OH"], "lat": [95.0], "lon": [-83.3]})),
                 ("meta.csv", "column lat", "[-90, 90]", "US-CRT", "95"), id="meta-lat-95"),
    pytest.param(_meta(pd.DataFrame({"site": ["US-CRT"], "region": ["OH"], "lat": [41.6], "lon": [-200]})),
                 ("meta.csv", "column lon", "[-180, 180]", "US-CRT", "-200"), id="meta-lon-minus-200"),
    pytest.param(_meta(pd.DataFrame({"site": ["US-CRT"], "region": ["OH"], "lat": ["north"],
                                     "lon": [-83.3]})),
                 ("meta.csv", "lat needs a number", "US-CRT", "north"), id="meta-lat-text"),
    pytest.param(_crops("site,year,crop\nUS-CRT,2011,maize\nUS-CRT,2012,wheat\n"),
                 ("crops.csv", "unknown crop 'wheat'", "US-CRT", "2012", "maize", "soybean"),
                 id="crops-unknown-crop"),
    pytest.param(_crops("site,year,crop\nUS-CRT,2011,maize\nUS-CRT,2011,Soybean\n"),
                 ("crops.csv", "US-CRT", "2011", "twice"), id="crops-site-year-twice"),
    pytest.param(_crops("site,season,crop\nUS-CRT,2011,maize\n"),
                 ("crops.csv", "missing column year"), id="crops-without-year"),
    pytest.param(_crops("site,year,crop\nUS-CRT,2011.5,maize\n"),
                 ("crops.csv", "whole years", "US-CRT", "2011.5"), id="crops-fractional-year"),
    pytest.param(_crops("site,year,crop\nUS-CRT,twenty,maize\n"),
                 ("crops.csv", "whole years", "twenty"), id="crops-text-year"),
    pytest.param(_crops("site,year,crop\nUS-CRT,2011,maize\n../x,2011,maize\n"),
                 ("crops.csv", "unsafe site id '../x'"), id="crops-unsafe-site"),
    pytest.param(_crops("site,year,crop\nUS-CRT,2011,\n"),
                 ("crops.csv", "column crop", "empty", "US-CRT"), id="crops-empty-crop"),
    pytest.param(lambda w: _cmd(daily_file(EDIT_SITE), out="crops.csv",
                                extra=("--crops", _crops_file(w, "site,year,crop\nUS-CRT,2011,maize\n"))),
                 ("output crops.csv", "is the input crops.csv"), id="out-is-the-crops-file"),
    pytest.param(lambda w: (CsvText().write(w), _cmd(w / CsvText().name, out=CsvText().name))[1],
                 ("output", "is the input"), id="out-is-an-input"),
    pytest.param(_file_case(lambda c: c.set("2012-06-15", "NEE_VUT_REF_QC", "87.5"), good_output=True),
                 ("NEE_VUT_REF_QC", "outside", "2012-06-15"), id="qc-in-percent"),
    pytest.param(_file_case(lambda c: c.set("2012-06-15", "TA_F_MAX", "-40"), good_output=True),
                 ("TA_F_MAX", "TA_F_MIN", "2012-06-15"), id="max-below-min"),
]


@pytest.mark.parametrize("setup, expect", CASES)
def test_bad_input_is_one_error_line(setup, expect, tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = setup(work)
    before = _snapshot(tmp_path)
    result = invoke(args)
    check_user_error(result, args, expect, tmp_path, before)


def test_missing_qc_imports_with_min_qc_zero(tmp_path: Path, monkeypatch) -> None:
    path = CsvText().drop_column("NEE_VUT_REF_QC").write(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    args = _cmd(path, out="noqc.parquet", extra=("--min-qc", "0", "--json"))
    result = invoke(args)
    assert_ok(result, args)
    report = json.loads(result.stdout)["sites"][0]
    assert "NEE_VUT_REF_QC" in report["absent_columns"]
    assert report["qc_masked_days"] == 0
    table = load_table(tmp_path / "noqc.parquet", schema.FLUXNET_FEATURES)
    raw = raw_frame(EDIT_SITE)
    np.testing.assert_array_equal(table["NEE"].to_numpy(), raw["NEE_VUT_REF"].to_numpy())
    assert pd.read_parquet(tmp_path / "noqc.parquet")["NEE_QC"].isna().all()


def test_good_output_is_replaced_on_success(tmp_path: Path, monkeypatch) -> None:
    """The unchanged-file checks above mean something: the same command on good data rewrites it."""
    monkeypatch.chdir(tmp_path)
    _good_output(tmp_path)
    before = (tmp_path / "x.parquet").read_bytes()
    args = _cmd(daily_file(EDIT_SITE))
    result = invoke(args)
    assert_ok(result, args)
    assert (tmp_path / "x.parquet").read_bytes() != before
    assert len(load_table(tmp_path / "x.parquet", schema.FLUXNET_FEATURES)) == 1096


# ---------------------------------------------------------------------------------------------
# 7. human-readable output


def test_cli_human_readable_summary(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["import", "fluxnet", str(DAILY), "--out", "x.csv"]
    result = invoke(args)
    assert_ok(result, args)
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["site", "region"]
    site_lines = lines[1:-1]
    assert len(site_lines) == len(SITE_YEARS)
    total = 0
    for line, site in zip(site_lines, sorted(SITE_YEARS)):
        y0, y1 = SITE_YEARS[site]
        days = len(daily_file(site).read_text().splitlines()) - 1
        total += days
        fields = line.split()
        assert fields[:5] == [site, site, f"{y0}-01-01", f"{y1}-12-31", str(days)], line
        assert fields[8] == "-" and line.endswith("FLUXNET2015, daily")  # no dropped years; the file kind
    assert lines[-1].startswith(f"wrote x.csv: {total} site-days, {len(SITE_YEARS)} sites; inputs ")
    assert set(lines[-1].split("inputs ")[1].split(", ")) == set(FLUX_INPUTS)
    assert (tmp_path / "x.csv").is_file()
