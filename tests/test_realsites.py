"""``kgml-peft experiment --suite fluxnet``: the real-site benchmark on the real FLUXNET2015 files
(quick config): the plan, what each model may see (no held-out data before calibration, no test
year in calibration), figures recomputed by hand from the saved models, resume, ``--jobs``
independence and bad input."""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import kgml_peft
from kgml_peft import schema
from kgml_peft.cli import cli
from kgml_peft.data.fluxnet import import_fluxnet
from kgml_peft.data.gpp import satellite_like_gpp
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.realsites import RealSiteBenchmark, RealSiteConfig, Scope, plan_runs
from kgml_peft.model.inference import predict_windows
from kgml_peft.store.checkpoint import load_backbone
from tests.test_cli_validation import _runner, _snapshot, check_user_error

DAILY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fluxnet2015" / "daily"
needs_data = pytest.mark.skipif(not DAILY.is_dir(), reason="../shared/data/fluxnet2015 is not here")
HELD_OUT = ("US-Ne3", "US-CRT")


def test_plan_skips_k_without_test_years_and_puts_backbones_first() -> None:
    config = RealSiteConfig(seeds=(0, 1))
    runs = plan_runs(config, {"US-Ne3": 12, "US-CRT": 3})
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    assert [r.method for r in runs[:4]] == ["pretrain"] * 4
    assert all(r.method != "pretrain" for r in runs[4:])
    # US-CRT has 3 years: k = 3 would leave nothing to test
    assert {r.years for r in runs if r.site == "US-CRT"} == {1, 2}
    assert {r.years for r in runs if r.site == "US-Ne3"} == {1, 2, 3}
    # per seed and (site, k): site-only once, global/full/adapter/adapter_cv per route; the three
    # deterministic baselines once per (site, k), with the first seed
    assert len(runs) == 4 + 2 * 5 * (1 + 2 * 4) + 5 * 3
    # with a second column of backbones for US-CRT: its pretraining runs, and its k = 1, 2 again
    scoped = plan_runs(config, {"US-Ne3": 12, "US-CRT": 3},
                       {"US-Ne3": {"main": Scope(("US-Ne1",))}, "US-CRT": {"main": Scope(), "past": Scope(before=2011)}})
    assert [r.key for r in scoped if r.method == "pretrain"][:3] == [
        "pretrain__observed__without-US-Ne1__s0", "pretrain__simulated__without-US-Ne1__s0", "pretrain__observed__s0"]
    assert len(scoped) == 2 * 3 * 2 + 2 * 5 * (1 + 2 * 4) + 5 * 3 + 2 * 2 * 2 * 4
    assert "adapter_cv__observed__US-CRT__2y__past__s1" in {r.key for r in scoped}
    baselines = [r for r in runs if r.method in ("regression_global", "regression_site", "climatology")]
    assert len(baselines) == 15 and {r.seed for r in baselines} == {0} and {r.route for r in baselines} == {None}


def test_config_checks_and_toml(tmp_path: Path) -> None:
    with pytest.raises(KgmlPeftError, match="unknown route"):
        RealSiteConfig(routes=("observed", "dreamt"))
    with pytest.raises(KgmlPeftError, match="calibration years must be >= 1"):
        RealSiteConfig(calibration_years=(0, 1))
    with pytest.raises(KgmlPeftError, match="unsafe held-out or excluded site id"):
        RealSiteConfig(held_out=("../x",))
    with pytest.raises(KgmlPeftError, match="both held out and excluded"):
        RealSiteConfig(exclude=("US-CRT",))
    with pytest.raises(KgmlPeftError, match="sim_sites_per_region must be >= 1"):
        RealSiteConfig(sim_sites_per_region=0)
    with pytest.raises(KgmlPeftError, match="gpp_route must be one of tower, satellite-like"):
        RealSiteConfig(gpp_route="modis")
    with pytest.raises(KgmlPeftError, match="between 0 and 1"):
        RealSiteConfig(interval=1.0)
    path = tmp_path / "c.toml"
    path.write_text('held_out = ["US-Ne2"]\ncalibration_years = [2]\n[adapter]\nepochs = 7\n'
                    '[backbone]\nhidden_size = 4\n')
    config = RealSiteConfig.from_toml(path)
    assert config.held_out == ("US-Ne2",) and config.adapter.epochs == 7 and config.adapter.lr == 1e-2
    assert config.backbone.features == schema.FLUXNET_FEATURES and config.backbone.hidden_size == 4
    assert RealSiteConfig.from_dict(config.to_dict()) == config
    path.write_text("helt_out = 1\n")
    with pytest.raises(KgmlPeftError, match="helt_out"):
        RealSiteConfig.from_toml(path)


@pytest.fixture(scope="module")
def fluxnet_table(tmp_path_factory) -> Path:
    if not DAILY.is_dir():
        pytest.skip("../shared/data/fluxnet2015 is not here")
    table, _ = import_fluxnet([DAILY], site_meta=DAILY.parent / "sites.csv")
    path = tmp_path_factory.mktemp("fluxnet") / "fluxnet.parquet"
    table.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def quick_run(fluxnet_table: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("realsites") / "out"
    result = _runner().invoke(cli, ["experiment", "--suite", "fluxnet", "--quick", "--data",
                                    str(fluxnet_table), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return out, result.stdout


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


@needs_data
@pytest.mark.slow
def test_quick_run_writes_every_method_for_every_site(quick_run) -> None:
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["held_out"] == list(HELD_OUT)
    assert not set(results["dev_sites"]) & set(HELD_OUT) and len(results["dev_sites"]) == 8
    expected = {"site_only", "global/observed", "full/observed", "adapter/observed", "adapter_cv/observed",
                "global/simulated", "full/simulated", "adapter/simulated", "adapter_cv/simulated",
                "regression_global", "regression_site", "climatology"}
    # US-CRT also has the past-only column (backbones on the years before 2011); US-Ne3 has none
    past = {f"{m}/{route}/past" for m in ("global", "full", "adapter", "adapter_cv") for route in ("observed", "simulated")}
    assert results["scopes"]["US-CRT"] == {"main": "dev", "past": "before-2011"}
    assert results["scopes"]["US-Ne3"]["main"] == "without-US-Ne1+US-Ne2"
    assert "before 2001" in results["scopes"]["US-Ne3"]["past"]["unavailable"]
    assert not {"US-Ne1", "US-Ne2"} & set(results["backbones"]["observed/without-US-Ne1+US-Ne2"]["dev_sites"])
    assert results["backbones"]["simulated/before-2011"]["dev_years"][1] == 2010
    for site in HELD_OUT:
        cell = results["cells"][site]["1"]
        assert set(cell) == (expected | past if site == "US-CRT" else expected)
        for entry in cell.values():
            for target in ("NEE", "Reco"):
                assert entry[target]["mse"]["mean"] > 0 and entry[target]["annual_mae"]["mean"] >= 0
            # skill against the cell's best baseline, per target, from the mean MSEs
            for target in ("NEE", "Reco"):
                best = entry["best_baseline"][target]
                assert best in ("regression_global", "regression_site", "climatology")
                assert entry["skill_vs_best_baseline"][target] == pytest.approx(
                    1 - entry[target]["mse"]["mean"] / cell[best][target]["mse"]["mean"], rel=1e-12)
        for target in ("NEE", "Reco"):
            baselines = [cell[b]["skill_vs_best_baseline"][target]
                         for b in ("regression_global", "regression_site", "climatology")]
            assert max(baselines) == 0.0 and min(baselines) < 0  # the best is 0, the others below
        # bootstrap intervals over the test years (US-Ne3: 11, US-CRT: 2), around the point figures
        for name, entry in cell.items():
            assert entry["test_years_n"] == (11 if site == "US-Ne3" else 2)
            for target in ("NEE", "Reco"):
                low, high = entry["mse_ci"][target]
                assert 0 < low <= high and low <= entry[target]["mse"]["mean"] * 1.5
                if entry["best_baseline"][target] == name:
                    assert entry["skill_ci"][target] is None
                else:
                    low, high = entry["skill_ci"][target]
                    assert low <= high and low < 1
        # baselines are deterministic: run once, their fitted values counted
        assert cell["regression_global"]["seeds"] == 1 and cell["regression_global"]["trained_parameters"] == 4
        assert cell["climatology"]["trained_parameters"] == 2 * 365
        assert cell["global/observed"]["trained_parameters"] == 0
        assert 0 < cell["adapter/observed"]["trained_parameters"] < cell["full/observed"]["trained_parameters"]
        assert cell["adapter/observed"]["adapter_bytes"] < 16 * 1024
    # cross-validated adapters record what their folds chose (one year: day blocks, those with
    # QC-passing observations)
    record = json.loads((out / "runs" / "adapter_cv__observed__US-Ne3__1y__s0.json").read_text())
    assert 2 <= len(record["cv"]["folds"]) <= 4 and all(f.startswith("days ") for f in record["cv"]["folds"])
    assert record["cv"]["strength"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    # ... and their intervals are scored as predict --interval serves them
    intervals = record["test"]["intervals"]
    assert intervals["level"] == 0.9 and 1 <= intervals["members"] <= 5
    for target in ("NEE", "Reco"):
        daily, annual = intervals[target]["daily"], intervals[target]["annual"]
        assert daily["n"] == record["test"][target]["n"] and 0 <= daily["coverage"] <= 1
        assert daily["mean_width"] > 0 and annual["n"] >= 1 and annual["mean_width"] > 0
    assert record["gpp_route"] == "satellite-like"  # the default route
    assert record["other_crop_test_years"] == 0  # the table has no Crop_Type: no crop limit
    assert results["figure_route"] in ("observed", "simulated")
    # where the results came from: the commit of this checkout, the date, the config
    provenance = results["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(kgml_peft.__file__).parent,
                          capture_output=True, text=True)
    assert provenance["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert datetime.datetime.fromisoformat(provenance["date"]).tzinfo is not None
    assert results["config"]["held_out"] == list(HELD_OUT)
    for name in ("results.md", "timeseries.png", "mse_by_years.png", "annual_sums.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "## US-Ne3: calibrated on 1 year(s) [2001], tested on 11 (2002-2012)" in \
        (out / "results.md").read_text()
    assert "US-Ne3 1y" in stdout and "US-CRT 1y" in stdout


@needs_data
@pytest.mark.slow
def test_models_see_only_what_they_may(quick_run, fluxnet_table: Path) -> None:
    out, _ = quick_run
    records = _records(out)
    table = pd.read_parquet(fluxnet_table)
    dev_years = {s: table.loc[table.site == s, "date"].dt.year.nunique()
                 for s in table.site.unique() if s not in HELD_OUT}
    for route in ("observed", "simulated"):
        rec = records[f"pretrain__{route}__s0"]
        assert sorted(rec["dev_sites"]) == sorted(dev_years)
        assert rec["train_site_years"] + rec["val_site_years"] == sum(dev_years.values())
        backbone = load_backbone(out / "models" / f"{route}__s0.safetensors")
        assert backbone.config.features == schema.FLUXNET_FEATURES
    for key, rec in records.items():
        if rec["method"] == "pretrain":
            continue
        first = int(table.loc[table.site == rec["site"], "date"].dt.year.min())
        assert rec["train_years"] == [first], key
        assert rec["test"]["years"][0] == first + 1 and first not in rec["test"]["years"], key


@needs_data
@pytest.mark.slow
def test_scores_recomputed_from_the_saved_backbone(quick_run, fluxnet_table: Path) -> None:
    """global/observed on US-CRT: predict with the saved backbone and score by hand."""
    out, _ = quick_run
    rec = _records(out)["global__observed__US-CRT__1y__s0"]
    backbone = load_backbone(out / "models" / "observed__s0.safetensors")
    raw = satellite_like_gpp(pd.read_parquet(fluxnet_table), seed=0)  # the quick run's (default) route
    site = raw[raw.site == "US-CRT"]
    windows = make_windows(validate_table(site, backbone.config.features), backbone.config.features)
    test = windows.subset(np.flatnonzero(windows.years >= 2012))
    preds = predict_windows(backbone.model, backbone.scalers, test)
    for target in ("NEE", "Reco"):
        obs = test.target(target)
        ok = np.isfinite(obs)
        # QC masking: every scored day passed the import's QC threshold
        qc = site.set_index("date")["NEE_QC"].reindex(pd.to_datetime(test.dates.ravel())).to_numpy()
        assert (qc.reshape(obs.shape)[ok] >= 0.5).all()
        mse = float(np.mean((preds[target][ok] - obs[ok]) ** 2))
        r2 = 1 - mse / float(np.var(obs[ok]))
        assert rec["test"][target]["n"] == int(ok.sum())
        assert rec["test"][target]["mse"] == pytest.approx(mse, rel=1e-9)
        assert rec["test"][target]["r2"] == pytest.approx(r2, rel=1e-9)
        # annual sums: 365 days (29 February dropped) of the gap-filled record
        for year, observed, predicted in zip(rec["test"]["years"], rec["test"][target]["annual_observed"],
                                             rec["test"][target]["annual_predicted"]):
            days = site[(site.date.dt.year == year) & ~((site.date.dt.month == 2) & (site.date.dt.day == 29))]
            assert observed == pytest.approx(days[f"{target}_gapfilled"].sum(), rel=1e-9)
            assert predicted == pytest.approx(preds[target][test.years == year].sum(), rel=1e-6)


@needs_data
@pytest.mark.slow
def test_regression_baseline_scored_by_hand(quick_run, fluxnet_table: Path) -> None:
    """regression_site on US-CRT, one year: fit Reco ~ 1 + TA + TA^2 + GPP on 2011's observed Reco
    days with the normal equations, predict NEE = Reco - GPP for 2012-2013, score by hand."""
    out, _ = quick_run
    rec = _records(out)["regression_site__none__US-CRT__1y__s0"]
    raw = satellite_like_gpp(pd.read_parquet(fluxnet_table), seed=0)  # the quick run's (default) route
    site = raw[(raw.site == "US-CRT") & ~((raw.date.dt.month == 2) & (raw.date.dt.day == 29))]
    fit = site[(site.date.dt.year == 2011) & site.Reco.notna()]

    def design(rows: pd.DataFrame) -> np.ndarray:
        return np.column_stack([np.ones(len(rows)), rows.TAVG_AIR, rows.TAVG_AIR ** 2, rows.GPP])

    coef = np.linalg.solve(design(fit).T @ design(fit), design(fit).T @ fit.Reco.to_numpy())
    test = site[site.date.dt.year >= 2012]
    reco = design(test) @ coef
    predicted = {"Reco": reco, "NEE": reco - test.GPP.to_numpy()}
    assert rec["train_years"] == [2011] and rec["test"]["years"] == [2012, 2013]
    assert rec["trained_parameters"] == 4 and rec["test"]["physics"] is None
    for target in ("NEE", "Reco"):
        ok = test[target].notna().to_numpy()
        mse = float(np.mean((predicted[target][ok] - test[target].to_numpy()[ok]) ** 2))
        assert rec["test"][target]["n"] == int(ok.sum())
        assert rec["test"][target]["mse"] == pytest.approx(mse, rel=1e-9)
        # per test year: squared errors and days, what the bootstrap resamples
        by_year = rec["test"][target]["by_year"]
        for i, year in enumerate((2012, 2013)):
            rows = (test.date.dt.year == year).to_numpy() & ok
            assert by_year["n"][i] == int(rows.sum())
            assert by_year["sse"][i] == pytest.approx(
                float(((predicted[target][rows] - test[target].to_numpy()[rows]) ** 2).sum()), rel=1e-9)


@needs_data
@pytest.mark.slow
def test_adapters_verify_against_their_backbone(quick_run) -> None:
    out, _ = quick_run
    adapter = out / "adapters" / "adapter__observed__US-Ne3__1y__s0.safetensors"
    # US-Ne3's backbones are those trained without its neighbours US-Ne1 and US-Ne2
    result = _runner().invoke(cli, ["adapters", "verify", str(adapter), "--backbone",
                                    str(out / "models" / "observed__without-US-Ne1+US-Ne2__s0.safetensors")])
    assert result.exit_code == 0, result.stderr
    for other in ("simulated__without-US-Ne1+US-Ne2__s0", "observed__s0"):
        wrong = _runner().invoke(cli, ["adapters", "verify", str(adapter), "--backbone",
                                       str(out / "models" / f"{other}.safetensors")])
        assert wrong.exit_code == 2 and "use the backbone it was made for" in wrong.stderr


@needs_data
@pytest.mark.slow
def test_resume_and_jobs_give_the_same_results(quick_run, fluxnet_table: Path, tmp_path: Path) -> None:
    out, _ = quick_run
    before = _records(out)
    again = _runner().invoke(cli, ["experiment", "--suite", "fluxnet", "--quick", "--data", str(fluxnet_table),
                                   "--out", str(out), "--quiet"])
    assert again.exit_code == 0 and "(38 resumed)" in again.stdout
    assert _records(out) == before
    parallel = tmp_path / "parallel"
    result = _runner().invoke(cli, ["experiment", "--suite", "fluxnet", "--quick", "--data", str(fluxnet_table),
                                    "--out", str(parallel), "--quiet", "--jobs", "2"])
    assert result.exit_code == 0, result.stderr
    strip = lambda recs: {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in recs.items()}  # noqa: E731
    assert strip(_records(parallel)) == strip(before)
    # the folder belongs to its config and table: another radius (the same run keys, other
    # backbones) is refused, not resumed, and nothing in the folder changes
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other = _runner().invoke(cli, ["experiment", "--suite", "fluxnet", "--quick", "--data", str(fluxnet_table),
                                   "--out", str(out), "--quiet", "--exclude-within-km", "0"])
    assert other.exit_code == 2 and "holds the runs of another experiment" in other.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


@needs_data
@pytest.mark.parametrize("case", ["no-data", "not-imported", "unknown-held-out", "bad-config",
                                  "no-test-year", "excluded-held-out", "no-coordinates", "negative-radius",
                                  "radius-elsewhere", "unobserved-calibration-year"])
def test_bad_input(case: str, fluxnet_table: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["experiment", "--suite", "fluxnet", "--quick", "--out", "out", "--quiet"]
    expect: tuple[str, ...]
    if case == "no-data":
        expect = ("--data", "import fluxnet")
    elif case == "not-imported":
        table = pd.read_parquet(fluxnet_table).drop(columns=["NEE_gapfilled", "Reco_gapfilled"])
        table.to_parquet("plain.parquet", index=False)
        args += ["--data", "plain.parquet"]
        expect = ("NEE_gapfilled", "import fluxnet")
    elif case == "unknown-held-out":
        table = pd.read_parquet(fluxnet_table)
        table[table.site != "US-CRT"].to_parquet("no-crt.parquet", index=False)
        args += ["--data", "no-crt.parquet"]
        expect = ("US-CRT", "not in the data")
    elif case == "no-test-year":  # US-CRT has 3 years: calibrating on 3 leaves nothing to test
        Path("c.toml").write_text("held_out = ['US-CRT']\ncalibration_years = [3]\n")
        args = [a for a in args if a != "--quick"] + ["--config", "c.toml", "--data", str(fluxnet_table)]
        expect = ("US-CRT", "no test year")
    elif case == "excluded-held-out":
        Path("c.toml").write_text("held_out = ['US-Ne2']\nexclude = ['US-Ne2x']\n")
        table = pd.read_parquet(fluxnet_table)
        table[table.site != "US-Ne2"].to_parquet("no-ne2.parquet", index=False)
        args = [a for a in args if a != "--quick"] + ["--config", "c.toml", "--data", "no-ne2.parquet"]
        expect = ("US-Ne2", "not in the data")
    elif case == "bad-config":
        Path("c.toml").write_text("routes = ['observed', 'guessed']\n")
        args = [a for a in args if a != "--quick"] + ["--config", "c.toml", "--data", str(fluxnet_table)]
        expect = ("route", "guessed")
    elif case == "no-coordinates":  # leaving out neighbours needs every tower's lat/lon
        pd.read_parquet(fluxnet_table).drop(columns=["lat", "lon"]).to_parquet("flat.parquet", index=False)
        args += ["--data", "flat.parquet"]
        expect = ("lat/lon", "--site-meta", "exclude_within_km = 0")
    elif case == "unobserved-calibration-year":  # the calibration year has no observed NEE
        table = pd.read_parquet(fluxnet_table)
        table.loc[(table.site == "US-CRT") & (table.date.dt.year == 2011), "NEE"] = np.nan
        table.to_parquet("blind.parquet", index=False)
        args += ["--data", "blind.parquet"]
        expect = ("US-CRT", "0 observed NEE days", "at least 16")
    elif case == "negative-radius":
        args += ["--data", str(fluxnet_table), "--exclude-within-km", "-1"]
        expect = ("exclude_within_km", ">= 0")
    elif case == "radius-elsewhere":
        args = ["experiment", "--quick", "--out", "out", "--quiet", "--exclude-within-km", "5"]
        expect = ("--exclude-within-km", "fluxnet suite")
    else:
        raise AssertionError(case)
    before = _snapshot(tmp_path)
    result = _runner().invoke(cli, args)
    check_user_error(result, args, expect, tmp_path, before)


@needs_data
def test_neighbours_within_the_radius_never_reach_a_towers_backbones(fluxnet_table: Path) -> None:
    """Leave-neighbours-out: with US-Ne3 held out at 10 km, the data its backbones pretrain on
    (and the global regression fits) has no US-Ne1 or US-Ne2 row; US-CRT, with no tower within
    10 km, keeps every development tower. The past-only column trains on years before the tower's
    first calibration year, and is missing, with why, where there are none (US-Ne3 starts in 2001
    like the other Mead towers)."""
    bench = RealSiteBenchmark(pd.read_parquet(fluxnet_table), RealSiteConfig(), "unused")
    ne3, crt = bench.scopes["US-Ne3"], bench.scopes["US-CRT"]
    assert ne3["main"].without == ("US-Ne1", "US-Ne2") and crt["main"].without == ()
    (train, val), _ = bench.dev_data(ne3["main"])
    seen = set(train.sites) | set(val.sites)
    assert not seen & {"US-Ne1", "US-Ne2", *HELD_OUT} and seen == set(bench.dev_sites) - {"US-Ne1", "US-Ne2"}
    assert bench._global_regression(ne3["main"]).days == int(np.isfinite(train.target("Reco")).sum())
    (train, val), _ = bench.dev_data(crt["main"])
    assert set(train.sites) | set(val.sites) == set(bench.dev_sites)
    (train, val), _ = bench.dev_data(crt["past"])
    assert crt["past"].before == 2011 and max(train.years.max(), val.years.max()) == 2010
    assert "past" not in ne3 and "before 2001" in bench.unavailable["US-Ne3"]["past"]
    pretrain = {r.scope for r in bench.plan if r.method == "pretrain"}
    assert pretrain == {"dev", "without-US-Ne1+US-Ne2", "before-2011"}
    assert {r.column for r in bench.plan if r.site == "US-Ne3"} == {"main"}
    # 0 km: nobody is left out, and coordinates are not needed
    flat = pd.read_parquet(fluxnet_table).drop(columns=["lat", "lon"])
    none = RealSiteBenchmark(flat, RealSiteConfig(exclude_within_km=0, past_only=False), "unused")
    assert {r.scope for r in none.plan if r.method == "pretrain"} == {"dev"}


@needs_data
def test_every_k_is_tested_on_the_same_years(fluxnet_table: Path) -> None:
    bench = RealSiteBenchmark(pd.read_parquet(fluxnet_table), RealSiteConfig(), "unused")
    for site, test_years in (("US-Ne3", list(range(2004, 2013))), ("US-CRT", [2013])):
        for k in ((1, 2, 3) if site == "US-Ne3" else (1, 2)):
            calibration, test = bench.site_split(site, k)
            first = 2001 if site == "US-Ne3" else 2011
            assert calibration.years.tolist() == list(range(first, first + k))
            assert test.years.tolist() == test_years


@needs_data
@pytest.mark.slow
def test_cli_workflow_on_tower_data(tmp_path: Path, monkeypatch) -> None:
    """The toolkit on FLUXNET as on its demo data: import, pretrain a tower-feature backbone with
    configs/fluxnet.toml (simulator first, towers after), calibrate a held-out tower, serve it."""
    config = Path(__file__).resolve().parents[1] / "configs" / "fluxnet.toml"
    monkeypatch.chdir(tmp_path)
    run = _runner()

    def ok(*args: str):
        result = run.invoke(cli, list(args))
        assert result.exit_code == 0, f"{args}: {result.stderr} {result.exception!r}"
        return result

    ok("synth", "--tower-weather", "--max-sites-per-region", "1", "--max-years-per-site", "3",
       "--out", "sim.parquet")
    ok("import", "fluxnet", str(DAILY / "FLX_US-Lin_FLUXNET2015_DD-FROM-HH_2009-2010.csv"),
       str(DAILY / "FLX_US-Tw3_FLUXNET2015_DD-FROM-HH_2013-2014.csv"), "--out", "dev.parquet")
    ok("import", "fluxnet", str(DAILY / "FLX_US-CRT_FLUXNET2015_DD-FROM-HH_2011-2013.csv"),
       "--out", "crt.csv")
    ok("pretrain", "--data", "sim.parquet", "--observed", "dev.parquet", "--config", str(config),
       "--name", "tower", "--out-dir", ".", "--quiet", "--cpu")
    backbone = load_backbone("tower.safetensors")
    assert backbone.config.features == schema.FLUXNET_FEATURES
    assert [p["name"] for p in backbone.training["phases"]] == ["simulated", "transfer"]
    (tmp_path / "adapters").mkdir()
    ok("calibrate", "--site", "US-CRT", "--data", "crt.csv", "--backbone", "tower.safetensors",
       "--out", "adapters", "--epochs", "3", "--quiet", "--cpu")
    assert (tmp_path / "adapters" / "US-CRT.safetensors").stat().st_size < 16 * 1024
    ok("predict", "--data", "crt.csv", "--backbone", "tower.safetensors", "--adapters", "adapters",
       "--site-column", "site", "--out", "pred.csv")
    pred = pd.read_csv("pred.csv")
    assert len(pred) == 3 * 365 and (pred["adapter"] == "US-CRT").all()
    assert np.isfinite(pred[["NEE", "Reco"]].to_numpy()).all()


@needs_data
def test_exclude_removes_sites_before_anything(fluxnet_table: Path, tmp_path: Path) -> None:
    """The development split (configs/fluxnet-dev.toml, and with tower GPP
    configs/fluxnet-dev-tower.toml) removes the real held-out towers."""

    from kgml_peft.experiments.realsites import RealSiteBenchmark

    configs = Path(__file__).resolve().parents[1] / "configs"
    dev = RealSiteConfig.from_toml(configs / "fluxnet-dev.toml")
    assert set(dev.exclude) == set(HELD_OUT) and not set(dev.held_out) & set(HELD_OUT)
    # its tower-GPP twin is the same split, only the GPP route differs; the held-out benchmark's
    # tower config differs from the default in the route alone
    tower = RealSiteConfig.from_toml(configs / "fluxnet-dev-tower.toml")
    assert tower == dataclasses.replace(dev, gpp_route="tower") and dev.gpp_route == "satellite-like"
    assert RealSiteConfig.from_toml(configs / "fluxnet-tower.toml") == RealSiteConfig(gpp_route="tower")
    config = dataclasses.replace(RealSiteConfig.quick(), held_out=dev.held_out, exclude=dev.exclude)
    bench = RealSiteBenchmark(pd.read_parquet(fluxnet_table), config, tmp_path / "out")
    assert not set(bench.windows.sites) & set(HELD_OUT)
    assert not set(bench.dev_sites) & {*HELD_OUT, *dev.held_out} and len(bench.dev_sites) == 6
    assert not (tmp_path / "out").exists()  # nothing is written before execution


@needs_data
def test_satellite_like_route_degrades_every_sites_gpp_and_nothing_else(fluxnet_table: Path) -> None:
    """The benchmark's satellite-like route: windows get the degraded GPP (inputs and the mass
    balance's GPP), targets and other inputs stay as the tower measured them."""
    frame = pd.read_parquet(fluxnet_table)
    config = dataclasses.replace(RealSiteConfig.quick(), gpp_route="satellite-like")
    tower = RealSiteBenchmark(frame, dataclasses.replace(RealSiteConfig.quick(), gpp_route="tower"), "unused")
    satellite = RealSiteBenchmark(frame, config, "unused")
    gpp = list(tower.windows.features).index("GPP")
    assert np.array_equal(tower.windows.daily, satellite.windows.daily, equal_nan=True)
    others = [i for i in range(len(tower.windows.features)) if i != gpp]
    assert np.array_equal(tower.windows.inputs[..., others], satellite.windows.inputs[..., others])
    assert np.array_equal(satellite.windows.inputs[..., gpp], satellite.windows.gpp)
    ratio = satellite.windows.gpp.sum(axis=1) / tower.windows.gpp.sum(axis=1)
    assert 0.05 < ratio.std() < 0.3 and not np.allclose(ratio, 1)


def test_bootstrap_over_test_years_is_paired_seeded_and_needs_two_years() -> None:
    """add_bootstrap on hand-made records: resampling years of a method that is exactly half as
    wrong as the baseline every year gives a skill interval of exactly [0.5, 0.5]; one test year
    gives no interval; different test years within a cell are refused."""
    from kgml_peft.experiments.realsites_report import add_bootstrap, add_skill

    def record(sse: list[float], years: list[int]) -> dict:
        by_year = {"sse": sse, "n": [10] * len(sse)}
        mse = sum(sse) / (10 * len(sse))
        return {"test": {"years": years, **{t: {"mse": mse, "by_year": by_year} for t in ("NEE", "Reco")}}}

    def cell(years: list[int], scale: float = 0.5) -> tuple[dict, dict]:
        base = [float(v) for v in range(10, 10 + 10 * len(years), 10)]
        records = {"climatology": [record(base, years)], "regression_site": [record([2 * v for v in base], years)],
                   "regression_global": [record([3 * v for v in base], years)],
                   "adapter/observed": [record([scale * v for v in base], years)] * 2}
        rows = {name: {t: {"mse": {"mean": recs[0]["test"][t]["mse"]}} for t in ("NEE", "Reco")}
                for name, recs in records.items()}
        return rows, records

    rows, records = cell([2004, 2005, 2006, 2007])
    add_skill(rows)
    add_bootstrap(rows, records)
    assert rows["adapter/observed"]["skill_vs_best_baseline"]["NEE"] == pytest.approx(0.5)
    assert rows["adapter/observed"]["skill_ci"]["NEE"] == pytest.approx([0.5, 0.5])
    assert rows["climatology"]["skill_ci"]["NEE"] is None  # the best baseline itself
    low, high = rows["adapter/observed"]["mse_ci"]["Reco"]
    assert low < rows["adapter/observed"]["Reco"]["mse"]["mean"] < high
    again, records = cell([2004, 2005, 2006, 2007])
    add_skill(again)
    add_bootstrap(again, records)
    assert again == rows  # seeded
    one, records = cell([2013])
    add_skill(one)
    add_bootstrap(one, records)
    assert one["adapter/observed"]["mse_ci"] == {"NEE": None, "Reco": None} and one["adapter/observed"]["test_years_n"] == 1
    rows, records = cell([2004, 2005])
    records["climatology"] = [record([1.0], [2004])]
    with pytest.raises(KgmlPeftError, match="different years"):
        add_bootstrap(rows, records)
    # as many years, other years (a stale record), in one seed only: refused too
    rows, records = cell([2004, 2005])
    records["adapter/observed"] = [records["adapter/observed"][0], record([5.0, 10.0], [2005, 2006])]
    with pytest.raises(KgmlPeftError, match="different years"):
        add_bootstrap(rows, records)
