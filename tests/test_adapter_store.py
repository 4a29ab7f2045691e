"""Adapter files and the adapter store: format, integrity, fingerprints, list/export/import."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kgml_peft.serve.loading import apply_adapter
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.adapter import METADATA_KEYS, load_adapter, read_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.store.library import export_adapter, import_adapter, list_adapters


def _raw(path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def test_file_layout(adapter_path, backbone_path):
    tensors, metadata = _raw(adapter_path)
    assert set(metadata) == set(METADATA_KEYS)
    assert metadata["format"] == "kgml-peft/adapter" and metadata["format_version"] == "1"
    assert metadata["site"] == "IA-001" and metadata["scope"] == "site"
    assert metadata["backbone_fingerprint"] == load_backbone(backbone_path).fingerprint
    assert {k.split(".")[0] for k in tensors} == {"lora", "blocks", "head"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert int(metadata["parameters"]) == sum(t.numel() for t in tensors.values())
    calibration = json.loads(metadata["calibration"])
    assert {"rho", "mu", "physics_weight", "seed", "lr"} <= set(calibration)
    metrics = json.loads(metadata["metrics"])
    assert {"before", "after", "best_epoch"} <= set(metrics)
    data = json.loads(metadata["data"])
    assert len(data["hash"]) == 64 and data["train_site_years"] == 1


def test_read_and_apply(adapter_path, backbone_path):
    backbone = load_backbone(backbone_path)
    adapter = load_adapter(adapter_path, backbone)
    assert adapter.site == "IA-001" and adapter.parameters > 0
    model = apply_adapter(backbone, adapter)
    out = model(torch.zeros(1, 365, len(backbone.config.features)))
    assert torch.isfinite(out["NEE"]).all()


def test_adapter_for_another_backbone_is_refused_naming_both(adapter_path, other_backbone_path,
                                                            backbone_path):
    other = load_backbone(other_backbone_path)
    mine = load_backbone(backbone_path).fingerprint
    with pytest.raises(KgmlPeftError) as err:
        load_adapter(adapter_path, other)
    assert mine[:16] in str(err.value) and other.fingerprint[:16] in str(err.value)
    with pytest.raises(KgmlPeftError):
        apply_adapter(other, read_adapter(adapter_path))


def _rewrite(adapter_path, tmp_path, edit):
    tensors, metadata = _raw(adapter_path)
    edit(tensors, metadata)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda t, m: t["head.shift"].add_(1.0), "content hash mismatch"),
    (lambda t, m: m.update(format="other/thing"), "not a kgml-peft adapter"),
    (lambda t, m: m.update(format="kgml-peft/backbone"), "it is a backbone checkpoint"),
    (lambda t, m: m.update(format_version="9"), "format version '9'"),
    (lambda t, m: m.pop("metrics"), "lacks the metadata field 'metrics'"),
    (lambda t, m: m.update(adapter_config="{"), "unreadable metadata"),
    (lambda t, m: m.update(site="../../etc"), "unsafe site"),
    (lambda t, m: t.update({"evil.x": torch.zeros(1)}), "outside the adapter namespaces"),
    (lambda t, m: t["head.scale"].fill_(float("nan")), "NaN or inf"),
    (lambda t, m: m.update(dtype="float16"), "the file declares float16"),
    (lambda t, m: m.update(site="IL-001"), "content hash mismatch"),
    (lambda t, m: m.update(features='["GPP"]'), "content hash mismatch"),
    (lambda t, m: m.update(parameters="abc"), "'parameters' must be the number of stored values"),
    (lambda t, m: m.update(features="5"), "'features' must be a JSON list of strings"),
    (lambda t, m: m.update(sites="[1, 2]"), "'sites' must be a JSON list of strings"),
    (lambda t, m: m.update(metrics="[1]"), "'metrics' must be a JSON object"),
    (lambda t, m: m.update(metrics='{"before": 3}'), "before/after objects"),
    (lambda t, m: m.update(calibration='"x"'), "'calibration' must be a JSON object"),
    (lambda t, m: m.update(targets='{"GPP": 1}'), "'targets' must be a JSON object"),
])
def test_damaged_files_are_refused(adapter_path, tmp_path, edit, message):
    path = _rewrite(adapter_path, tmp_path, edit)
    with pytest.raises(KgmlPeftError, match=message):
        read_adapter(path)


def test_truncated_and_foreign_files(adapter_path, tmp_path, backbone_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(adapter_path.read_bytes()[:-40])
    with pytest.raises(KgmlPeftError, match="not a readable safetensors file"):
        read_adapter(cut)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(KgmlPeftError, match="not a readable safetensors file"):
        read_adapter(text)
    with pytest.raises(KgmlPeftError, match="it is a backbone checkpoint"):
        read_adapter(backbone_path)
    with pytest.raises(KgmlPeftError, match="does not exist"):
        read_adapter(tmp_path / "missing.safetensors")


def test_save_is_atomic_and_keeps_a_good_file_on_failure(adapter_path, tmp_path):
    adapter = read_adapter(adapter_path)
    target = tmp_path / "IA-001.safetensors"
    save_adapter(target, adapter)
    good = target.read_bytes()
    adapter.tensors["head.scale"] = torch.full((4,), float("inf"))
    with pytest.raises(KgmlPeftError, match="not finite"):
        save_adapter(target, adapter)
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["IA-001.safetensors"]


def test_float16_overflow_is_refused(adapter_path, tmp_path):
    adapter = read_adapter(adapter_path)
    adapter.tensors["head.shift"] = torch.full((4,), 1e6)
    with pytest.raises(KgmlPeftError, match="not finite in float16"):
        save_adapter(tmp_path / "x.safetensors", adapter, dtype="float16")
    assert not (tmp_path / "x.safetensors").exists()


def test_list_store_with_a_corrupt_file_and_a_site_backbone(adapter_path, backbone_path, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "IA-001.safetensors").write_bytes(adapter_path.read_bytes())
    (store / "IA-full.safetensors").write_bytes(backbone_path.read_bytes())
    (store / "broken.safetensors").write_bytes(b"\x00" * 20)
    rows = list_adapters(store)
    assert [r["file"] for r in rows] == ["IA-001.safetensors", "IA-full.safetensors", "broken.safetensors"]
    assert [r["kind"] for r in rows] == ["adapter", "backbone", "unreadable"]
    assert rows[0]["site"] == "IA-001" and rows[0]["parameters"] > 0 and "error" not in rows[0]
    assert "not a readable safetensors file" in rows[2]["error"]
    with pytest.raises(KgmlPeftError, match="does not exist"):
        list_adapters(tmp_path / "nowhere")


def test_export_then_import_round_trip(adapter_path, backbone_path, other_backbone_path, tmp_path):
    backbone = load_backbone(backbone_path)
    share = tmp_path / "share"
    share.mkdir()
    dest, summary = export_adapter(adapter_path, share, backbone)
    assert dest == share / "IA-001.safetensors" and dest.read_bytes() == adapter_path.read_bytes()
    text = summary.read_text()
    assert "IA-001" in text and backbone.fingerprint in text
    with pytest.raises(KgmlPeftError, match="exists; pass --force"):
        export_adapter(adapter_path, share, backbone)
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(KgmlPeftError, match="was trained on backbone"):
        import_adapter(dest, store, load_backbone(other_backbone_path))
    assert not list(store.iterdir())
    path = import_adapter(dest, store, backbone)
    assert path == store / "IA-001.safetensors" and path.read_bytes() == adapter_path.read_bytes()
    with pytest.raises(KgmlPeftError, match="exists; pass --force"):
        import_adapter(dest, store, backbone)
    assert import_adapter(dest, store, backbone, force=True) == path
