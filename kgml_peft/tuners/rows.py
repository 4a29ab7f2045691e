"""Mixed-site batches in one pass: shared backbone matmuls plus each row's own adapter.

peft cannot run a batch whose rows use different adapters when LoRA wraps parameters
(``target_parameters``), so this module computes such a batch itself, the way multi-LoRA servers do.
:func:`plan_rows` asks every registered component to stack its parts of the batch's adapters
(:meth:`~kgml_peft.tuners.base.Component.stack`); :func:`forward_rows` runs the backbone with them.

* **Per-row low-rank GRU updates** (LoRA): all adapters' ``down`` factors are stacked into one
  matrix [R, in] and a 0/1 mask [B, R] marks each row's own rank columns (:class:`RowLora`).
  Input-to-hidden updates cost two small matmuls for the whole sequence at once:
  ``((x @ down_all.T) * mask) @ up_all.T``. Hidden-to-hidden updates need the recurrence, and
  torch's GRU kernel takes one weight for all rows, so they run in the day loop of
  :func:`~kgml_peft.model.recurrence.gru_layer`: rows are grouped by their updates, each
  group's weight merged once per call (``W + up diag(mask) down``), and each day multiplies
  every group's rows by their own weight in one batched matmul. Every GRU with row updates of
  either kind runs this way (:func:`gru_rows`); adapters of different ranks mix freely. GRUs
  without updates in the batch still run torch's kernel.
* **Taps and output transforms** (blocks, head) gather each row's weights ([B, ...], zeros for
  rows without that part, an exact identity) and apply them with batched matmuls.

Rows whose adapter replaces backbone weights (``--unfreeze``) cannot share the base weights; the
bank runs those grouped by site with merged weights instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import KGMLag, run_layers
from kgml_peft.model.recurrence import gru_layer
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


@dataclass(frozen=True)
class _Groups:
    """A batch's rows laid out for per-group weights: ``chunks`` runs of ``size`` consecutive
    slots, each run from one group (rows with equal hidden-to-hidden updates). ``order`` [chunks *
    size] is the row in each slot (a chunk's spare slots repeat one of its group's rows),
    ``position`` [B] the slot holding each row's result, ``chunk_group`` [chunks] each run's group
    and ``representative`` [G] one row of each group."""

    order: torch.Tensor
    position: torch.Tensor
    chunk_group: torch.Tensor
    representative: torch.Tensor
    #: the slots are the rows in their own order: nothing to gather
    in_place: bool


def _group_rows(keys: torch.Tensor) -> _Groups:
    """Group the rows of ``keys`` [B, K] (equal key rows = equal updates) into runs of equal size.

    The run size minimises slots + runs: a spare slot costs a row's arithmetic, and a run costs
    about as much as a row in the batched matmul (measured, 64 rows of hidden size 32: 8 runs of 8
    6.9 us, 64 runs of 1 19.6 us, one shared matmul 5.2 us). Tensor ops only, no loop over rows
    or groups: a serving batch may hold thousands of rows."""
    device, batch = keys.device, keys.shape[0]
    rows = torch.arange(batch, device=device)
    if batch == 0:
        return _Groups(rows, rows, rows, rows, in_place=True)
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    first = torch.full_like(counts, batch).scatter_reduce(0, inverse, rows, "amin")
    by_first = torch.argsort(first)  # groups in row order: consecutive groups need no gather
    rank = torch.empty_like(by_first)
    rank[by_first] = torch.arange(len(by_first), device=device)
    group, counts, first = rank[inverse], counts[by_first], first[by_first]
    # the cost of every run size at once, over the distinct group sizes (at most sqrt(2B) of them)
    sizes, how_many = torch.unique(counts, return_counts=True)
    run_size = torch.arange(1, int(sizes.max()) + 1, device=device)
    runs = ((sizes[None, :] + run_size[:, None] - 1) // run_size[:, None] * how_many).sum(1)
    size = int(run_size[torch.argmin(runs * run_size + runs)])  # argmin: the smallest of equal costs
    runs = (counts + size - 1) // size  # per group
    slots = runs * size
    start = torch.cumsum(slots, 0) - slots  # each group's first slot
    chunk_group = torch.repeat_interleave(torch.arange(len(counts), device=device), runs)
    # each row's slot: its group's first slot plus its rank among the group's rows (row order);
    # with the rows sorted by group (stably), a row's rank is its place minus its group's start
    by_group = torch.argsort(group, stable=True)
    its_group = group[by_group]
    rank_in_group = rows - (torch.cumsum(counts, 0) - counts)[its_group]
    position = torch.empty_like(rows)
    position[by_group] = start[its_group] + rank_in_group
    order = first[chunk_group].repeat_interleave(size)  # spare slots repeat the group's first row
    order[position] = rows
    return _Groups(order, position, chunk_group, first,
                   in_place=len(order) == batch and bool((position == rows).all()))


def _hidden_weights(layers: list[_Layer], groups: _Groups | None) -> torch.Tensor:
    """The layers' hidden-to-hidden weights as one GRU's: [3KH, KH] (block-diagonal, gates
    ordered r_1..r_K, z_1..z_K, n_1..n_K), or per run of rows [chunks, 3KH, KH] with each
    group's LoRA merged in."""
    k, size = len(layers), layers[0].w_hh.shape[1]
    weights = []
    for layer in layers:
        weight = layer.w_hh
        if groups is not None:
            weight = weight.expand(len(groups.representative), *weight.shape)
            if layer.lora is not None:  # W + up diag(mask) down, per group
                mask = layer.lora.mask[groups.representative]
                weight = weight + torch.einsum("gr,ro,ri->goi", mask, layer.lora.up_t, layer.lora.down)
            weight = weight[groups.chunk_group]
        weights.append(weight)
    if k == 1:
        return weights[0]
    total = k * size
    block = weights[0].new_zeros(*weights[0].shape[:-2], 3 * total, total)
    for i, weight in enumerate(weights):
        for g in range(3):
            block[..., (g * k + i) * size:(g * k + i + 1) * size, i * size:(i + 1) * size] = \
                weight[..., g * size:(g + 1) * size, :]
    return block


def _recur(layers: list[_Layer]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run GRU layers of equal hidden size H side by side in one day loop; (sequence, last) each.

    The K layers form one GRU of hidden size K*H with block-diagonal weights, so each day costs the
    same few kernel calls whatever K is. With LoRA on any of their hidden-to-hidden weights, rows
    are grouped by their updates (:func:`_group_rows`) and each group runs its merged weights.
    """
    k, size = len(layers), layers[0].w_hh.shape[1]
    masks = [layer.lora.mask for layer in layers if layer.lora is not None]
    groups = _group_rows(torch.cat(masks, dim=1)) if masks else None
    weight = _hidden_weights(layers, groups)
    bias = layers[0].b_hh if k == 1 else torch.cat(
        [layer.b_hh[g * size:(g + 1) * size] for g in range(3) for layer in layers])
    gi = layers[0].gi if k == 1 else torch.cat(
        [layer.gi[..., g * size:(g + 1) * size] for g in range(3) for layer in layers], dim=-1)
    h0 = torch.cat([layer.h0 for layer in layers], dim=-1)
    if groups is not None and not groups.in_place:
        gi, h0 = gi.index_select(0, groups.order), h0.index_select(0, groups.order)
    seq, last = gru_layer(gi, h0, weight, bias)
    if groups is not None and not groups.in_place:  # seq is a day-major buffer seen batch-first
        seq = seq.transpose(0, 1).index_select(1, groups.position).transpose(0, 1)
        last = last.index_select(0, groups.position)
    return [(seq[..., i * size:(i + 1) * size], last[:, i * size:(i + 1) * size]) for i in range(k)]


#: Most rows for which GRUs that read the same input share one day loop (their first layers as
#: one block-diagonal GRU): fewer, larger ops pay off while per-op overhead dominates. Measured
#: on a CPU, gru_ra + gru_rh with rank-1 LoRA of 8 adapters, ms shared against apart for forward
#: and backward (in brackets: forward alone, without gradients): 5 rows 38 / 46 (14 / 17), 17 rows
#: 64 / 64 (20 / 22), 64 rows 184 / 140 (50 / 48). The block-diagonal matmul does twice the
#: arithmetic, which loses once rows are many.
SHARED_LOOP_ROWS = 16


def gru_rows(modules: Sequence[nn.GRU], inputs: torch.Tensor, h0s: Sequence[torch.Tensor | None],
             loras: Sequence[dict[str, RowLora]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run GRUs (batch_first, equal hidden sizes) that read the same ``inputs``
    [B, T, in], with per-row LoRA updates keyed by each module's weight names (``weight_hh_l0``
    ...). Their first layers share one day loop for batches of at most :data:`SHARED_LOOP_ROWS`
    rows. Same outputs as each module with each row's merged weights: (sequence [B, T, H], last
    states [layers, B, H]) per module."""
    if len(modules) > 1 and inputs.shape[0] > SHARED_LOOP_ROWS:
        return [result for m, h0, lora in zip(modules, h0s, loras)
                for result in gru_rows([m], inputs, [h0], [lora])]
    first = _recur([_layer(m, 0, inputs, h0, lora) for m, h0, lora in zip(modules, h0s, loras)])
    return [run_layers(module, seq, partial(_row_step, module, h0, lora), first=1, states=[last])
            for module, h0, lora, (seq, last) in zip(modules, h0s, loras, first)]


def _row_step(module: nn.GRU, h0: torch.Tensor | None, lora: dict[str, RowLora], layer: int,
              seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer`` of ``module`` over the rows of a mixed batch (a ``LayerStep`` of
    :func:`~kgml_peft.model.backbone.run_layers`)."""
    return _recur([_layer(module, layer, seq, h0, lora)])[0]


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
