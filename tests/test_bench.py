"""``kgml-peft bench`` through the CLI: a quick run on the shipped backbone prints JSON with every
key scripts track, consistent figures, and the mixed-batch equality check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kgml_peft.cli import cli
from tests.test_cli_validation import _runner

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "demo.safetensors"
REQUIRED = ["swap_ms.cached_median", "swap_ms.disk_median", "ratios.merged_vs_bare",
            "ratios.mixed_vs_single", "memory.tensor_mb_per_1000_adapters", "calibrate_s_per_site",
            "adapter_bytes", "backbone_bytes", "ratios.interval_vs_point", "predict_ms.point",
            "predict_ms.interval_5_members", "ratios.cv_vs_plain_calibrate", "calibrate_cv_s_per_site",
            "calibrate_plain_s_per_site", "ratios.interval_vs_point_head_only", "predict_ms.head_only_point",
            "predict_ms.head_only_interval_5_members", "ratios.blend3_vs_single", "predict_ms.own_adapters",
            "predict_ms.blends_of_3_neighbours"] + [
    f"throughput_site_days_per_s.{k}" for k in
    ("bare", "peft", "merged", "mixed", "grouped", "naive", "single_same_size")]


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_globals")
def test_quick_bench_prints_every_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new" / "dir" / "bench.json"  # missing folders are created
    result = _runner().invoke(cli, ["bench", "--backbone", str(SHIPPED), "--quick", "--json", "--quiet",
                                    "--cpu", "--memory-adapters", "12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert json.loads(out.read_text()) == data
    for key in REQUIRED:
        value = _get(data, key)
        assert isinstance(value, (int, float)) and value > 0, (key, value)
    t, r = data["throughput_site_days_per_s"], data["ratios"]
    assert r["merged_vs_bare"] == pytest.approx(t["merged"] / t["bare"], abs=2e-3)
    assert r["mixed_vs_single"] == pytest.approx(t["mixed"] / t["single_same_size"], abs=2e-3)
    assert data["batch"] == {"site_years": 6, "sites": 3, "site_days": 6 * 365}
    p = data["predict_ms"]
    assert r["interval_vs_point"] == pytest.approx(p["point"] / p["interval_5_members"], rel=0.02)
    assert r["interval_vs_point_head_only"] == pytest.approx(
        p["head_only_point"] / p["head_only_interval_5_members"], rel=0.02)
    assert r["blend3_vs_single"] == pytest.approx(p["blends_of_3_neighbours"] / p["own_adapters"], rel=0.02)
    assert r["cv_vs_plain_calibrate"] == pytest.approx(
        data["calibrate_cv_s_per_site"] / data["calibrate_plain_s_per_site"], rel=0.02)
    assert data["memory"]["adapters_loaded"] == 12
    # RSS growth of 12 small adapters may be absorbed by freed memory: a number, or None off Linux
    rss = data["memory_mb_per_1000_adapters"]
    assert rss is None or isinstance(rss, (int, float))
    # resident tensor data = the default adapter's values in float32, per adapter
    from kgml_peft.tuners.config import AdapterConfig
    from kgml_peft.tuners.site_model import SiteModel
    from kgml_peft.store.checkpoint import load_backbone

    values = sum(p.numel() for p in SiteModel(load_backbone(SHIPPED).model, AdapterConfig())
                 .adapter_parameters().values())
    assert data["memory"]["tensor_mb_per_1000_adapters"] == pytest.approx(values * 4 * 1000 / 2**20, abs=1e-3)
    assert data["checks"]["mixed_equals_per_site_within_1e-5"] is True
    assert max(data["checks"]["max_abs_diff_vs_per_site"].values()) <= 1e-5
    assert data["backbone_bytes"] == SHIPPED.stat().st_size
    from kgml_peft.model import native

    loops = data["machine"]["native_day_loop"]  # what this process found, reported as it is
    assert loops["available"] is native.status().available
    assert loops["seconds"] >= 0 and (loops["reason"] is None) is loops["available"]
    assert 1000 < data["adapter_bytes"] < 64 * 1024
    assert set(data["strategy_sweep_site_days_per_s"]) == {"1", "2", "3"}
    # calibration throughput: in process and through the real command in 1 and 2 processes
    rate = data["calibration_throughput"]
    assert rate["sites"] == 3 and rate["processes"] == 2 and rate["epochs"] == 1
    per_min = rate["sites_per_min"]
    assert set(per_min) == {"sequential_in_process", "batched_in_process", "command_1_process",
                            "command_2_processes", "command_1_process_batched",
                            "command_2_processes_batched"}
    assert all(isinstance(v, (int, float)) and v > 0 for v in per_min.values())
    assert rate["ratios"]["batched_vs_sequential"] == pytest.approx(
        per_min["batched_in_process"] / per_min["sequential_in_process"], abs=0.02)
    assert rate["ratios"]["2_processes_vs_1"] == pytest.approx(
        per_min["command_2_processes"] / per_min["command_1_process"], abs=0.02)
    loss = rate["validation_loss"]
    assert loss["sequential_mean"] <= loss["before_mean"] and loss["batched_mean"] <= loss["before_mean"]
    assert not list(tmp_path.glob("*.safetensors")), "the bench's adapters live in a temporary folder"


def test_bench_refuses_a_missing_backbone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _runner().invoke(cli, ["bench", "--backbone", "nope.safetensors", "--quick"])
    assert result.exit_code == 2 and result.stderr.startswith("error: backbone nope.safetensors")
    assert len(result.stderr.splitlines()) == 1
