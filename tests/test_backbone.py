"""The KGML-ag backbone: shapes, wiring and configs."""

import pytest
import torch

from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import GRU_NAMES, BackboneConfig, KGMLag, build_backbone


def test_output_shapes_and_gru_layers():
    config = BackboneConfig(hidden_size=12)
    model = build_backbone(config, seed=1).eval()
    x = torch.randn(3, 365, len(config.features))
    out = model(x)
    for name in ("Ra", "Rh", "NEE"):
        assert out[name].shape == (3, 365)
    assert out["Yield"].shape == (3,)
    assert model.gru_basis.num_layers == 2 and model.gru_rh.num_layers == 2
    assert model.gru_ra.num_layers == 1 and model.gru_nee.num_layers == 1
    f, h = len(config.features), 12
    assert model.gru_ra.input_size == h + f and model.gru_rh.input_size == h + f
    assert model.gru_nee.input_size == 2 + f
    assert set(GRU_NAMES) <= {n for n, _ in model.named_children()}
    assert out["state"]["gru_basis"].shape == (2, 3, 12)


def test_gru_nee_receives_ra_and_rh():
    model = build_backbone(BackboneConfig(hidden_size=8), seed=0).eval()
    x = torch.randn(2, 30, len(model.config.features))
    seen = {}

    def hook(module, inputs, output):
        seen["input"] = inputs[0]

    model.gru_nee.register_forward_hook(hook)
    out = model(x)
    torch.testing.assert_close(seen["input"][..., 0], out["Ra"])
    torch.testing.assert_close(seen["input"][..., 1], out["Rh"])
    torch.testing.assert_close(seen["input"][..., 2:], x)
    # changing only the Ra head changes NEE (through gru_nee) but not Rh
    with torch.no_grad():
        model.ra_out.bias += 1.0
    moved = model(x)
    assert torch.equal(moved["Rh"], out["Rh"])
    assert not torch.allclose(moved["NEE"], out["NEE"])


def test_state_carries_across_years():
    model = build_backbone(BackboneConfig(hidden_size=8), seed=0).eval()
    x = torch.randn(1, 60, len(model.config.features))
    whole = model(x)
    first = model(x[:, :30])
    second = model(x[:, 30:], state=first["state"])
    torch.testing.assert_close(second["NEE"], whole["NEE"][:, 30:])


def test_feature_subset_and_config_round_trip():
    config = BackboneConfig(features=("RADN", "TMAX_AIR", "GPP"), hidden_size=4)
    assert BackboneConfig.from_dict(config.to_dict()) == config
    model = KGMLag(config)
    assert model(torch.zeros(1, 365, 3))["NEE"].shape == (1, 365)
    with pytest.raises(KgmlPeftError, match="expected inputs"):
        model(torch.zeros(1, 365, 4))


@pytest.mark.parametrize("features, match", [
    (("RADN", "NOPE", "GPP"), "unknown feature"),
    (("RADN",), "must contain GPP"),
    ((), "empty"),
    (("GPP", "GPP"), "twice"),
])
def test_bad_feature_lists(features, match):
    with pytest.raises(KgmlPeftError, match=match):
        BackboneConfig(features=features)


def test_seeded_build_is_reproducible():
    a = build_backbone(BackboneConfig(hidden_size=8), seed=3).state_dict()
    b = build_backbone(BackboneConfig(hidden_size=8), seed=3).state_dict()
    c = build_backbone(BackboneConfig(hidden_size=8), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
