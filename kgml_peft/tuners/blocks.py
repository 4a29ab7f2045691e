"""Bottleneck adapter blocks after GRU output sequences: ``h + up(gelu(down(h)))``.

``up`` starts at zero, so a fresh block is an exact identity. A block sits after each GRU named in
``block_targets`` and acts on that GRU's output sequence [B, T, H] before anything reads it.

File tensors per targeted GRU (``k`` = ``bottleneck``, ``H`` = the backbone's hidden size):
``blocks.<gru>.down.weight`` [k, H], ``blocks.<gru>.down.bias`` [k], ``blocks.<gru>.up.weight``
[H, k], ``blocks.<gru>.up.bias`` [H].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from kgml_peft.model.backbone import GRU_NAMES, KGMLag
from kgml_peft.tuners.base import Component, Part, Tap
from kgml_peft.tuners.config import MAX_SIZE, AdapterConfig, names, positive_int
from kgml_peft.tuners.rows import stack_padded

#: a block's tensors, after ``blocks.<gru>.``
TENSORS: tuple[str, ...] = ("down.weight", "down.bias", "up.weight", "up.bias")


def bottleneck(h: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor,
               up_weight: torch.Tensor, up_bias: torch.Tensor) -> torch.Tensor:
    """``h + up(gelu(down(h)))`` from plain tensors."""
    return h + F.linear(F.gelu(F.linear(h, down_weight, down_bias)), up_weight, up_bias)


@dataclass(frozen=True, eq=False)
class Block:
    """A bottleneck block as four tensors (the order of :data:`TENSORS`)."""

    down_weight: torch.Tensor  # [k, H]
    down_bias: torch.Tensor  # [k]
    up_weight: torch.Tensor  # [H, k]
    up_bias: torch.Tensor  # [H]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the block to a GRU output sequence [B, T, H]."""
        return bottleneck(h, self.down_weight, self.down_bias, self.up_weight, self.up_bias)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The four tensors, in the order of :data:`TENSORS`."""
        return self.down_weight, self.down_bias, self.up_weight, self.up_bias


@dataclass(frozen=True, eq=False)
class BlocksPart(Part):
    """One adapter's blocks by GRU name."""

    blocks: dict[str, Block]

    def tensors(self) -> list[torch.Tensor]:  # noqa: D102
        return [t for b in self.blocks.values() for t in b.tensors()]

    def taps(self) -> dict[str, Tap]:  # noqa: D102
        return dict(self.blocks)


def _row_block(dw: torch.Tensor, db: torch.Tensor, uw: torch.Tensor, ub: torch.Tensor) -> Tap:
    def apply(h: torch.Tensor) -> torch.Tensor:
        inner = F.gelu(torch.baddbmm(db[:, None, :], h, dw.transpose(1, 2)))
        return h + torch.baddbmm(ub[:, None, :], inner, uw.transpose(1, 2))

    return apply


@dataclass(frozen=True, eq=False)
class BlocksRows(Part):
    """A mixed batch's blocks: per GRU, each row's four tensors stacked [B, ...]."""

    rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

    def taps(self) -> dict[str, Tap]:  # noqa: D102
        return {gru: _row_block(*weights) for gru, weights in self.rows.items()}


class Blocks(Component):
    """Bottleneck blocks after GRUs (see module docstring)."""

    name = "blocks"

    def check(self, config: AdapterConfig) -> dict[str, object]:  # noqa: D102
        positive_int(config.bottleneck, "bottleneck", MAX_SIZE)
        return {"block_targets": names(config.block_targets, GRU_NAMES, "block target")}

    def shapes(self, config: AdapterConfig, backbone: KGMLag) -> dict[str, tuple[int, ...]]:  # noqa: D102
        shapes = {}
        for gru in config.block_targets:
            size, k = backbone.config.hidden_size, config.bottleneck
            for tensor, shape in zip(TENSORS, ((k, size), (k,), (size, k), (size,))):
                shapes[f"blocks.{gru}.{tensor}"] = shape
        return shapes

    def attach(self, config: AdapterConfig, backbone: KGMLag) -> dict[str, nn.Parameter]:
        """Each block's tensors as torch's Linear layers initialise them, ``up`` zeroed."""
        params = {}
        for gru in config.block_targets:
            size = backbone.config.hidden_size
            down, up = nn.Linear(size, config.bottleneck), nn.Linear(config.bottleneck, size)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
            for tensor, param in zip(TENSORS, (down.weight, down.bias, up.weight, up.bias)):
                params[f"blocks.{gru}.{tensor}"] = param
        return params

    def layout(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> BlocksPart:  # noqa: D102
        return BlocksPart({gru: Block(*(tensors[f"blocks.{gru}.{t}"] for t in TENSORS))
                           for gru in config.block_targets})

    def scale(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        """``up`` times the strength: the block's output change ``up(gelu(down(h)))`` scales
        linearly."""
        return {k: v * strength if ".up." in k else v.clone() for k, v in tensors.items()}

    def stack(self, parts: Sequence[BlocksPart | None], index: torch.Tensor, like: torch.Tensor) -> BlocksRows:
        """Each GRU's blocks zero-padded to the largest bottleneck and gathered per row."""
        rows = {}
        for gru in dict.fromkeys(g for p in parts if p is not None for g in p.blocks):
            found = [None if p is None else p.blocks.get(gru) for p in parts]
            k = max(b.down_weight.shape[0] for b in found if b is not None)
            size = next(b for b in found if b is not None).up_bias.shape[0]
            columns = [[None if b is None else b.tensors()[i] for b in found] for i in range(len(TENSORS))]
            dw, db, uw, ub = (stack_padded(c, s, like)[index] for c, s in
                              zip(columns, ((k, size), (k,), (size, k), (size,))))
            rows[gru] = (dw, db, uw, ub)
        return BlocksRows(rows)
