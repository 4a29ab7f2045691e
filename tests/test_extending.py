"""docs/extending.md's worked example: a component defined here, in the test file only, trains,
saves, loads and serves mixed with default adapters, with no library module edited. It proves
the component protocol (kgml_peft.tuners.base) is enough to add an adapter type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from kgml_peft import schema
from kgml_peft.calibration.batched import calibrate_batched
from kgml_peft.calibration.calibrate import calibrate, calibration_units, prepare_unit
from kgml_peft.data.tables import validate_table
from kgml_peft.errors import KgmlPeftError
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.loading import apply_adapter
from kgml_peft.store.adapter import read_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.store.library import adapter_path
from kgml_peft.tuners import Component, Part, register, unregister
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.tuners.rows import stack_padded
from tests.conftest import make_frame, random_adapter, tiny_calibration

OUTPUTS = (*schema.FLUX_OUTPUTS, "Yield")


# --- the toy component: a trainable bias on some outputs ----------------------------------------


def _shift(out: dict[str, torch.Tensor], names: Sequence[str], bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """Add ``bias[..., j]`` to output ``names[j]`` (``bias`` [n] for one adapter, [B, n] per row)."""
    out = dict(out)
    for j, name in enumerate(names):
        b = bias[..., j]
        out[name] = out[name] + (b[:, None] if bias.dim() == 2 and out[name].dim() == 2 else b)
    return out


@dataclass(frozen=True, eq=False)
class BiasPart(Part):
    names: tuple[str, ...]
    bias: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.bias]

    def outputs(self, out, x):
        return _shift(out, self.names, self.bias)


class OutputBias(Component):
    """``y + b`` on the outputs named in ``options["bias"]["outputs"]``; ``b`` starts at zero."""

    name = "bias"
    defaults = {"outputs": list(OUTPUTS)}

    def check(self, config):
        outputs = config.option("bias", "outputs")
        if not outputs or any(o not in OUTPUTS for o in outputs):
            raise KgmlPeftError(f"bias outputs must be some of {', '.join(OUTPUTS)}, got {outputs}")
        return {}

    def shapes(self, config, backbone):
        return {"bias.value": (len(config.option("bias", "outputs")),)}

    def attach(self, config, backbone):
        return {"bias.value": nn.Parameter(torch.zeros(len(config.option("bias", "outputs"))))}

    def layout(self, config, tensors: Mapping[str, torch.Tensor]) -> BiasPart:
        return BiasPart(tuple(config.option("bias", "outputs")), tensors["bias.value"])

    def stack(self, parts, index, like) -> Part:
        # rows index every output (zeros where a row's adapter has no bias on it: an identity)
        full = [None if p is None else torch.stack([p.bias[p.names.index(n)] if n in p.names
                                                    else p.bias.new_zeros(()) for n in OUTPUTS])
                for p in parts]
        return BiasPart(OUTPUTS, stack_padded(full, (len(OUTPUTS),), like)[index])


@pytest.fixture
def bias_component():
    component = register(OutputBias())
    yield component
    unregister("bias")


# --- the test --------------------------------------------------------------------------------------


def test_a_component_defined_outside_the_library_trains_saves_loads_and_serves_mixed(
        bias_component, backbone_path, tmp_path):
    backbone = load_backbone(backbone_path)
    frame = make_frame()
    config = AdapterConfig(components=("lora", "bias"), options={"bias": {"outputs": ["NEE", "Yield"]}})
    assert config.to_dict()["options"] == {"bias": {"outputs": ["NEE", "Yield"]}}
    assert AdapterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(KgmlPeftError, match="bias outputs"):
        AdapterConfig(components=("bias",), options={"bias": {"outputs": ["GPP"]}})
    with pytest.raises(KgmlPeftError, match="options of component bias"):
        AdapterConfig(components=("bias",), options={"bias": {"colour": "red"}})

    # trains: Eq. 3's objective moves the bias away from its identity start
    result = calibrate(backbone, frame, "IA-001", tiny_calibration(adapter=config, lr=0.05), progress=False)
    trained = result.adapter.tensors
    assert set(trained) == {"bias.value"} | {k for k in trained if k.startswith("lora.")}
    assert trained["bias.value"].shape == (2,) and trained["bias.value"].abs().min() > 0

    # saves and loads: the file carries the component's tensors and options, and is checked
    store = tmp_path / "store"
    store.mkdir()
    save_adapter(adapter_path(store, "IA-001"), result.adapter)
    loaded = read_adapter(adapter_path(store, "IA-001"))
    assert loaded.config == config and torch.equal(loaded.tensors["bias.value"], trained["bias.value"])
    x = torch.randn(4, schema.DAYS_PER_YEAR, len(backbone.config.features))
    with torch.no_grad():
        expected = result.model.eval()(x)
        site_model = apply_adapter(backbone, loaded)(x)
    for key in OUTPUTS:
        assert torch.equal(site_model[key], expected[key]), key
    bad = dict(loaded.tensors, **{"bias.value": torch.zeros(3)})
    with pytest.raises(KgmlPeftError, match="bias.value has shape"):
        apply_adapter(backbone, type(loaded)(**{**loaded.__dict__, "tensors": bad}))

    # serves mixed with a default adapter and the bare backbone, as each row's own site model
    save_adapter(adapter_path(store, "IL-001"), random_adapter(backbone, "IL-001", seed=3))
    bank = AdapterBank(backbone, store)
    names = ["IA-001", "IL-001", None, "IA-001"]
    with torch.no_grad():
        reference = {n: (backbone.model if n is None else apply_adapter(backbone, read_adapter(adapter_path(store, n))))(x)
                     for n in set(names)}
        for strategy in ("batched", "grouped", "naive"):
            out = bank.forward(x, bank.resolve(names), strategy=strategy)
            for i, n in enumerate(names):
                for key in OUTPUTS:
                    torch.testing.assert_close(out[key][i], reference[n][key][i], rtol=0, atol=1e-5)
    assert bank.get("IA-001").parts["bias"].bias.shape == (2,)

    # trains side by side with others in one batched pass (the mixed-batch layout trains too)
    table = validate_table(frame, backbone.config.features)
    units = [prepare_unit(backbone, rows, name, scope, tiny_calibration(adapter=config))
             for site in ("IA-001", "IL-001") for name, scope, rows in calibration_units(table, site)]
    batched = calibrate_batched(backbone, units, tiny_calibration(adapter=config, batch_sites=2, lr=0.05),
                                progress=False)
    assert all(r.summary["metrics"]["steps"] > 0 for r in batched)

    # where the component is not registered, its files are refused in one line
    unregister("bias")
    with pytest.raises(KgmlPeftError, match="unknown adapter component 'bias'"):
        read_adapter(adapter_path(store, "IA-001"))
    improved = [r for r in batched if r.summary["metrics"]["best_epoch"] > 0]
    assert improved and all(r.adapter.tensors["bias.value"].abs().min() > 0 for r in improved)


def test_unregistered_component_names_are_refused(backbone_path):
    with pytest.raises(KgmlPeftError, match="unknown adapter component 'bias'"):
        AdapterConfig(components=("lora", "bias"))
    with pytest.raises(KgmlPeftError, match="already registered"):
        from kgml_peft.tuners import Lora
        register(type("Other", (Lora,), {})())
