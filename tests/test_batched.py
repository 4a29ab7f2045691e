"""Batched calibration (``--batch-sites``): several units trained side by side in one pass over a
real backbone, against the same units calibrated one after another."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from kgml_peft.calibration.batched import calibrate_batched
from kgml_peft.calibration.calibrate import calibrate_unit, calibration_units, prepare_unit
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.cli import cli
from kgml_peft.data.tables import validate_table, write_table
from kgml_peft.data.windows import Scalers, make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import BackboneConfig, build_backbone
from kgml_peft.store.adapter import read_adapter
from kgml_peft.store.checkpoint import load_backbone, save_backbone
from tests.conftest import make_frame

SITES = ["IA-001", "IA-002", "IL-001", "IN-001"]


def _frame() -> pd.DataFrame:
    """Four sites with 5, 5, 3 and 4 years: units of unequal step counts per epoch."""
    return pd.concat([make_frame({"IA-001": "IA", "IA-002": "IA"}, years=tuple(range(2003, 2008))),
                      make_frame({"IL-001": "IL"}, years=(2003, 2004, 2005), seed=1),
                      make_frame({"IN-001": "IN"}, years=(2003, 2004, 2005, 2006), seed=2)],
                     ignore_index=True)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return _frame()


def _backbone(tmp_path_factory, dropout: float):
    config = BackboneConfig(hidden_size=8, attention_size=4, yield_hidden=8, dropout=dropout)
    table = validate_table(_frame(), config.features)
    path = tmp_path_factory.mktemp("batched") / f"drop{dropout}.safetensors"
    save_backbone(path, build_backbone(config, seed=3), Scalers.fit(make_windows(table, config.features)),
                  {"note": "batched-calibration test backbone"})
    return path


@pytest.fixture(scope="module")
def plain_path(tmp_path_factory):
    """A backbone without dropout: batched and one-at-a-time runs see exactly the same model."""
    return _backbone(tmp_path_factory, 0.0)


@pytest.fixture(scope="module")
def dropout_path(tmp_path_factory):
    return _backbone(tmp_path_factory, 0.1)


def _units(backbone, table, config):
    table = validate_table(table, backbone.config.features)
    return [prepare_unit(backbone, rows, name, scope, config)
            for site in SITES for name, scope, rows in calibration_units(table, site)]


CONFIGS = {
    "cosine": dict(epochs=4, batch_size=1, patience=2, cv="none"),
    "response+mlp-head": dict(epochs=3, batch_size=2, response_weight=0.5, cv="none",
                              adapter=AdapterConfig(head="mlp", lora_weights=("ih", "hh"), lora_rank=2)),
    "constant+early-stop": dict(epochs=6, batch_size=1, schedule="constant", lr=0.05, patience=1, cv="none"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_units_equal_units_calibrated_one_at_a_time(plain_path, table, name):
    """Without dropout the only difference is floating-point order: same tensors within 1e-5,
    same curves, best epochs and step counts, though the units have different numbers of steps
    per epoch and stop at different epochs."""
    backbone = load_backbone(plain_path)
    config = CalibrationConfig(**CONFIGS[name])
    units = _units(backbone, table, config)
    batched = calibrate_batched(backbone, units, config, progress=False)
    single = [calibrate_unit(backbone, unit, config, progress=False) for unit in units]
    assert [r.name for r in batched] == SITES
    steps = {r.summary["metrics"]["steps"] for r in single}
    assert len(steps) > 1, "the units should differ in steps per epoch"
    for b, s in zip(batched, single):
        assert b.adapter.tensors.keys() == s.adapter.tensors.keys()
        moved = [k for k in s.adapter.tensors if k.endswith(".B")]
        assert any(s.adapter.tensors[k].abs().max() > 0 for k in moved), "training moved nothing"
        for key, value in s.adapter.tensors.items():
            torch.testing.assert_close(b.adapter.tensors[key], value, rtol=1e-4, atol=1e-5)
        for key in ("best_epoch", "epochs_run", "steps"):
            assert b.summary["metrics"][key] == s.summary["metrics"][key], key
        assert [c["epoch"] for c in b.curve] == [c["epoch"] for c in s.curve]
        assert [c["step"] for c in b.curve] == [c["step"] for c in s.curve]
        for cb, cs in zip(b.curve, s.curve):
            assert cb["val_loss"] == pytest.approx(cs["val_loss"], rel=1e-4)
        assert b.metrics["after"]["loss"] == pytest.approx(s.metrics["after"]["loss"], rel=1e-4)
        assert b.summary["calibration"]["batched_with"] == SITES
    if config.patience == 1:  # early stopping really fired for some unit, in both paths alike
        assert any(r.summary["metrics"]["epochs_run"] < config.epochs for r in single)


@pytest.mark.slow
def test_batched_with_dropout_is_deterministic_and_as_good(dropout_path, table):
    """With dropout the masks are drawn for the stacked batch, so the tensors differ from a run of
    its own; they are the same on every run, and each unit's validation loss is as good."""
    backbone = load_backbone(dropout_path)
    config = CalibrationConfig(epochs=5, batch_size=2, cv="none")
    units = _units(backbone, table, config)
    first = calibrate_batched(backbone, units, config, progress=False)
    again = calibrate_batched(backbone, units, config, progress=False)
    single = [calibrate_unit(backbone, unit, config, progress=False) for unit in units]
    for a, b, s in zip(first, again, single):
        assert all(torch.equal(a.adapter.tensors[k], b.adapter.tensors[k]) for k in a.adapter.tensors)
        assert a.metrics["after"]["loss"] <= a.metrics["before"]["loss"]
        assert a.metrics["after"]["loss"] <= 1.05 * s.metrics["after"]["loss"]


def test_batched_bf16_autocast_trains_on_cpu(plain_path, table):
    backbone = load_backbone(plain_path)
    config = CalibrationConfig(epochs=2, batch_size=2, mixed_precision="bf16", cv="none")
    results = calibrate_batched(backbone, _units(backbone, table, config)[:2], config, progress=False)
    for result in results:
        assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in result.adapter.tensors.values())


@pytest.mark.parametrize("values, message", [
    (dict(batch_sites=0), "batch_sites must be >= 1"),
    (dict(batch_sites=2, method="full"), "needs the adapter method"),
    (dict(batch_sites=2, unfreeze=("nee_out",)), "cannot be combined with unfreeze"),
])
def test_config_refuses_what_cannot_be_batched(values, message):
    with pytest.raises(KgmlPeftError, match=message):
        CalibrationConfig(**values)


def _cli(tmp_path, table, backbone, *extra):
    data = tmp_path / "sites.parquet"
    if not data.exists():
        write_table(table, data)
    out = tmp_path / "store"
    out.mkdir(exist_ok=True)
    args = ["calibrate", "--site", ",".join(SITES), "--data", str(data), "--backbone", str(backbone),
            "--out", str(out), "--epochs", "3", "--batch-size", "2", "--batch-sites", "3", "--cpu",
            "--quiet", *extra]
    return CliRunner().invoke(cli, args), out


@pytest.mark.slow
def test_cli_batched_writes_each_unit_and_resume_reruns_only_unfinished_groups(tmp_path, table, dropout_path):
    # with dropout, a rerun equals the first run only if it forms the very same group
    plain_path = dropout_path
    result, out = _cli(tmp_path, table, plain_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["site"] for r in report] == SITES
    groups = [r["calibration"].get("batched_with") for r in report]
    # groups of --batch-sites 3, in order; the last unit, alone in its group, ran on its own
    assert groups == [SITES[:3]] * 3 + [None]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"{s}.safetensors" for s in SITES)  # no temporaries, no state folder
    first = {s: read_adapter(out / f"{s}.safetensors") for s in SITES}
    for site, adapter in first.items():
        verify = CliRunner().invoke(cli, ["adapters", "verify", str(out / f"{site}.safetensors"),
                                          "--backbone", str(plain_path)])
        assert verify.exit_code == 0, verify.output
        assert adapter.info["calibration"]["batch_sites"] == 3

    # an interrupted run lost IA-002: its group reruns whole (same tensors), the rest stays
    (out / "IA-002.safetensors").unlink()
    kept = {s: (out / f"{s}.safetensors").stat().st_mtime_ns for s in SITES if s != "IA-002"}
    resumed, _ = _cli(tmp_path, table, plain_path, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.count("already written by this run") == 3
    assert {s: (out / f"{s}.safetensors").stat().st_mtime_ns for s in kept} == kept
    again = read_adapter(out / "IA-002.safetensors")
    assert all(torch.equal(again.tensors[k], v) for k, v in first["IA-002"].tensors.items())


@pytest.mark.parametrize("extra, message", [
    (("--batch-sites", "0"), "batch_sites must be >= 1"),
    (("--batch-sites", "2", "--method", "full"), "needs the adapter method"),
    (("--batch-sites", "2", "--unfreeze", "nee_out"), "cannot be combined with unfreeze"),
])
def test_cli_refuses_unbatchable_options_in_one_line(tmp_path, table, plain_path, extra, message):
    result, out = _cli(tmp_path, table, plain_path, *extra)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(out.iterdir()) == []


def test_training_mode_drops_out_between_gru_layers_and_eval_does_not(plain_path, table):
    """The batched forward (tuners.rows) applies the backbone's dropout between the layers of a
    two-layer GRU with LoRA, as torch's GRU does in training mode; eval mode stays exact."""
    from kgml_peft.calibration.batched import _rows_model
    from kgml_peft.tuners.site_model import SiteModel
    from kgml_peft.data.windows import WindowDataset
    from kgml_peft.tuners.serving import ServingAdapter

    backbone = load_backbone(plain_path)
    net = backbone.model
    net.gru_rh.dropout = 0.5  # only gru_rh (LoRA on both layers by default) drops out
    config = AdapterConfig()
    tensors = SiteModel(net, config).adapter_tensors()
    adapter = ServingAdapter.from_tensors("x", tensors, config)
    windows = make_windows(validate_table(table, backbone.config.features), backbone.config.features)
    x = WindowDataset(windows, backbone.scalers).x[:3]
    forward = _rows_model(net, [adapter] * len(x), x)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return forward(x)["Rh"].detach()

    net.train()
    assert not torch.equal(run(0), run(1))  # masks differ: dropout is active
    assert torch.equal(run(0), run(0))
    net.eval()
    assert torch.equal(run(0), run(1))
    net.gru_rh.dropout = 0.0
    net.train()
    assert torch.equal(run(0), run(1))  # nothing else in this backbone drops out
