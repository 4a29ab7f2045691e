"""AmeriFlux FLUXNET, ICOS L2 and FLUXNET2015 files, daily and sub-daily, through ``import fluxnet``.

Fixtures are files in each product's naming and columns built from the shared daily data
(:mod:`tests.flux_fixtures`); the reference is the import of the shared daily file of the same
site, so a product × resolution passes only if it gives the same contract table. One day is also
written out by hand with its daily values computed in the test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kgml_peft.cli import cli
from kgml_peft.data.flux_files import FluxFile, expand_paths, identify
from kgml_peft.data.fluxnet import ImportOptions, convert, import_fluxnet
from kgml_peft.data.subdaily import read_sub_daily
from kgml_peft.data.tables import read_table
from kgml_peft.errors import KgmlPeftError
from tests.flux_fixtures import SHARED, records_from_daily, shared_daily, write_fixture
from tests.test_cli_validation import _runner, _snapshot, check_user_error

SITES_CSV = SHARED / "sites.csv"
CROPS_CSV = SHARED / "crops.csv"
#: (product, site, resolution, grouping): every product × resolution the acceptance names; the
#: small development sites keep the files small (US-Tw2 has documented crops, so Crop_Type is
#: compared as well as NaN).
PRODUCTS = [
    ("AMF", "US-Tw3", "DD", "FULLSET"), ("AMF", "US-Tw2", "HH", "FULLSET"),
    ("AMF", "US-Lin", "HR", "FULLSET"), ("AMF", "US-Tw2", "HH", "SUBSET"),
    ("ICOS", "US-Lin", "DD", ""), ("ICOS", "US-Tw3", "HH", ""),
    ("FLX", "US-Tw2", "DD", "FULLSET"), ("FLX", "US-Tw3", "DD", "SUBSET"),
    ("FLX", "US-Lin", "HH", "FULLSET"), ("FLX", "US-Tw2", "HH", "SUBSET"), ("FLX", "US-Tw3", "HR", "FULLSET"),
    # the newest release names half-hourly and hourly files alike HH: the records decide
    ("FLUXMET", "US-Tw3", "DD", ""), ("FLUXMET", "US-Tw2", "HH", ""), ("FLUXMET", "US-Lin", "HR", ""),
]
LABELS = {"AMF": "AmeriFlux FLUXNET", "ICOS": "ICOS ETC L2", "FLX": "FLUXNET2015",
          "FLUXMET": "FLUXNET FLUXMET (AMF)"}
RESOLUTION = {"DD": "daily", "HH": "half-hourly", "HR": "hourly"}
VALUES = ["RADN", "TAVG_AIR", "TMAX_AIR", "TDIF_AIR", "VPD_AIR", "VPDMAX_AIR", "GPP", "lat", "lon",
          "Crop_Type", "NEE", "Reco", "NEE_gapfilled", "Reco_gapfilled"]


def invoke(args: list[str]):
    return _runner().invoke(cli, args)


@pytest.mark.parametrize("product, site, resolution, grouping", PRODUCTS,
                         ids=[f"{p}-{g or 'L2'}-{r}-{s}" for p, s, r, g in PRODUCTS])
def test_each_product_gives_the_shared_daily_table(product, site, resolution, grouping,
                                                   tmp_path: Path) -> None:
    path = write_fixture(tmp_path / "download", product, site, resolution, grouping or "FULLSET")
    out = tmp_path / "new" / "folder" / "table.parquet"
    args = ["import", "fluxnet", str(path), "--out", str(out), "--site-meta", str(SITES_CSV),
            "--crops", str(CROPS_CSV), "--json"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["sites"][0]
    kind = f"{LABELS[product]} {grouping}" if grouping else LABELS[product]
    assert report["product"] == f"{kind}, {RESOLUTION[resolution]}"
    assert report["site"] == site and report["region"] != site  # the metadata row was used
    got = read_table(out)
    want, _ = import_fluxnet([shared_daily(site)], site_meta=SITES_CSV, crops=CROPS_CSV)
    assert list(got.columns) == list(want.columns)
    assert got["date"].tolist() == want["date"].tolist()
    assert (got[["site", "region"]].to_numpy() == want[["site", "region"]].to_numpy()).all()
    for name in VALUES:
        a, b = got[name].to_numpy(dtype=float), want[name].to_numpy(dtype=float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), name  # same days masked, same crops unknown
        assert np.nanmax(np.abs(a - b), initial=0.0) <= 1e-6, name
    qc, shared_qc = got["NEE_QC"].to_numpy(), want["NEE_QC"].to_numpy()
    if resolution == "HH":  # k/48 exactly; the shared file keeps 4 decimals
        assert np.array_equal(np.round(qc, 4), shared_qc)
        assert np.allclose(qc * 48, np.rint(qc * 48), atol=1e-9)
    elif resolution == "HR":  # whole hours: at most one half-hour off, never across 0.5
        assert np.abs(qc - shared_qc).max() <= 1 / 48 + 1e-4
        assert np.array_equal(qc < 0.5, shared_qc < 0.5)
    else:
        assert np.array_equal(qc, shared_qc)
    if resolution != "DD":
        per_day = 48 if resolution == "HH" else 24
        assert report["records"] == per_day * len(want) and report["incomplete_days"] == 0


def _one_day_by_hand(folder: Path, name: str = "AMF_US-Abc_FLUXNET_FULLSET_HH_2020-2020_3-5.csv",
                     ta_missing: bool = False, drop_record: bool = False) -> Path:
    """Two days (2020-07-01/02) of 48 half-hours with round numbers, the first written out below."""
    lines = ["TIMESTAMP_START,TIMESTAMP_END,TA_F,SW_IN_F,VPD_F,P_F,WS_F,NEE_VUT_REF,NEE_VUT_REF_QC,"
             "GPP_NT_VUT_REF,RECO_NT_VUT_REF,LE_F_MDS"]
    for day in ("20200701", "20200702"):
        for k in range(48):
            start = pd.Timestamp(day) + pd.Timedelta(minutes=30 * k)
            end = start + pd.Timedelta(minutes=30)
            ta = 5.0 if k == 6 else 25.0 if k == 30 else 10.0 if k < 24 else 20.0
            daytime = 12 <= k < 36               # 06:00-18:00: 24 half-hours
            sw, vpd, gpp = (400.0, 10.0, 4.0) if daytime else (0.0, 0.0, 0.0)
            reco = 3.0
            rain = 0.5 if k in (40, 41, 42, 43) else 0.0
            flag = 0 if k < 12 else 1 if k < 24 else 2
            if ta_missing and day == "20200702" and k == 10:
                ta = -9999
            if drop_record and day == "20200702" and k == 47:
                continue
            lines.append(f"{start:%Y%m%d%H%M},{end:%Y%m%d%H%M},{ta},{sw},{vpd},{rain},3.0,{reco - gpp},"
                         f"{flag},{gpp},{reco},-9999")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _daily_and_contract(path: Path, **options):
    """The aggregated daily values (ONEFlux names) and the contract rows of a short hand-made file
    (two days: too short for a table, which needs a whole year, so the rows are checked here)."""
    opts = ImportOptions(min_qc=0.25, **options)
    daily, info = read_sub_daily(path, "HH", 1 if opts.qc_counts == "good" else 0)
    rows, report = convert(daily, "US-Abc", "Nowhere", opts, path.name)
    return daily, info, rows, report


def test_one_day_aggregated_by_hand(tmp_path: Path) -> None:
    path = _one_day_by_hand(tmp_path)
    daily, info, rows, report = _daily_and_contract(path)
    day, row = daily.iloc[0], rows.iloc[0]
    gc = 12.0107e-6 * 1800 * 48  # gC m-2 d-1 per umol m-2 s-1 held all day
    assert day["TIMESTAMP"] == 20200701 and len(daily) == 2 and info.records == 96
    # TA: 23 half-hours at 10, 23 at 20, one at 5 and one at 25 -> (230 + 460 + 30) / 48 = 15
    assert day["TA_F"] == pytest.approx(15.0, abs=1e-12)
    assert (day["TA_F_MIN"], day["TA_F_MAX"]) == (5.0, 25.0)
    assert day["SW_IN_F"] == pytest.approx(200.0, abs=1e-12)              # 400 W m-2 half the day
    assert day["VPD_F"] == pytest.approx(5.0) and day["VPD_F_MAX"] == 10.0
    assert day["P_F"] == pytest.approx(2.0) and day["WS_F"] == pytest.approx(3.0)  # 4 x 0.5 mm
    assert day["GPP_NT_VUT_REF"] == pytest.approx(2.0 * gc, abs=1e-12)    # 4 umol half the day
    assert day["RECO_NT_VUT_REF"] == pytest.approx(3.0 * gc, abs=1e-12)
    assert day["NEE_VUT_REF"] == pytest.approx(1.0 * gc, abs=1e-12)       # 3 - 4 by day, 3 at night
    assert day["NEE_VUT_REF_QC"] == 0.25                                  # 12 of 48 flagged 0
    # the contract row: units as for any daily file
    assert row["RADN"] == pytest.approx(200.0 * 0.0864, abs=1e-12)
    assert (row["TAVG_AIR"], row["TMAX_AIR"], row["TDIF_AIR"]) == (pytest.approx(15.0), 25.0, 20.0)
    assert (row["PRECN"], row["WIND"], row["VPDMAX_AIR"]) == (pytest.approx(2.0), pytest.approx(3.0), 10.0)
    assert row["NEE"] == pytest.approx(gc) and row["GPP"] == pytest.approx(2 * gc)
    assert report.rows == 2 and report.qc_masked_days == 0
    good = _daily_and_contract(path, qc_counts="good")[0]
    assert good["NEE_VUT_REF_QC"].iloc[0] == 0.5                          # 24 of 48 flagged 0 or 1
    masked = convert(daily, "US-Abc", "Nowhere", ImportOptions(), path.name)[0]  # min_qc 0.5
    assert masked["NEE"].isna().all() and masked["NEE_gapfilled"].iloc[0] == pytest.approx(gc)


@pytest.mark.parametrize("edit", ["ta_missing", "drop_record"])
def test_a_day_with_a_missing_record_is_a_missing_day(edit: str, tmp_path: Path) -> None:
    path = _one_day_by_hand(tmp_path, **{edit: True})
    daily, info, rows, report = _daily_and_contract(path)
    assert info.incomplete_days == 1 and len(rows) == 2
    assert np.isnan(daily["TA_F"].iloc[1]) and np.isnan(daily["TA_F_MAX"].iloc[1])
    # the 2nd day's temperature is missing and filled from the 1st (the daily gap rule, at the edge)
    assert report.filled_days["TAVG_AIR"] == 1 and rows["TAVG_AIR"].iloc[1] == rows["TAVG_AIR"].iloc[0]
    if edit == "drop_record":   # every column lacks the record: the fluxes are missing too
        assert np.isnan(rows["NEE"].iloc[1]) and info.missing_records["TA_F"] == 0
    else:                       # only TA is missing; the day's fluxes stay
        assert rows["NEE"].iloc[1] == pytest.approx(rows["NEE"].iloc[0])
        assert info.missing_records["TA_F"] == 1
    with pytest.raises(KgmlPeftError, match="every year has an input gap"):  # nothing may be filled
        _daily_and_contract(path, max_gap=0)


def test_qc_counts_good_against_the_flags_of_the_file(tmp_path: Path) -> None:
    path = write_fixture(tmp_path, "AMF", "US-Tw3", "HH")
    records = pd.read_csv(path, dtype={"TIMESTAMP_START": str})
    day = pd.to_datetime(records["TIMESTAMP_START"].str[:8], format="%Y%m%d")
    share = (records["NEE_VUT_REF_QC"] <= 1).groupby(day).mean()
    table, _ = import_fluxnet([path], options=ImportOptions(qc_counts="good"))
    assert np.allclose(table["NEE_QC"].to_numpy(), share.to_numpy(), atol=1e-12)
    measured, _ = import_fluxnet([path])
    assert (table["NEE_QC"] >= measured["NEE_QC"]).all()
    assert table["NEE"].notna().sum() > measured["NEE"].notna().sum()  # fewer days masked


def test_an_unzipped_download_folder_reads_its_half_hourly_file(tmp_path: Path) -> None:
    folder = tmp_path / "AMF_US-Tw3_FLUXNET_FULLSET_2013-2014_3-5"
    hh = write_fixture(folder, "AMF", "US-Tw3", "HH")
    dd = write_fixture(folder, "AMF", "US-Tw3", "DD")
    for extra in ("FULLSET_WW", "FULLSET_MM", "FULLSET_YY", "ERA5_HH", "ERA5_DD"):
        shutil.copy(dd, folder / dd.name.replace("FULLSET_DD", extra))
    for extra in ("AUXMETEO", "AUXNEE"):
        shutil.copy(dd, folder / f"AMF_US-Tw3_FLUXNET_{extra}_2013-2014_3-5.csv")
    (folder / "README.txt").write_text("AmeriFlux FLUXNET data product README\n")
    files = expand_paths([folder])
    assert files == [FluxFile(hh, "US-Tw3", "AmeriFlux FLUXNET", "FULLSET", "HH")]
    out = tmp_path / "t.csv"
    result = invoke(["import", "fluxnet", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "AmeriFlux FLUXNET FULLSET, half-hourly" in result.output
    assert "TMAX_AIR" in result.output.splitlines()[-1]  # the sub-daily file gives daily extremes


def test_a_folder_of_official_daily_files_serves_the_daily_feature_list(tmp_path: Path) -> None:
    """Official DD files have no daily minimum or maximum: the table then has the DD features."""
    path = write_fixture(tmp_path, "ICOS", "US-Lin", "DD")
    frame = pd.read_csv(path).drop(columns=["TA_F_MIN", "TA_F_MAX", "VPD_F_MAX"])
    frame.to_csv(path, index=False)
    table, (report,) = import_fluxnet([path])
    assert "TMAX_AIR" not in table and "VPDMAX_AIR" not in table
    assert {"RADN", "TAVG_AIR", "VPD_AIR", "GPP"} <= set(table.columns)
    assert {"TA_F_MIN", "TA_F_MAX", "VPD_F_MAX"} <= set(report.absent_columns)


NAMES = [
    ("FLX_US-Ne1_FLUXNET2015_FULLSET_HH_2001-2013_1-4.csv", "FLUXNET2015", "FULLSET", "HH"),
    ("FLX_US-Ne1_FLUXNET2015_SUBSET_HR_2001-2013_1-4.csv", "FLUXNET2015", "SUBSET", "HR"),
    ("FLX_US-Ne1_FLUXNET2015_FULLSET_DD_2001-2013_1-4.csv", "FLUXNET2015", "FULLSET", "DD"),
    ("FLX_US-Ne1_FLUXNET2015_DD-FROM-HH_2001-2012.csv", "FLUXNET2015", "", "DD"),
    ("FLX_DE-Tha_FLUXNET2015_FULLSET_HH_2016-2020_beta-3.csv", "FLUXNET2015", "FULLSET", "HH"),
    ("AMF_US-Ha1_FLUXNET_FULLSET_HR_1992-2020_3-5.csv", "AmeriFlux FLUXNET", "FULLSET", "HR"),
    ("AMF_US-Ne1_FLUXNET_SUBSET_DD_2001-2020_3-5.csv", "AmeriFlux FLUXNET", "SUBSET", "DD"),
    ("EUF_CH-Oe2_FLUXNET_FLUXMET_HH_2004-2024_v1.3_r1.csv", "FLUXNET FLUXMET", "", "SD"),
    ("AMF_US-Ha1_FLUXNET_FLUXMET_HR_1991-2025_v1.3_r1.csv", "FLUXNET FLUXMET", "", "HR"),
    ("ICOSETC_FI-Ken_FLUXNET_FLUXMET_DD_2018-2025_v1.3_r1.csv", "FLUXNET FLUXMET", "", "DD"),
    ("AMF_us-ab1_FLUXNET_FULLSET_HH_2001-2020_3-5.csv", "AmeriFlux FLUXNET", "FULLSET", "HH"),
    ("ICOSETC_DE-Tha_FLUXNET_HH_L2.csv", "ICOS ETC L2", "", "HH"),
    ("ICOSETC_FR-Fon_FLUXNET_DD_L2.csv", "ICOS ETC L2", "", "DD"),
    ("ICOSETC_BE-Lon_FLUXNET_HH_INTERIM_L2.csv", "ICOS ETC L2", "", "HH"),
]


@pytest.mark.parametrize("name, product, grouping, resolution", NAMES, ids=[n[0] for n in NAMES])
def test_names_of_each_product(name, product, grouping, resolution) -> None:
    flux = identify(Path("x") / name)
    assert (flux.product, flux.grouping, flux.resolution) == (product, grouping, resolution)
    assert flux.site == name.split("_")[1]  # literally as written


def _refused(name: str, tmp_path: Path, content: str = "TIMESTAMP,NEE_VUT_REF\n20200101,1\n") -> list[str]:
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return ["import", "fluxnet", str(path), "--out", str(tmp_path / "out.csv")]


def _mixed(tmp_path: Path) -> list[str]:
    amf = write_fixture(tmp_path / "a", "AMF", "US-Tw3", "HH")
    flx = write_fixture(tmp_path / "b", "FLX", "US-Tw3", "DD")
    return ["import", "fluxnet", str(amf), str(flx), "--out", str(tmp_path / "out.csv")]


def _mixed_folder(tmp_path: Path) -> list[str]:
    write_fixture(tmp_path / "f", "AMF", "US-Tw3", "DD", "FULLSET")
    write_fixture(tmp_path / "f", "AMF", "US-Tw3", "HH", "SUBSET")
    return ["import", "fluxnet", str(tmp_path / "f"), "--out", str(tmp_path / "out.csv")]


def _folder_with_a_lost_site(tmp_path: Path) -> list[str]:
    write_fixture(tmp_path / "f", "AMF", "US-Tw3", "HH")
    shutil.copy(SHARED / "AMF_US-CRT_BASE_HH_2-5.csv", tmp_path / "f" / "AMF_US-Xyz_BASE_HH_2-5.csv")
    return ["import", "fluxnet", str(tmp_path / "f"), "--out", str(tmp_path / "out.csv")]


def _folder_of_folders(tmp_path: Path) -> list[str]:
    write_fixture(tmp_path / "downloads" / "AMF_US-Tw3_FLUXNET_FULLSET_2013-2014_3-5", "AMF", "US-Tw3", "DD")
    return ["import", "fluxnet", str(tmp_path / "downloads"), "--out", str(tmp_path / "out.csv")]


def _case_twins(tmp_path: Path) -> list[str]:
    path = write_fixture(tmp_path / "f", "AMF", "US-Tw3", "DD")
    shutil.copy(path, tmp_path / "f" / path.name.replace("US-Tw3", "us-tw3"))
    return ["import", "fluxnet", str(tmp_path / "f"), "--out", str(tmp_path / "out.csv")]


def _meta_in_other_case(tmp_path: Path) -> list[str]:
    path = write_fixture(tmp_path / "f", "AMF", "US-Tw3", "DD")
    (tmp_path / "meta.csv").write_text("site,region,lat,lon\nus-tw3,CA,38.1,-121.6\n")
    return ["import", "fluxnet", str(path), "--site-meta", str(tmp_path / "meta.csv"),
            "--out", str(tmp_path / "out.csv")]


def _sub_daily_edit(edit, resolution: str = "HH"):
    """A 3-day AmeriFlux file of US-Tw3 records, edited."""
    def setup(tmp_path: Path) -> list[str]:
        daily = pd.read_csv(shared_daily("US-Tw3")).iloc[:3]
        records = edit(records_from_daily(daily, "HH" if resolution == "named-HR" else resolution))
        name = f"AMF_US-Tw3_FLUXNET_FULLSET_{'HR' if resolution == 'named-HR' else resolution}_2013-2013_3-5.csv"
        return _refused(name, tmp_path, records.to_csv(index=False))
    return setup


def _set(column: str, row: int, value):
    def edit(records: pd.DataFrame) -> pd.DataFrame:
        records[column] = records[column].astype(object)
        records.loc[row, column] = value
        return records
    return edit


#: File names import refuses whatever the content, and what the line must say.
NAME_REFUSALS = [
    ("AMF_US-CRT_BASE_HH_2-5.csv",
     ("AmeriFlux BASE file", "not gap-filled", "AMF_US-CRT_FLUXNET_FULLSET"), "ameriflux-base"),
    ("AMF_US-Ne1_FLUXNET_FULLSET_MM_2001-2020_3-5.csv",
     ("monthly AmeriFlux FLUXNET file", "(DD)", "(HH)", "(HR)"), "amf-monthly"),
    ("AMF_US-Ne1_FLUXNET_FULLSET_WW_2001-2020_3-5.csv",
     ("weekly",), "amf-weekly"),
    ("FLX_US-Ne1_FLUXNET2015_SUBSET_YY_2001-2013_1-4.csv",
     ("yearly FLUXNET2015 file",), "flx-yearly"),
    ("ICOSETC_DE-Tha_FLUXNET_MM_L2.csv",
     ("monthly ICOS ETC L2 FLUXNET file",), "icos-monthly"),
    ("AMF_US-Ne1_FLUXNET_ERA5_HH_1981-2020_3-5.csv",
     ("ERA5", "no fluxes", "AMF_US-Ne1_FLUXNET_FULLSET"), "amf-era5"),
    ("AMF_US-Ne1_FLUXNET_AUXNEE_2001-2020_3-5.csv",
     ("auxiliary NEE",), "amf-auxnee"),
    ("FLX_US-Ne1_FLUXNET2015_ERAI_DD_1989-2014_1-4.csv",
     ("ERA-Interim", "FLX_US-Ne1_FLUXNET2015_FULLSET"), "flx-erai"),
    ("FLX_US-Ne1_FLUXNET-CH4_HH_2001-2013_1-1.csv",
     ("FLUXNET-CH4",), "fluxnet-ch4"),
    ("ICOSETC_DE-Tha_METEO_L2.csv",
     ("ICOS ETC L2 METEO", "ICOSETC_DE-Tha_FLUXNET_HH_L2.csv"), "icos-meteo"),
    ("ICOSETC_DE-Tha_FLUXES_L2.csv",
     ("FLUXES", "not the ONEFlux FLUXNET product"), "icos-fluxes"),
    ("ICOSETC_DE-Tha_VARINFO_FLUXNET_HH_L2.csv",
     ("metadata",), "icos-varinfo"),
    ("AMF_US-Ne1_FLUXNET_FULLSET_2001-2020_3-5.zip",
     ("zip archive", "unzip"), "zip"),
    ("US-Ne1_daily.csv",
     ("not a FLUXNET file name", "AMF_<site>_FLUXNET"), "unknown-name"),
    ("amf_us-ne1_fluxnet_fullset_hh_2001-2020_3-5.csv",
     ("not spelled as downloads are", "site id is read from it literally"), "lower-case-name"),
    ("AMF_US-Ne1_FLUXNET_FULLSET_HH_2001-2020_3-5.CSV",
     ("not spelled as downloads are",), "upper-case-extension"),
    ("EUF_CH-Oe2_FLUXNET_FLUXMET_MM_2004-2024_v1.3_r1.csv",
     ("monthly FLUXNET FLUXMET file", "(HH)"), "fluxmet-monthly"),
    ("EUF_CH-Oe2_FLUXNET_BIFVARINFO_HH_2004-2024_v1.3_r1.csv",
     ("variable metadata", "EUF_CH-Oe2_FLUXNET_FLUXMET_HH"), "fluxmet-varinfo"),
    ("EUF_CH-Oe2_FLUXNET_ERA5_HH_1981-2024_v1.3_r1.csv",
     ("ERA5", "no fluxes"), "fluxmet-era5"),
    ("AMF_US-Ne1_FLUXNET_FULLSET_HH_2001-2020_3-5.csv",
     ("named HH", "TIMESTAMP", "daily records"), "daily-records-named-hh"),
]


REFUSED = [
    *(pytest.param(lambda t, n=name: _refused(n, t), expect, id=case) for name, expect, case in NAME_REFUSALS),
    pytest.param(_mixed, ("site US-Tw3 is in two files", "AmeriFlux FLUXNET FULLSET, half-hourly",
                          "FLUXNET2015 FULLSET, daily", "one product per site"), id="mixed-products"),
    pytest.param(_mixed_folder, ("site US-Tw3", "FULLSET", "SUBSET", "keep one of the two sets"),
                 id="fullset-and-subset-in-a-folder"),
    pytest.param(_folder_with_a_lost_site, ("no file of site US-Xyz can be imported", "AmeriFlux BASE"),
                 id="folder-with-a-site-of-refused-files"),
    pytest.param(_folder_of_folders, ("no FLUXNET daily", "1 subfolders are not searched"),
                 id="folder-of-download-folders"),
    pytest.param(_case_twins, ("US-Tw3", "us-tw3", "differ only in case"), id="sites-differing-in-case"),
    pytest.param(_meta_in_other_case, ("site metadata lists site us-tw3", "US-Tw3", "literally"),
                 id="site-meta-in-other-case"),
    pytest.param(lambda t: _refused("EUF_CH-Oe2_FLUXNET_FLUXMET_HH_2004-2024_v1.3_r1.csv", t),
                 ("named HH but has TIMESTAMP", "daily records"), id="daily-records-named-fluxmet-hh"),
    pytest.param(_sub_daily_edit(lambda r: r, "named-HR"),
                 ("30 minutes long", "hourly (HR)"), id="half-hours-named-hr"),
    pytest.param(_sub_daily_edit(lambda r: _set("TIMESTAMP_END", 5, "201301010245")(
        _set("TIMESTAMP_START", 5, "201301010215")(r))),
                 ("201301010215", "30-minute grid"), id="off-grid-record"),
    pytest.param(_sub_daily_edit(_set("TIMESTAMP_START", 5, "2013-01-01 02:30")),
                 ("TIMESTAMP_START", "YYYYMMDDHHMM", "2013-01-01 02:30"), id="iso-timestamp"),
    pytest.param(_sub_daily_edit(lambda r: pd.concat([r, r.iloc[[7]]], ignore_index=True)),
                 ("201301010330", "twice"), id="record-twice"),
    pytest.param(_sub_daily_edit(_set("NEE_VUT_REF_QC", 9, 0.5)),
                 ("NEE_VUT_REF_QC", "flags 0-3", "0.5"), id="qc-fraction-in-records"),
    pytest.param(_sub_daily_edit(lambda r: r.drop(columns=["NEE_VUT_REF"])),
                 ("missing column NEE_VUT_REF",), id="no-nee"),
    pytest.param(_sub_daily_edit(lambda r: _set("TIMESTAMP_END", 100, "209912310100")(
        _set("TIMESTAMP_START", 100, "209912310030")(r))),  # memory grows with records, not the span
                 ("every year has an input gap",), id="a-record-a-century-later"),
    pytest.param(_sub_daily_edit(lambda r: r.drop(columns=["TIMESTAMP_END"]), "named-HR"),
                 ("30 minutes apart", "hourly (HR)"), id="half-hours-named-hr-without-end"),
    pytest.param(_sub_daily_edit(lambda r: _set("TIMESTAMP_END", 9, "999912312330")(
        _set("TIMESTAMP_START", 9, "999912312300")(r))), ("TIMESTAMP_START", "outside the years", "9999"),
                 id="a-record-in-year-9999"),
    pytest.param(_sub_daily_edit(lambda r: r.rename(columns={"SW_IN_F": "NEE_VUT_REF_QC"})),
                 ("NEE_VUT_REF_QC appears 2 times",), id="a-header-twice"),
    pytest.param(lambda t: _refused("AMF_US-Ne1_FLUXNET_FULLSET_HH_2001-2020_3-5.csv", t,
                                    "TIMESTAMP_START;TA_F\n201301010000;1\n"),
                 ("missing column TIMESTAMP_START",), id="semicolon-separated"),
    pytest.param(_sub_daily_edit(_set("TA_F", 3, "warm")),
                 ("TA_F", "not numeric", "warm"), id="text-in-records"),
]


@pytest.mark.parametrize("setup, expect", REFUSED)
def test_files_import_cannot_use_get_one_line(setup, expect, tmp_path: Path) -> None:
    args = setup(tmp_path)
    before = _snapshot(tmp_path)
    check_user_error(invoke(args), args, expect, tmp_path, before)


def test_api_refusals_are_library_errors(tmp_path: Path) -> None:
    with pytest.raises(KgmlPeftError, match="BASE"):
        identify(tmp_path / "AMF_US-CRT_BASE_HH_2-5.csv")
    with pytest.raises(KgmlPeftError, match="qc_counts"):
        ImportOptions(qc_counts="all")


def _run_on(tmp_path: Path, terminal: bool) -> str:
    """``kgml-peft import fluxnet`` of the ten shared daily files with stderr on a pseudo-terminal
    or redirected to a file (as a log or CI run is); returns what stderr received."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    args = [sys.executable, "-m", "kgml_peft", "import", "fluxnet", str(SHARED / "daily"),
            "--out", str(tmp_path / ("tty.csv" if terminal else "log.csv"))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if not terminal:
        with open(tmp_path / "stderr.log", "wb") as log:
            done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=log, env=env, timeout=300)
        assert done.returncode == 0
        return (tmp_path / "stderr.log").read_text()
    main, child = pty.openpty()
    # a new pseudo-terminal is 0 columns wide, where tqdm draws an empty bar; a real one is not
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=child, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_a_bar_on_a_terminal_and_none_in_a_log(tmp_path: Path) -> None:
    on_terminal = _run_on(tmp_path, terminal=True)
    assert "import:" in on_terminal and "%|" in on_terminal, on_terminal
    in_log = _run_on(tmp_path, terminal=False)
    assert in_log == "", in_log  # not a bar, not a carriage return
    assert (tmp_path / "tty.csv").read_bytes() == (tmp_path / "log.csv").read_bytes()


def test_gaps_in_a_real_sized_file_reach_the_report(tmp_path: Path) -> None:
    """Two years of half-hours with one record absent and one temperature -9999, through the CLI:
    both days become missing days, are filled by the daily rule, and the report counts them."""
    path = write_fixture(tmp_path / "in", "AMF", "US-Tw3", "HH")
    records = pd.read_csv(path, dtype={"TIMESTAMP_START": str, "TIMESTAMP_END": str})
    records = records[records["TIMESTAMP_START"] != "201303100500"]
    records.loc[records["TIMESTAMP_START"] == "201306011200", "TA_F"] = -9999
    records.to_csv(path, index=False)
    out = tmp_path / "t.csv"
    result = invoke(["import", "fluxnet", str(path), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.stdout)["sites"]
    assert report["records"] == 730 * 48 - 1 and report["incomplete_days"] == 2
    assert report["missing_values"]["TA_F"] == 1 and report["missing_values"]["NEE_VUT_REF"] == 0
    assert report["filled_days"] == {"RADN": 1, "TMAX_AIR": 2, "TDIF_AIR": 2, "TAVG_AIR": 2,
                                     "VPD_AIR": 1, "VPDMAX_AIR": 1, "GPP": 1}
    assert report["rows"] == 730 and report["dropped_years"] == []
    got = read_table(out)
    got = got.set_index(pd.to_datetime(got["date"]))
    want = import_fluxnet([shared_daily("US-Tw3")])[0].set_index("date")
    gap, bad = pd.Timestamp("2013-03-10"), pd.Timestamp("2013-06-01")
    assert np.isnan(got.loc[gap, "NEE_gapfilled"])  # the fluxes of the day with an absent record
    assert got.loc[bad, "NEE_gapfilled"] == pytest.approx(want.loc[bad, "NEE_gapfilled"])  # only TA lost
    for day in (gap, bad):  # interpolated between the neighbouring days
        around = want.loc[[day - pd.Timedelta(days=1), day + pd.Timedelta(days=1)], "TAVG_AIR"].mean()
        assert got.loc[day, "TAVG_AIR"] == pytest.approx(around, abs=1e-6)
    other = got.index.difference([gap, bad])
    assert len(other) == 728
    assert np.allclose(got.loc[other, "TAVG_AIR"], want.loc[other, "TAVG_AIR"], atol=1e-6)
