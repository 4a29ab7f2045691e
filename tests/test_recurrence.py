"""The hand-written GRU day loop (kgml_peft.model.recurrence) against independent references:
finite differences (gradcheck, float64) and torch's own GRU kernel (outputs and gradients), with
and without per-row low-rank updates, alone, inside the backbone and under peft's LoRA."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import GRU, BackboneConfig, build_backbone
from kgml_peft.model.recurrence import gru_layer, strategy, use_day_loop
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.tuners.rows import RowLora, gru_rows
from kgml_peft.tuners.site_model import SiteModel


def _small(dtype=torch.float64, batch=4, days=6, size=3, groups=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()  # noqa: E731
    return (make(batch, days, 3 * size), make(batch, size), make(3 * size, size), make(3 * size),
            make(groups, 3 * size, size))


def test_gradients_match_finite_differences_with_shared_and_grouped_weights():
    gi, h0, w, b, grouped = _small()
    assert torch.autograd.gradcheck(gru_layer, (gi, h0, w, b))
    assert torch.autograd.gradcheck(gru_layer, (gi, h0, grouped, b))


def test_each_group_of_rows_runs_its_own_weight_as_torch_gru_does():
    gi, h0, _, b, grouped = _small(batch=6, days=9, groups=3)
    seq, last = gru_layer(gi, h0, grouped, b)
    for row in range(len(gi)):
        ref = _gru_on_gates(grouped[row // 2], b, gi[row:row + 1], h0[row:row + 1])
        torch.testing.assert_close(seq[row:row + 1], ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(last[row], ref[0, -1], rtol=1e-10, atol=1e-10)


def _gru_on_gates(w_hh: torch.Tensor, b_hh: torch.Tensor, gi: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """torch's GRU cell (torch.gru_cell) stepped over precomputed input gates (w_ih = identity)."""
    eye = torch.eye(gi.shape[-1], dtype=gi.dtype)
    h, out = h0, []
    for day in range(gi.shape[1]):
        h = torch.gru_cell(gi[:, day], h, eye, w_hh, None, b_hh)
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("adapters", [[0, 1, 0, 2, 2, 2, 2, 0, None], [1] * 20 + [0], [0, 0, 1, 1]])
def test_mixed_rows_in_any_order_equal_torch_gru_with_each_rows_merged_weight(adapters):
    """tuners.rows groups a mixed batch's rows by adapter (unbalanced groups, interleaved rows,
    rows without an adapter); every row equals torch's GRU cell with ``W + up diag(mask) down``,
    and the LoRA factors get the gradients of that reference."""
    torch.manual_seed(4)
    gru = torch.nn.GRU(5, 3, batch_first=True).double()
    ranks = (1, 2, 1)  # adapters of different ranks mix
    down = torch.randn(sum(ranks), 3, dtype=torch.float64, requires_grad=True)
    up_t = torch.randn(sum(ranks), 9, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(len(adapters), sum(ranks), dtype=torch.float64)
    for row, adapter in enumerate(adapters):
        if adapter is not None:
            mask[row, sum(ranks[:adapter]):sum(ranks[:adapter + 1])] = 1
    x = torch.randn(len(adapters), 7, 5, dtype=torch.float64)
    [(seq, last)] = gru_rows([gru], x, [None], [{"weight_hh_l0": RowLora(down, up_t, mask)}])
    weight = torch.randn_like(seq)
    grads = torch.autograd.grad((seq * weight).sum() + last.sum(), (down, up_t))
    refs = []
    for row in range(len(adapters)):
        merged = gru.weight_hh_l0 + (up_t.t() * mask[row]) @ down
        gi = torch.nn.functional.linear(x[row:row + 1], gru.weight_ih_l0, gru.bias_ih_l0)
        refs.append(_gru_on_gates(merged, gru.bias_hh_l0, gi, x.new_zeros(1, 3)))
    ref = torch.cat(refs)
    torch.testing.assert_close(seq, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last[0], ref[:, -1], rtol=1e-10, atol=1e-10)
    ref_grads = torch.autograd.grad((ref * weight).sum() + ref[:, -1].sum(), (down, up_t))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def _two_layer(dropout: float = 0.0) -> GRU:
    torch.manual_seed(3)
    return GRU(5, 4, num_layers=2, batch_first=True, dropout=dropout)


@pytest.mark.parametrize("with_state", [False, True])
def test_backbone_gru_loop_equals_torch_kernel_outputs_and_gradients(with_state):
    gru = _two_layer()
    x = torch.randn(3, 40, 5, requires_grad=True)
    h0 = torch.randn(2, 3, 4, requires_grad=True) if with_state else None
    weight = torch.randn(3, 40, 4)

    def run(name: str):
        for p in [*gru.parameters(), x, *([h0] if with_state else [])]:
            p.grad = None
        with strategy(name):
            seq, last = gru(x, h0)
        ((seq * weight).sum() + last.square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in gru.named_parameters()}
        grads["x"] = x.grad.clone()
        if with_state:
            grads["h0"] = h0.grad.clone()
        return seq.detach(), last.detach(), grads

    seq_loop, last_loop, grads_loop = run("loop")
    seq_kernel, last_kernel, grads_kernel = run("kernel")
    torch.testing.assert_close(seq_loop, seq_kernel, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last_loop, last_kernel, rtol=1e-5, atol=1e-6)
    assert grads_loop.keys() == grads_kernel.keys()
    for name in grads_kernel:
        torch.testing.assert_close(grads_loop[name], grads_kernel[name], rtol=1e-4, atol=1e-5, msg=name)


def test_dropout_between_layers_only_in_training_mode():
    gru = _two_layer(dropout=0.5)
    x = torch.randn(2, 30, 5, requires_grad=True)  # requires grad: auto takes the loop on a CPU
    with strategy("loop"):
        gru.train()
        first = [gru(x)[0].detach() for _ in range(2)]
        gru.eval()
        plain = gru(x)[0].detach()
    assert not torch.equal(first[0], first[1])
    with strategy("kernel"):
        torch.testing.assert_close(gru(x)[0].detach(), plain, rtol=1e-5, atol=1e-6)


def test_peft_lora_gradients_are_the_same_through_either_way():
    """peft injects LoRA as a parametrization of the GRU weights; the loop reads them as
    attributes, so LoRA A and B get the same gradients as through torch's kernel."""
    backbone = build_backbone(BackboneConfig(hidden_size=8, attention_size=4, yield_hidden=4, dropout=0.0), seed=1)
    model = SiteModel(backbone, AdapterConfig(lora_weights=("ih", "hh"), lora_rank=2), seed=2)
    with torch.no_grad():
        for param in model.adapter_parameters().values():
            param.add_(torch.randn_like(param) * 0.1)  # a trained-looking adapter, not the identity start
    x = torch.randn(2, 20, len(backbone.config.features))

    def grads(name: str) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with strategy(name):
            out = model(x)
        (out["NEE"].square().mean() + out["Ra"].mean() + out["Yield"].sum()).backward()
        return {k: p.grad.clone() for k, p in model.adapter_parameters().items() if p.grad is not None}

    loop, kernel = grads("loop"), grads("kernel")
    assert any(k.startswith("lora.") and k.endswith(".A") for k in kernel)
    assert loop.keys() == kernel.keys()
    for key in kernel:
        assert kernel[key].abs().max() > 0, key
        torch.testing.assert_close(loop[key], kernel[key], rtol=1e-4, atol=1e-6, msg=key)


def test_auto_chooses_the_loop_for_cpu_training_of_few_rows_only_and_strategy_is_checked():
    from kgml_peft.model.recurrence import LOOP_MAX_ROWS

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_day_loop(cpu, needs_grad=True, rows=8)
    assert use_day_loop(cpu, needs_grad=True, rows=LOOP_MAX_ROWS)
    assert not use_day_loop(cpu, needs_grad=True, rows=LOOP_MAX_ROWS + 1)
    assert not use_day_loop(cpu, needs_grad=False, rows=8)
    assert not use_day_loop(cuda, needs_grad=True, rows=8)
    with strategy("kernel"):
        assert not use_day_loop(cpu, needs_grad=True, rows=8)
    with strategy("loop"):
        assert use_day_loop(cuda, needs_grad=False, rows=1000)
    with pytest.raises(KgmlPeftError, match="unknown GRU strategy 'fast'"):
        with strategy("fast"):
            pass
    assert use_day_loop(cpu, needs_grad=True, rows=8)  # put back after the error


def test_half_precision_runs_in_float32_and_bad_shapes_are_refused():
    gi, h0, w, b, grouped = _small(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq, last = gru_layer(F.linear(gi, torch.eye(9)), h0, w, b)
    assert seq.dtype == last.dtype == torch.float32
    ref, _ = gru_layer(gi, h0, w, b)
    torch.testing.assert_close(seq, ref, rtol=0.05, atol=0.05)  # bf16 only in the projection
    empty, start = gru_layer(gi[:, :0], h0, w, b)
    assert empty.shape == (4, 0, 3) and torch.equal(start, h0)
    for bad in [(gi[..., :6], h0, w, b), (gi, h0[:3], w, b), (gi[:3], h0[:3], grouped, b), (gi, h0, w, b[:6])]:
        with pytest.raises(KgmlPeftError, match="do not fit"):
            gru_layer(*bad)


def test_recurrence_study_tool_times_every_way_and_checks_they_agree():
    """tools/recurrence_study.py (the figures behind ``auto``) runs and reports every way."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "tools" / "recurrence_study.py"), "--batches", "2,8",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [case["batch"] for case in report["cases"]] == [2, 8]
    assert [case["groups"] for case in report["cases"]] == [1, 8]
    for case in report["cases"]:
        for kind in ("train_ms", "no_grad_ms"):
            both = {"loop_python", "loop_per_group_python"} if report["native_loop"]["available"] else set()
            assert set(case[kind]) == {"kernel", "loop", "loop_per_group"} | both
            assert all(value > 0 for value in case[kind].values())
        assert case["max_abs_difference_loop_vs_kernel"] < 1e-5


def test_grus_sharing_an_input_give_the_same_rows_in_one_loop_or_apart(monkeypatch):
    """Up to SHARED_LOOP_ROWS rows two GRUs reading one input share a block-diagonal loop, above
    it they run apart: the same outputs and LoRA gradients either way."""
    from kgml_peft.tuners import rows as rows_module

    torch.manual_seed(5)
    grus = [torch.nn.GRU(4, 3, batch_first=True), torch.nn.GRU(4, 3, num_layers=2, batch_first=True)]
    x = torch.randn(8, 12, 4)
    down = torch.randn(2, 3, requires_grad=True)
    up_t = torch.randn(2, 9, requires_grad=True)
    mask = torch.zeros(8, 2)
    mask[:3, 0] = 1
    mask[3:, 1] = 1
    calls = []
    real_recur = rows_module._recur
    monkeypatch.setattr(rows_module, "_recur", lambda layers: calls.append(len(layers)) or real_recur(layers))

    def run(limit: int):
        monkeypatch.setattr(rows_module, "SHARED_LOOP_ROWS", limit)
        lora = {"weight_hh_l0": RowLora(down, up_t, mask)}
        out = gru_rows(grus, x, [None, None], [lora, dict(lora)])
        seqs = torch.cat([seq for seq, _ in out], -1)
        return seqs, torch.autograd.grad(seqs.square().sum(), (down, up_t))

    shared, shared_grads = run(16)
    assert calls == [2, 1]  # first layers together, gru_rh's second layer alone
    calls.clear()
    apart, apart_grads = run(7)
    assert calls == [1, 1, 1]
    torch.testing.assert_close(shared, apart, rtol=1e-5, atol=1e-6)
    for got, want in zip(shared_grads, apart_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_grouping_of_rows_against_a_plain_reference():
    """``_group_rows`` (tensor ops) against the definition: every row in exactly one slot of a run
    of its own group, runs of one size that minimises slots + runs, spare slots holding a row of
    the run's group, groups in order of their first row; and an empty batch."""
    from kgml_peft.tuners.rows import _group_rows

    empty = _group_rows(torch.zeros(0, 3))
    assert empty.in_place and len(empty.order) == len(empty.position) == 0
    gen = torch.Generator().manual_seed(3)
    for trial in range(60):
        batch = int(torch.randint(1, 70, (1,), generator=gen))
        keys = torch.randint(0, int(torch.randint(1, 9, (1,), generator=gen)), (batch, 2), generator=gen).float()
        if trial % 4 == 0:
            keys = keys.sort(0).values
        groups = _group_rows(keys)
        members: dict[tuple, list[int]] = {}
        for row, key in enumerate(map(tuple, keys.tolist())):
            members.setdefault(key, []).append(row)
        counts = [len(rows) for rows in members.values()]  # dict order = order of first rows
        cost = {s: sum(-(-c // s) for c in counts) * (s + 1) for s in range(1, max(counts) + 1)}
        size = len(groups.order) // len(groups.chunk_group)
        assert cost[size] == min(cost.values()) and size == min(s for s in cost if cost[s] == cost[size])
        assert torch.equal(groups.order[groups.position], torch.arange(batch))
        assert groups.representative.tolist() == [rows[0] for rows in members.values()]
        for chunk, group in enumerate(groups.chunk_group.tolist()):
            slots = groups.order[chunk * size:(chunk + 1) * size]
            assert set(slots.tolist()) <= set(list(members.values())[group])
        assert groups.in_place == (groups.order.tolist() == list(range(batch)))


def test_zero_days_half_precision_bias_free_and_bias_only_training():
    """Edge cases: a year of no days comes back in float32 like any other; a GRU without biases
    runs torch's kernel; training only the biases still takes the loop (and matches the kernel)."""
    gi = torch.zeros(2, 0, 9, dtype=torch.bfloat16)
    seq, last = gru_layer(gi, torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(9, 3), torch.zeros(9))
    assert seq.shape == (2, 0, 3) and seq.dtype == last.dtype == torch.float32
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4)
    plain = torch.nn.GRU(4, 5, 2, batch_first=True, bias=False)
    ours = GRU(4, 5, 2, batch_first=True, bias=False)
    ours.load_state_dict(plain.state_dict())
    with strategy("loop"):
        torch.testing.assert_close(ours(x)[0], plain(x)[0], rtol=0, atol=0)  # the kernel itself
    gru = GRU(4, 5, 2, batch_first=True)
    for name, p in gru.named_parameters():
        p.requires_grad_(name.startswith("bias"))
    grads = {}
    for way in ("auto", "kernel"):
        gru.zero_grad()
        with strategy(way):
            seq, _ = gru(x)
        # bias gradients are gradients: under auto the loop's backward runs
        assert ("_GruLayer" in type(seq.grad_fn).__name__) == (way == "auto")
        seq.square().sum().backward()
        grads[way] = [p.grad.clone() for p in gru.parameters() if p.requires_grad]
    for a, b in zip(grads["auto"], grads["kernel"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_spawned_experiment_workers_run_the_parents_gru_strategy(tmp_path):
    """``experiment --jobs N`` starts spawned processes, which would begin from ``auto``: the
    parent's way (``kgml-peft --gru``) is passed to them."""
    from types import SimpleNamespace

    from kgml_peft.experiments.pipeline import execute_runs
    from kgml_peft.model.recurrence import default_strategy

    runs = [SimpleNamespace(key=str(tmp_path / f"run{i}")) for i in range(2)]
    with default_strategy("kernel"):
        execute_runs(None, StrategyRecorder, runs[:1], runs[1:], jobs=2, progress=False)
    assert [open(r.key).read() for r in runs] == ["kernel", "kernel"]


class StrategyRecorder:
    """An experiment stand-in for :func:`execute_runs`: writes the GRU way it runs under to the
    file its run names (module level, so spawned workers can import it)."""

    def execute(self, run) -> None:
        from kgml_peft.model.recurrence import current_strategy

        with open(run.key, "w") as handle:
            handle.write(current_strategy())
