"""Choosing an adapter's training length, shape and strength on cross-validation folds.

A calibration with ``cv = "folds"`` never decides on data it reports as held out. It cuts the
unit's data into folds (:mod:`kgml_peft.calibration.folds`) and trains, in one batched pass
(:func:`~kgml_peft.calibration.batched.train_side_by_side`), one adapter per fold and shape of
:func:`shape_menu` (head only; head + blocks; the configured adapter), each early-stopped on its
fold, plus one adapter per shape on all the data. A shape's units stop together, at the end of the
epoch in which its first fold early-stopped: only epochs every fold ran are candidates, so any
later epoch would be computed for nothing. Then, per shape:

1. the number of epochs ``E`` minimises the validation loss relative to the global backbone's
   (epoch 0, included), averaged over the folds;
2. each fold's adapter after ``E`` epochs is scaled to every strength of :data:`STRENGTHS` (the
   adapter's change to the backbone times t, see :func:`~kgml_peft.tuners.base.scale_adapter`)
   and scored on its fold's validation data.

The (shape, t) with the lowest mean over folds of the fold's loss relative to the global model's
wins (scale-free, so a fold with large fluxes does not outvote the others), ties going to the
smaller strength and the smaller shape; t = 0 is the global backbone, so an adapter is kept only when it beats the global
model out of sample. The winner is the all-data adapter of that shape after ``E`` epochs, scaled
by t; with t = 0 the result is an identity adapter (head only, all zeros) that records why.

With a neighbour prior (:mod:`kgml_peft.calibration.prior`) every shape holds the whole prior
(the configured adapter laid out from the neighbours' blend) and the shape names only the
components that train; the others keep the neighbours' values. Epoch 0 of a shape is then the
prior itself, scored on every fold like any candidate (it never saw the unit's data), and the
one-year rule (the head alone trains) limits what one season may fit, not what the neighbours
already know.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import set_seed

from kgml_peft.calibration.batched import TrainedUnit, train_side_by_side, validate_adapters
from kgml_peft.calibration.units import CalibrationData, CalibrationResult, finish_unit, validation_metrics
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.folds import Fold, make_folds
from kgml_peft.calibration.members import calibration_crops, interval_record, site_model
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.blend import laid_out
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.train.loop import deterministic_algorithms
from kgml_peft.train.state import PhaseResult
from kgml_peft.tuners.base import scale_adapter
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.tuners.serving import ServingAdapter

#: the strengths a calibration chooses from (0 = the global backbone, 1 = the adapter as trained)
STRENGTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def shape_menu(adapter: AdapterConfig, years: int = 2) -> dict[str, AdapterConfig]:
    """The shapes cross-validation compares, smallest first: head only, head + blocks, and the
    configured adapter; only those made of components the configured adapter has. With one
    calibration year (``years`` = 1) only the head, if the adapter has one: folds inside one
    year measure how well an adapter fits that year's other days, not the next year, and an
    adapter that reshapes the GRUs' dynamics on one season carries that season's quirks into the
    next (on the development split, docs/fluxnet.md, the larger shapes won the within-year folds
    and lost the later years)."""
    if years == 1 and "head" in adapter.components:
        return {"head": dataclasses.replace(adapter, components=("head",))}
    menu: dict[str, AdapterConfig] = {}
    for name, parts in (("head", ("head",)), ("head+blocks", ("blocks", "head"))):
        if set(parts) <= set(adapter.components) and set(parts) != set(adapter.components):
            menu[name] = dataclasses.replace(adapter, components=tuple(c for c in adapter.components if c in parts))
    menu["+".join(adapter.components)] = adapter
    return menu


@dataclass
class Selection:
    """What cross-validation chose and measured for one unit (the ``cv`` record of its adapter)."""

    fold_data: list[Fold]
    shape: str
    adapter: AdapterConfig
    epochs: int
    strength: float
    #: per fold: the global backbone's validation loss and the chosen adapter's
    global_loss: list[float]
    chosen_loss: list[float]
    #: per shape: epochs chosen and mean fold loss at each strength
    table: dict[str, dict]
    tensors: dict[str, torch.Tensor]
    #: per fold, the loss of the best adapter with a strength above 0 (what "keep the global model"
    #: was decided against)
    best_adapter_loss: list[float] = dataclasses.field(default_factory=list)
    #: per fold, the chosen shape's fold adapter after ``epochs`` epochs, scaled by ``strength``
    fold_tensors: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)
    #: the crops (Crop_Type codes) of the calibration years when all are documented, else None:
    #: the adapter applies to these crops only
    crops: list[float] | None = None

    @property
    def folds(self) -> list[str]:
        """The folds' names."""
        return [f.name for f in self.fold_data]

    @property
    def change(self) -> list[float]:
        """Per fold, the chosen adapter's loss relative to the global backbone's, minus 1."""
        return [c / g - 1 for c, g in zip(self.chosen_loss, self.global_loss)]

    def record(self) -> dict:
        """JSON-ready summary (stored in the adapter's ``metrics.cv``)."""
        change = self.change
        best = [b / g - 1 for b, g in zip(self.best_adapter_loss, self.global_loss)]
        return {
            "crops": self.crops,
            "folds": self.folds, "shape": self.shape, "epochs": self.epochs, "strength": self.strength,
            "global_loss": self.global_loss, "chosen_loss": self.chosen_loss,
            "change_mean": statistics.fmean(change),
            "change_sd": statistics.stdev(change) if len(change) > 1 else 0.0,
            "best_adapter_change_mean": statistics.fmean(best) if best else None,
            "shapes": self.table,
        }


def _epochs(units: list[TrainedUnit]) -> tuple[int, list[float]]:
    """The epoch count with the lowest validation loss relative to the global model's (epoch 0),
    averaged over the folds (only epochs every fold ran), and that mean relative curve."""
    curves = [[e["val_loss"] for e in u.result.curve] for u in units]
    last = min(len(c) for c in curves)
    mean = [statistics.fmean(c[e] / c[0] for c in curves) for e in range(last)]
    return int(np.argmin(mean)), mean


def cross_validate(backbone: Backbone, data: CalibrationData, config: CalibrationConfig, *,
                   cpu: bool = False, progress: bool = True) -> Selection:
    """Choose epochs, shape and strength for ``data`` on folds and return the winner's tensors
    (see module docstring). ``data.train`` holds every calibration site-year."""
    folds: list[Fold] = make_folds(data.train, list(data.weights), data.name)
    menu = shape_menu(config.adapter, years=len(set(np.asarray(data.train.years).tolist())))
    # what each shape's adapter holds: the shape itself, or with a neighbour prior the whole
    # configured adapter, the shape naming only what trains (what the neighbours know is kept)
    layout = {shape: adapter if data.prior is None else config.adapter for shape, adapter in menu.items()}
    units, shapes, trains, groups, followers = [], [], [], [], []
    for group, (shape, adapter) in enumerate(menu.items()):
        for fold in [*folds, None]:
            part = "all data" if fold is None else fold.name
            units.append(dataclasses.replace(data, name=f"{data.name} [{shape}, {part}]",
                                             train=data.train if fold is None else fold.train,
                                             val=data.train if fold is None else fold.val))
            shapes.append(layout[shape])
            trains.append(None if data.prior is None else adapter)
            # a shape's folds and refit stop together: only epochs every fold ran can be chosen
            groups.append(group)
            followers.append(fold is None)
    trained = train_side_by_side(backbone, units, config, adapters=shapes, history=True,
                                 groups=groups, followers=followers, trains=trains, cpu=cpu, progress=progress)

    per_shape = len(folds) + 1
    candidates, table = [], {}
    items = []  # (shape, strength, fold index) for every scored adapter
    layouts = []
    for s, shape in enumerate(menu):
        adapter = layout[shape]
        fold_units = trained[s * per_shape:s * per_shape + len(folds)]
        epochs, mean_curve = _epochs(fold_units)
        table[shape] = {"epochs": epochs, "mean_fold_curve": mean_curve}
        if data.prior is not None:  # the prior's other components ride along, untrained
            table[shape]["holds"] = "+".join(adapter.components)
        for t in STRENGTHS:
            if t == 0.0 and s > 0:  # the global backbone: scored once, with the first shape
                continue
            for f, unit in enumerate(fold_units):
                tensors = scale_adapter(unit.history[epochs], adapter, backbone.model, t)
                layouts.append((ServingAdapter.from_tensors(f"{shape} t={t} f={f}", tensors, adapter),
                                folds[f].val, data.weights))
                items.append((shape, t, f))
    losses = validate_adapters(backbone, layouts, config, cpu=cpu)
    scores: dict[tuple[str, float], list[float]] = {}
    for (shape, t, f), loss in zip(items, losses):
        scores.setdefault((shape, t), []).append(loss)
    # t = 0 is the global backbone whatever the shape: one score, not one per shape
    global_loss = scores[(next(iter(menu)), 0.0)]
    for shape in menu:
        scores[(shape, 0.0)] = global_loss
    # scale-free: the mean over folds of each fold's loss relative to the global model's, the
    # figure the record reports (a mean of raw losses lets one high-variance fold decide)
    # rounded to 9 digits: an adapter stopped at epoch 0 is the global model up to float noise,
    # and noise must not pick a strength or shape over it (ties go to the smaller ones)
    ratio = {key: round(statistics.fmean(v / g for v, g in zip(values, global_loss)), 9)
             for key, values in scores.items()}
    for s, shape in enumerate(menu):
        table[shape]["mean_fold_loss"] = {str(t): statistics.fmean(scores[(shape, t)]) for t in STRENGTHS}
        table[shape]["mean_fold_ratio"] = {str(t): ratio[(shape, t)] for t in STRENGTHS}
        for t in STRENGTHS:
            # ties: the smaller strength, then the smaller shape
            candidates.append((ratio[(shape, t)], t, s, shape))
    best_ratio, strength, s, shape = min(candidates)
    _, best_t, _, best_shape = min(c for c in candidates if c[1] > 0)
    if strength == 0.0:  # the global backbone wins: an identity adapter of the smallest shape
        shape = next(iter(menu))
    adapter = layout[shape] if strength > 0.0 else menu[shape]
    epochs = table[shape]["epochs"]
    all_data = trained[list(menu).index(shape) * per_shape + len(folds)]
    if epochs >= len(all_data.history):
        raise KgmlPeftError(f"{data.name}: the all-data adapter stopped before epoch {epochs}")

    def scaled(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return scale_adapter(laid_out(tensors, adapter, backbone.model, data.name), adapter, backbone.model, strength)

    tensors = scaled(all_data.history[epochs])
    s = list(menu).index(shape)
    fold_tensors = [scaled(unit.history[epochs]) for unit in trained[s * per_shape:s * per_shape + len(folds)]]
    return Selection(fold_data=folds, shape=shape, adapter=adapter, epochs=epochs,
                     strength=strength, global_loss=global_loss, chosen_loss=scores[(shape, strength)],
                     table=table, tensors=tensors, best_adapter_loss=scores[(best_shape, best_t)],
                     fold_tensors=fold_tensors, crops=calibration_crops(data.train))


def calibrate_cross_validated(backbone: Backbone, data: CalibrationData, config: CalibrationConfig, *,
                              cpu: bool = False, progress: bool = True) -> CalibrationResult:
    """Calibrate one prepared unit with its epochs, shape and strength chosen on folds (see module
    docstring). Its ``metrics.before``/``after`` are in-sample (all calibration data); the
    out-of-sample figures are ``metrics.cv``: per fold, the global backbone's loss and the chosen
    adapter's, and their mean relative change. The adapter keeps up to ``config.members`` members
    and the conformal interval widths (:mod:`kgml_peft.calibration.members`)."""
    with deterministic_algorithms():
        set_seed(config.seed, deterministic=True)
        before = validation_metrics(backbone.model, backbone, data.val, data.weights, config.tolerance)
        selection = cross_validate(backbone, data, config, cpu=cpu, progress=progress)
        # t = 0: every member is the identity, one is stored
        stored = 1 if selection.strength == 0.0 else min(config.members, 1 + len(selection.folds))
        intervals, members = interval_record(backbone, selection.adapter, selection.tensors,
                                             selection.fold_tensors, selection.fold_data, stored)
    result = PhaseResult(name=f"calibrate {data.name}", best_epoch=selection.epochs)
    chosen = dataclasses.replace(config, adapter=selection.adapter)
    return finish_unit(backbone, data, chosen, site_model(backbone, selection.adapter, selection.tensors), result, before,
                       provenance={"requested_adapter": config.adapter.to_dict()},
                       metrics={"cv": selection.record(), "in_sample": True, "intervals": intervals,
                                "members": members},
                       members=selection.fold_tensors[:stored - 1])
