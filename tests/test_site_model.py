"""The site adapter on a real backbone: identity at init, LoRA acting on the GRUs, tensor names."""

from __future__ import annotations

import pytest
import torch

from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.tuners.site_model import SiteModel
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import WindowDataset, make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import GRU_NAMES
from kgml_peft.model.inference import predict_windows
from kgml_peft.store.checkpoint import load_backbone
from tests.conftest import make_frame

EVERYTHING = AdapterConfig(lora_targets=GRU_NAMES, lora_weights=("ih", "hh"), lora_rank=2,
                           block_targets=GRU_NAMES, bottleneck=3, head="mlp")


@pytest.fixture
def backbone(backbone_path):
    return load_backbone(backbone_path)


@pytest.fixture
def x(backbone):
    table = validate_table(make_frame(), backbone.config.features)
    return WindowDataset(make_windows(table, backbone.config.features), backbone.scalers).x


@pytest.mark.parametrize("config", [AdapterConfig(), EVERYTHING,
                                    AdapterConfig(components=("lora",)),
                                    AdapterConfig(components=("blocks", "head"))],
                         ids=["default", "everything", "lora-only", "blocks-head"])
def test_fresh_adapter_reproduces_backbone_exactly(backbone, config):
    windows = make_windows(validate_table(make_frame(), backbone.config.features),
                           backbone.config.features)
    base = predict_windows(backbone.model, backbone.scalers, windows)
    site = SiteModel(backbone.model, config, seed=3)
    adapted = predict_windows(site, backbone.scalers, windows)
    for name in ("Ra", "Rh", "NEE", "Reco", "Yield"):
        assert (base[name] == adapted[name]).all(), name


def _gru_outputs(model, x) -> dict[str, torch.Tensor]:
    """Output sequences of every GRU of the (possibly adapted) backbone inside ``model``."""
    seen: dict[str, torch.Tensor] = {}
    net = model.backbone if isinstance(model, SiteModel) else model
    taps = {name: (lambda h, name=name: seen.setdefault(name, h)) for name in GRU_NAMES}
    net(x, taps=taps)
    return seen


def test_lora_gets_gradients_and_changes_every_targeted_gru(backbone, x):
    config = AdapterConfig(components=("lora",), lora_targets=GRU_NAMES, lora_weights=("ih", "hh"))
    site = SiteModel(backbone.model, config, seed=0).train()
    lora = {k: v for k, v in site.adapter_parameters().items() if k.startswith("lora.")}
    # two LoRA factors for every weight matrix of every GRU layer (2+1+2+1 layers, ih and hh)
    assert len(lora) == 2 * 2 * 6
    with torch.no_grad():
        for name, param in lora.items():
            if name.endswith(".B"):
                param.normal_(0, 0.05)
    site.eval()
    out = site(x)
    (out["Ra"].square().mean() + out["Rh"].square().mean() + out["NEE"].square().mean()
     + out["Yield"].square().mean()).backward()
    for name, param in lora.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with torch.no_grad():
        before = _gru_outputs(backbone.model, x)
        after = _gru_outputs(site, x)
    for name in GRU_NAMES:
        assert not torch.equal(before[name], after[name]), f"LoRA did not change {name}"
    # and the backbone's own weights got no gradient: they are frozen
    assert all(p.grad is None for n, p in site.backbone.named_parameters() if "lora_" not in n)


def test_lora_b_gets_gradient_from_zero(backbone, x):
    """At initialisation (B = 0) the loss gradient flows into B, so training can start."""
    site = SiteModel(backbone.model, AdapterConfig(components=("lora",)), seed=0)
    out = site(x)
    out["NEE"].square().mean().backward()
    grads = {k: v.grad for k, v in site.adapter_parameters().items()}
    assert all(grads[k].abs().sum() > 0 for k in grads if k.endswith(".B"))


def test_adapter_tensor_names_and_shapes(backbone):
    site = SiteModel(backbone.model, AdapterConfig(), seed=0)
    tensors = site.adapter_tensors()
    h = backbone.config.hidden_size
    assert tensors["lora.gru_rh.weight_hh_l1.A"].shape == (1, h)
    assert tensors["lora.gru_rh.weight_hh_l1.B"].shape == (3 * h, 1)
    assert tensors["blocks.gru_nee.up.weight"].shape == (h, 2)
    assert tensors["head.scale"].shape == (4,)
    assert {k.split(".")[0] for k in tensors} == {"lora", "blocks", "head"}


def test_load_adapter_tensors_round_trip_and_shape_check(backbone, x):
    a = SiteModel(backbone.model, EVERYTHING, seed=0)
    with torch.no_grad():
        for p in a.adapter_parameters().values():
            p.add_(0.01)
    b = SiteModel(backbone.model, EVERYTHING, seed=5)
    b.load_adapter_tensors(a.adapter_tensors())
    with torch.no_grad():
        assert torch.equal(a.eval()(x)["NEE"], b.eval()(x)["NEE"])
    bad = a.adapter_tensors()
    bad["head.scale"] = torch.zeros(5)
    with pytest.raises(KgmlPeftError, match="head.scale has shape"):
        b.load_adapter_tensors(bad)
    missing = a.adapter_tensors()
    missing.pop("blocks.gru_ra.down.bias")
    with pytest.raises(KgmlPeftError, match="lacks blocks.gru_ra.down.bias"):
        b.load_adapter_tensors(missing)


def test_site_model_never_touches_the_callers_backbone(backbone, x):
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    site = SiteModel(backbone.model, EVERYTHING, seed=0)
    site.unfreeze(("nee_out",))
    optimizer = torch.optim.SGD([p for p in site.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        site(x)["NEE"].square().mean().backward()
        optimizer.step()
    after = backbone.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(p.requires_grad for p in backbone.model.parameters())


def test_unfreeze_needs_a_matching_prefix(backbone):
    with pytest.raises(KgmlPeftError, match="matches no backbone parameter"):
        SiteModel(backbone.model, AdapterConfig(), seed=0).unfreeze(("nope",))


@pytest.mark.parametrize("kwargs, message", [
    ({"components": ()}, "at least one"),
    ({"components": ("lora", "adapters")}, "unknown adapter component 'adapters'"),
    ({"lora_targets": ("gru_xx",)}, "unknown LoRA target"),
    ({"lora_rank": 0}, "lora_rank must be >= 1"),
    ({"lora_alpha": -1.0}, "lora_alpha must be > 0"),
    ({"head": "deep"}, "head must be one of"),
    ({"lora_weights": ("hh", "hh")}, "twice"),
])
def test_adapter_config_rejects_bad_values(kwargs, message):
    with pytest.raises(KgmlPeftError, match=message):
        AdapterConfig(**kwargs)


def test_adapter_config_dict_round_trip():
    assert AdapterConfig.from_dict(EVERYTHING.to_dict()) == EVERYTHING
    with pytest.raises(KgmlPeftError, match="unknown adapter config key 'rank'"):
        AdapterConfig.from_dict({"rank": 2})
