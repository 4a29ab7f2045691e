"""Ids are names, not numbers (issue 20, class 2).

Site, region, crop and adapter ids are read as the text they are: ``001`` is not ``1``, ``01`` and
``1`` are two sites, ``1e3`` is not 1000.0, ``TRUE`` is not a boolean and ``NA`` or ``null`` is a
name, not a missing value; only an empty cell is missing. Checked here:

* table-driven: every hostile id, as a site and as a region, through the toolkit's own table
  writer and reader (CSV and Parquet);
* a synth-style table (``simulate`` with its sites renamed to hostile ids) through the real
  ``calibrate``, ``adapters import`` and ``predict`` (daily and annual tables): adapter file names,
  their recorded site, and every output row keep the ids unchanged;
* a region labelled ``NA`` calibrated and served by region, and ``import fluxnet`` keeping a
  site-meta region ``NA``;
* bad input in the matrix style (exit 2, one ``error:`` line, nothing created or changed): empty
  ids, Parquet id columns stored as numbers or booleans, a selector ``1`` on a table with ``01``.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kgml_peft import schema
from kgml_peft.cli import cli
from kgml_peft.data.synthetic import SynthConfig, simulate
from kgml_peft.data.tables import read_table, validate_table, write_table
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.adapter import read_adapter
from tests.conftest import make_frame
from tests.test_bad_input_matrix import _mtimes
from tests.test_cli_validation import MARKER, _runner, _snapshot, case, check_user_error
from tests.test_fluxnet_import import DAILY, daily_file

#: The ids of the issue: each is what pandas would otherwise turn into a number, a boolean or NaN.
IDS = ("001", "1", "01", "1e3", "TRUE", "NA", "null")
#: More spellings pandas guesses at (numbers, infinities, NA words), all safe site ids.
MORE_IDS = ("0", "00", "1.0", "1e-3", "0x1", "inf", "nan", "NaN", "None", "NULL", "True",
            "false", "20030101")
#: Region labels of the synth-style table: NA spellings and a boolean, none of them a site id.
REGIONS = {"IA": "None", "IL": "nan", "IN": "FALSE"}
FEATURES = schema.DEFAULT_FEATURES
TINY = ["--epochs", "1", "--cv", "none", "--batch-size", "2", "--quiet", "--cpu"]


def _invoke(*args: str):
    result = _runner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    assert result.exit_code == 0, f"{args}\n{result.stdout}\n{result.stderr}\n{result.exception!r}"
    return result


def _cells(path: Path, column: str) -> list[str]:
    """A CSV column exactly as its text says (no type guessing at all)."""
    with path.open(newline="") as handle:
        return [row[column] for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def synth_frame() -> pd.DataFrame:
    """What ``synth`` writes (two years per site: one to fit, one to stop early), its first seven
    sites renamed to :data:`IDS`."""
    frame = simulate(SynthConfig(max_sites_per_region=3, max_years_per_site=2))
    keep = sorted(frame[schema.SITE].unique())[: len(IDS)]
    frame = frame[frame[schema.SITE].isin(keep)].copy()
    frame[schema.SITE] = frame[schema.SITE].map(dict(zip(keep, IDS)))
    frame[schema.REGION] = frame[schema.REGION].map(REGIONS)
    return frame.reset_index(drop=True)


# --- the reader and writer, table-driven ---------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("name", IDS + MORE_IDS)
def test_id_survives_write_and_read(name: str, suffix: str, tmp_path: Path) -> None:
    """One site whose id is also its region: a column of nothing but that spelling is where
    pandas' guessing bites (a column with other ids in it would stay text anyway)."""
    path = write_table(make_frame({name: name}, years=(2003,)), tmp_path / f"t{suffix}")
    read = read_table(path)
    assert read[schema.SITE].tolist() == [name] * len(read)
    assert read[schema.REGION].tolist() == [name] * len(read)
    table = validate_table(read, FEATURES)
    assert set(table[schema.SITE]) == {name} and set(table[schema.REGION]) == {name}
    if suffix == ".csv":
        assert set(_cells(path, schema.SITE)) == {name}


def test_synth_style_table_keeps_seven_distinct_sites(synth_frame: pd.DataFrame, tmp_path: Path) -> None:
    """``01`` and ``1`` (and ``001``) are three sites, not one site with duplicate dates."""
    for suffix in (".csv", ".parquet"):
        table = validate_table(read_table(write_table(synth_frame, tmp_path / f"s{suffix}")), FEATURES)
        assert sorted(table[schema.SITE].unique()) == sorted(IDS)
        assert sorted(table[schema.REGION].unique()) == sorted(REGIONS.values())
        assert (table.groupby(schema.SITE).size() >= 2 * schema.DAYS_PER_YEAR).all()


def test_missing_spellings_still_mean_nan_in_number_columns(tmp_path: Path) -> None:
    """Only id columns are read as text: ``NA``/``null`` in a number column stays a missing value."""
    frame = make_frame({"NA": "null"}, years=(2003,))
    frame["NEE"] = frame["NEE"].astype(object)
    frame.loc[[3, 4, 5], "NEE"] = ["NA", "null", ""]
    table = validate_table(read_table(write_table(frame, tmp_path / "t.csv")), FEATURES)
    assert table["NEE"].dtype == "float64" and table["NEE"].isna().sum() == 3
    assert set(table[schema.SITE]) == {"NA"} and set(table[schema.REGION]) == {"null"}


def test_parquet_ids_as_dictionary_strings_are_text(tmp_path: Path) -> None:
    """A categorical (dictionary-encoded) id column of strings is text, as written."""
    frame = make_frame({"001": "NA", "1": "NA"}, years=(2003,))
    frame["site"] = frame["site"].astype("category")
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    table = validate_table(read_table(tmp_path / "t.parquet"), FEATURES)
    assert sorted(table[schema.SITE].unique()) == ["001", "1"] and set(table[schema.REGION]) == {"NA"}


def test_numeric_ids_in_a_frame_are_refused_not_guessed() -> None:
    """The library path (a DataFrame, not a file) follows the same rule as a Parquet file."""
    frame = make_frame({"IA-001": "IA"}, years=(2003,))
    with pytest.raises(KgmlPeftError, match="column site holds float64 values such as 1.0, not text"):
        validate_table(frame.assign(site=1.0), FEATURES)
    with pytest.raises(KgmlPeftError, match="column region holds int64 values such as 7"):
        validate_table(frame.assign(region=7), FEATURES)


# --- calibrate, adapters import, predict ----------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(synth_frame, backbone_path, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The synth-style CSV, and the store ``calibrate`` wrote for all seven ids (one epoch)."""
    work = tmp_path_factory.mktemp("ids")
    data = write_table(synth_frame, work / "data.csv")
    store = work / "adapters"
    store.mkdir()
    _invoke("calibrate", "--site", ",".join(IDS), "--data", data, "--backbone", backbone_path,
            "--out", store, *TINY)
    return work, data, store


def test_calibrate_names_adapters_by_the_ids(calibrated) -> None:
    _, data, store = calibrated
    assert sorted(p.name for p in store.glob("*.safetensors")) == sorted(f"{i}.safetensors" for i in IDS)
    for name in IDS:
        adapter = read_adapter(store / f"{name}.safetensors")
        assert adapter.site == name and adapter.info["sites"] == [name], name
    assert set(_cells(data, schema.SITE)) == set(IDS)  # the writer wrote the ids as text


def test_import_and_predict_keep_the_ids(calibrated, backbone_path) -> None:
    work, data, store = calibrated
    received = work / "received"
    received.mkdir()
    for name in IDS:
        _invoke("adapters", "import", store / f"{name}.safetensors", "--store", received,
                "--backbone", backbone_path)
        assert read_adapter(received / f"{name}.safetensors").site == name
    assert sorted(p.name for p in received.glob("*.safetensors")) == sorted(f"{i}.safetensors" for i in IDS)

    pred, annual = work / "pred.csv", work / "annual.csv"
    _invoke("predict", "--data", data, "--backbone", backbone_path, "--adapters", received,
            "--site-column", "site", "--out", pred, "--annual", annual, "--quiet", "--cpu")
    sites, adapters = _cells(pred, "site"), _cells(pred, "adapter")
    assert sorted(set(sites)) == sorted(IDS) and len(sites) == len(IDS) * 2 * schema.DAYS_PER_YEAR
    assert sites == adapters  # each row served by its own site's adapter, 001 by 001, not 1
    assert sorted(_cells(annual, "site")) == sorted(IDS * 2)
    assert _cells(annual, "site") == _cells(annual, "adapter")
    back = read_table(pred)  # the toolkit reads its own output back unchanged
    assert list(back["site"]) == sites and list(back["adapter"]) == adapters

    one = work / "one.parquet"
    _invoke("predict", "--data", data, "--backbone", backbone_path, "--adapters", received,
            "--site", "001", "--out", one, "--quiet", "--cpu")
    served = pd.read_parquet(one)
    assert set(served["adapter"]) == {"001"} and sorted(served["site"].unique()) == sorted(IDS)
    assert read_table(one)["site"].tolist() == served["site"].tolist()


def test_region_named_na_is_calibrated_and_served(synth_frame, backbone_path, tmp_path: Path) -> None:
    """A region ``NA`` (and one ``null``) is a label: calibrated pooled, served by region."""
    frame = synth_frame[synth_frame[schema.SITE].isin(["001", "01", "1"])].copy()
    frame[schema.REGION] = frame[schema.SITE].map({"001": "NA", "01": "NA", "1": "null"})
    data = write_table(frame, tmp_path / "regions.csv")
    store = tmp_path / "adapters"
    store.mkdir()
    _invoke("calibrate", "--site", "NA", "--data", data, "--backbone", backbone_path, "--out", store, *TINY)
    adapter = read_adapter(store / "NA.safetensors")
    assert adapter.site == "NA" and sorted(adapter.info["sites"]) == ["001", "01"]
    pred = tmp_path / "pred.csv"
    _invoke("predict", "--data", data, "--backbone", backbone_path, "--adapters", store,
            "--site-column", "region", "--out", pred, "--quiet", "--cpu")
    served = dict(zip(_cells(pred, "site"), _cells(pred, "adapter")))
    assert served["001"] == served["01"] == "NA" and served["1"] != "NA"


@pytest.mark.skipif(not DAILY.is_dir(), reason=f"real FLUXNET2015 data not found at {DAILY}")
def test_import_fluxnet_keeps_a_region_named_na(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("meta.csv").write_text("site,region\nUS-CRT,NA\n")
    Path("crops.csv").write_text("site,year,crop\nUS-CRT,2011,soy\nUS-CRT,2012,NA\n")
    result = _runner().invoke(cli, ["import", "fluxnet", str(daily_file("US-CRT")), "--out", "f.csv",
                                    "--site-meta", "meta.csv", "--json"])
    assert result.exit_code == 0, result.stderr
    assert set(_cells(Path("f.csv"), "region")) == {"NA"}
    assert set(read_table("f.csv")[schema.REGION]) == {"NA"}
    # a crop called NA is an unknown crop (named as written), not a missing cell
    bad = _runner().invoke(cli, ["import", "fluxnet", str(daily_file("US-CRT")), "--out", "g.csv",
                                 "--crops", "crops.csv"])
    assert bad.exit_code == 2 and "unknown crop 'NA'" in bad.stderr and not Path("g.csv").exists()


# --- bad input, matrix style ------------------------------------------------------------------


@dataclass
class IEnv:
    """A case's scratch folder (the working directory) and a copy of the tiny backbone in it."""

    tmp: Path
    backbone: Path

    def data(self, edit=None, name: str = "data.csv", sites: dict[str, str] | None = None) -> Path:
        """A valid small table, edited by ``edit`` (which may return a new frame), written as ``name``
        with pandas' own writers (not the toolkit's), as another program would."""
        frame = make_frame(sites)
        if edit is not None:
            frame = edit(frame)
        path = self.tmp / name
        if path.suffix == ".csv":
            frame.to_csv(path, index=False, date_format="%Y-%m-%d")
        else:
            frame.to_parquet(path, index=False)
        return path

    def evaluate(self, data: Path) -> list[str]:
        return ["evaluate", "--backbone", str(self.backbone), "--data", str(data)]

    def predict(self, data: Path, *extra: str) -> list[str]:
        store = self.tmp / "store"
        store.mkdir(exist_ok=True)
        return ["predict", "--data", str(data), "--backbone", str(self.backbone), "--adapters",
                str(store), "--out", "pred.csv", "--site-column", "site", "--quiet", "--cpu", *extra]

    def calibrate(self, data: Path, site: str = "IA-001") -> list[str]:
        (self.tmp / "adapters").mkdir(exist_ok=True)
        return ["calibrate", "--data", str(data), "--backbone", str(self.backbone), "--out",
                str(self.tmp / "adapters"), "--site", site, *TINY]

    def fluxnet(self, *extra: str) -> list[str]:
        if not DAILY.is_dir():
            pytest.skip(f"real FLUXNET2015 data not found at {DAILY}")
        return ["import", "fluxnet", str(daily_file("US-CRT")), "--out", "flux.csv", *extra]

    def text(self, name: str, content: str) -> str:
        (self.tmp / name).write_text(content)
        return name


def _cell(column: str, value, row: int = 10):
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
        return frame
    return edit


def _column(column: str, values):
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        codes = {s: i for i, s in enumerate(frame[column].unique())}
        frame[column] = frame[column].map(codes).map(values)
        return frame
    return edit


CASES = [
    case("evaluate-empty-site-csv", lambda e: e.evaluate(e.data(_cell("site", ""))),
         "column site has 1 empty values"),
    case("predict-empty-region-csv", lambda e: e.predict(e.data(_cell("region", ""))),
         "column region has 1 empty values"),
    case("calibrate-empty-site-csv", lambda e: e.calibrate(e.data(_cell("site", np.nan))),
         "column site has 1 empty values", absent=("adapters/IA-001.safetensors",)),
    case("calibrate-int-site-parquet",
         lambda e: e.calibrate(e.data(_column("site", lambda i: i + 1), "data.parquet"), "1"),
         "data.parquet", "column site holds int64 values such as 1", "store site ids as strings"),
    case("predict-float-site-parquet",
         lambda e: e.predict(e.data(_column("site", lambda i: i + 1.0), "data.parquet")),
         "column site holds float64 values such as 1.0", "store site ids as strings"),
    case("evaluate-bool-region-parquet",
         lambda e: e.evaluate(e.data(_column("region", lambda i: bool(i)), "data.parquet")),
         "column region holds bool values such as False", "not text"),
    case("evaluate-int-category-site-parquet",
         lambda e: e.evaluate(e.data(_category_site, "data.parquet")),
         "column site holds", "values such as 7", "not text"),
    case("calibrate-1-is-not-01",
         lambda e: e.calibrate(e.data(sites={"01": "IA", "001": "IL"}), "1"),
         "unknown site or region '1'", "01"),
    case("evaluate-na-spelled-in-number-column", lambda e: e.evaluate(e.data(_cell("TMAX_AIR", "NA"))),
         "column TMAX_AIR has 1 NaN values"),
    case("fluxnet-site-meta-int-site-parquet",
         lambda e: e.fluxnet("--site-meta", str(_meta_parquet(e))),
         "meta.parquet", "column site holds int64", "store site ids as strings"),
    case("fluxnet-site-meta-empty-region",
         lambda e: e.fluxnet("--site-meta", e.text("meta.csv", "site,region\nUS-CRT,\n")),
         "meta.csv", "empty site or region values"),
    case("fluxnet-crops-empty-site",
         lambda e: e.fluxnet("--crops", e.text("crops.csv", "site,year,crop\n,2011,soy\n")),
         "crops.csv", "column site has 1 empty values"),
]


def _category_site(frame: pd.DataFrame) -> pd.DataFrame:
    """Site codes 7 and 8 as a dictionary-encoded (categorical) column of integers."""
    frame["site"] = frame["site"].map({"IA-001": 7, "IL-001": 8}).astype("category")
    return frame


def _meta_parquet(env: IEnv) -> Path:
    path = env.tmp / "meta.parquet"
    pd.DataFrame({"site": [1], "region": ["NA"]}).to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("spec", CASES)
@pytest.mark.usefixtures("isolated_globals")
def test_bad_id_is_one_line_and_writes_nothing(spec, tmp_path: Path, backbone_path: Path,
                                               monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    backbone = work / "backbone.safetensors"
    shutil.copyfile(backbone_path, backbone)
    args = spec.setup(IEnv(work, backbone))
    before, mtimes = _snapshot(tmp_path), _mtimes(tmp_path)

    result = _runner().invoke(cli, args, catch_exceptions=True)
    check_user_error(result, args, spec.expect, tmp_path, before)
    assert _mtimes(tmp_path) == mtimes, "a file was rewritten (same bytes, new modification time)"
    for name in spec.absent:
        assert not (work / name).exists(), name
    assert not list(tmp_path.rglob(MARKER))
