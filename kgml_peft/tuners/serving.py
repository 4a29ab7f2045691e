"""An adapter laid out for serving: plain tensors, no modules, no peft wrappers.

A :class:`ServingAdapter` holds what a request needs from one adapter file: the LoRA factors with
their scaling folded in (``up = alpha / r * B``), the bottleneck blocks' and head's weights, and any
backbone weights the run unfroze. It is a few kilobytes, so thousands stay resident, and it gives
the same predictions as the peft-wrapped :class:`~kgml_peft.tuners.site_model.SiteModel`
two ways: merged into the backbone's weights (:meth:`ServingAdapter.merged_parameters`, one site
per batch) or per row in a mixed batch (:mod:`kgml_peft.tuners.mixed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.tuners.site_model import bottleneck, calibrate_outputs


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA update ``up @ down`` of a GRU weight [out, in]: ``down`` [r, in], ``up`` [out, r]
    (the peft scaling alpha / r is folded into ``up``)."""

    down: torch.Tensor
    up: torch.Tensor

    def delta(self) -> torch.Tensor:
        """The dense update [out, in]."""
        return self.up @ self.down


@dataclass(frozen=True)
class Block:
    """A bottleneck block ``h + up(gelu(down(h)))`` as four tensors."""

    down_weight: torch.Tensor  # [k, H]
    down_bias: torch.Tensor  # [k]
    up_weight: torch.Tensor  # [H, k]
    up_bias: torch.Tensor  # [H]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the block to a GRU output sequence [B, T, H]."""
        return bottleneck(h, self.down_weight, self.down_bias, self.up_weight, self.up_bias)


@dataclass(frozen=True)
class Head:
    """The calibration head: per-output ``scale``/``shift`` over :data:`HEAD_OUTPUTS`, and an
    optional residual MLP on the input features (``mlp`` = w1, b1, w2, b2)."""

    scale: torch.Tensor  # [4]
    shift: torch.Tensor  # [4]
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Calibrated copy of a backbone output dict (scaled units), as the training-time head."""
        residual = None
        if self.mlp is not None:
            w1, b1, w2, b2 = self.mlp
            residual = F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)
        return calibrate_outputs(out, self.scale, self.shift, residual)


@dataclass(frozen=True)
class ServingAdapter:
    """One adapter, ready to serve (see module docstring). Build it with :meth:`from_tensors`
    (:func:`kgml_peft.serve.loading.serving_adapter` checks an adapter file first)."""

    name: str
    content_hash: str
    lora: dict[str, LoraFactors] = field(default_factory=dict)  # "gru_rh.weight_hh_l0" -> factors
    blocks: dict[str, Block] = field(default_factory=dict)  # GRU name -> block after it
    head: Head | None = None
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # unfrozen backbone weights
    path: Path | None = None

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, torch.Tensor], config: AdapterConfig,
                     content_hash: str = "", path: Path | None = None) -> ServingAdapter:
        """Lay out already-checked adapter tensors (file names, see
        :class:`~kgml_peft.tuners.site_model.SiteModel`). Only views and one product are
        taken, so gradients reach ``tensors``: batched calibration trains through this layout."""
        t, cfg = tensors, config
        scaling = cfg.lora_alpha / cfg.lora_rank
        lora = {n: LoraFactors(t[f"lora.{n}.A"].contiguous(), (t[f"lora.{n}.B"] * scaling).contiguous())
                for n in (cfg.lora_parameters if "lora" in cfg.components else ())}
        blocks = {gru: Block(t[f"blocks.{gru}.down.weight"], t[f"blocks.{gru}.down.bias"],
                             t[f"blocks.{gru}.up.weight"], t[f"blocks.{gru}.up.bias"])
                  for gru in (cfg.block_targets if "blocks" in cfg.components else ())}
        head = None
        if "head" in cfg.components:
            mlp = None
            if cfg.head == "mlp":
                mlp = (t["head.mlp.0.weight"], t["head.mlp.0.bias"], t["head.mlp.2.weight"], t["head.mlp.2.bias"])
            head = Head(t["head.scale"], t["head.shift"], mlp)
        overrides = {k[len("backbone."):]: v for k, v in t.items() if k.startswith("backbone.")}
        return cls(name=name, content_hash=content_hash, lora=lora, blocks=blocks, head=head,
                   overrides=overrides, path=path)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this adapter keeps resident."""
        found = [t for f in self.lora.values() for t in (f.down, f.up)]
        found += [t for b in self.blocks.values()
                  for t in (b.down_weight, b.down_bias, b.up_weight, b.up_bias)]
        if self.head is not None:
            found += [self.head.scale, self.head.shift, *(self.head.mlp or ())]
        return found + list(self.overrides.values())

    @property
    def nbytes(self) -> int:
        """Bytes of resident tensor data (what the bank's memory bound counts)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def merged_parameters(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The backbone weights this adapter changes, with LoRA merged (``W + up @ down``) and
        unfrozen weights replaced; ``base`` maps backbone parameter names to tensors."""
        merged = dict(self.overrides)
        for name, factors in self.lora.items():
            merged[name] = merged.get(name, base[name]) + factors.delta()
        return merged
