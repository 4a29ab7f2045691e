"""An adapter laid out for serving: plain tensors, no modules, no peft wrappers.

A :class:`ServingAdapter` holds what a request needs from one adapter file: each component's
serving part (:meth:`~kgml_peft.tuners.base.Component.layout`; LoRA keeps its factors with the
scaling folded in) and any backbone weights the run unfroze. It is a few kilobytes, so thousands
stay resident, and it gives the same predictions as the peft-wrapped
:class:`~kgml_peft.tuners.site_model.SiteModel` two ways: merged into the backbone's weights
(:meth:`ServingAdapter.forward`, one adapter per batch) or per row in a mixed batch
(:mod:`kgml_peft.tuners.rows`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kgml_peft.model.backbone import KGMLag
from kgml_peft.tuners import base
from kgml_peft.tuners.config import AdapterConfig


@dataclass(frozen=True, eq=False)
class ServingAdapter:
    """One adapter, ready to serve (see module docstring). Build it with :meth:`from_tensors`
    (:func:`kgml_peft.serve.loading.serving_adapter` checks an adapter file first)."""

    name: str
    content_hash: str
    parts: dict[str, base.Part] = field(default_factory=dict)  # component name -> its part
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # unfrozen backbone weights
    path: Path | None = None
    #: members 2..M of a multi-member adapter (each laid out alike), for prediction intervals
    members: tuple[ServingAdapter, ...] = ()
    #: the conformal interval widths of the adapter file (``metrics.intervals``), if any
    intervals: dict | None = None
    #: the crops (Crop_Type codes) the adapter applies to; None: any
    crops: tuple[float, ...] | None = None
    #: a blend's member weights (this adapter first): its prediction is their weighted mean
    member_weights: tuple[float, ...] | None = None

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, torch.Tensor], config: AdapterConfig,
                     content_hash: str = "", path: Path | None = None,
                     members: tuple[ServingAdapter, ...] = (), intervals: dict | None = None,
                     crops: tuple[float, ...] | None = None,
                     member_weights: tuple[float, ...] | None = None) -> ServingAdapter:
        """Lay out already-checked adapter tensors (file names). Only views and products are
        taken, so gradients reach ``tensors``: batched calibration trains through this layout."""
        parts = {c.name: c.layout(config, base.own_tensors(c, tensors)) for c in base.active(config)}
        prefix = base.BACKBONE_PREFIX
        overrides = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return cls(name=name, content_hash=content_hash, parts=parts, overrides=overrides, path=path,
                   members=members, intervals=intervals, crops=crops, member_weights=member_weights)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this adapter keeps resident (its members' too)."""
        own = [t for part in self.parts.values() for t in part.tensors()] + list(self.overrides.values())
        return own + [t for member in self.members for t in member.tensors()]

    @property
    def all_members(self) -> tuple[ServingAdapter, ...]:
        """Every member, this adapter (the point prediction's) first."""
        return (self, *self.members)

    @property
    def nbytes(self) -> int:
        """Bytes of resident tensor data (what the bank's memory bound counts)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def merged_parameters(self, base_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The backbone weights this adapter changes: unfrozen weights replaced, then each part's
        merge (LoRA: ``W + up @ down``); ``base_weights`` maps backbone parameter names to tensors."""
        merged = dict(self.overrides)
        for part in self.parts.values():
            part.merge(merged, base_weights)
        return merged

    def forward(self, backbone: KGMLag, base_weights: Mapping[str, torch.Tensor], x: torch.Tensor,
                state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This adapter on every row of ``x``: ``backbone`` run with the merged weights (torch's
        fused GRU kernel), the parts' taps and output transforms."""
        return base.run_parts(backbone, x, state, list(self.parts.values()),
                              weights=self.merged_parameters(base_weights))
