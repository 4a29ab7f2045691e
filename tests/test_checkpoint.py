"""Backbone checkpoints: round trip, fingerprint stability, refusal of foreign or changed files."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kgml_peft.cli import cli
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.checkpoint import FORMAT, fingerprint, load_backbone, save_backbone


def test_round_trip_keeps_tensors_scalers_and_predictions(backbone_path, tmp_path):
    loaded = load_backbone(backbone_path)
    copy = tmp_path / "copy.safetensors"
    fp = save_backbone(copy, loaded.model, loaded.scalers, loaded.training)
    again = load_backbone(copy)
    assert fp == loaded.fingerprint == again.fingerprint
    assert again.scalers == loaded.scalers and again.config == loaded.config
    x = torch.randn(2, 365, len(loaded.config.features))
    torch.testing.assert_close(again.model(x)["NEE"], loaded.model(x)["NEE"], rtol=0, atol=0)
    # same tensors bit for bit and same metadata (safetensors orders header keys at random)
    a, b = load_file(str(copy)), load_file(str(backbone_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(copy), framework="pt") as x, safe_open(str(backbone_path), framework="pt") as y:
        assert x.metadata() == y.metadata()


def test_fingerprint_depends_on_weights_and_scalers_not_on_training_log(backbone_path, tmp_path):
    b = load_backbone(backbone_path)
    state = b.model.state_dict()
    fp = fingerprint(state, b.config, b.scalers)
    other_log = tmp_path / "log.safetensors"
    assert save_backbone(other_log, b.model, b.scalers, {"note": "other"}) == fp
    state2 = {k: v.clone() for k, v in state.items()}
    state2["nee_out.bias"] += 1e-6
    assert fingerprint(state2, b.config, b.scalers) != fp
    scalers = type(b.scalers)(mean=dict(b.scalers.mean), std=dict(b.scalers.std))
    scalers.mean["GPP"] += 0.1
    assert fingerprint(state, b.config, scalers) != fp


def test_metadata_holds_config_scalers_fingerprint(backbone_path):
    with safe_open(str(backbone_path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == FORMAT
    assert json.loads(meta["config"])["hidden_size"] == 8
    assert "GPP" in json.loads(meta["scalers"])["mean"]
    assert json.loads(meta["features"])[0] == "RADN"
    assert len(meta["fingerprint"]) == 64


def test_modified_tensor_is_refused(backbone_path, tmp_path):
    tensors = load_file(str(backbone_path))
    with safe_open(str(backbone_path), framework="pt") as handle:
        meta = handle.metadata()
    tensors["ra_out.bias"] = tensors["ra_out.bias"] + 1
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(KgmlPeftError, match="fingerprint mismatch"):
        load_backbone(bad)


def test_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(KgmlPeftError, match="not a readable safetensors file"):
        load_backbone(path)
    assert not marker.exists()


def test_refused_save_leaves_previous_file(backbone_path, tmp_path):
    """A save that is refused (no scalers) changes nothing; the rollback of a write that fails
    half-way is tested on atomic_path itself in test_tables.py."""
    b = load_backbone(backbone_path)
    target = tmp_path / "kept.safetensors"
    save_backbone(target, b.model, b.scalers, {})
    before = target.read_bytes()
    with pytest.raises(KgmlPeftError, match="no scaler"):
        save_backbone(target, b.model, type(b.scalers)(mean={}, std={}), {})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["kept.safetensors"]


def test_saved_checkpoint_gets_a_normal_file_mode(backbone_path, tmp_path):
    """safetensors recreates the file it writes; the atomic write still gives it the mode a plain
    open() would (0644 under umask 022), so a shared backbone stays readable by colleagues."""
    import os
    import stat

    backbone = load_backbone(backbone_path)
    old = os.umask(0o022)
    try:
        save_backbone(tmp_path / "b.safetensors", backbone.model, backbone.scalers)
        assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def _rebuilt(backbone_path, path, tensor_shift: float, loss_factor: float) -> None:
    """A copy of the backbone as another CPU would rebuild it: every float tensor shifted, every
    training loss scaled, saved through the toolkit (so its fingerprint is the new tensors')."""
    b = load_backbone(backbone_path)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(tensor_shift)
    training = json.loads(json.dumps(b.training))
    for point in training["curves"]:
        for key in ("train_loss", "val_loss"):
            if isinstance(point.get(key), float):
                point[key] *= loss_factor
    save_backbone(path, b.model, b.scalers, training)


def test_compare_with_a_tolerance_accepts_float_rounding_and_nothing_more(tmp_path):
    """``backbone compare --atol/--rtol``: a rebuild that differs by rounding passes, a larger
    change of a tensor or a loss does not, and bad tolerances are one-line errors (exit 2)."""
    backbone_path = Path(__file__).resolve().parents[1] / "checkpoints" / "demo.safetensors"
    runner = CliRunner()
    close, far_tensor, far_loss = (tmp_path / f"{n}.safetensors" for n in ("close", "tensor", "loss"))
    _rebuilt(backbone_path, close, 1e-4, 1 + 1e-6)
    _rebuilt(backbone_path, far_tensor, 0.1, 1 + 1e-6)
    _rebuilt(backbone_path, far_loss, 1e-4, 1.01)
    exact = runner.invoke(cli, ["backbone", "compare", str(close), str(backbone_path)])
    assert exact.exit_code == 1 and "metadata fingerprint differs" in exact.output
    loose = ["--atol", "0.001", "--rtol", "1e-4"]
    ok = runner.invoke(cli, ["backbone", "compare", str(close), str(backbone_path), *loose])
    assert ok.exit_code == 0 and "within atol=0.001, rtol=0.0001" in ok.output, ok.output
    tensor = runner.invoke(cli, ["backbone", "compare", str(far_tensor), str(backbone_path), *loose])
    assert tensor.exit_code == 1 and "tensor gru_ra.weight_hh_l0 differs" in tensor.output
    assert "metadata" not in tensor.output
    loss = runner.invoke(cli, ["backbone", "compare", str(far_loss), str(backbone_path), *loose])
    assert loss.exit_code == 1 and loss.output.strip() == "metadata training differs"
    for bad in ("nan", "-1", "inf"):
        refused = runner.invoke(cli, ["backbone", "compare", str(close), str(backbone_path), "--atol", bad])
        assert refused.exit_code == 2 and "tolerances must be finite" in refused.output, refused.output
