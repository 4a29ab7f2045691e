"""``kgml-peft calibrate`` and ``kgml-peft adapters ...`` through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kgml_peft.cli import cli
from kgml_peft.store.adapter import read_adapter
from kgml_peft.store.checkpoint import load_backbone
from tests.conftest import make_frame
from tests.test_cli_validation import _runner

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo.safetensors"
FAST = ["--epochs", "3", "--batch-size", "2", "--quiet"]


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "sites.csv"
    make_frame({"IA-001": "IA", "IA-002": "IA", "IL-001": "IL"}, years=(2003, 2004, 2005)).to_csv(
        path, index=False, date_format="%Y-%m-%d")
    return path


def _calibrate(table, backbone, out, *extra):
    return _runner().invoke(cli, ["calibrate", "--data", str(table), "--backbone", str(backbone),
                                  "--out", str(out), *FAST, *extra])


def test_calibrate_region_prints_before_after_and_writes_adapter(table, backbone_path, tmp_path):
    out = tmp_path / "adapters"
    out.mkdir()
    backbone_bytes = backbone_path.read_bytes()
    result = _calibrate(table, backbone_path, out, "--site", "IA")
    assert result.exit_code == 0, result.output + result.stderr
    # cross-validation is the default for the adapter method: leave one year out over the region
    assert "IA (region, 2 sites): 6 site-years, all in the folds" in result.stdout
    assert "cross-validation on 3 folds (year 2003, year 2004, year 2005)" in result.stdout
    assert "in-sample (all data)" in result.stdout and "NEE MSE" in result.stdout
    assert f"wrote {out / 'IA.safetensors'}" in result.stdout
    adapter = read_adapter(out / "IA.safetensors")
    assert adapter.info["sites"] == ["IA-001", "IA-002"]
    assert adapter.info["calibration"]["cv"] == "folds" and adapter.intervals is not None
    assert backbone_path.read_bytes() == backbone_bytes
    # an existing adapter is kept unless --force
    good = (out / "IA.safetensors").read_bytes()
    again = _calibrate(table, backbone_path, out, "--site", "IA")
    assert again.exit_code == 2 and "exists; pass --force" in again.stderr
    assert (out / "IA.safetensors").read_bytes() == good
    forced = _calibrate(table, backbone_path, out, "--site", "IA", "--force", "--seed", "1")
    assert forced.exit_code == 0
    assert (out / "IA.safetensors").read_bytes() != good


def test_calibrate_all_writes_one_adapter_per_region_json(table, backbone_path, tmp_path):
    result = _calibrate(table, backbone_path, tmp_path, "--site", "all", "--json")
    assert result.exit_code == 0, result.stderr
    runs = json.loads(result.stdout)
    assert [r["site"] for r in runs] == ["IA", "IL"]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["IA.safetensors", "IL.safetensors"]
    assert all(r["metrics"]["after"]["loss"] <= r["metrics"]["before"]["loss"] for r in runs)


def test_options_reach_the_adapter(table, backbone_path, tmp_path):
    result = _calibrate(table, backbone_path, tmp_path, "--site", "IA-002", "--components",
                        "lora,head", "--rank", "2", "--alpha", "4", "--lora-targets", "gru_nee",
                        "--lora-weights", "ih,hh", "--head", "mlp", "--targets", "NEE,Reco",
                        "--dtype", "float16", "--rho", "0.5", "--lambda", "0.2")
    assert result.exit_code == 0, result.stderr
    adapter = read_adapter(tmp_path / "IA-002.safetensors")
    assert adapter.config.components == ("lora", "head") and adapter.config.head == "mlp"
    assert set(k for k in adapter.tensors if k.startswith("lora.")) == {
        "lora.gru_nee.weight_ih_l0.A", "lora.gru_nee.weight_ih_l0.B",
        "lora.gru_nee.weight_hh_l0.A", "lora.gru_nee.weight_hh_l0.B"}
    assert adapter.tensors["lora.gru_nee.weight_ih_l0.A"].shape[0] == 2
    assert adapter.info["dtype"] == "float16" and adapter.info["targets"] == {"NEE": 1.0, "Reco": 1.0}
    assert adapter.info["calibration"]["rho"] == 0.5
    assert adapter.info["calibration"]["physics_weight"] == 0.2
    with safe_open(str(tmp_path / "IA-002.safetensors"), framework="pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.float16 for k in handle.keys())


def test_config_file_with_overrides(table, backbone_path, tmp_path):
    config = tmp_path / "calib.toml"
    config.write_text('lr = 0.003\nrho = 0.01\n[adapter]\nlora_rank = 3\nbottleneck = 4\n')
    result = _calibrate(table, backbone_path, tmp_path, "--site", "IL", "--config", str(config),
                        "--bottleneck", "5")
    assert result.exit_code == 0, result.stderr
    adapter = read_adapter(tmp_path / "IL.safetensors")
    assert adapter.config.lora_rank == 3 and adapter.config.bottleneck == 5
    assert adapter.info["calibration"]["lr"] == 0.003 and adapter.info["calibration"]["rho"] == 0.01


@pytest.mark.parametrize("method", ["full", "scratch"])
def test_full_and_scratch_write_backbones_every_command_accepts(table, backbone_path, tmp_path, method):
    result = _calibrate(table, backbone_path, tmp_path, "--site", "IA", "--method", method)
    assert result.exit_code == 0, result.stderr
    path = tmp_path / f"IA-{method}.safetensors"
    site_backbone = load_backbone(path)
    assert site_backbone.training["method"] == method
    assert site_backbone.training["backbone_fingerprint"] == load_backbone(backbone_path).fingerprint
    evaluated = _runner().invoke(cli, ["evaluate", "--backbone", str(path), "--data", str(table)])
    assert evaluated.exit_code == 0 and "IA" in evaluated.stdout
    # and it can serve as the backbone of a further calibration
    nested = tmp_path / "nested"
    nested.mkdir()
    assert _calibrate(table, path, nested, "--site", "IA").exit_code == 0


def test_adapters_list_show_verify_export_import(table, backbone_path, other_backbone_path, tmp_path):
    store = tmp_path / "adapters"
    store.mkdir()
    assert _calibrate(table, backbone_path, store, "--site", "all").exit_code == 0
    runner = _runner()
    listed = runner.invoke(cli, ["adapters", "list", "--store", str(store)])
    assert listed.exit_code == 0 and "IA.safetensors" in listed.stdout and "IL.safetensors" in listed.stdout
    rows = json.loads(runner.invoke(cli, ["adapters", "list", "--store", str(store), "--json"]).stdout)
    assert [r["site"] for r in rows] == ["IA", "IL"]
    shown = runner.invoke(cli, ["adapters", "show", str(store / "IA.safetensors")])
    assert shown.exit_code == 0 and "validation" in shown.stdout
    shown_json = json.loads(runner.invoke(cli, ["adapters", "show", str(store / "IA.safetensors"),
                                                "--json"]).stdout)
    assert "head.scale" in shown_json["tensors"]
    ok = runner.invoke(cli, ["adapters", "verify", str(store / "IA.safetensors"), "--backbone",
                             str(backbone_path)])
    assert ok.exit_code == 0 and ok.stdout.startswith("ok: ")
    bad = runner.invoke(cli, ["adapters", "verify", str(store / "IA.safetensors"), "--backbone",
                              str(other_backbone_path)])
    assert bad.exit_code == 2 and len(bad.stderr.splitlines()) == 1
    share = tmp_path / "share"
    share.mkdir()
    exported = runner.invoke(cli, ["adapters", "export", str(store / "IL.safetensors"), str(share)])
    assert exported.exit_code == 0 and (share / "IL.safetensors").exists() and (share / "IL.txt").exists()
    other_store = tmp_path / "colleague"
    other_store.mkdir()
    imported = runner.invoke(cli, ["adapters", "import", str(share / "IL.safetensors"), "--store",
                                   str(other_store), "--backbone", str(backbone_path)])
    assert imported.exit_code == 0, imported.stderr
    assert (other_store / "IL.safetensors").read_bytes() == (store / "IL.safetensors").read_bytes()


@pytest.mark.slow
def test_demo_calibrate_ia_meets_size_and_accuracy_targets(tmp_path):
    """The acceptance run: ``kgml-peft calibrate --site IA`` with defaults (cross-validated) on the
    demo data: a file within 64 KiB whose point adapter is at least 20 times smaller than the
    backbone, and a fold estimate that does not make the region worse."""
    out = tmp_path / "adapters"
    out.mkdir()
    result = _runner().invoke(cli, ["calibrate", "--site", "IA", "--backbone", str(DEMO), "--out",
                                    str(out), "--quiet", "--json"])
    assert result.exit_code == 0, result.stderr
    (run,) = json.loads(result.stdout)
    path = out / "IA.safetensors"
    assert path.stat().st_size <= 64 * 1024
    adapter = read_adapter(path)
    point_bytes = sum(t.numel() * 4 for t in adapter.tensors.values())  # one member, float32
    assert DEMO.stat().st_size / point_bytes >= 20
    cv = run["metrics"]["cv"]
    assert cv["folds"] == ["years 2000-2005", "years 2006-2012", "years 2013-2017"]  # 18 years: 3 groups
    assert cv["change_mean"] <= 0 and adapter.member_count == (1 if cv["strength"] == 0 else 4)
    before, after = run["metrics"]["before"], run["metrics"]["after"]  # in-sample: all IA data
    assert after["loss"] <= before["loss"]
    verify = _runner().invoke(cli, ["adapters", "verify", str(path), "--backbone", str(DEMO)])
    assert verify.exit_code == 0


@pytest.mark.parametrize("method, lr", [("adapter", "10"), ("full", "1e6")])
def test_diverging_calibration_stops_with_one_line_and_keeps_the_good_adapter(
        table, backbone_path, tmp_path, method, lr):
    """lr 10 on an adapter (or 1e6 on full fine-tuning) blows the loss up by orders of magnitude
    while it stays finite: early stopping alone would quietly hand back the unchanged backbone, so
    the run must stop with an error, and the adapter from an earlier good run must stay as it was."""
    from tests.test_cli_validation import _snapshot, check_user_error

    out = tmp_path / "adapters"
    out.mkdir()
    first = _calibrate(table, backbone_path, out, "--site", "IA", "--method", method)
    assert first.exit_code == 0, first.stderr
    before = _snapshot(tmp_path)
    args = ["--site", "IA", "--method", method, "--lr", lr, "--force"]
    result = _calibrate(table, backbone_path, out, *args)
    check_user_error(result, args, ("diverged", "lower the learning rate"), tmp_path, before)


def test_gru_option_chooses_the_loop_or_torchs_kernel_and_is_put_back(table, backbone_path, tmp_path):
    """``--gru``: on a CPU the default (auto) trains through the day loop and evaluates through
    torch's kernel, ``loop`` and ``kernel`` use one way throughout; all three train the same
    adapter to float rounding, none is the same as another bit for bit, and the process default is
    back to auto after the command."""
    from kgml_peft.model import recurrence

    tensors = {}
    for way in ("default", "loop", "kernel"):
        out = tmp_path / way
        args = ["--gru", way] if way != "default" else []
        result = _runner().invoke(cli, [*args, "calibrate", "--data", str(table), "--backbone", str(backbone_path),
                                        "--out", str(out), "--site", "IA-001", "--cv", "none", *FAST])
        assert result.exit_code == 0, result.output + result.stderr
        tensors[way] = read_adapter(out / "IA-001.safetensors").tensors
        assert recurrence._default == "auto"
    for a, b in (("default", "loop"), ("default", "kernel"), ("loop", "kernel")):
        assert any(not torch.equal(tensors[a][k], tensors[b][k]) for k in tensors[b]), (a, b)
        for key, value in tensors[b].items():
            torch.testing.assert_close(tensors[a][key], value, rtol=1e-3, atol=1e-5, msg=(a, b, key))
    result = _runner().invoke(cli, ["--gru", "fast", "calibrate", "--help"])
    assert result.exit_code == 2 and "'fast' is not one of 'auto', 'loop', 'kernel'" in result.stderr
