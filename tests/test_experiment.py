"""``kgml-peft experiment``: the year split, the run plan, the config, a real quick run through the
CLI (structure of results.json / results.md / figures, resume without redoing runs) and bad input."""

from __future__ import annotations

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


def test_config_checks_and_toml(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    path.write_text('seeds = [3, 4]\nranks = [2]\n[adapter]\nepochs = 5\n[backbone]\nhidden_size = 12\n')
    config = ExperimentConfig.from_toml(path)
    assert config.seeds == (3, 4) and config.adapter.epochs == 5 and config.adapter.lr == 1e-2
    assert config.backbone.hidden_size == 12 and config.ranks == (2,)
    assert ExperimentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, match in (({"seeds": []}, "at least one seed"), ({"test_fraction": 0.6}, "test_fraction"),
                       ({"ablations": [["lora", "x"]]}, "ablation"), ({"colour": 1}, "colour"),
                       ({"adapter": {"epochs": 0}}, "epochs >= 1")):
        with pytest.raises(KgmlPeftError, match=match):
            ExperimentConfig.from_dict(bad)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real ``experiment --quick`` run on the built-in demo data."""
    out = tmp_path_factory.mktemp("experiment") / "results"
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
    for regime in MAIN_REGIMES:
        for region in regions:
            entry = results["regimes"][regime][region]
            assert np.isfinite(entry["mse_mean"]) and entry["mse_mean"] > 0 and entry["mse_std"] == 0.0
    adapters, full = results["regimes"]["adapters"]["IA"], results["regimes"]["full_finetune"]["IA"]
    assert adapters["trainable_parameters"] < 0.1 * full["trainable_parameters"]
    assert adapters["adapter_bytes"] > 0 and full["trainable_parameters"] == full["backbone_parameters"]
    assert set(results["cross_regional"]) == {"IA", "IL", "IN", "IA+IL", "IA+IN", "IL+IN"}
    assert {"scarcity_adapters_1y", "sensitivity_full_lr0.001_bs32", "ablation_head", "rank_2"} <= set(results["regimes"])
    assert set(results["regimes"]["adapters"]["IA"]["physics"]) >= {"l_phys", "mass_balance_violation_rate"}
    assert results["scaling"]["targets"] == ["NEE", "Reco"]
    text = (out / "results.md").read_text()
    for heading in ("## Regimes per region", "## Relative MSE change", "## Cross-regional",
                    "## Data scarcity", "## Physics audit"):
        assert heading in text
    for name in ("regimes", "cross_regional", "sensitivity", "scarcity", "ablations", "physics_audit",
                 "global_training"):
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
        for by_region in data["regimes"].values():
            for entry in by_region.values():
                entry.pop("seconds_mean")
        return data

    assert numbers(tmp_path / "two") == numbers(out)


@pytest.mark.parametrize("case", ["quick-and-config", "one-region", "few-years", "no-parent",
                                  "unknown-region", "zero-jobs"])
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
    elif case == "zero-jobs":
        args += ["--quick", "--jobs", "0"]
        expect = ("--jobs",)
    elif case == "no-parent":
        args = ["experiment", "--out", "missing/res", "--quick", "--quiet"]
        expect = ("does not exist",)
    else:
        (tmp_path / "e.toml").write_text('regions = ["IA", "XX"]\nseeds = [0]\n')
        args += ["--config", "e.toml"]
        expect = ("XX",)
    before = _snapshot(tmp_path)
    result = _runner().invoke(cli, args, catch_exceptions=True)
    check_user_error(result, args, expect, tmp_path, before)
