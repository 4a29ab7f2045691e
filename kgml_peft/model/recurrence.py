"""A GRU layer's day loop with a hand-written backward pass, for where torch's GRU kernel is slow
or cannot be used.

Two places need it. A mixed batch (:mod:`kgml_peft.tuners.rows`) gives every row its own
low-rank hidden-to-hidden update, which torch's GRU kernel (one weight for all rows) cannot run.
And on a CPU, training through torch's GRU records a dozen small autograd nodes per day, whose
bookkeeping costs more than the arithmetic at the batch sizes of a site calibration (a few to a
few dozen rows of 365 days).

:func:`gru_layer` runs the 365-day recurrence without recording a graph, with few in-place ops
per day on buffers laid out day-major, and keeps what the backward pass needs. Its backward pass
(:class:`_GruLayer`) walks the days back with four ops per day (six with low-rank updates): every
gate derivative is the incoming ``dh`` times a coefficient known from the forward values, so the
coefficients of all days are computed at once before the loop, and the weight gradients after it
as one large matmul each. Nothing in torch or a well-kept library computes a GRU this way:
``torch.compile`` of the day cell was measured slower than eager on a CPU (14.9 against 12.5 ms
per 365 days at 8 rows, after 16 s of compiling) and its ``scan`` does not compile here
(docs/scaling.md). Gradients match autograd through torch's own GRU to float rounding; the tests
check them against it and with ``gradcheck`` in float64.

Where each way is faster is measured (``kgml-peft bench``, docs/scaling.md) and chosen by
:func:`use_day_loop`; :func:`strategy` forces one for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kgml_peft.errors import KgmlPeftError

#: ``auto`` (the measured choice, see :func:`use_day_loop`), ``loop`` (always :func:`gru_layer`)
#: or ``kernel`` (torch's GRU wherever it can run)
STRATEGIES: tuple[str, ...] = ("auto", "loop", "kernel")
#: the way in force; a context variable, so a thread (each starts at ``auto``) sets its own
_strategy: contextvars.ContextVar[str] = contextvars.ContextVar("kgml_peft_gru_strategy", default="auto")


@contextlib.contextmanager
def strategy(name: str) -> Iterator[None]:
    """Within the block (in this thread), run plain GRUs (:class:`~kgml_peft.model.backbone.GRU`)
    the way ``name`` says (one of :data:`STRATEGIES`); mixed batches always take the day loop."""
    if name not in STRATEGIES:
        raise KgmlPeftError(f"unknown GRU strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    token = _strategy.set(name)
    try:
        yield
    finally:
        _strategy.reset(token)


def use_day_loop(device: torch.device, needs_grad: bool) -> bool:
    """Whether a plain GRU runs :func:`gru_layer` rather than torch's kernel. ``auto`` takes the
    day loop where it was measured faster: training on a CPU (forward + backward at 8 rows
    12 ms against 36 ms per layer-year, 64 rows 32 against 62). Without gradients torch's kernel
    is as fast at a few rows and faster at many (64 rows: 14 against 26 ms), and on a GPU cuDNN
    runs the whole loop in one kernel."""
    chosen = _strategy.get()
    if chosen != "auto":
        return chosen == "loop"
    return needs_grad and device.type == "cpu"


@dataclass(frozen=True)
class LowRank:
    """Per-row low-rank updates of a hidden-to-hidden weight: row b adds
    ``((h @ down.T) * mask[b]) @ up_t`` to its hidden gates. ``down`` [R, H], ``up_t`` [R, 3H],
    ``mask`` [B, R] (1 where rank column r belongs to row b's update, else 0)."""

    down: torch.Tensor
    up_t: torch.Tensor
    mask: torch.Tensor


def gru_layer(gi: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
              low_rank: LowRank | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer over the days of ``gi`` [B, T, 3H] (the input gates ``x W_ih^T + b_ih``, gate
    order r, z, n as torch's GRU) from start state ``h0`` [B, H]: (sequence [B, T, H], last state
    [B, H]), as torch's GRU computes them, plus ``low_rank`` updates of ``w_hh`` if given.
    Differentiable in every tensor but the mask; half precision (autocast) runs in float32."""
    three = w_hh.shape[0]
    if gi.dim() != 3 or gi.shape[-1] != three or three % 3 or w_hh.shape[1] * 3 != three:
        raise KgmlPeftError(f"gru_layer: input gates {list(gi.shape)} do not fit w_hh {list(w_hh.shape)}")
    if low_rank is None:
        empty = w_hh.new_zeros(0, w_hh.shape[1])
        low_rank = LowRank(empty, w_hh.new_zeros(0, three), gi.new_zeros(gi.shape[0], 0))
    if gi.shape[1] == 0:
        return gi.new_zeros(gi.shape[0], 0, w_hh.shape[1]), h0
    dtype = torch.promote_types(gi.dtype, torch.float32)  # half precision runs in float32
    with torch.autocast(gi.device.type, enabled=False):
        return _GruLayer.apply(*(t.to(dtype) for t in (gi, h0, w_hh, b_hh, low_rank.down, low_rank.up_t,
                                                          low_rank.mask)))


def _start(gi: torch.Tensor, h0: torch.Tensor, b_hh: torch.Tensor, ranks: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The day loop's buffers, day-major: ``ga`` [T, B, 3H+R] holding each day's input gates with
    the hidden biases (r, z: ``gi + b_hh``; n: ``b_hh``; rank columns: 0), ``n`` [T, B, H] holding
    the input part of n, and an empty ``hs`` [T, B, H] for the states."""
    days, batch, three = gi.shape[1], gi.shape[0], gi.shape[2]
    size = three // 3
    gi_t = gi.transpose(0, 1)
    ga = gi.new_empty(days, batch, three + ranks)
    torch.add(gi_t[..., :2 * size], b_hh[:2 * size], out=ga[..., :2 * size])
    ga[..., 2 * size:three] = b_hh[2 * size:]
    ga[..., three:] = 0
    return ga, gi_t[..., 2 * size:].contiguous(), h0.new_empty(days, batch, size)


def _forward_days(ga: torch.Tensor, n: torch.Tensor, hs: torch.Tensor, h: torch.Tensor,
                  weight_t: torch.Tensor, up_t: torch.Tensor, mask: torch.Tensor) -> None:
    """The day loop, in place on the buffers of :func:`_start`. On exit ``ga`` holds the gates
    ``sigmoid(r)``, ``sigmoid(z)``, the hidden n pre-activation (``h W_hn^T + b_hn`` plus the
    low-rank part) and the masked rank columns; ``n`` the candidate states; ``hs`` the states.
    ``weight_t`` is ``[w_hh; down]`` transposed [H, 3H+R]."""
    size = hs.shape[-1]
    low_rank = up_t.shape[0] > 0
    # views made once: making a slice costs about as much as a small op, and a day has only 5-7
    full, gates = ga.unbind(0), ga[..., :3 * size].unbind(0)
    rank_cols, rz = ga[..., 3 * size:].unbind(0), ga[..., :2 * size].unbind(0)
    r, z, gh_n = ga[..., :size].unbind(0), ga[..., size:2 * size].unbind(0), ga[..., 2 * size:3 * size].unbind(0)
    cand, states = n.unbind(0), hs.unbind(0)
    for day in range(len(full)):
        full[day].addmm_(h, weight_t)
        if low_rank:  # each row keeps its own rank columns, then adds its own update
            gates[day].addmm_(rank_cols[day].mul_(mask), up_t)
        rz[day].sigmoid_()
        cand[day].addcmul_(r[day], gh_n[day]).tanh_()
        h = torch.lerp(cand[day], h, z[day], out=states[day])  # (1 - z) n + z h


class _GruLayer(torch.autograd.Function):
    """:func:`gru_layer`'s forward and backward (see module docstring)."""

    @staticmethod
    def forward(ctx, gi, h0, w_hh, b_hh, down, up_t, mask):  # noqa: D102
        ga, n, hs = _start(gi, h0, b_hh, down.shape[0])
        weight_t = torch.cat([w_hh, down]).t().contiguous()
        _forward_days(ga, n, hs, h0, weight_t, up_t, mask)
        ctx.save_for_backward(h0, w_hh, down, up_t, mask, ga, n, hs)
        return hs.transpose(0, 1), hs[-1]

    @staticmethod
    def backward(ctx, d_seq, d_last):  # noqa: D102
        h0, w_hh, down, up_t, mask, ga, n, hs = ctx.saved_tensors
        days, batch, size = hs.shape
        ranks = down.shape[0]
        h_prev = torch.cat([h0[None], hs[:-1]])
        r, z, gh_n = ga[..., :size], ga[..., size:2 * size], ga[..., 2 * size:3 * size]
        # d(pre-activation)/dh of every gate, for all days at once: the loop only scales them
        d_n = (1 - z) * (1 - n * n)  # n's pre-activation (its input part's gradient)
        coef = torch.stack([d_n * gh_n * r * (1 - r), (h_prev - n) * z * (1 - z), d_n * r], dim=2)
        dh = (d_seq.transpose(0, 1).clone() if d_seq is not None else hs.new_zeros(hs.shape))
        if d_last is not None:
            dh[-1] += d_last
        back = torch.cat([w_hh, up_t.t()], dim=1)  # [3H, H+R]: dgh -> dh_prev and the rank part
        dgh = hs.new_empty(days, batch, 3, size)
        dh_days, coef_days, dgh_days, z_days = dh.unbind(0), coef.unbind(0), dgh.unbind(0), z.unbind(0)
        carry = None
        for day in range(days - 1, -1, -1):
            if carry is not None:
                dh_days[day].add_(carry)
            d_gates = torch.mul(dh_days[day][:, None, :], coef_days[day], out=dgh_days[day]).view(batch, 3 * size)
            through = d_gates @ back
            carry = torch.addcmul(through[:, :size], dh_days[day], z_days[day])
            if ranks:
                carry = carry.addmm_(through[:, size:] * mask, down)
        flat = dgh.view(days * batch, 3 * size)
        prev = h_prev.reshape(days * batch, size)
        grads = [None] * 7
        if ctx.needs_input_grad[0]:
            grads[0] = torch.cat([dgh[:, :, :2].reshape(days, batch, 2 * size), dh * d_n], dim=-1).transpose(0, 1)
        grads[1] = carry if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            grads[2] = flat.t() @ prev
        if ctx.needs_input_grad[3]:
            grads[3] = flat.sum(0)
        if ranks and ctx.needs_input_grad[4]:
            grads[4] = ((dgh.view(days, batch, 3 * size) @ up_t.t()) * mask).reshape(-1, ranks).t() @ prev
        if ranks and ctx.needs_input_grad[5]:
            grads[5] = ga[..., 3 * size:].reshape(-1, ranks).t() @ flat
        return tuple(grads)
