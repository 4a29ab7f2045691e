"""``kgml-peft experiment``: the year split, the run plan, the config, a real quick run through the
CLI (structure of results.json / results.md / figures, resume without redoing runs) and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from kgml_peft.cli import cli
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.config import MAIN_REGIMES, ExperimentConfig
from kgml_peft.experiments.runs import plan, split_years
from kgml_peft.experiments.suite_baselines import BASELINES
from kgml_peft.model.backbone import BackboneConfig
from tests.conftest import make_frame
from tests.test_cli_validation import _runner, _snapshot, _write, check_user_error

FEATURES = BackboneConfig().features


def _windows(years: int):
    frame = make_frame({"IA-001": "IA", "IL-001": "IL"}, years=tuple(range(2001, 2001 + years)))
    return make_windows(validate_table(frame, FEATURES), FEATURES)


def test_split_keeps_test_and_validation_years_last() -> None:
    split = split_years(_windows(10), 0.2, 0.2)
    for site in ("IA-001", "IL-001"):
        years = {part: sorted(getattr(split, part).years[getattr(split, part).sites == site])
                 for part in ("train", "val", "test")}
        assert years == {"train": list(range(2001, 2007)), "val": [2007, 2008], "test": [2009, 2010]}
    recent = split.region("train", ("IA",), years=2)
    assert sorted(recent.years) == [2005, 2006] and set(recent.regions) == {"IA"}
    with pytest.raises(KgmlPeftError, match="has 2 complete years; the experiment needs at least 3"):
        split_years(_windows(2), 0.2, 0.2)


def test_plan_shares_runs_between_regimes_and_trains_global_models_first() -> None:
    config = ExperimentConfig(seeds=(0, 1))
    p = plan(config, ("IA", "IL", "IN"))
    keys = [r.key for r in p.runs]
    assert len(keys) == len(set(keys))
    assert all(r.method == "scratch" and r.regions == ("IA", "IL", "IN") for r in p.runs[:2])
    # the all-components rank-1 adapter is the main regime, an ablation and a rank point at once
    assert p.regimes["adapters"]["IA"] == p.regimes["rank_1"]["IA"] == \
        p.regimes["ablation_lora+blocks+head"]["IA"]
    assert p.regimes["site_only"]["IL"] == p.cross["IL"]["IL"]
    assert set(p.cross) == {"IA", "IL", "IN", "IA+IL", "IA+IN", "IL+IN"}
    for regime in MAIN_REGIMES:
        assert {r: len(k) for r, k in p.regimes[regime].items()} == {"IA": 2, "IL": 2, "IN": 2}
    # per region and seed: site-only, full, 7 adapter variants, 3 x 2 sensitivity, 3 x 3 scarcity
    per_unit = 1 + 1 + (1 + 3 + 3) + 6 + 9
    assert len(p.runs) == 2 * (1 + 3 * per_unit + 3)  # + global + the pairs


def test_plan_new_fields_come_from_a_global_model_that_never_saw_them() -> None:
    config = ExperimentConfig(seeds=(0, 1), new_site_years=(1, 3))
    new = {"IA": ("IA-007", "IA-008"), "IL": ("IL-004",), "IN": ()}
    p = plan(config, ("IA", "IL", "IN"), new)
    known = [r for r in p.runs if r.known_only]
    assert [r.seed for r in known] == [0, 1] and all(r.method == "scratch" for r in known)
    assert p.runs.index(known[-1]) < min(p.runs.index(r) for r in p.runs if r.site)  # global models first
    # per seed: 3 new fields x 2 k x (site-only, full, adapter)
    assert len([r for r in p.runs if r.site]) == 2 * 3 * 2 * 3
    assert set(p.new_sites) == {"global_only", "site_only", "full_finetune", "adapters"}
    assert set(p.new_sites["adapters"]) == {"IA", "IL"}
    assert [site for _, site in p.new_sites["adapters"]["IA"][3]] == ["IA-007", "IA-008"] * 2
    assert p.new_sites["global_only"]["IL"][1] == [(k.key, "IL-004") for k in known]
    assert len(plan(config, ("IA", "IL", "IN")).runs) == len(p.runs) - 2 - 36  # without new fields


def test_new_fields_are_left_out_of_the_known_global_model_and_the_scaling(tmp_path: Path) -> None:
    from kgml_peft.data.synthetic import SynthConfig, simulate
    from kgml_peft.experiments.runs import Experiment

    frame = simulate(SynthConfig(observed=True, obs_years=(6, 6), max_sites_per_region=2,
                                 regions=("IA", "IL")))
    config = dataclasses.replace(ExperimentConfig.quick(), new_site_years=(1, 2))
    experiment = Experiment(frame, config, tmp_path / "out")
    assert experiment.new_sites == {"IA": ("IA-002",), "IL": ("IL-002",)}
    known = experiment.known(experiment.split.train)
    assert set(known.sites) == {"IA-001", "IL-001"}
    from kgml_peft.data.windows import Scalers

    assert Scalers.fit(known).std["NEE"] == pytest.approx(experiment.scalers.std["NEE"])
    calibration, test = experiment.new_site_parts("IA-002", 1)
    assert list(calibration.years) == sorted(experiment.new_windows["IA-002"].years)[:1]  # its first year
    assert sorted(test.years) == sorted(experiment.new_windows["IA-002"].years)[2:]  # after the largest k
    with pytest.raises(KgmlPeftError, match="region IA has 2 site"):
        Experiment(frame, dataclasses.replace(config, new_sites_per_region=2), tmp_path / "o2")
    with pytest.raises(KgmlPeftError, match="new field IA-002 has 6 complete years"):
        Experiment(frame, dataclasses.replace(config, new_site_years=(6,)), tmp_path / "o3")


def test_config_checks_and_toml(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    path.write_text('seeds = [3, 4]\nranks = [2]\n[adapter]\nepochs = 5\n[backbone]\nhidden_size = 12\n')
    config = ExperimentConfig.from_toml(path)
    assert config.seeds == (3, 4) and config.adapter.epochs == 5 and config.adapter.lr == 1e-2
    assert config.backbone.hidden_size == 12 and config.ranks == (2,)
    assert ExperimentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, match in (({"seeds": []}, "at least one seed"), ({"test_fraction": 0.6}, "test_fraction"),
                       ({"ablations": [["lora", "x"]]}, "ablation"), ({"colour": 1}, "colour"),
                       ({"adapter": {"epochs": 0}}, "epochs >= 1"),
                       ({"new_site_years": [0]}, "new_site_years"), ({"new_sites_per_region": -1}, "new_sites")):
        with pytest.raises(KgmlPeftError, match=match):
            ExperimentConfig.from_dict(bad)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real ``experiment --quick`` run on the built-in demo data, into a folder that does not
    exist yet (created with its parents)."""
    out = tmp_path_factory.mktemp("experiment") / "new" / "results"
    result = _runner().invoke(cli, ["experiment", "--quick", "--out", str(out), "--quiet", "--cpu"])
    assert result.exit_code == 0, result.output
    return out, result


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_globals")
def test_quick_experiment_writes_every_output(quick_run) -> None:
    out, result = quick_run
    results = json.loads((out / "results.json").read_text())
    regions = results["regions"]
    assert regions == ["IA", "IL", "IN"]
    assert results["targets"] == ["NEE", "Reco"]
    for regime in (*MAIN_REGIMES, *BASELINES):
        for region in regions:
            entry = results["regimes"][regime][region]
            for target in ("NEE", "Reco"):
                figures = entry[target]
                assert np.isfinite(figures["mse"]["mean"]) and figures["mse"]["mean"] > 0
                assert figures["mse"]["std"] == 0.0 and entry["seeds"] == 1
                lo, hi = figures["mse_ci"]  # 6-8 test site-years per region: an interval
                assert 0 < lo <= hi
                best = entry["best_baseline"][target]
                assert best in BASELINES
                base = results["regimes"][best][region][target]["mse"]["mean"]
                assert figures["skill"] == pytest.approx(1 - figures["mse"]["mean"] / base)
                assert (figures["skill_ci"] is None) == (regime == best)
    adapters, full = results["regimes"]["adapters"]["IA"], results["regimes"]["full_finetune"]["IA"]
    assert adapters["trainable_parameters"] < 0.1 * full["trainable_parameters"]
    assert adapters["adapter_bytes"] > 0 and full["trainable_parameters"] == full["backbone_parameters"]
    assert set(results["cross_regional"]) == {"IA", "IL", "IN", "IA+IL", "IA+IN", "IL+IN"}
    assert {"scarcity_adapters_1y", "sensitivity_full_lr0.001_bs32", "ablation_head", "rank_2"} <= set(results["regimes"])
    assert set(results["regimes"]["adapters"]["IA"]["physics"]) >= {"l_phys", "mass_balance_violation_rate"}
    assert results["scaling"]["trained_on"] == ["NEE", "Reco", "Yield"]
    # new fields: one per region, calibrated on 1 year, tested on its years after it
    assert results["new_site_ids"] == {"IA": ["IA-008"], "IL": ["IL-004"], "IN": ["IN-006"]}
    for method in ("global_only", "site_only", "full_finetune", "adapters", *BASELINES):
        for region in regions:
            entry = results["new_sites"][method][region]["k1"]
            assert np.isfinite(entry["NEE"]["mse"]["mean"]) and entry["NEE"]["mse"]["mean"] > 0
            assert entry["seeds"] == 1 and entry["NEE"]["mse_ci"] is not None
            if method not in BASELINES:
                assert list(entry["sites"]) == results["new_site_ids"][region]
    assert 0 <= results["new_sites"]["adapters"]["IA"]["k1"]["kept_global_share"] <= 1
    change = results["new_sites_relative"]["adapters"]["IN"]["k1"]["Reco"]["vs_global_only_pct"]
    ia = results["new_sites"]
    assert change == pytest.approx(100 * (ia["adapters"]["IN"]["k1"]["Reco"]["mse"]["mean"]
                                          / ia["global_only"]["IN"]["k1"]["Reco"]["mse"]["mean"] - 1))
    # the cross-regional matrix has a regression row per training unit
    assert set(results["cross_regional_regression"]) == set(results["cross_regional"])
    run = json.loads(next((out / "runs").glob("adapter__IA-008__*__first1y__s0.json")).read_text())
    assert len(run["train_years"]) == 1 and min(run["test_years"]) > run["train_years"][0]
    assert (out / "models" / "global-known__s0.safetensors").is_file()
    assert set(results["regimes"]["adapters"]["IA"]["physics"]) >= {"mass_balance_violation_rate_relative"}
    text = (out / "results.md").read_text()
    for heading in ("## Regimes and baselines per region: NEE", "## Regimes and baselines per region: Reco",
                    "## R² on anomalies", "## Relative MSE change", "## Cross-regional: NEE",
                    "## Data scarcity", "## New fields", "### Reco", "## Physics audit"):
        assert heading in text
    assert "| climatology |" in text and "| scarcity_regression_site_1y |" not in text
    assert "| regression_site_1y |" in text  # the scarcity table's baseline rows
    names = ["physics_audit", "global_training"] + [f"{n}_{t}" for t in ("NEE", "Reco") for n in (
        "regimes", "cross_regional", "sensitivity", "scarcity", "ablations", "new_sites")]
    for name in names:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(list((out / "runs").glob("*.json"))) == results["runs"]
    assert "adapters" in result.stdout and "IA" in result.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_globals")
def test_rerun_resumes_without_training(quick_run) -> None:
    out, _ = quick_run
    before = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    removed = sorted(before)[-1]
    (out / "runs" / removed).unlink()  # one unfinished run
    result = _runner().invoke(cli, ["experiment", "--quick", "--out", str(out), "--quiet", "--cpu"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_runs"] == results["runs"] - 1
    after = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert set(after) == set(before)
    assert all(after[k] == v for k, v in before.items() if k != removed)


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_globals")
def test_two_worker_processes_give_the_same_results(quick_run, tmp_path: Path) -> None:
    out, _ = quick_run
    result = _runner().invoke(cli, ["experiment", "--quick", "--out", str(tmp_path / "two"), "--quiet",
                                    "--cpu", "--jobs", "2"])
    assert result.exit_code == 0, result.output

    def numbers(path: Path) -> dict:
        data = json.loads((path / "results.json").read_text())
        for key in ("seconds_total", "resumed_runs"):
            data.pop(key)
        data["provenance"].pop("date")  # when each was written; the commit must agree
        for by_region in data["regimes"].values():
            for entry in by_region.values():
                entry.pop("seconds_mean", None)
        return data

    assert numbers(tmp_path / "two") == numbers(out)


@pytest.mark.parametrize("case", ["quick-and-config", "one-region", "few-years", "parent-is-a-file",
                                  "unknown-region", "zero-jobs", "one-site-per-region",
                                  "new-fields-fluxnet", "foreign-folder"])
def test_bad_input_is_one_line(case: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["experiment", "--out", "res", "--quiet", "--cpu"]
    if case == "quick-and-config":
        (tmp_path / "e.toml").write_text("seeds = [1]\n")
        args += ["--quick", "--config", "e.toml"]
        expect = ("not both",)
    elif case == "one-region":
        _write(make_frame({"IA-001": "IA"}, years=tuple(range(2001, 2007))), tmp_path / "d.csv")
        args += ["--quick", "--data", "d.csv"]
        expect = ("at least two",)
    elif case == "few-years":
        _write(make_frame(years=(2001, 2002)), tmp_path / "d.csv")
        args += ["--quick", "--data", "d.csv"]
        expect = ("complete years",)
    elif case == "one-site-per-region":  # nothing would be left to train a global model on
        _write(make_frame(years=tuple(range(2001, 2007))), tmp_path / "d.csv")
        args += ["--quick", "--data", "d.csv"]
        expect = ("region IA has 1 site(s)", "--new-fields 0")
    elif case == "new-fields-fluxnet":
        args += ["--suite", "fluxnet", "--quick", "--new-fields", "1"]
        expect = ("--new-fields is an option of the paper suite",)
    elif case == "foreign-folder":  # runs of another (or an older) experiment are not resumed
        (tmp_path / "res" / "runs").mkdir(parents=True)
        (tmp_path / "res" / "runs" / "scratch__IA__x__s0.json").write_text("{}")
        args += ["--quick"]
        expect = ("holds runs without experiment.json",)
    elif case == "zero-jobs":
        args += ["--quick", "--jobs", "0"]
        expect = ("--jobs",)
    elif case == "parent-is-a-file":  # a missing folder is created; a file in the way is not
        (tmp_path / "missing").write_text("a file\n")
        args = ["experiment", "--out", "missing/res", "--quick", "--quiet"]
        expect = ("missing is not a folder",)
    else:
        (tmp_path / "e.toml").write_text('regions = ["IA", "XX"]\nseeds = [0]\n')
        args += ["--config", "e.toml"]
        expect = ("XX",)
    before = _snapshot(tmp_path)
    result = _runner().invoke(cli, args, catch_exceptions=True)
    check_user_error(result, args, expect, tmp_path, before)
