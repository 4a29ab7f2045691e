"""The calibration head on the outputs (scaled units): ``(y + residual) * (1 + scale) + shift``.

``scale`` and ``shift`` have one entry per output of :data:`HEAD_OUTPUTS` and start at zero. The
``mlp`` kind adds a residual MLP of the input features on Ra, Rh and NEE (``tanh`` hidden layer;
its last layer starts at zero). Every part starts as an exact identity.

File tensors: ``head.scale`` [4], ``head.shift`` [4]; with ``head = "mlp"`` (``h`` =
``head_hidden``, ``F`` = the backbone's features) also ``head.mlp.0.weight`` [h, F],
``head.mlp.0.bias`` [h], ``head.mlp.2.weight`` [3, h], ``head.mlp.2.bias`` [3].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from kgml_peft import schema
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.model.backbone import KGMLag
from kgml_peft.tuners.base import Component, Part
from kgml_peft.tuners.config import HEAD_KINDS, MAX_SIZE, AdapterConfig, positive_int
from kgml_peft.tuners.rows import stack_padded

#: The outputs the head calibrates, in the order of its ``scale``/``shift`` entries.
HEAD_OUTPUTS: tuple[str, ...] = (*schema.FLUX_OUTPUTS, "Yield")
#: The residual MLP's tensors, after ``head.``: the layer indices of the ``nn.Sequential`` (Linear,
#: Tanh, Linear) that first wrote them, kept because files carry these names.
MLP_TENSORS: tuple[str, ...] = ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")

MlpWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def calibrate_outputs(out: dict[str, torch.Tensor], scale: torch.Tensor, shift: torch.Tensor,
                      residual: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``(y + residual) * (1 + scale) + shift`` per head output. ``scale``/``shift`` are [4] for
    one site or [B, 4] per row; ``residual`` [B, T, 3] adds to Ra, Rh, NEE."""
    out = dict(out)
    per_row = scale.dim() == 2
    for j, name in enumerate(HEAD_OUTPUTS):
        value = out[name]
        if residual is not None and j < len(schema.FLUX_OUTPUTS):
            value = value + residual[..., j]
        s, b = (scale[:, j], shift[:, j]) if per_row else (scale[j], shift[j])
        if per_row and value.dim() == 2:  # daily outputs [B, T]
            s, b = s[:, None], b[:, None]
        out[name] = value * (1 + s) + b
    return out


@dataclass(frozen=True, eq=False)
class HeadPart(Part):
    """One adapter's head: ``scale``/``shift`` [4] and the optional MLP (w1, b1, w2, b2)."""

    scale: torch.Tensor
    shift: torch.Tensor
    mlp: MlpWeights | None = None

    def tensors(self) -> list[torch.Tensor]:  # noqa: D102
        return [self.scale, self.shift, *(self.mlp or ())]

    def outputs(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: D102
        residual = None
        if self.mlp is not None:
            w1, b1, w2, b2 = self.mlp
            residual = F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)
        return calibrate_outputs(out, self.scale, self.shift, residual)


@dataclass(frozen=True, eq=False)
class HeadRows(Part):
    """A mixed batch's heads: ``scale``/``shift`` [B, 4] and MLP weights [B, ...] (or None)."""

    scale: torch.Tensor
    shift: torch.Tensor
    mlp: MlpWeights | None

    def outputs(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: D102
        residual = None
        if self.mlp is not None:
            w1, b1, w2, b2 = self.mlp
            hidden = torch.tanh(torch.baddbmm(b1[:, None, :], x, w1.transpose(1, 2)))
            residual = torch.baddbmm(b2[:, None, :], hidden, w2.transpose(1, 2))
        return calibrate_outputs(out, self.scale, self.shift, residual)


class Head(Component):
    """The calibration head (see module docstring)."""

    name = "head"

    def check(self, config: AdapterConfig) -> dict[str, object]:  # noqa: D102
        positive_int(config.head_hidden, "head_hidden", MAX_SIZE)
        expect_type(config.head, str, "head")
        if config.head not in HEAD_KINDS:
            raise KgmlPeftError(f"head must be one of {', '.join(HEAD_KINDS)}, got {config.head!r}")
        return {}

    def shapes(self, config: AdapterConfig, backbone: KGMLag) -> dict[str, tuple[int, ...]]:  # noqa: D102
        n = len(HEAD_OUTPUTS)
        shapes = {"head.scale": (n,), "head.shift": (n,)}
        if config.head == "mlp":
            hidden, flux = config.head_hidden, len(schema.FLUX_OUTPUTS)
            sizes = ((hidden, len(backbone.config.features)), (hidden,), (flux, hidden), (flux,))
            shapes.update({f"head.{t}": s for t, s in zip(MLP_TENSORS, sizes)})
        return shapes

    def attach(self, config: AdapterConfig, backbone: KGMLag) -> dict[str, nn.Parameter]:
        """Zero scale and shift; the MLP's layers as torch's Linear initialises them, the last
        one zeroed."""
        n = len(HEAD_OUTPUTS)
        params = {"head.scale": nn.Parameter(torch.zeros(n)), "head.shift": nn.Parameter(torch.zeros(n))}
        if config.head == "mlp":
            first = nn.Linear(len(backbone.config.features), config.head_hidden)
            last = nn.Linear(config.head_hidden, len(schema.FLUX_OUTPUTS))
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            params.update({f"head.{t}": p for t, p in
                           zip(MLP_TENSORS, (first.weight, first.bias, last.weight, last.bias))})
        return params

    def layout(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> HeadPart:  # noqa: D102
        mlp = tuple(tensors[f"head.{t}"] for t in MLP_TENSORS) if config.head == "mlp" else None
        return HeadPart(tensors["head.scale"], tensors["head.shift"], mlp)

    def scale(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        """``scale``, ``shift`` and the MLP's last layer times the strength (towards identity:
        ``(y + t r) (1 + t s) + t b``)."""
        moved = ("head.scale", "head.shift", f"head.{MLP_TENSORS[2]}", f"head.{MLP_TENSORS[3]}")
        return {k: v * strength if k in moved else v.clone() for k, v in tensors.items()}

    def stack(self, parts: Sequence[HeadPart | None], index: torch.Tensor, like: torch.Tensor) -> HeadRows:
        """Scales, shifts and MLPs per row (zero-padded to the widest MLP; zeros = identity)."""
        n = len(HEAD_OUTPUTS)
        scale = stack_padded([None if p is None else p.scale for p in parts], (n,), like)[index]
        shift = stack_padded([None if p is None else p.shift for p in parts], (n,), like)[index]
        mlps = [None if p is None else p.mlp for p in parts]
        mlp = None
        if any(m is not None for m in mlps):
            hidden = max(m[0].shape[0] for m in mlps if m is not None)
            features = next(m for m in mlps if m is not None)[0].shape[1]
            shapes = ((hidden, features), (hidden,), (len(schema.FLUX_OUTPUTS), hidden), (len(schema.FLUX_OUTPUTS),))
            mlp = tuple(stack_padded([None if m is None else m[i] for m in mlps], shapes[i], like)[index]
                        for i in range(len(MLP_TENSORS)))
        return HeadRows(scale, shift, mlp)
