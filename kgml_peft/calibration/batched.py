"""Calibrating several units in one pass over the frozen backbone (``calibrate --batch-sites K``).

One unit after another pays the backbone's per-step cost once per unit, and a site with a few
years fills a mini-batch of a handful of rows, so on a CPU most of a step is per-operation
overhead, not arithmetic. Here K units train side by side:

* every step stacks each unit's next mini-batch (its own loader, shuffled with the config's seed as
  in a run of its own) into one batch and runs the frozen backbone once, each row with its own
  unit's adapter: every component's parts stacked per row (:mod:`kgml_peft.tuners.rows`), laid
  out from the units' trainable tensors so that gradients flow back to them;
* the loss is the sum of the units' own objectives (L_pred + lambda L_phys (+ response) + rho
  ||phi||^2, each on its own rows). The units' tensors are disjoint, so each receives the gradient
  of its own objective;
* one Adam with a parameter group per unit is stepped only for the units in the step (the others
  have no gradient and are skipped), so every unit keeps its own moments, step count and cosine
  schedule;
* after every epoch each unit is validated, checked for divergence and early-stopped on its own;
  a stopped unit leaves the batch. Each unit ends with its best epoch's tensors, measured and
  summarised by the same code as a unit calibrated alone.

What differs from one unit at a time: the backbone's dropout masks are drawn for the stacked batch,
so a unit's result depends on the units it was calibrated with (the same units, config and seed
give the same tensors), and the adapter records them. Units whose adapters replace backbone
weights (``unfreeze``) and the ``full``/``scratch`` methods cannot share a pass. Per-epoch training
states are not written: an interrupted ``--resume`` reruns unfinished groups from the start.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from kgml_peft.calibration.single import calibrate_alone
from kgml_peft.calibration.units import CalibrationData, CalibrationResult, finish_unit, validation_metrics
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.prior import prior_tensors
from kgml_peft.tuners.site_model import SiteModel
from kgml_peft.data.windows import WindowDataset, YearWindows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.outputs import physical, scaled_targets
from kgml_peft.tuners.base import adapter_shapes
from kgml_peft.tuners.rows import forward_rows, plan_rows
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.tuners.serving import ServingAdapter
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.train.loop import Member, check_finite, deterministic_algorithms, fit, make_accelerator, weighted_mse
from kgml_peft.train.objectives import (anchor_distance, output_loss, response_loss, responses, squared_norm,
                                        target_errors)
from kgml_peft.train.state import PhaseResult


#: validation rows per forward pass (all units' held-out years together)
VAL_ROWS = 256


@dataclass
class _Unit:
    """One unit of a batched run: its data, trainable tensors, loader and its place in the
    training loop (a :class:`~kgml_peft.train.loop.Member`: steps, early stopping, best tensors)."""

    data: CalibrationData
    tensors: dict[str, torch.nn.Parameter]
    loader: DataLoader
    val: WindowDataset
    total_steps: int
    member: Member
    adapter: AdapterConfig
    #: a neighbour prior's tensors, which rho pulls towards (None: towards zero)
    anchor: dict[str, torch.Tensor] | None = None
    #: its parameter group in the optimizer (its learning rate is set there before each step)
    group: dict = field(default_factory=dict)

    def layout(self, config: CalibrationConfig) -> ServingAdapter:
        """The unit's current adapter in the layout a mixed batch takes (gradients flow)."""
        return ServingAdapter.from_tensors(self.data.name, self.tensors, self.adapter)


def _rows_model(backbone: torch.nn.Module, adapters: Sequence[ServingAdapter], like: torch.Tensor):
    """``x -> outputs``: the backbone with row i of ``x`` running ``adapters[i]``; the adapters are
    stacked once (``like``: dtype and device), however often the model is called."""
    plan = plan_rows(list(adapters), like=like)

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return forward_rows(backbone, x, plan)

    return forward


def _stack(parts: Sequence[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}


def _slice(tensors: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in tensors.items() if k != "state"}


def calibrate_batched(
    backbone: Backbone,
    units: Sequence[CalibrationData],
    config: CalibrationConfig,
    *,
    cpu: bool = False,
    progress: bool = True,
    local: bool = False,
) -> list[CalibrationResult]:
    """Calibrate the prepared ``units`` (see :func:`~kgml_peft.calibration.units.prepare_unit`)
    side by side in one process (see module docstring); results in the order of ``units``. A
    single unit is calibrated on its own, exactly as without batching (``local``: as one of
    several processes' own units, see :func:`~kgml_peft.calibration.single.calibrate_alone`;
    a batched group is always this process's own). :func:`~kgml_peft.calibration.runs.run_calibration`
    sends single units to ``calibrate_unit`` itself, with their per-epoch training state."""
    if config.method != "adapter" or config.unfreeze:  # CalibrationConfig(batch_sites > 1) refuses these
        raise KgmlPeftError("batched calibration needs the adapter method without unfreeze")
    if config.cv == "folds" and len(units) > 1:
        raise KgmlPeftError("batched calibration trains plain units (cv none); a cross-validated unit "
                            "already trains its folds side by side: calibrate it with calibrate_unit")
    if len(units) < 2:  # nothing to share a pass with: a unit of its own runs torch's fused GRUs
        return [calibrate_alone(backbone, unit, config, cpu=cpu, progress=progress, local=local)
                for unit in units]
    with deterministic_algorithms():
        set_seed(config.seed, deterministic=True)
        return _calibrate_batched(backbone, list(units), config, cpu=cpu, progress=progress)


def _calibrate_batched(backbone: Backbone, data: list[CalibrationData], config: CalibrationConfig, *,
                       cpu: bool, progress: bool) -> list[CalibrationResult]:
    befores = [validation_metrics(backbone.model, backbone, d.val, d.weights, config.tolerance) for d in data]
    trained = train_side_by_side(backbone, data, config, cpu=cpu, progress=progress)
    results = []
    for unit, before in zip(trained, befores):
        model = SiteModel(backbone.model, config.adapter, seed=config.seed)
        model.load_adapter_tensors(unit.best)
        provenance = {"batched_with": [d.name for d in data]}
        results.append(finish_unit(backbone, unit.data, config, model.eval(), unit.result, before,
                                   provenance))
    return results


@dataclass
class TrainedUnit:
    """One unit after :func:`train_side_by_side`: its curve and step count, its best tensors, and
    (when asked for) its tensors after every epoch it ran (``history[0]`` = the start)."""

    data: CalibrationData
    result: PhaseResult
    best: dict[str, torch.Tensor]
    history: list[dict[str, torch.Tensor]] = field(default_factory=list)


def train_side_by_side(backbone: Backbone, data: Sequence[CalibrationData], config: CalibrationConfig, *,
                       adapters: Sequence[AdapterConfig] | None = None, history: bool = False,
                       groups: Sequence[int] | None = None, followers: Sequence[bool] | None = None,
                       trains: Sequence[AdapterConfig | None] | None = None, cpu: bool = False,
                       progress: bool = True) -> list[TrainedUnit]:
    """Train one adapter per unit of ``data`` in one batched pass (see module docstring), unit
    ``i`` with architecture ``adapters[i]`` (default: ``config.adapter`` for all), each early
    stopped on its own ``val`` windows; CPU tensors, in the order of ``data``. Each architecture
    starts from the initial adapter a run of its own with ``config.seed`` would have. With
    ``history`` every unit keeps its tensors after each epoch. Units with the same ``groups[i]``
    stop together, at the end of the first epoch in which one of them stopped on its own (default:
    each unit on its own); a unit marked in ``followers`` never stops on its own, only with its
    group, and is not validated (its curve has no validation loss; its divergence check reads its
    training loss). Cross-validation trains each shape's folds and its refit on all data (a
    follower) as one group: it takes an epoch that every fold of the shape ran, so no unit of the
    shape needs to run past the first fold that stops. ``trains[i]``, when given, names
    the components of ``adapters[i]`` that train (a config with a subset of its components); the
    others keep their start (a neighbour prior's values) and take no step."""
    adapters = list(adapters) if adapters is not None else [config.adapter] * len(data)
    groups = list(groups) if groups is not None else list(range(len(data)))
    followers = list(followers) if followers is not None else [False] * len(data)
    if not all(any(g == h and not f for h, f in zip(groups, followers)) for g in groups):
        raise KgmlPeftError("every group of units side by side needs a unit that stops on its own")
    trains = list(trains) if trains is not None else [None] * len(data)
    accelerator = make_accelerator(cpu=cpu, mixed_precision=config.mixed_precision)
    device = accelerator.device
    net = copy.deepcopy(backbone.model).requires_grad_(False).to(device)
    reference = None
    if config.response_weight:
        reference = copy.deepcopy(backbone.model).eval().requires_grad_(False).to(device)
    response_feature = backbone.config.features.index("GPP")
    starts: dict[AdapterConfig, dict[str, torch.Tensor]] = {}

    units: list[_Unit] = []
    for d, adapter, train in zip(data, adapters, trains):
        if adapter not in starts:
            starts[adapter] = SiteModel(backbone.model, adapter, seed=config.seed).adapter_tensors()
        start = starts[adapter] if d.prior is None else prior_tensors(d.prior, adapter, backbone.model)
        moving = set(start) if train is None else set(adapter_shapes(train, backbone.model))
        if not moving <= set(start):
            raise KgmlPeftError(f"{d.name}: the trained components {list(train.components)} are not all "
                                f"in the adapter {list(adapter.components)}")
        tensors = {k: torch.nn.Parameter(v.clone().to(device)) if k in moving else v.clone().to(device)
                   for k, v in start.items()}
        loader = DataLoader(WindowDataset(d.train, backbone.scalers), batch_size=config.batch_size,
                            shuffle=True, generator=torch.Generator().manual_seed(config.seed))
        member = Member(PhaseResult(name=f"calibrate {d.name}"), lambda l=loader: iter(l),
                        lambda t=tensors: {k: v.detach().cpu().clone() for k, v in t.items()},
                        patience=0 if followers[len(units)] else None)
        units.append(_Unit(d, tensors, loader, WindowDataset(d.val, backbone.scalers),
                           max(config.epochs * len(loader), 1), member, adapter,
                           None if d.prior is None else {k: v.to(device) for k, v in start.items()}))
    optimizer = torch.optim.Adam([{"params": [v for v in u.tensors.values() if isinstance(v, torch.nn.Parameter)]}
                                  for u in units], lr=config.lr)
    optimizer = accelerator.prepare_optimizer(optimizer)  # mixed precision: loss scaling
    for unit, group in zip(units, optimizer.param_groups):  # its own copies of the group dicts
        unit.group = group
    by_member = {id(u.member): u for u in units}
    kept: dict[int, list[dict[str, torch.Tensor]]] = {id(u): [] for u in units}

    def step(pairs: list[tuple[Member, dict]], epoch: int) -> list[float]:
        return _train_step(net, reference, [(by_member[id(m)], b) for m, b in pairs], config, backbone,
                           accelerator, optimizer, epoch, response_feature)

    following = {id(u.member) for u, f in zip(units, followers) if f}

    def validate(members: list[Member]) -> list[float | None]:
        # a follower's loss would decide nothing (it stops with its group), so it is not
        # computed: a tenth of a cross-validated calibration's time went to it
        judged = [by_member[id(m)] for m in members if id(m) not in following]
        losses = iter(_validate(net, [(u.layout(config), u.val, u.data.weights) for u in judged], backbone,
                                accelerator) if judged else [])
        return [None if id(m) in following else next(losses) for m in members]

    def end_epoch(epoch: int) -> None:
        if history:
            for unit in units:
                if epoch == 0 or len(unit.member.result.curve) == epoch + 1:  # the start, or it ran
                    kept[id(unit)].append(unit.member.snapshot())
        ended = {g for u, g in zip(units, groups) if u.member.stopped}
        for unit, group in zip(units, groups):
            unit.member.stopped = unit.member.stopped or group in ended

    end_epoch(0)
    fit([u.member for u in units], epochs=config.epochs, patience=config.patience, step=step,
        validate=validate, train_mode=net.train, desc=f"calibrate {len(units)} units",
        progress=progress and accelerator.is_local_main_process, on_epoch=end_epoch,
        postfix=lambda members: {"active": sum(not m.stopped for m in members)})
    trained = []
    for unit in units:
        unit.member.result.steps = unit.member.step
        trained.append(TrainedUnit(unit.data, unit.member.result, unit.member.best, kept[id(unit)]))
    return trained


def _train_step(net, reference, step, config: CalibrationConfig, backbone: Backbone, accelerator,
                optimizer, epoch: int, response_feature: int) -> list[float]:
    """One optimizer step for the units in ``step`` ([(unit, its mini-batch)]); their losses."""
    batch = _stack([b for _, b in step], accelerator.device)
    adapters = [u.layout(config) for u, _ in step]
    rows = [a for a, (_, b) in zip(adapters, step) for _ in range(len(b["x"]))]
    forward = _rows_model(net, rows, batch["x"])
    with accelerator.autocast():
        out = forward(batch["x"])
        out = {k: v for k, v in out.items() if k != "state"}
        mine = ref = None
        if reference is not None:
            mine, ref = responses(forward, reference, batch["x"], backbone.scalers, response_feature,
                                  physical(out, backbone.scalers))
        first = 0
        losses = []
        for unit, b in step:
            rows_u = slice(first, first + len(b["x"]))
            first = rows_u.stop
            loss, _ = output_loss(_slice(out, rows_u), _slice(batch, rows_u), backbone.scalers,
                                  unit.data.weights, config.physics_weight, config.tolerance)
            if mine is not None:
                loss = loss + config.response_weight * response_loss(_slice(mine, rows_u), _slice(ref, rows_u))
            if unit.anchor is None:  # Eq. 3: rho ||phi||^2
                losses.append(loss + config.rho * squared_norm(unit.tensors.values()))
            else:  # a neighbour prior: rho ||phi - phi_nb||^2
                losses.append(loss + config.rho * anchor_distance(
                    (v, unit.anchor[k]) for k, v in unit.tensors.items()))
        stacked = torch.stack([loss.float() for loss in losses])
    values = stacked.detach().cpu().tolist()  # one device sync per step, not one per unit
    for (unit, _), value in zip(step, values):
        check_finite(unit.member.result.name, value, epoch)
    optimizer.zero_grad(set_to_none=True)  # units not in this step keep no gradient: Adam skips them
    accelerator.backward(stacked.sum())
    for unit, _ in step:
        unit.group["lr"] = _lr(config, unit.member.step, unit.total_steps)
    optimizer.step()
    return values


def _lr(config: CalibrationConfig, done: int, total: int) -> float:
    """The learning rate of a unit's next step after ``done`` of ``total`` (the closed form of
    torch's cosine annealing to zero, as a unit trained alone follows it)."""
    if config.schedule != "cosine":
        return config.lr
    return config.lr * (1 + math.cos(math.pi * min(done, total) / total)) / 2


def validate_adapters(backbone: Backbone, items: Sequence[tuple[ServingAdapter, YearWindows, dict[str, float]]],
                      config: CalibrationConfig, *, cpu: bool = False) -> list[float]:
    """The validation loss (the weighted masked MSE early stopping uses) of each ``(adapter,
    windows, target weights)``: every adapter on its own windows, all in mixed batches."""
    accelerator = make_accelerator(cpu=cpu, mixed_precision=config.mixed_precision)
    net = copy.deepcopy(backbone.model).requires_grad_(False).to(accelerator.device)
    return _validate(net, [(a, WindowDataset(w, backbone.scalers), weights) for a, w, weights in items],
                     backbone, accelerator)


def _validate(net, items: Sequence[tuple[ServingAdapter, WindowDataset, dict[str, float]]],
              backbone: Backbone, accelerator) -> list[float]:
    """Each ``(adapter, validation set, target weights)``'s validation loss (the weighted masked
    MSE a unit trained alone stops on)."""
    net.eval()
    rows = [(j, i) for j, (_, val, _) in enumerate(items) for i in range(len(val))]
    names = tuple(dict.fromkeys(n for _, _, weights in items for n in weights))
    sse = torch.zeros(len(items), len(names), dtype=torch.float64)
    count = torch.zeros(len(items), len(names), dtype=torch.float64)
    with torch.no_grad():
        for first in range(0, len(rows), VAL_ROWS):
            chunk = rows[first:first + VAL_ROWS]
            batch = _stack([{k: v[None] for k, v in items[j][1][i].items()} for j, i in chunk], accelerator.device)
            with accelerator.autocast():
                out = _rows_model(net, [items[j][0] for j, _ in chunk], batch["x"])(batch["x"])
            out = {k: v.float() for k, v in out.items() if k != "state"}
            scaled = scaled_targets(out, backbone.scalers, physical(out, backbone.scalers))
            e, c = target_errors(scaled, batch, names)
            index = torch.tensor([j for j, _ in chunk])
            sse.index_add_(0, index, e.double().cpu())
            count.index_add_(0, index, c.double().cpu())
    losses = []
    for j, (_, _, weights) in enumerate(items):
        cols = [names.index(n) for n in weights]
        losses.append(weighted_mse(sse[j, cols], count[j, cols], weights))
    return losses
