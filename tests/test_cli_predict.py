"""``kgml-peft predict`` through the real CLI: CSV and Parquet round trips, output columns and
units, rows without an adapter, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kgml_peft.cli import cli
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.predict import OUTPUT_COLUMNS, predict_table
from kgml_peft.store.adapter import save_adapter
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.store.library import adapter_path
from tests.conftest import make_frame, random_adapter
from tests.test_cli_validation import _runner, _snapshot, _write, case, check_user_error, drop, setv

SITES = {"IA-001": "IA", "IA-002": "IA", "IL-001": "IL"}


@pytest.fixture
def work(tmp_path: Path, backbone_path: Path, other_backbone_path: Path, monkeypatch) -> Path:
    """A working folder with data.csv, data.parquet and a store holding IA-001, IA and a foreign
    adapter (OTHER, made for another backbone)."""
    monkeypatch.chdir(tmp_path)
    frame = make_frame(SITES)
    _write(frame, tmp_path / "data.csv")
    _write(frame, tmp_path / "data.parquet")
    store = tmp_path / "adapters"
    store.mkdir()
    backbone = load_backbone(backbone_path)
    save_adapter(adapter_path(store, "IA-001"), random_adapter(backbone, "IA-001", seed=1))
    save_adapter(adapter_path(store, "IA"), random_adapter(backbone, "IA", seed=2))
    save_adapter(tmp_path / "OTHER.safetensors", random_adapter(load_backbone(other_backbone_path), "OTHER"))
    return tmp_path


def _predict(backbone_path: Path, *extra: str, data: str = "data.csv", out: str = "pred.csv") -> list[str]:
    return ["predict", "--data", data, "--backbone", str(backbone_path), "--out", out, "--quiet", *extra]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip_matches_the_library(suffix, work, backbone_path) -> None:
    result = _runner().invoke(cli, _predict(backbone_path, "--site-column", "site", "--json",
                                            data=f"data{suffix}", out=f"pred{suffix}"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["adapters"] == {"IA-001": 2} and summary["missing_adapters"] == {"IA-002": 2, "IL-001": 2}
    out = pd.read_csv(work / "pred.csv", parse_dates=["date"]) if suffix == ".csv" \
        else pd.read_parquet(work / "pred.parquet")
    assert tuple(out.columns) == OUTPUT_COLUMNS
    assert len(out) == 3 * 2 * 365 and summary["rows"] == len(out)
    bank = AdapterBank(backbone_path, work / "adapters")
    expected = predict_table(bank, make_frame(SITES), site_column="site").frame
    assert (out["site"].to_numpy() == expected["site"].to_numpy()).all()
    assert (pd.to_datetime(out["date"]).to_numpy() == expected["date"].to_numpy()).all()
    for key in ("Ra", "Rh", "Reco", "NEE", "Yield"):  # CSV keeps full float precision
        np.testing.assert_array_equal(out[key].to_numpy(), expected[key].to_numpy())
    flagged = out["adapter"].isna()
    assert (flagged == out["site"].isin(["IA-002", "IL-001"])).all()
    assert (out.loc[~flagged, "adapter"] == "IA-001").all()
    # Yield only on each year's last day
    assert out["Yield"].notna().sum() == 3 * 2
    assert (pd.to_datetime(out.loc[out["Yield"].notna(), "date"]).dt.strftime("%m-%d") == "12-31").all()


def test_units_are_physical(work, backbone_path) -> None:
    """Daily fluxes in gC m-2 d-1 and Yield in t ha-1: the same numbers as the library's
    physical-unit predictions of the adapter's site model (not z-scores)."""
    from kgml_peft.serve.loading import apply_adapter
    from kgml_peft.data.tables import validate_table
    from kgml_peft.data.windows import make_windows
    from kgml_peft.model.inference import predict_windows
    from kgml_peft.store.adapter import load_adapter

    result = _runner().invoke(cli, _predict(backbone_path, "--site", "IA-001", out="pred.parquet"))
    assert result.exit_code == 0, result.output
    out = pd.read_parquet(work / "pred.parquet")
    assert (out["adapter"] == "IA-001").all()
    backbone = load_backbone(backbone_path)
    windows = make_windows(validate_table(make_frame(SITES), backbone.config.features), backbone.config.features)
    model = apply_adapter(backbone, load_adapter(work / "adapters" / "IA-001.safetensors"))
    ref = predict_windows(model, backbone.scalers, windows)
    for key in ("Ra", "Rh", "Reco", "NEE"):
        np.testing.assert_allclose(out[key], ref[key].reshape(-1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["Yield"].dropna(), ref["Yield"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["Reco"], out["Ra"] + out["Rh"], atol=1e-5)
    # z-scores would sit near 0; these sit near the physical scaler means
    assert abs(out["Yield"].mean()) > 0.5 * backbone.scalers.std["Yield"]


def test_region_adapters_and_plain_backbone(work, backbone_path) -> None:
    result = _runner().invoke(cli, _predict(backbone_path, "--site-column", "region", out="r.csv"))
    assert result.exit_code == 0, result.output
    assert "adapters: IA (4)" in result.stdout and "no adapter for IL" in result.stdout
    out = pd.read_csv(work / "r.csv")
    assert (out.loc[out["site"].str.startswith("IA"), "adapter"] == "IA").all()
    assert out.loc[out["site"] == "IL-001", "adapter"].isna().all()
    plain = _runner().invoke(cli, _predict(backbone_path, out="plain.csv", data="data.parquet"))
    assert plain.exit_code == 0, plain.output
    bare = pd.read_csv(work / "plain.csv")
    assert bare["adapter"].isna().all()
    il = out["site"] == "IL-001"
    # IL-001 has no adapter: the backbone's values (up to float rounding: it ran in a mixed batch)
    np.testing.assert_allclose(out.loc[il, "NEE"], bare.loc[il, "NEE"], rtol=0, atol=1e-5)
    assert np.abs(out.loc[~il, "NEE"].to_numpy() - bare.loc[~il, "NEE"].to_numpy()).max() > 1e-3


def test_force_replaces_and_strategies_agree(work, backbone_path) -> None:
    first = _runner().invoke(cli, _predict(backbone_path, "--site-column", "site", "--strategy", "naive"))
    assert first.exit_code == 0, first.output
    naive = pd.read_csv(work / "pred.csv")
    again = _runner().invoke(cli, _predict(backbone_path, "--site-column", "site", "--force"))
    assert again.exit_code == 0, again.output
    batched = pd.read_csv(work / "pred.csv")
    np.testing.assert_allclose(batched["NEE"], naive["NEE"], rtol=0, atol=1e-5)


def _corrupt_store(env) -> list[str]:
    (Path("adapters") / "IA-002.safetensors").write_bytes(b"\x00" * 40)
    return _predict(env, "--site-column", "site")


def _foreign_in_store(env) -> list[str]:
    shutil.copyfile("OTHER.safetensors", Path("adapters") / "OTHER.safetensors")
    return _predict(env, "--site", "OTHER")


def _existing_output(env) -> list[str]:
    Path("pred.csv").write_text("keep me\n")
    return _predict(env, "--site", "IA-001")


def _data(corrupt: Callable) -> Callable:
    def setup(env) -> list[str]:
        frame = make_frame(SITES)
        changed = corrupt(frame)
        frame = frame if changed is None else changed
        _write(frame, Path("bad.csv"))
        return _predict(env, "--site-column", "site", data="bad.csv")
    return setup


CASES = [
    case("require-adapter", lambda b: _predict(b, "--site-column", "site", "--require-adapter"),
         "2 of 3 adapters", "first: IA-002", "--require-adapter"),
    case("unknown-site", lambda b: _predict(b, "--site", "XX-404"), "no adapter 'XX-404'"),
    case("unsafe-site", lambda b: _predict(b, "--site", "../IA-001"), "unsafe"),
    case("site-and-column", lambda b: _predict(b, "--site", "IA-001", "--site-column", "site"), "not both"),
    case("bad-site-column", lambda b: _predict(b, "--site-column", "county"), "county"),
    case("corrupt-adapter", _corrupt_store, "IA-002.safetensors"),
    case("foreign-adapter", _foreign_in_store, "was trained on backbone"),
    case("existing-output", _existing_output, "exists", "--force"),
    case("bad-extension", lambda b: _predict(b, out="pred.txt"), "unknown table format"),
    case("out-folder-is-a-file", lambda b: (Path("nowhere").write_text("x"), _predict(b, out="nowhere/pred.csv"))[1],
         "nowhere is not a folder"),
    case("missing-store", lambda b: _predict(b, "--site", "IA-001", "--adapters", "none"), "none", "not a folder"),
    case("missing-data", lambda b: _predict(b, data="nope.csv"), "nope.csv"),
    case("missing-column", _data(drop("GPP")), "GPP"),
    case("nan-input", _data(setv("TMAX_AIR", np.nan, site="IA-001", start="2003-07-14", n=3)), "TMAX_AIR", "NaN"),
    case("wrong-units", _data(lambda f: f.assign(GPP=f["GPP"] * 100)), "GPP"),
    case("missing-backbone", lambda b: ["predict", "--backbone", "no.safetensors", "--out", "p.csv",
                                        "--data", "data.csv"], "no.safetensors"),
    case("bad-batch-size", lambda b: _predict(b, "--batch-size", "0"), "batch-size"),
]


@pytest.mark.parametrize("spec", CASES)
def test_bad_input_is_one_line_and_writes_nothing(spec, work, backbone_path) -> None:
    args = spec.setup(backbone_path)
    before = _snapshot(work)
    result = _runner().invoke(cli, args, catch_exceptions=True)
    check_user_error(result, args, spec.expect, work, before)


def test_real_process_prints_one_line(work, backbone_path) -> None:
    """What a user's terminal shows (warnings included) for an adapter that is not in the store."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "kgml_peft", *_predict(backbone_path, "--site", "XX-404")],
                          capture_output=True, text=True, timeout=120, cwd=work)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == ["error: no adapter 'XX-404' in the store adapters"]
    assert not (work / "pred.csv").exists()
