"""LoRA on GRU weight matrices: ``W + alpha / r * B A``, injected by peft for training.

Training wraps the backbone's GRU weights with peft (``LoraConfig(target_parameters=[...])``);
``B`` starts at zero, so a fresh adapter is the backbone. Serving keeps plain factors with the
scaling folded in (``up = alpha / r * B``, ``down = A``) and merges them (``W + up @ down``) or
applies them per row of a mixed batch.

File tensors (one pair per targeted weight, every layer of each targeted GRU):
``lora.<gru>.weight_<ih|hh>_l<layer>.A`` [r, in] and ``.B`` [out, r], e.g.
``lora.gru_rh.weight_hh_l1.A``. Settings: ``lora_rank``, ``lora_alpha``, ``lora_targets`` (GRU
names), ``lora_weights`` (``ih``, ``hh``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.model.backbone import GRU_NAMES, KGMLag
from kgml_peft.tuners.base import Component, Part
from kgml_peft.tuners.config import LORA_WEIGHTS, AdapterConfig, names, positive_int
from kgml_peft.tuners.rows import RowLora


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA update ``up @ down`` of a GRU weight [out, in]: ``down`` [r, in], ``up`` [out, r]
    (the peft scaling alpha / r is folded into ``up``)."""

    down: torch.Tensor
    up: torch.Tensor

    def delta(self) -> torch.Tensor:
        """The dense update [out, in]."""
        return self.up @ self.down


@dataclass(frozen=True, eq=False)
class LoraPart(Part):
    """One adapter's LoRA factors by backbone weight name (``gru_rh.weight_hh_l0``)."""

    factors: dict[str, LoraFactors]

    def tensors(self) -> list[torch.Tensor]:  # noqa: D102
        return [t for f in self.factors.values() for t in (f.down, f.up)]

    def merge(self, weights: MutableMapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
        """``W + up @ down`` for every targeted weight (on top of a replaced weight, if any)."""
        for name, factors in self.factors.items():
            weights[name] = weights.get(name, base[name]) + factors.delta()


@dataclass(frozen=True, eq=False)
class LoraRows(Part):
    """A mixed batch's LoRA: stacked factors and row masks by backbone weight name."""

    rows: dict[str, RowLora]

    def row_updates(self) -> dict[str, RowLora]:  # noqa: D102
        return self.rows


class Lora(Component):
    """LoRA on the GRU weights (see module docstring)."""

    name = "lora"

    def check(self, config: AdapterConfig) -> dict[str, object]:  # noqa: D102
        positive_int(config.lora_rank, "lora_rank")
        expect_type(config.lora_alpha, (int, float), "lora_alpha")
        if not (math.isfinite(config.lora_alpha) and config.lora_alpha > 0):
            raise KgmlPeftError(f"lora_alpha must be > 0, got {config.lora_alpha}")
        return {"lora_targets": names(config.lora_targets, GRU_NAMES, "LoRA target"),
                "lora_weights": names(config.lora_weights, LORA_WEIGHTS, "LoRA weight"),
                "lora_alpha": float(config.lora_alpha)}

    def shapes(self, config: AdapterConfig, backbone: KGMLag) -> dict[str, tuple[int, ...]]:  # noqa: D102
        weights = dict(backbone.named_parameters())
        shapes = {}
        for name in config.lora_parameters:
            out, inp = weights[name].shape
            if config.lora_rank > min(out, inp):  # B A of a higher rank is no more than a full update
                raise KgmlPeftError(f"lora_rank {config.lora_rank} exceeds what {name} [{out}, {inp}] of "
                                    f"this backbone can use; choose a rank <= {min(out, inp)}")
            shapes[f"lora.{name}.A"] = (config.lora_rank, inp)
            shapes[f"lora.{name}.B"] = (out, config.lora_rank)
        return shapes

    def attach(self, config: AdapterConfig, backbone: KGMLag) -> dict[str, nn.Parameter]:
        """Wrap ``backbone``'s targeted GRU weights with peft (in place); return its factors."""
        # imported here, not at the top: peft takes a second to import and only training needs it
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=[],
                          target_parameters=list(config.lora_parameters))
        if inject_adapter_in_model(lora, backbone) is not backbone:
            raise KgmlPeftError("peft returned a new model instead of wrapping the backbone in place")
        found: dict[str, nn.Parameter] = {}
        for path, module in backbone.named_modules():
            weight = getattr(module, "parameter_name", None)
            if weight is None or not hasattr(module, "lora_A"):
                continue
            key = f"lora.{path.split('.')[0]}.{weight}"
            found[f"{key}.A"] = module.lora_A["default"].weight
            found[f"{key}.B"] = module.lora_B["default"].weight
        expected = {f"lora.{p}.{f}" for p in config.lora_parameters for f in "AB"}
        if set(found) != expected:
            # peft versions before LoRA on nn.Parameter (or on RNN weights) silently skip targets
            missing = sorted(expected - set(found))
            raise KgmlPeftError(f"peft did not wrap {missing[0] if missing else 'the GRU weights'}; "
                                "LoRA on GRU weights needs peft >= 0.17 and torch >= 2.0")
        return found

    def training_part(self, config: AdapterConfig, params: Mapping[str, torch.Tensor]) -> Part:
        """Nothing to add: peft's wrappers inside the backbone apply the factors."""
        return Part()

    def layout(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> LoraPart:  # noqa: D102
        scaling = config.lora_alpha / config.lora_rank
        return LoraPart({n: LoraFactors(tensors[f"lora.{n}.A"].contiguous(),
                                        (tensors[f"lora.{n}.B"] * scaling).contiguous())
                         for n in config.lora_parameters})

    def scale(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        """``B`` times the strength: the update ``alpha / r * B A`` scales linearly."""
        return {k: v * strength if k.endswith(".B") else v.clone() for k, v in tensors.items()}

    def stack(self, parts: Sequence[LoraPart | None], index: torch.Tensor, like: torch.Tensor) -> LoraRows:
        """Every adapter's factors of a weight side by side; row ``b`` keeps its own rank columns."""
        rows: dict[str, RowLora] = {}
        for name in dict.fromkeys(n for p in parts if p is not None for n in p.factors):
            owners = [(i, p.factors[name]) for i, p in enumerate(parts) if p is not None and name in p.factors]
            down = torch.cat([f.down for _, f in owners])
            up_t = torch.cat([f.up for _, f in owners], dim=1).t().contiguous()
            columns = like.new_zeros((len(parts), down.shape[0]))
            start = 0
            for i, f in owners:
                rank = f.down.shape[0]
                columns[i, start:start + rank] = 1
                start += rank
            rows[name] = RowLora(down.to(like), up_t.to(like), columns[index])
        return LoraRows(rows)
