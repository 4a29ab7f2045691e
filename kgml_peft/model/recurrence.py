"""A GRU layer's day loop with a hand-written backward pass, for where torch's GRU kernel is slow
or cannot be used.

Two places need it. A mixed batch (:mod:`kgml_peft.tuners.rows`) gives groups of rows their own
hidden-to-hidden weight (each adapter's LoRA merged in), which torch's GRU kernel (one weight for
all rows) cannot run. And on a CPU, training through torch's GRU records a dozen small autograd
nodes per day, whose bookkeeping costs more than the arithmetic at the batch sizes of a site
calibration (a few to a few dozen rows of 365 days).

:func:`gru_layer` runs the recurrence without recording a graph, five in-place ops per day on
buffers laid out day-major, and keeps what the backward pass needs. The backward pass
(:class:`_GruLayer`) walks the days back with four ops per day: every gate's derivative is the
incoming ``dh`` times a coefficient known from the forward values, so the coefficients of all days
are computed at once before the loop, and the weight gradients after it as one large matmul.
Nothing in torch or a well-kept library computes a GRU this way: ``torch.compile`` of the day cell
was measured slower than eager on a CPU (after 16 s of compiling) and torch's ``scan`` does not
compile here (``tools/recurrence_study.py``, docs/scaling.md). Gradients match finite
differences and autograd through torch's own GRU (tests/test_recurrence.py).

Where each way is faster was measured (docs/scaling.md) and is chosen by :func:`use_day_loop`;
:func:`strategy` forces one for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from kgml_peft.errors import KgmlPeftError
from kgml_peft.model import native

#: ``auto`` (the measured choice, see :func:`use_day_loop`), ``loop`` (always :func:`gru_layer`)
#: or ``kernel`` (torch's GRU wherever it can run)
STRATEGIES: tuple[str, ...] = ("auto", "loop", "kernel")
#: the way a ``with strategy(...)`` block set in this thread (None: the process default)
_strategy: contextvars.ContextVar[str | None] = contextvars.ContextVar("kgml_peft_gru_strategy", default=None)
#: the process default (``kgml-peft --gru``), which every thread sees
_default = "auto"


def _check(name: str) -> str:
    if name not in STRATEGIES:
        raise KgmlPeftError(f"unknown GRU strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return name


@contextlib.contextmanager
def strategy(name: str) -> Iterator[None]:
    """Within the block, in this thread, run plain GRUs (:class:`~kgml_peft.model.backbone.GRU`)
    the way ``name`` says (one of :data:`STRATEGIES`); mixed batches always take the day loop."""
    token = _strategy.set(_check(name))
    try:
        yield
    finally:
        _strategy.reset(token)


def set_default_strategy(name: str) -> None:
    """Make ``name`` the way of every thread of this process that does not choose its own.

    A process-level setting, made once at start (the CLI's ``--gru``, a spawned worker taking its
    parent's, see :func:`current_strategy`): switching it while other threads run GRUs changes
    their way mid-run. Code that wants its own way uses :func:`strategy`, which is per thread."""
    global _default
    _default = _check(name)


@contextlib.contextmanager
def default_strategy(name: str) -> Iterator[None]:
    """:func:`set_default_strategy` for the block, restored after it (same caveat)."""
    before = _default
    set_default_strategy(name)
    try:
        yield
    finally:
        set_default_strategy(before)


def current_strategy() -> str:
    """The way in force here: this thread's :func:`strategy` block, else the process default.
    A process started by this one (``experiment --jobs``) passes it on explicitly: the default
    is a module global and a spawned process starts from ``auto``."""
    return _strategy.get() or _default


#: Most rows for which ``auto`` trains through the day loop on a CPU: forward and backward of a
#: layer-year, milliseconds, loop against torch's kernel (tools/recurrence_study.py, one thread):
#: 8 rows 12.8 / 31.4, 17 rows 17.2 / 35.2, 64 rows 46-59 / 53-59 (even), 128 rows 78-103 / 83,
#: 256 rows 264 / 164. Per-op overhead, which the loop saves, matters less as rows grow.
LOOP_MAX_ROWS = 64


def use_day_loop(device: torch.device, needs_grad: bool, rows: int) -> bool:
    """Whether a plain GRU over a batch of ``rows`` runs :func:`gru_layer` rather than torch's
    kernel. ``auto`` takes the day loop where it was measured faster: training on a CPU with at
    most :data:`LOOP_MAX_ROWS` rows (a site calibration's batch of 8: 2.4x). Without gradients
    torch's kernel is about as fast (8 rows: 4.7 against 5.7 ms, 64 rows 13.7 against 13.1), and
    on a GPU cuDNN runs the whole year in one call."""
    chosen = current_strategy()
    if chosen != "auto":
        return chosen == "loop"
    return needs_grad and device.type == "cpu" and rows <= LOOP_MAX_ROWS


def gru_layer(gi: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor,
              b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer over the days of ``gi`` [B, T, 3H] (the input gates ``x W_ih^T + b_ih``, gate
    order r, z, n as torch's GRU) from start state ``h0`` [B, H]: (sequence [B, T, H], last state
    [B, H]), as torch's GRU computes them. ``w_hh`` is [3H, H], or [G, 3H, H] for G groups of
    B / G consecutive rows, each with its own hidden-to-hidden weight (the rows of a mixed batch
    grouped by adapter, see :mod:`kgml_peft.tuners.rows`). Differentiable in every tensor; half
    precision (autocast) runs in float32."""
    three, size = w_hh.shape[-2:]
    groups = w_hh.shape[0] if w_hh.dim() == 3 else 1
    if (gi.dim() != 3 or gi.shape[-1] != three or three != 3 * size or w_hh.dim() not in (2, 3)
            or gi.shape[0] % groups or tuple(h0.shape) != (gi.shape[0], size) or tuple(b_hh.shape) != (three,)):
        raise KgmlPeftError(f"gru_layer: input gates {list(gi.shape)}, start state {list(h0.shape)} and "
                            f"bias {list(b_hh.shape)} do not fit w_hh {list(w_hh.shape)}")
    dtype = torch.promote_types(gi.dtype, torch.float32)  # half precision runs in float32
    if gi.shape[1] == 0:
        return gi.new_zeros(gi.shape[0], 0, size, dtype=dtype), h0.to(dtype)
    with torch.autocast(gi.device.type, enabled=False):
        return _GruLayer.apply(*(t.to(dtype) for t in (gi, h0, w_hh, b_hh)))


def _start(gi: torch.Tensor, h0: torch.Tensor, b_hh: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The day loop's buffers, day-major: ``ga`` [T, B, 3H] holding each day's input gates with
    the hidden biases (r, z: ``gi + b_hh``; n: ``b_hh``), ``n`` [T, B, H] holding the input part
    of n, and an empty ``hs`` [T, B, H] for the states."""
    days, batch, three = gi.shape[1], gi.shape[0], gi.shape[2]
    size = three // 3
    gi_t = gi.transpose(0, 1)
    ga = gi.new_empty(days, batch, three)
    torch.add(gi_t[..., :2 * size], b_hh[:2 * size], out=ga[..., :2 * size])
    ga[..., 2 * size:] = b_hh[2 * size:]
    return ga, gi_t[..., 2 * size:].contiguous(), h0.new_empty(days, batch, size)


def _forward_days(ga: torch.Tensor, n: torch.Tensor, hs: torch.Tensor, h: torch.Tensor,
                  weight_t: torch.Tensor) -> None:
    """The day loop, in place on the buffers of :func:`_start`. On exit ``ga`` holds the gates
    ``sigmoid(r)``, ``sigmoid(z)`` and the hidden n pre-activation ``h W_hn^T + b_hn``; ``n``
    the candidate states; ``hs`` the states. ``weight_t`` is ``w_hh`` transposed: [H, 3H], or
    [G, H, 3H] per group of rows."""
    built = native.extension()
    if built is not None:  # the same calls from C++ (see kgml_peft.model.native)
        built.forward_days(ga, n, hs, h, weight_t)
        return
    size = hs.shape[-1]
    groups = weight_t.shape[0] if weight_t.dim() == 3 else 0
    # views made once: making a slice costs about as much as a small op, and a day has only five
    full = ga.view(len(ga), groups, -1, 3 * size).unbind(0) if groups else ga.unbind(0)
    rz = ga[..., :2 * size].unbind(0)
    r, z, gh_n = ga[..., :size].unbind(0), ga[..., size:2 * size].unbind(0), ga[..., 2 * size:].unbind(0)
    cand, states = n.unbind(0), hs.unbind(0)
    for day in range(len(rz)):
        if groups:  # each group of rows its own weight: one batched matmul
            full[day].baddbmm_(h.view(groups, -1, size), weight_t)
        else:
            full[day].addmm_(h, weight_t)
        rz[day].sigmoid_()
        cand[day].addcmul_(r[day], gh_n[day]).tanh_()
        h = torch.lerp(cand[day], h, z[day], out=states[day])  # (1 - z) n + z h


class _GruLayer(torch.autograd.Function):
    """:func:`gru_layer`'s forward and backward (see module docstring)."""

    @staticmethod
    def forward(ctx, gi: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor,
                b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        ga, n, hs = _start(gi, h0, b_hh)
        _forward_days(ga, n, hs, h0.contiguous(), w_hh.transpose(-1, -2).contiguous())
        ctx.save_for_backward(h0, w_hh, ga, n, hs)
        return hs.transpose(0, 1), hs[-1]

    @staticmethod
    @once_differentiable  # the backward is itself not differentiable (no double backward)
    def backward(ctx, d_seq: torch.Tensor | None,
                 d_last: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        h0, w_hh, ga, n, hs = ctx.saved_tensors
        days, batch, size = hs.shape
        groups = w_hh.shape[0] if w_hh.dim() == 3 else 0
        h_prev = torch.cat([h0[None], hs[:-1]])
        r, z, gh_n = ga[..., :size], ga[..., size:2 * size], ga[..., 2 * size:]
        # d(pre-activation)/dh of every gate, for all days at once: the loop only scales them
        d_n = (1 - z) * (1 - n * n)  # n's pre-activation (its input part's gradient)
        coef = torch.stack([d_n * gh_n * r * (1 - r), (h_prev - n) * z * (1 - z), d_n * r], dim=2)
        dh = d_seq.transpose(0, 1).clone() if d_seq is not None else hs.new_zeros(hs.shape)
        if d_last is not None:
            dh[-1] += d_last
        dgh = hs.new_empty(days, batch, 3, size)
        carry = _backward_days(dh, coef, dgh, z, w_hh)
        grads: list[torch.Tensor | None] = [None] * 4
        grads[1] = carry if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            if groups:  # per group: sum over its rows and all days; rows of a group made adjacent
                # with their gates last, so the transposed operand is a flag to bmm, not a copy
                per_group = dgh.view(days, groups, -1, 3 * size).transpose(0, 1).reshape(groups, -1, 3 * size)
                h_group = h_prev.view(days, groups, -1, size).transpose(0, 1).reshape(groups, -1, size)
                grads[2] = torch.bmm(per_group.transpose(1, 2), h_group)
            else:
                grads[2] = dgh.view(-1, 3 * size).t() @ h_prev.reshape(-1, size)
        if ctx.needs_input_grad[3]:
            grads[3] = dgh.view(-1, 3 * size).sum(0)
        if ctx.needs_input_grad[0]:
            # r and z take the same gradient as their hidden parts; n's input part lacks the factor
            # r, so its slot is overwritten (last: the weight and bias gradients above read it)
            torch.mul(dh, d_n, out=dgh[:, :, 2])
            grads[0] = dgh.view(days, batch, 3 * size).transpose(0, 1)
        return tuple(grads)


def _backward_days(dh: torch.Tensor, coef: torch.Tensor, dgh: torch.Tensor, z: torch.Tensor,
                   w_hh: torch.Tensor) -> torch.Tensor:
    """The backward pass's day loop, last day first: fills ``dgh`` [T, B, 3, H] with each day's
    gate gradients ``dh * coef`` (``dh`` [T, B, H] gains the gradient carried from the next day,
    in place) and returns the gradient of the start state. ``z`` [T, B, H] are the update gates,
    ``w_hh`` [3H, H] or [G, 3H, H]."""
    built = native.extension()
    if built is not None:  # the same calls from C++ (see kgml_peft.model.native)
        return built.backward_days(dh, coef, dgh, z, w_hh)
    batch, size = dh.shape[1:]
    groups = w_hh.shape[0] if w_hh.dim() == 3 else 0
    dh_days, coef_days, dgh_days, z_days = dh.unbind(0), coef.unbind(0), dgh.unbind(0), z.unbind(0)
    carry = None
    for day in range(len(dh_days) - 1, -1, -1):
        if carry is not None:
            dh_days[day].add_(carry)
        d_gates = torch.mul(dh_days[day][:, None, :], coef_days[day], out=dgh_days[day])
        if groups:
            through = torch.bmm(d_gates.view(groups, -1, 3 * size), w_hh).view(batch, size)
        else:
            through = d_gates.view(batch, 3 * size) @ w_hh
        carry = torch.addcmul(through, dh_days[day], z_days[day])
    return carry
