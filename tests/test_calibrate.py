"""Calibration runs (Eq. 2 and 3) on a real tiny backbone: determinism, frozen backbone, methods."""

from __future__ import annotations

import hashlib

import pytest
import torch

from kgml_peft import schema
from kgml_peft.calibration.calibrate import calibrate, calibration_units
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.serve.loading import apply_adapter
from kgml_peft.tuners.site_model import SiteModel
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import KGMLag
from kgml_peft.model.inference import predict_windows
from kgml_peft.store.adapter import read_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone, save_backbone
from tests.conftest import make_frame, tiny_calibration


@pytest.fixture
def backbone(backbone_path):
    return load_backbone(backbone_path)


@pytest.fixture(scope="module")
def frame():
    return make_frame(years=(2003, 2004, 2005))


def test_calibration_leaves_backbone_and_its_file_bit_identical(backbone, backbone_path, frame):
    file_hash = hashlib.sha256(backbone_path.read_bytes()).hexdigest()
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    config = tiny_calibration(unfreeze=("nee_out",))
    result = calibrate(backbone, frame, "IA", config, progress=False)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in result.adapter.tensors.items()
               if k.endswith(".B")), "training did not move LoRA B"
    assert all(torch.equal(state[k], v) for k, v in backbone.model.state_dict().items())
    assert hashlib.sha256(backbone_path.read_bytes()).hexdigest() == file_hash
    # the unfrozen weights travel in the adapter, the backbone's own copy did not change
    assert "backbone.nee_out.weight" in result.adapter.tensors
    assert not torch.equal(result.adapter.tensors["backbone.nee_out.weight"], state["nee_out.weight"])


def test_same_data_config_seed_give_identical_adapter_tensors(backbone, frame):
    runs = [calibrate(backbone, frame, "IA", tiny_calibration(seed=s), progress=False)
            for s in (7, 7, 8)]
    a, b, c = (r.adapter.tensors for r in runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_metrics_before_after_and_summary(backbone, frame):
    result = calibrate(backbone, frame, "IA", tiny_calibration(epochs=4), progress=False)
    s = result.summary
    assert s["scope"] == "region" and s["sites"] == ["IA-001"]
    assert s["data"]["train_years"] == [2003, 2004] and s["data"]["val_years"] == [2005]
    before, after = s["metrics"]["before"], s["metrics"]["after"]
    assert set(before["mse"]) == {"Ra", "Rh", "NEE", "Reco", "Yield"}
    # the best epoch (0 = the global backbone itself) is kept, so the validation loss never rises
    assert after["loss"] <= before["loss"]
    # the "after" metrics are those of the returned model on the validation years
    windows = make_windows(validate_table(frame[frame.site == "IA-001"], backbone.config.features),
                           backbone.config.features).subset([2])
    preds = predict_windows(result.model, backbone.scalers, windows)
    nee = windows.target("NEE")
    assert after["mse"]["NEE"] == pytest.approx(float(((preds["NEE"] - nee) ** 2).mean()))


def test_adapter_file_reproduces_the_calibrated_model(backbone, frame, tmp_path):
    result = calibrate(backbone, frame, "IA-001", tiny_calibration(), progress=False)
    path = save_adapter(tmp_path / "IA-001.safetensors", result.adapter)
    loaded = apply_adapter(backbone, read_adapter(path))
    windows = make_windows(validate_table(frame, backbone.config.features), backbone.config.features)
    a = predict_windows(result.model, backbone.scalers, windows)
    b = predict_windows(loaded, backbone.scalers, windows)
    assert all((a[k] == b[k]).all() for k in a)


def test_float16_storage_is_what_was_measured(backbone, frame, tmp_path):
    result = calibrate(backbone, frame, "IA", tiny_calibration(storage_dtype="float16"), progress=False)
    path = save_adapter(tmp_path / "IA.safetensors", result.adapter, dtype="float16")
    adapter = read_adapter(path)
    assert adapter.info["dtype"] == "float16"
    loaded = apply_adapter(backbone, adapter)
    windows = make_windows(validate_table(frame, backbone.config.features), backbone.config.features)
    a = predict_windows(result.model, backbone.scalers, windows)
    b = predict_windows(loaded, backbone.scalers, windows)
    assert all((a[k] == b[k]).all() for k in a)
    f32 = save_adapter(tmp_path / "f32.safetensors", result.adapter)
    assert path.stat().st_size < f32.stat().st_size


def test_full_method_is_mu_anchored_and_saves_a_backbone(backbone, frame, tmp_path):
    loose = calibrate(backbone, frame, "IA", tiny_calibration(method="full", mu=0.0, lr=1e-2),
                      progress=False)
    tight = calibrate(backbone, frame, "IA", tiny_calibration(method="full", mu=1e4, lr=1e-2),
                      progress=False)
    assert isinstance(loose.model, KGMLag) and loose.adapter is None

    def drift(model):
        return sum(float((p - q).square().sum()) for p, q in
                   zip(model.state_dict().values(), backbone.model.state_dict().values()))

    assert drift(tight.model) < drift(loose.model)
    path = tmp_path / "IA-full.safetensors"
    save_backbone(path, loose.model, backbone.scalers, loose.summary)
    assert load_backbone(path).fingerprint != backbone.fingerprint


def test_scratch_starts_from_random_weights(backbone, frame):
    result = calibrate(backbone, frame, "IA", tiny_calibration(method="scratch", epochs=1),
                       progress=False)
    before = result.summary["metrics"]["before"]["loss"]
    assert isinstance(result.model, KGMLag)
    # same architecture as the backbone, but none of its weights
    ref = backbone.model.state_dict()
    assert all(not torch.equal(v, ref[k]) for k, v in result.model.state_dict().items()
               if v.numel() > 1)
    assert before > 0


def test_targets_option_and_physics_only_runs(backbone, frame):
    result = calibrate(backbone, frame, "IA", tiny_calibration(targets={"NEE": 1.0}), progress=False)
    assert result.summary["targets"] == {"NEE": 1.0}
    assert result.adapter.info["targets"] == {"NEE": 1.0}


def test_calibration_units():
    table = validate_table(make_frame({"IA-001": "IA", "IA-002": "IA", "IL-001": "IL"}),
                           schema.DEFAULT_FEATURES)
    assert [(n, s, sorted(r.site.unique())) for n, s, r in calibration_units(table, "IA")] == \
        [("IA", "region", ["IA-001", "IA-002"])]
    assert [(n, s) for n, s, _ in calibration_units(table, "IA-002")] == [("IA-002", "site")]
    assert [n for n, _, _ in calibration_units(table, "all")] == ["IA", "IL"]
    with pytest.raises(KgmlPeftError, match="unknown site or region 'OH'"):
        calibration_units(table, "OH")
    with pytest.raises(KgmlPeftError, match="site"):
        calibration_units(table, "../x")


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "lora"}, "method must be one of"),
    ({"val_fraction": 0.0}, "val_fraction must be in"),
    ({"targets": {"GPP": 1.0}}, "unknown target 'GPP'"),
    ({"epochs": 0}, "epochs >= 1"),
    ({"rho": -1.0}, "rho must be a finite number >= 0"),
    ({"rho": float("nan")}, "rho must be a finite number"),
    ({"mu": float("inf")}, "mu must be a finite number"),
    ({"seed": -1}, "seed must be in"),
    ({"targets": {"NEE": float("inf")}}, "weight of target NEE"),
    ({"method": "full", "unfreeze": ("nee_out",)}, "unfreeze only applies"),
    ({"storage_dtype": "int8"}, "storage_dtype"),
    ({"schedule": "step"}, "schedule must be"),
])
def test_calibration_config_rejects_bad_values(kwargs, message):
    with pytest.raises(KgmlPeftError, match=message):
        CalibrationConfig(**kwargs)


def test_method_defaults_and_dict_round_trip():
    full = CalibrationConfig(method="full")
    assert (full.epochs, full.lr) == (40, 5e-4)
    config = CalibrationConfig(adapter=AdapterConfig(lora_rank=3), targets={"NEE": 2})
    assert CalibrationConfig.from_dict(config.to_dict()) == config


def test_data_problems_are_user_errors(backbone):
    one_year = make_frame(years=(2003,))
    with pytest.raises(KgmlPeftError, match="single complete year"):
        calibrate(backbone, one_year, "IA", tiny_calibration(), progress=False)
    no_flux = make_frame().drop(columns=["Ra", "Rh", "NEE", "Reco", "Yield"])
    with pytest.raises(KgmlPeftError, match="no observed target"):
        calibrate(backbone, no_flux, "IA", tiny_calibration(), progress=False)
    with pytest.raises(KgmlPeftError, match="target Yield has no observations"):
        calibrate(backbone, make_frame().drop(columns=["Yield"]), "IA",
                  tiny_calibration(targets={"Yield": 1.0}), progress=False)
    with pytest.raises(KgmlPeftError, match="one site or region"):
        calibrate(backbone, make_frame(), "all", tiny_calibration(), progress=False)
    blank_last_year = make_frame(years=(2003, 2004, 2005))
    blank_last_year.loc[blank_last_year.date.dt.year == 2005, ["Ra", "Rh", "NEE", "Reco", "Yield"]] = float("nan")
    with pytest.raises(KgmlPeftError, match="validation years \\(2005\\) have no observation"):
        calibrate(backbone, blank_last_year, "IA", tiny_calibration(), progress=False)


def test_site_model_round_adapter_matches_float16(backbone):
    site = SiteModel(backbone.model, AdapterConfig(), seed=0)
    site.round_adapter(torch.float16)
    for value in site.adapter_tensors().values():
        assert torch.equal(value, value.half().float())
