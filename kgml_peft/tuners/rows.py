"""Mixed-site batches in one pass: shared backbone matmuls plus each row's own adapter.

peft cannot run a batch whose rows use different adapters when LoRA wraps parameters
(``target_parameters``), so this module computes such a batch itself, the way multi-LoRA servers do.
:func:`plan_rows` asks every registered component to stack its parts of the batch's adapters
(:meth:`~kgml_peft.tuners.base.Component.stack`); :func:`forward_rows` runs the backbone with them.

* **Per-row low-rank GRU updates** (LoRA): every row computes ``W h`` with the shared W, and its
  own update as ``up_s (down_s h)``. All adapters' ``down`` factors are stacked into one matrix
  [R, in] and a 0/1 mask [B, R] keeps each row's own rank columns (:class:`RowLora`), so the delta
  costs two small matmuls for the whole batch: ``((h @ down_all.T) * mask) @ up_all.T``. Adapters
  of different ranks mix freely. Input-to-hidden updates are applied to the whole sequence at
  once; hidden-to-hidden updates need the recurrence, so GRUs with such updates in the batch run a
  hand-written GRU loop (:func:`gru_rows`; torch's fused GRU kernel takes one weight for all rows,
  which is why this loop exists). GRUs without updates in the batch still run torch's kernel.
* **Taps and output transforms** (blocks, head) gather each row's weights ([B, ...], zeros for
  rows without that part, an exact identity) and apply them with batched matmuls.

Rows whose adapter replaces backbone weights (``--unfreeze``) cannot share the base weights; the
bank runs those grouped by site with merged weights instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import KGMLag
from kgml_peft.model.recurrence import LowRank, gru_layer
from kgml_peft.tuners import base
from kgml_peft.tuners.serving import ServingAdapter


@dataclass(frozen=True)
class RowLora:
    """Stacked LoRA factors of one GRU weight for a batch: ``down`` [R, in], ``up_t`` [R, out] and
    ``mask`` [B, R] (1 where column r belongs to row b's adapter)."""

    down: torch.Tensor
    up_t: torch.Tensor
    mask: torch.Tensor

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """Each row's own update applied to ``h`` [B, in] or [B, T, in]."""
        mask = self.mask if h.dim() == 2 else self.mask[:, None, :]
        return ((h @ self.down.t()) * mask) @ self.up_t


def stack_padded(parts: Sequence[torch.Tensor | None], shape: tuple[int, ...],
                 like: torch.Tensor) -> torch.Tensor:
    """Stack tensors zero-padded to ``shape``; ``None`` (no such part) becomes all zeros."""
    out = like.new_zeros((len(parts), *shape))
    for i, part in enumerate(parts):
        if part is not None:
            out[(i, *(slice(0, n) for n in part.shape))] = part
    return out


def plan_rows(rows: Sequence[ServingAdapter | None], like: torch.Tensor) -> list[base.Part]:
    """Stack the adapters of a batch's rows (``None`` = bare backbone) for :func:`forward_rows`:
    one part per component that any of them has; ``like`` gives dtype and device."""
    unique = list({id(a): a for a in rows if a is not None}.values())
    replacing = [a.name for a in unique if a.overrides]
    if replacing:
        raise KgmlPeftError(f"adapter {replacing[0]} replaces backbone weights; it cannot share a "
                            "batched pass (AdapterBank runs such rows grouped)")
    slot = {id(a): i for i, a in enumerate(unique)}
    index = torch.tensor([slot[id(a)] if a is not None else len(unique) for a in rows],
                         device=like.device)  # len(unique) = the slot of rows without an adapter
    plan = []
    for component in base.registered():
        parts = [a.parts.get(component.name) for a in unique] + [None]
        if any(p is not None for p in parts):
            plan.append(component.stack(parts, index, like))
    return plan


@dataclass(frozen=True)
class _Layer:
    """One GRU layer of a batch: input gates ``gi`` [B, T, 3H] (row updates included), its
    hidden-to-hidden weight and bias, per-row LoRA on that weight (or None) and start state."""

    gi: torch.Tensor
    w_hh: torch.Tensor
    b_hh: torch.Tensor
    lora: RowLora | None
    h0: torch.Tensor


def _layer(module: nn.GRU, layer: int, inputs: torch.Tensor, h0: torch.Tensor | None,
           lora: dict[str, RowLora]) -> _Layer:
    w_ih, b_ih = getattr(module, f"weight_ih_l{layer}"), getattr(module, f"bias_ih_l{layer}")
    gi = F.linear(inputs, w_ih, b_ih)
    if f"weight_ih_l{layer}" in lora:  # input-to-hidden updates: the whole sequence at once
        gi = gi + lora[f"weight_ih_l{layer}"].delta(inputs)
    start = inputs.new_zeros(inputs.shape[0], module.hidden_size) if h0 is None else h0[layer]
    return _Layer(gi, getattr(module, f"weight_hh_l{layer}"), getattr(module, f"bias_hh_l{layer}"),
                  lora.get(f"weight_hh_l{layer}"), start)


def _recur(layers: list[_Layer]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run GRU layers of equal hidden size H side by side in one day loop; (sequence, last) each.

    The K layers form one GRU of hidden size K*H with block-diagonal weights (gates ordered
    r_1..r_K, z_1..z_K, n_1..n_K), so each day costs the same few kernel calls whatever K is;
    every layer's row-wise LoRA ranks ride along as extra rank columns
    (:func:`~kgml_peft.model.recurrence.gru_layer`, which also computes the backward pass).
    """
    k, size = len(layers), layers[0].w_hh.shape[1]
    total = k * size
    ranks = [0 if layer.lora is None else layer.lora.down.shape[0] for layer in layers]
    like = layers[0].gi
    if k == 1:
        weight, bias = layers[0].w_hh, layers[0].b_hh
    else:
        weight = like.new_zeros(3 * total, total)
        bias = like.new_zeros(3 * total)
        for i, layer in enumerate(layers):
            for g in range(3):
                rows = slice((g * k + i) * size, (g * k + i + 1) * size)
                weight[rows, i * size:(i + 1) * size] = layer.w_hh[g * size:(g + 1) * size]
                bias[rows] = layer.b_hh[g * size:(g + 1) * size]
    low_rank = None
    if sum(ranks):
        down = like.new_zeros(sum(ranks), total)
        up_t = like.new_zeros(sum(ranks), 3 * total)
        mask = like.new_zeros(like.shape[0], sum(ranks))
        offset = 0
        for i, layer in enumerate(layers):
            if layer.lora is not None:
                rank = slice(offset, offset + ranks[i])
                down[rank, i * size:(i + 1) * size] = layer.lora.down
                mask[:, rank] = layer.lora.mask
                for g in range(3):
                    up_t[rank, (g * k + i) * size:(g * k + i + 1) * size] = layer.lora.up_t[:, g * size:(g + 1) * size]
                offset += ranks[i]
        low_rank = LowRank(down, up_t, mask)
    gi = layers[0].gi if k == 1 else torch.cat(
        [layer.gi[..., g * size:(g + 1) * size] for g in range(3) for layer in layers], dim=-1)
    h0 = torch.cat([layer.h0 for layer in layers], dim=-1)
    seq, last = gru_layer(gi, h0, weight, bias, low_rank)
    return [(seq[..., i * size:(i + 1) * size], last[:, i * size:(i + 1) * size]) for i in range(k)]


def gru_rows(modules: Sequence[nn.GRU], inputs: torch.Tensor, h0s: Sequence[torch.Tensor | None],
             loras: Sequence[dict[str, RowLora]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run GRUs (batch_first, equal hidden sizes) that read the same ``inputs``
    [B, T, in], with per-row LoRA updates keyed by each module's weight names (``weight_hh_l0``
    ...). Their first layers share one day loop. Same outputs as each module with each row's
    merged weights: (sequence [B, T, H], last states [layers, B, H]) per module."""
    first = _recur([_layer(m, 0, inputs, h0, lora) for m, h0, lora in zip(modules, h0s, loras)])
    results = []
    for module, h0, lora, (seq, last) in zip(modules, h0s, loras, first):
        states = [last]
        for layer in range(1, module.num_layers):
            # as torch's GRU: dropout between layers in training mode (batched calibration)
            seq = F.dropout(seq, module.dropout, module.training)
            [(seq, h)] = _recur([_layer(module, layer, seq, h0, lora)])
            states.append(h)
        results.append((seq, torch.stack(states)))
    return results


def shared_rows(same_as: torch.Tensor, inputs: torch.Tensor, h0s: Sequence[torch.Tensor | None],
                loras: Sequence[RowLora]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows of one GRU call that need not be computed: row b whose candidate ``same_as[b]`` (a row
    that is its own candidate) has the same inputs, start states and LoRA columns gets that row's
    outputs. Returns (rows to compute, for every row the position of its result among them), or
    None when every row must be computed.

    Members of one adapter are rows of one window (:meth:`AdapterBank.predict_members`); members
    that differ only after a GRU (head, blocks) give it identical rows, so it runs once per window.
    """
    rows = torch.arange(len(same_as), device=same_as.device)
    if bool((same_as[same_as] != same_as).any()):
        raise KgmlPeftError("same_as must point at rows that are their own candidate")
    candidates = (same_as != rows).nonzero().squeeze(1)
    if not len(candidates):
        return None
    first = same_as[candidates]
    equal = (inputs[candidates] == inputs[first]).flatten(1).all(1)
    for h0 in h0s:
        if h0 is not None:  # [layers, B, H]
            equal &= (h0[:, candidates] == h0[:, first]).all(-1).all(0)
    for lora in loras:
        equal &= (lora.mask[candidates] == lora.mask[first]).all(1)
    if not bool(equal.any()):
        return None
    same = torch.zeros_like(rows, dtype=torch.bool)
    same[candidates] = equal
    keep = (~same).nonzero().squeeze(1)
    position = torch.empty_like(rows)
    position[keep] = torch.arange(len(keep), device=rows.device)
    return keep, position[torch.where(same, same_as, rows)]


def forward_rows(backbone: KGMLag, x: torch.Tensor, plan: Sequence[base.Part],
                 state: dict[str, torch.Tensor] | None = None,
                 same_as: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The backbone's forward on ``x`` [B, T, F] with each row's own adapter (see :func:`plan_rows`);
    scaled outputs like :meth:`KGMLag.forward`. ``same_as`` [B] (optional) names for each row a
    row that may carry the same inputs (itself if none): GRUs then run once for rows that turn out
    identical (:func:`shared_rows`); the outputs are the same either way."""
    by_gru: dict[str, dict[str, RowLora]] = {}
    for part in plan:
        for name, row_lora in part.row_updates().items():
            gru, weight = name.split(".", 1)
            by_gru.setdefault(gru, {})[weight] = row_lora

    def run(names, modules, inputs, h0s, loras) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = [i for i, name in enumerate(names) if name in loras]
        fused = iter(gru_rows([modules[i] for i in rows], inputs, [h0s[i] for i in rows],
                              [loras[names[i]] for i in rows]) if rows else [])
        return [next(fused) if i in rows else modules[i](inputs, h0s[i]) for i in range(len(names))]

    def runner(names, modules, inputs, h0s) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loras = {n: by_gru[n] for n in names if n in by_gru}
        shared = None if same_as is None else shared_rows(
            same_as, inputs, h0s, [lora for n in loras for lora in loras[n].values()])
        if shared is None:
            return run(names, modules, inputs, h0s, loras)
        keep, position = shared
        results = run(names, modules, inputs[keep], [None if h is None else h[:, keep] for h in h0s],
                      {n: {w: replace(lora, mask=lora.mask[keep]) for w, lora in loras[n].items()}
                       for n in loras})
        return [(seq[position], last[:, position]) for seq, last in results]

    return base.run_parts(backbone, x, state, plan, runner=runner)
