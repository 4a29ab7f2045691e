"""AdapterBank: one frozen backbone, many site adapters, hot-swapped per request.

The bank loads adapters from a store folder (``<site>.safetensors``) on first use, checks each
against its backbone, and keeps them in an LRU cache bounded in bytes and/or count. Adapters added
from memory with :meth:`AdapterBank.add` are pinned: never evicted, and not counted against the
cache's bounds. How a batch runs:

* **one adapter (or none) on every row: merged.** LoRA is merged into the GRU weights
  (``W + up @ down``, microseconds at this size) and the backbone runs with them through
  :func:`torch.func.functional_call`, so torch's fused GRU kernel runs at the bare backbone's speed.
* **mixed batches**, by ``strategy``: ``batched`` (and ``auto``, the default) runs one pass with
  shared base matmuls and per-row low-rank deltas (:mod:`kgml_peft.tuners.rows`), measured faster
  than ``grouped`` from 2 adapters per batch up (docs/serving.md); ``grouped`` runs each adapter's
  rows merged, one group after another; ``naive`` runs every row on its own, single-adapter
  batches too (a baseline for ``kgml-peft bench``). Rows whose adapter replaces backbone weights
  always run grouped.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kgml_peft import schema
from kgml_peft.data.windows import Scalers, WindowDataset, YearWindows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.inference import PREDICTED, in_batches
from kgml_peft.model.outputs import physical
from kgml_peft.tuners.rows import forward_rows, plan_rows
from kgml_peft.serve.loading import serving_adapter
from kgml_peft.tuners.serving import ServingAdapter
from kgml_peft.store.adapter import Adapter, load_adapter
from kgml_peft.store.checkpoint import Backbone, load_backbone
from kgml_peft.store.library import adapter_path
from kgml_peft.uncertainty import INTERVAL_TARGETS

STRATEGIES: tuple[str, ...] = ("auto", "batched", "grouped", "naive")
#: outputs whose spread over an adapter's members :meth:`AdapterBank.predict_members` returns
SPREAD_OUTPUTS: tuple[str, ...] = INTERVAL_TARGETS


class AdapterBank:
    """Serve many adapters on one backbone (see module docstring).

    ``backbone`` is a :class:`Backbone` or a checkpoint path; ``store`` a folder of adapter files
    (or ``None`` for adapters added with :meth:`add` only). ``max_bytes`` bounds the tensor bytes
    of the adapters cached from the store, ``max_adapters`` their number (``None``: unbounded); the
    least recently used one is evicted first. The bank works on its own copy of the backbone's
    module, in eval mode on ``device``.
    """

    def __init__(self, backbone: Backbone | str | os.PathLike, store: str | os.PathLike | None = None,
                 *, max_bytes: int | None = 256 * 2**20, max_adapters: int | None = None,
                 device: str | torch.device = "cpu", strategy: str = "auto") -> None:
        self.device = torch.device(device)
        self.backbone = backbone if isinstance(backbone, Backbone) else load_backbone(backbone)
        # the bank's own copy: merged calls swap its weights while they run, so nobody else's
        # module may be touched (the copy is one backbone, ~0.2 MB)
        self.model = copy.deepcopy(self.backbone.model).to(self.device).eval()
        self.store = Path(store) if store is not None else None
        if self.store is not None and not self.store.is_dir():
            raise KgmlPeftError(f"adapter store {self.store} is not a folder")
        for name, value in (("max_bytes", max_bytes), ("max_adapters", max_adapters)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise KgmlPeftError(f"{name} must be a positive integer or None, got {value!r}")
        self.max_bytes, self.max_adapters = max_bytes, max_adapters
        self.strategy = _check_strategy(strategy)
        self._base = dict(self.model.named_parameters())
        self._cache: OrderedDict[str, ServingAdapter] = OrderedDict()
        self._pinned: dict[str, ServingAdapter] = {}
        self._bytes = {"cache": 0, "pinned": 0}  # tensor bytes resident, kept up to date
        self._lock = threading.RLock()
        self._run_lock = threading.Lock()
        self.stats = {"hits": 0, "loads": 0, "evictions": 0}

    # ---- the adapter cache -------------------------------------------------------------------

    def add(self, adapter: Adapter) -> ServingAdapter:
        """Check an in-memory adapter against the backbone and pin it under its site name."""
        served = serving_adapter(adapter, self.backbone, self.device)
        with self._lock:
            self._drop(served.name)
            self._pinned[served.name] = served
            self._bytes["pinned"] += served.nbytes
        return served

    def _drop(self, name: str) -> None:
        """Forget resident adapter ``name`` (cached or pinned), if any."""
        for kind, table in (("cache", self._cache), ("pinned", self._pinned)):
            old = table.pop(name, None)
            if old is not None:
                self._bytes[kind] -= old.nbytes

    def path(self, name: str) -> Path | None:
        """Where adapter ``name`` would be in the store (``None`` without a store)."""
        return adapter_path(self.store, name) if self.store is not None else None

    def has(self, name: str) -> bool:
        """Whether adapter ``name`` is resident or in the store (a name that is not a safe site
        id cannot be a file in the store: False)."""
        with self._lock:
            if name in self._pinned or name in self._cache:
                return True
        if self.store is None or not schema.SITE_ID_PATTERN.fullmatch(str(name)):
            return False
        # any entry counts, a broken one too (a FIFO, a dangling link): get() then says what is
        # wrong with it, rather than the backbone silently standing in for that adapter
        return os.path.lexists(self.path(name))

    def get(self, name: str) -> ServingAdapter:
        """Adapter ``name``, from the cache or loaded (and checked) from the store."""
        with self._lock:
            served = self._pinned.get(name)
            if served is None and name in self._cache:
                self._cache.move_to_end(name)
                served = self._cache[name]
            if served is not None:
                self.stats["hits"] += 1
                return served
        path = self.path(name)
        if path is None or not os.path.lexists(path):
            where = f"store {self.store}" if self.store is not None else "bank (no store)"
            raise KgmlPeftError(f"no adapter {name!r} in the {where}")
        served = serving_adapter(load_adapter(path), self.backbone, self.device)
        if served.name != name:
            raise KgmlPeftError(f"{path} holds the adapter of {served.name!r}, not {name!r}")
        with self._lock:
            if name in self._pinned:  # added meanwhile by another thread: that one wins
                return self._pinned[name]
            self._drop(name)  # or loaded meanwhile by another thread
            self._cache[name] = served
            self._bytes["cache"] += served.nbytes
            self.stats["loads"] += 1
            self._evict()
        return served

    def _evict(self) -> None:
        """Drop least recently used store adapters until the cache's bounds hold (the adapter
        just loaded stays, even if it alone exceeds ``max_bytes``)."""
        while len(self._cache) > 1 and (
                (self.max_adapters is not None and len(self._cache) > self.max_adapters)
                or (self.max_bytes is not None and self._bytes["cache"] > self.max_bytes)):
            self._bytes["cache"] -= self._cache.popitem(last=False)[1].nbytes
            self.stats["evictions"] += 1

    def resident(self) -> list[str]:
        """Names of resident adapters, pinned first, then least to most recently used."""
        with self._lock:
            return [*self._pinned, *self._cache]

    def memory_bytes(self) -> int:
        """Tensor bytes of every resident adapter (cached and pinned)."""
        with self._lock:
            return self._bytes["cache"] + self._bytes["pinned"]

    def clear(self) -> None:
        """Drop every cached store adapter (pinned ones stay)."""
        with self._lock:
            for name in list(self._cache):
                self._drop(name)

    def resolve(self, names: Sequence[str | None], require: bool = False) -> list[ServingAdapter | None]:
        """The adapter of each row name; ``None`` rows, and (unless ``require``) names without an
        adapter, get ``None`` (the bare backbone)."""
        found: dict[str, ServingAdapter | None] = {}
        for name in dict.fromkeys(n for n in names if n is not None):
            if require or self.has(name):
                found[name] = self.get(name)
            else:
                found[name] = None
        return [None if n is None else found[n] for n in names]

    # ---- prediction --------------------------------------------------------------------------

    def merged_parameters(self, name: str | None) -> dict[str, torch.Tensor]:
        """The backbone weights that adapter ``name`` changes, merged (empty for ``None``): what
        swapping to that adapter costs."""
        return {} if name is None else self.get(name).merged_parameters(self._base)

    def run_merged(self, x: torch.Tensor, adapter: ServingAdapter | None,
                   state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One adapter on every row of ``x`` (on the bank's device), LoRA merged into the GRU
        weights; no routing and no lock (:meth:`forward` is the thread-safe entry point)."""
        if adapter is None:
            return self.model(x, state)
        if adapter.member_weights is not None:
            raise KgmlPeftError(f"adapter {adapter.name} is a blend of {len(adapter.all_members)} members; "
                                "serve it through forward or predict")
        return adapter.forward(self.model, self._base, x, state)

    def _pieces(self, x: torch.Tensor, state: dict[str, torch.Tensor] | None, n_rows: int,
                pieces: list[tuple[list[int], Callable]]) -> dict[str, torch.Tensor]:
        """Run ``fn(x[index], state of index)`` for each ``(index, fn)`` and put the outputs back
        in row order."""
        out: dict[str, torch.Tensor] = {"state": {}}
        for index, fn in pieces:
            idx = torch.tensor(index, device=x.device)
            part = fn(x[idx], _rows_of(state, idx))
            for gru, h in part.pop("state").items():
                out["state"].setdefault(gru, h.new_empty((h.shape[0], n_rows, *h.shape[2:])))[:, idx] = h
            for key, value in part.items():
                out.setdefault(key, value.new_empty((n_rows, *value.shape[1:])))[idx] = value
        return out

    def _single_fn(self, adapter: ServingAdapter | None) -> Callable:
        return lambda x, state: self.run_merged(x, adapter, state)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, rows: Sequence[ServingAdapter | None],
                state: dict[str, torch.Tensor] | None = None,
                strategy: str | None = None, same_as: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Scaled outputs (as :meth:`KGMLag.forward`) for ``x`` [B, T, F] with ``rows[i]``'s
        adapter on row i (``None`` = bare backbone). ``same_as`` [B] may name for each row a row
        with the same inputs (see :func:`~kgml_peft.tuners.rows.forward_rows`; used by the batched
        strategy). Safe to call from several threads: calls run one at a time, because a merged
        call swaps the shared module's weights while it runs."""
        with self._run_lock:
            return self._forward(x, rows, state, strategy, same_as)

    def _forward(self, x: torch.Tensor, rows: Sequence[ServingAdapter | None],
                 state: dict[str, torch.Tensor] | None, strategy: str | None,
                 same_as: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        rows = list(rows)
        if len(rows) != x.shape[0]:
            raise KgmlPeftError(f"{len(rows)} row adapters for a batch of {x.shape[0]} rows")
        if any(a is not None and a.member_weights is not None for a in rows):
            # a blend's rows run each member, then take the weighted mean of their outputs
            if state is not None:
                raise KgmlPeftError("a blend adapter cannot continue GRU states from an earlier call")
            expanded = member_rows(rows, every_member=False)
            out = self._forward(x[expanded.owner.to(x.device)], expanded.rows, None, strategy,
                                expanded.same_as)
            return {**{k: expanded.pool(v) for k, v in out.items() if k != "state"}, "state": {}}
        strategy = _check_strategy(strategy or self.strategy)
        x = x.to(self.device)
        if state is not None:
            state = {k: v.to(self.device) for k, v in state.items()}
        if strategy == "naive":
            pieces = [([i], self._single_fn(a)) for i, a in enumerate(rows)]
            return self._pieces(x, state, len(rows), pieces)
        groups: dict[int, list[int]] = {}
        for i, adapter in enumerate(rows):
            groups.setdefault(id(adapter), []).append(i)
        if len(groups) == 1:
            return self.run_merged(x, rows[0], state)
        # adapters that replace backbone weights cannot share the base matmuls: always grouped
        special = [g for g in groups.values() if strategy == "grouped" or
                   (rows[g[0]] is not None and rows[g[0]].overrides)]
        if not special:
            return forward_rows(self.model, x, plan_rows(rows, x), state,
                                None if same_as is None else same_as.to(self.device))
        pieces = [(g, self._single_fn(rows[g[0]])) for g in special]
        common = sorted(i for g in groups.values() if g not in special for i in g)
        if common:
            plan = plan_rows([rows[i] for i in common], x)
            pieces.append((common, lambda xs, st: forward_rows(self.model, xs, plan, st)))
        return self._pieces(x, state, len(rows), pieces)

    def predict(self, x: torch.Tensor, site: str | None = None, sites: Sequence[str | None] | None = None,
                *, require: bool = True, state: dict[str, torch.Tensor] | None = None,
                strategy: str | None = None) -> dict[str, torch.Tensor]:
        """Physical-unit predictions (Ra, Rh, NEE, Reco in gC m-2 d-1 [B, T]; Yield t ha-1 [B])
        for scaled inputs ``x`` [B, T, F]: adapter ``site`` on every row, or ``sites[i]`` on row i
        (``None`` = bare backbone). Unknown names raise unless ``require`` is False (then the
        backbone serves them)."""
        if site is not None and sites is not None:
            raise KgmlPeftError("pass site or sites, not both")
        names = [site] * x.shape[0] if sites is None else list(sites)
        out = self.forward(x, self.resolve(names, require=require), state, strategy)
        phys = physical(out, self.backbone.scalers)
        return {name: phys[name] for name in PREDICTED}

    def predict_windows(self, windows: YearWindows, names: Sequence[str | None],
                        batch_size: int = 64, require: bool = True,
                        strategy: str | None = None, progress: bool = False) -> dict[str, np.ndarray]:
        """Like :func:`~kgml_peft.model.inference.predict_windows`, with adapter ``names[i]`` on
        window i (``None`` = bare backbone): Ra, Rh, NEE, Reco [N, 365] and Yield [N]."""
        if len(names) != len(windows):
            raise KgmlPeftError(f"{len(names)} adapter names for {len(windows)} windows")
        names = list(names)
        x = WindowDataset(windows, self.backbone.scalers).x

        def run(start: int, stop: int) -> dict[str, torch.Tensor]:
            rows = self.resolve(names[start:stop], require=require)  # per batch: the cache bounds hold
            out = physical(self.forward(x[start:stop], rows, strategy=strategy), self.backbone.scalers)
            return {name: out[name] for name in PREDICTED}

        out = in_batches(x, batch_size, run, progress=progress)
        # no windows: zero-length arrays of the right shapes
        return out or {name: np.zeros((0,) if name == "Yield" else (0, x.shape[1])) for name in PREDICTED}

    def predict_members(self, windows: YearWindows, names: Sequence[str | None], batch_size: int = 64,
                        strategy: str | None = None, progress: bool = False) -> dict[str, np.ndarray]:
        """Every member of adapter ``names[i]`` on window i, all in one mixed batch per
        ``batch_size`` windows (the per-row machinery: members are rows with their own adapter).
        Returns the point predictions (as :meth:`predict_windows`: member 1's, or a blend's
        weighted mean of its members') and ``<output>_spread``, the standard deviation over the
        window's members (0 for one member), of NEE and Reco [N, 365]."""
        if len(names) != len(windows):
            raise KgmlPeftError(f"{len(names)} adapter names for {len(windows)} windows")
        names = list(names)
        x = WindowDataset(windows, self.backbone.scalers).x

        def run(start: int, stop: int) -> dict[str, torch.Tensor]:
            expanded = member_rows(self.resolve(names[start:stop], require=True), every_member=True)
            index = expanded.owner
            phys = physical(self.forward(x[start:stop][index], expanded.rows, strategy=strategy,
                                         same_as=expanded.same_as), self.backbone.scalers)
            out = {name: expanded.pool(phys[name]) for name in PREDICTED}
            for name in SPREAD_OUTPUTS:
                out[f"{name}_spread"] = torch.stack([
                    phys[name][index == i].double().std(dim=0, correction=0) for i in range(stop - start)])
            return out

        out = in_batches(x, batch_size, run, progress=progress)
        return out or {name: np.zeros((0,) if name == "Yield" else (0, x.shape[1]))
                       for name in (*PREDICTED, *(f"{n}_spread" for n in SPREAD_OUTPUTS))}

    @property
    def scalers(self) -> Scalers:
        """The backbone's scalers (inputs and outputs)."""
        return self.backbone.scalers


@dataclass(frozen=True)
class MemberRows:
    """Windows laid out as one row per member (see :func:`member_rows`): each row's adapter, its
    window (``owner`` [R]), its share of the window's point prediction (``weight`` [R]) and the
    window's first row (``same_as`` [R], the rows that read the same inputs)."""

    rows: list[ServingAdapter | None]
    owner: torch.Tensor
    weight: torch.Tensor
    same_as: torch.Tensor
    windows: int

    def pool(self, values: torch.Tensor) -> torch.Tensor:
        """Each window's point prediction from its rows' ``values`` [R, ...]: the weighted sum
        (exactly member 1's values where the weights are 1, 0, ...)."""
        weight = self.weight.to(values.device, values.dtype).view(-1, *([1] * (values.dim() - 1)))
        out = values.new_zeros((self.windows, *values.shape[1:]))
        return out.index_add_(0, self.owner.to(values.device), values * weight)


def member_rows(adapters: Sequence[ServingAdapter | None], every_member: bool) -> MemberRows:
    """One row per member of each window's adapter: all members with ``every_member`` (intervals),
    else only blends' members (a blend's prediction is their weighted mean); other windows keep
    one row with weight 1. A blend's first member runs as a plain adapter (no weights)."""
    rows: list[ServingAdapter | None] = []
    owner: list[int] = []
    weight: list[float] = []
    same_as: list[int] = []
    plain: dict[int, ServingAdapter] = {}  # one weightless first member per blend: one row adapter
    for i, adapter in enumerate(adapters):
        members: tuple[ServingAdapter | None, ...] = (adapter,)
        shares: tuple[float, ...] = (1.0,)
        if adapter is not None and (every_member or adapter.member_weights is not None):
            first = adapter
            if adapter.member_weights is not None:
                first = plain.setdefault(id(adapter), replace(adapter, members=(), member_weights=None))
            members = (first, *adapter.members)
            shares = adapter.member_weights or (1.0,) + (0.0,) * len(adapter.members)
        same_as += [len(rows)] * len(members)
        rows += members
        owner += [i] * len(members)
        weight += shares
    return MemberRows(rows, torch.tensor(owner, dtype=torch.long), torch.tensor(weight, dtype=torch.float64),
                      torch.tensor(same_as, dtype=torch.long), len(adapters))


def _check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise KgmlPeftError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return strategy


def _rows_of(state: dict[str, torch.Tensor] | None, idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The hidden states of rows ``idx`` ([layers, B, H] tensors are indexed on dim 1)."""
    return None if state is None else {k: v[:, idx] for k, v in state.items()}
