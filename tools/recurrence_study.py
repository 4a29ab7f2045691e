"""How fast each way of running one GRU layer over a year is, side by side in one run.

    python tools/recurrence_study.py --threads 1 [--compile]

Times one GRU layer (hidden 32, 40 input features, 365 days) forward + backward and forward
without gradients at several batch sizes: torch's kernel (``nn.GRU``), the day loop of
:mod:`kgml_peft.model.recurrence`, and the loop with a hidden-to-hidden weight per group of
rows (8 groups, as a mixed batch of 8 sites has); the loop's days run from C++
(:mod:`kgml_peft.model.native`, where it builds) and, as ``*_python``, from Python (the same
ops, the same bits). With
``--compile`` it also times ``torch.compile`` of one day's cell (its compile time separately)
and tries ``torch.compile`` of the whole year with torch's ``scan``. Prints JSON: milliseconds per
layer-year (median of ``--repeats``), and the largest difference of the loop's outputs from
the kernel's. These figures choose :func:`~kgml_peft.model.recurrence.use_day_loop`'s ``auto``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from kgml_peft.model import native
from kgml_peft.model.backbone import GRU
from kgml_peft.model.recurrence import gru_layer, strategy

DAYS, FEATURES, HIDDEN, ADAPTERS = 365, 40, 32, 8


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 2)


def _case(batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    gru = GRU(FEATURES, HIDDEN, batch_first=True)
    x = torch.randn(batch, DAYS, FEATURES)
    weight = torch.randn(batch, DAYS, HIDDEN)
    groups = ADAPTERS if batch % ADAPTERS == 0 else 1
    grouped = (gru.weight_hh_l0.detach() + 0.01 * torch.randn(groups, 3 * HIDDEN, HIDDEN)).requires_grad_()

    def plain(name: str, grad: bool, compiled: bool = True) -> Callable[[], object]:
        def run():
            with strategy(name), torch.set_grad_enabled(grad), native.enabled(compiled):
                seq, _ = gru(x)
                if grad:
                    (seq * weight).sum().backward()
        return run

    def per_group(grad: bool, compiled: bool = True) -> Callable[[], object]:
        def run():
            with torch.set_grad_enabled(grad), native.enabled(compiled):
                gi = F.linear(x, gru.weight_ih_l0, gru.bias_ih_l0)
                seq, _ = gru_layer(gi, x.new_zeros(batch, HIDDEN), grouped, gru.bias_hh_l0)
                if grad:
                    (seq * weight).sum().backward()
        return run

    with torch.no_grad(), strategy("loop"):
        loop_out = gru(x)[0]
    with torch.no_grad(), strategy("kernel"):
        kernel_out = gru(x)[0]

    def ways(grad: bool) -> dict[str, float]:
        timed = {"kernel": plain("kernel", grad), "loop": plain("loop", grad),
                 "loop_per_group": per_group(grad)}
        if native.status().available:  # else "loop" already is the Python loop
            timed.update(loop_python=plain("loop", grad, False), loop_per_group_python=per_group(grad, False))
        return {name: _median_ms(fn, repeats) for name, fn in timed.items()}

    return {
        "batch": batch, "groups": groups,
        "train_ms": ways(True),
        "no_grad_ms": ways(False),
        "max_abs_difference_loop_vs_kernel": float((loop_out - kernel_out).abs().max()),
    }


def _compiled(batch: int, repeats: int) -> dict:
    """torch.compile of one day's cell (called 365 times) and of the year with torch's scan."""
    torch.manual_seed(0)
    gru = GRU(FEATURES, HIDDEN, batch_first=True)
    w_hh, b_hh = gru.weight_hh_l0.detach(), gru.bias_hh_l0.detach()
    gi = F.linear(torch.randn(batch, DAYS, FEATURES), gru.weight_ih_l0, gru.bias_ih_l0).detach()

    def cell(h, gates):
        hidden = F.linear(h, w_hh, b_hh)
        r, z = torch.sigmoid(hidden[:, :2 * HIDDEN] + gates[:, :2 * HIDDEN]).chunk(2, dim=1)
        n = torch.tanh(gates[:, 2 * HIDDEN:] + r * hidden[:, 2 * HIDDEN:])
        return torch.lerp(n, h, z)

    compiled = torch.compile(cell, dynamic=False)
    h0 = gi.new_zeros(batch, HIDDEN)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(h0, gi[:, 0])
    compile_s = time.perf_counter() - start

    def year(fn):
        def run():
            with torch.no_grad():
                h = h0
                for day in range(DAYS):
                    h = fn(h, gi[:, day])
        return run

    result = {"batch": batch, "cell_compile_s": round(compile_s, 1),
              "no_grad_ms": {"eager_cell": _median_ms(year(cell), repeats),
                             "compiled_cell": _median_ms(year(compiled), repeats),
                             "loop": _median_ms(lambda: gru_layer(gi, h0, w_hh, b_hh), repeats)}}
    try:
        from torch._higher_order_ops.scan import scan

        def body(h, gates):
            h = cell(h, gates)
            return h, h.clone()

        scanned = torch.compile(lambda g: scan(body, h0, g), dynamic=False)
        with torch.no_grad():
            scanned(gi.transpose(0, 1).contiguous())
        result["scan"] = "compiled"
    except Exception as exc:  # a prototype API: report how it fails, do not stop the study
        result["scan"] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,8,17,64,256", help="comma-separated batch sizes")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (tens of seconds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    loops = native.status()
    report = {"machine": {"torch": torch.__version__, "threads": args.threads, "platform": platform.platform()},
              "native_loop": {"available": loops.available, "reason": loops.reason},
              "layer": {"days": DAYS, "features": FEATURES, "hidden": HIDDEN, "adapters": ADAPTERS},
              "cases": [_case(b, args.repeats) for b in batches]}
    if args.compile:
        report["compile"] = _compiled(8, args.repeats)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
