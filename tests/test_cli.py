"""The CLI surface: help, version, synth, demo (evaluation + calibration), backbone show/plot,\npython -m."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kgml_peft import __version__
from kgml_peft.cli import cli
from kgml_peft.data.synthetic import SynthConfig, simulate
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import make_windows
from kgml_peft.model.inference import predict_windows
from kgml_peft.store.adapter import read_adapter
from kgml_peft.store.checkpoint import load_backbone

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo.safetensors"


def all_commands(group=cli, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("command", [()] + list(all_commands()), ids=lambda c: " ".join(c) or "root")
def test_help_on_every_command(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_synth_is_deterministic_and_writes_both_formats(tmp_path):
    runner = CliRunner()
    args = ["synth", "--max-sites-per-region", "1", "--max-years-per-site", "2"]
    assert runner.invoke(cli, [*args, "--out", str(tmp_path / "a.parquet")]).exit_code == 0
    assert runner.invoke(cli, [*args, "--out", str(tmp_path / "b.csv")]).exit_code == 0
    obs = runner.invoke(cli, [*args, "--observed", "--out", str(tmp_path / "o.csv")])
    assert obs.exit_code == 0 and "observed" in obs.output
    a = pd.read_parquet(tmp_path / "a.parquet")
    b = pd.read_csv(tmp_path / "b.csv", parse_dates=["date"])
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b) == 3 * (365 + 366)  # 2000 is a leap year; 29 Feb is kept in tables
    pd.testing.assert_frame_equal(a, b, check_dtype=False, atol=1e-9)
    again = tmp_path / "c.parquet"
    runner.invoke(cli, [*args, "--out", str(again)])
    pd.testing.assert_frame_equal(a, pd.read_parquet(again))
    o = pd.read_csv(tmp_path / "o.csv")
    assert o["Ra"].isna().all() and o["NEE"].isna().any()


@pytest.mark.slow
def test_demo_evaluates_and_calibrates_every_state(tmp_path):
    out = tmp_path / "demo-adapters"
    result = CliRunner().invoke(cli, ["demo", "--backbone", str(DEMO), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for region in ("IA", "IL", "IN"):
        # evaluation tables of both flavours, the calibration table and the test on other fields
        assert sum(line.split()[:1] == [region] for line in lines) == 4
        adapter = read_adapter(out / f"{region}.safetensors")
        before, after = adapter.info["metrics"]["before"], adapter.info["metrics"]["after"]
        assert after["loss"] < before["loss"]
        assert (out / f"{region}.safetensors").stat().st_size * 20 <= DEMO.stat().st_size
    assert "NEE_mse" in result.output and "loss_global" in result.output
    # every observed site-year served with its state's adapter
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["site", "date", "Ra", "Rh", "Reco", "NEE", "Yield", "adapter"]
    assert (predictions["adapter"] == predictions["site"].str[:2]).all()
    assert "served all 72 observed site-years with the 3 state adapters" in result.output
    # the new fields: the backbone never saw them; each adapter learnt from the years before the
    # field's last one, which is where backbone and adapter are compared
    shipped = load_backbone(DEMO)
    fresh = shipped.training["config"]["exclude_sites"]
    assert fresh == ["IA-007", "IA-008", "IL-003", "IL-004", "IN-005", "IN-006"]
    assert "new fields (never seen by the backbone)" in result.output
    observed = simulate(SynthConfig(observed=True))
    for site in fresh:
        info = read_adapter(out / f"{site}.safetensors").info
        last = observed.loc[observed["site"] == site, "date"].dt.year.max()
        assert info["sites"] == [site] and int(info["data"]["last_date"][:4]) == last - 1
        row = next(line for line in lines if line.startswith(site))
        assert f" {last} " in row  # the test year
    summary = next(line for line in lines if "new fields predicted better" in line)
    assert summary.split()[0].isdigit() and "of 6" in summary and "Reco" in summary
    # the calibration's validation years are labelled as selection scores; the test is on the
    # fields of seed 1 (tests/test_demo_split.py: disjoint from everything the backbone saw). Its
    # global-model MSE, recomputed here from the seed-1 table, says which data it scored.
    assert "in-sample selection scores, not a test" in result.output
    start = lines.index(next(line for line in lines if line.startswith("test: the state adapters on the fields of seed 1")))
    header = lines[start + 1].split()
    assert header[:4] == ["state", "fields", "site_years", "data_seed"]
    other = simulate(SynthConfig(seed=1, observed=True))
    windows = make_windows(validate_table(other, shipped.config.features), shipped.config.features)
    preds = predict_windows(shipped.model, shipped.scalers, windows)
    for line in lines[start + 2:start + 5]:
        row = dict(zip(header, line.split()))
        assert row["data_seed"] == "1"
        rows = windows.regions == row["state"]
        assert int(row["site_years"]) == int(rows.sum())
        for target in ("NEE", "Reco"):
            obs = windows.target(target)[rows]
            ok = np.isfinite(obs)
            mse = float(np.mean((preds[target][rows][ok] - obs[ok]) ** 2))
            assert float(row[f"{target}_global"]) == pytest.approx(mse, abs=6e-4)


def test_backbone_show_and_plot(tmp_path):
    png = tmp_path / "curves.png"
    result = CliRunner().invoke(cli, ["backbone", "show", str(DEMO), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "phase fluxes" in result.output and "parameters" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "kgml_peft", "--version"],
                            capture_output=True, text=True, check=True)
    assert __version__ in result.stdout
