"""``kgml-peft calibrate`` as a function: load the backbone and data, calibrate every selected
site or region, write one adapter (or site checkpoint) per unit."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from kgml_peft.calibration.batched import calibrate_batched
from kgml_peft.calibration.calibrate import (
    CalibrationData,
    CalibrationResult,
    calibrate_unit,
    calibration_state,
    calibration_units,
    prepare_unit,
)
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.prior import with_neighbour_prior
from kgml_peft.calibration.units import PROVENANCE
from kgml_peft.data.tables import load_table, validate_table
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.adapter import read_adapter, save_adapter
from kgml_peft.atomic import check_outputs, make_folders, remove_empty
from kgml_peft.store.checkpoint import Backbone, load_backbone, read_checkpoint, save_backbone
from kgml_peft.tuners.base import adapter_shapes
from kgml_peft.store.library import adapter_path, writable_target
from kgml_peft.store.probe import check_backbone_outputs
from kgml_peft.train.pretrain import frame_hash
from kgml_peft.train.processes import launched, map_sharded, rank
from kgml_peft.train.state import RESUME_DIR, StateFile


@dataclass
class CalibrationRun:
    """One unit's output: its file, wall time, the backbone file's size and what it trained.

    ``summary`` is ``None`` for a unit that a resumed run found already written by the same run
    (skipped). ``result`` (the model and adapter) is kept only by the process that trained the
    unit; under several processes the main process receives every unit's summary and curve.
    """

    name: str
    path: Path
    seconds: float
    backbone_bytes: int
    summary: dict | None = None
    curve: list[dict] = field(default_factory=list)
    trained_parameters: int = 0
    is_adapter: bool = True
    process: int = 0
    result: CalibrationResult | None = None

    @property
    def skipped(self) -> bool:
        """Whether the unit was skipped (already written by this same run)."""
        return self.summary is None


def demo_table() -> pd.DataFrame:
    """The built-in demo site data: the observed (flux-tower) flavour of the simulator, seed 0."""
    from kgml_peft.data.synthetic import SynthConfig, simulate

    return simulate(SynthConfig(seed=0, observed=True))


def output_path(out_dir: str | os.PathLike, name: str, method: str) -> Path:
    """``<out>/<name>.safetensors`` for adapters, ``<out>/<name>-<method>.safetensors`` otherwise."""
    return adapter_path(out_dir, name if method == "adapter" else f"{name}-{method}")


def run_calibration(
    site: str,
    *,
    backbone_path: str | os.PathLike,
    data: str | os.PathLike | pd.DataFrame | None = None,
    out_dir: str | os.PathLike = "adapters",
    config: CalibrationConfig | None = None,
    cpu: bool = False,
    progress: bool = True,
    force: bool = False,
    resume: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    also_writes: Sequence[str | os.PathLike] = (),
) -> list[CalibrationRun]:
    """Calibrate ``site`` (site id, region label or ``all``) and write the outputs.

    ``data`` is a table path, a DataFrame or ``None`` for :func:`demo_table`. Every output path is
    checked before any training starts; existing files are replaced only with ``force``. Each
    unit's training state is saved after every epoch in ``<out>/.kgml-resume/``; with ``resume``
    an interrupted unit continues from it, and a unit whose output this same run (config, data,
    seed, backbone) already wrote is skipped. With ``config.batch_sites`` K > 1 the units are
    calibrated in groups of K (:mod:`kgml_peft.calibration.batched`); groups save no per-epoch
    state: a resumed run reruns unfinished groups whole.

    ``out_dir`` is created if missing; if the run fails, the folders it created (``out_dir``,
    ``.kgml-resume``) are removed again when empty. No
    output may be the backbone, the data table, one of ``inputs`` (e.g. the config file) or one
    of ``also_writes`` (files the caller writes afterwards, e.g. a plot; checked with ``force``
    like the adapters).
    """
    config = config or CalibrationConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise KgmlPeftError(f"output folder {out} is not a folder")
    backbone = load_backbone(backbone_path)
    if config.method == "adapter":  # its sizes fit this backbone: refused before any allocation
        adapter_shapes(config.adapter, backbone.model)
    features = backbone.config.features
    if data is None:
        table = validate_table(demo_table(), features)
    elif isinstance(data, pd.DataFrame):
        table = validate_table(data, features)
    else:
        table = load_table(data, features)
    units = calibration_units(table, site)
    read = [backbone_path, *inputs, *([] if data is None or isinstance(data, pd.DataFrame) else [data])]
    paths = [output_path(out, name, config.method) for name, _, _ in units]
    check_outputs([*paths, *also_writes], read, force=True)  # no output is an input or repeats
    check_outputs(paths, force=force or resume)
    check_outputs(also_writes, force=force)
    check_backbone_outputs(backbone)  # a backbone with a valid hash can still overflow
    created = make_folders(out)
    ours = [] if os.path.lexists(out / RESUME_DIR) else [out / RESUME_DIR]  # another run's is kept
    try:
        return _calibrate_units(backbone, backbone_path, units, paths, out, config, cpu, progress,
                                force, resume)
    except BaseException:
        remove_empty([*created, *ours])
        raise


def _calibrate_units(backbone: Backbone, backbone_path, units, paths: list[Path], out: Path,
                     config: CalibrationConfig, cpu: bool, progress: bool, force: bool,
                     resume: bool) -> list[CalibrationRun]:
    """The body of :func:`run_calibration`, once every output path has passed its check."""
    # every unit's data problems surface before the first unit trains and writes its file
    prepared = [prepare_unit(backbone, rows, name, scope, config) for name, scope, rows in units]
    if config.prior == "neighbours":  # each unit starts from its neighbours in the output store
        prepared = [with_neighbour_prior(unit, out, backbone, config) for unit in prepared]
    backbone_bytes = Path(backbone_path).stat().st_size
    size = config.batch_sites
    groups = [list(range(i, min(i + size, len(prepared)))) for i in range(0, len(prepared), size)]
    alone = {group[0] for group in groups if len(group) == 1}
    items, skipped = [], []
    for index, (unit, path) in enumerate(zip(prepared, paths)):
        done = resume and path.exists() and written_by(path, backbone, unit, config)
        # a unit calibrated on its own saves its state every epoch; a batched group saves none
        # (it reruns whole; see calibration.batched)
        state = calibration_state(path, backbone, unit, config, resume) if index in alone else None
        if done:
            if state is not None:
                state.discard_if_ours()
            skipped.append(CalibrationRun(unit.name, path, 0.0, backbone_bytes))
        else:
            writable_target(path, force)
            if state is not None:
                state.load()  # a corrupt or another run's state stops the run before any training
        items.append((unit, path, state, done))
    local = launched()  # under several processes each calibrates its own units

    def finished(unit: CalibrationData, path: Path, result: CalibrationResult, seconds: float) -> CalibrationRun:
        if result.adapter is not None:
            save_adapter(path, result.adapter, dtype=config.storage_dtype)
        else:
            training = {"method": config.method, **result.summary, "curves": result.curve}
            save_backbone(path, result.model, backbone.scalers, training)
        run = CalibrationRun(unit.name, path, seconds, backbone_bytes, result.summary, result.curve,
                             result.trained_parameters, result.adapter is not None, rank())
        # only the summary travels to the main process; the model stays in the one that trained it
        return replace(run, result=result) if not local else run

    def calibrate_one(item: tuple[CalibrationData, Path, StateFile, bool]) -> list[CalibrationRun]:
        unit, path, state, _ = item
        start = time.perf_counter()
        result = calibrate_unit(backbone, unit, config, cpu=cpu, progress=progress, state=state,
                                local=local)
        run = finished(unit, path, result, time.perf_counter() - start)
        state.discard()
        return [run]

    def calibrate_group(group: list[tuple[CalibrationData, Path, None, bool]]) -> list[CalibrationRun]:
        if len(group) == 1:
            return calibrate_one(group[0])
        start = time.perf_counter()
        results = calibrate_batched(backbone, [unit for unit, *_ in group], config, cpu=cpu,
                                    progress=progress)
        share = (time.perf_counter() - start) / len(group)  # the group's wall time, per unit
        # a resumed group reruns whole (same units, same tensors); units already written stay
        return [finished(unit, path, result, share)
                for (unit, path, _, done), result in zip(group, results) if not done]

    # groups of --batch-sites units (of one unit each without it) are dealt to the processes
    work = [[items[i] for i in group] for group in groups if not all(items[i][3] for i in group)]
    trained = map_sharded(work, calibrate_group, cpu)
    runs = skipped + [run for runs in trained for run in runs]
    order = {unit.name: i for i, unit in enumerate(prepared)}
    return sorted(runs, key=lambda run: order[run.name])


def written_by(path: Path, backbone: Backbone, unit: CalibrationData, config: CalibrationConfig) -> bool:
    """Whether the file at ``path`` is the output of calibrating ``unit`` with ``config`` on
    ``backbone`` (same recorded config, seed, data hash and backbone fingerprint)."""
    expected = json.loads(json.dumps(config.to_dict()))
    try:
        if config.method == "adapter":
            adapter = read_adapter(path)
            calibration = adapter.info["calibration"]
            recorded = {**calibration, "adapter": calibration.get("requested_adapter", adapter.config.to_dict())}
            site, data_hash, fp = adapter.site, adapter.info["data"].get("hash"), adapter.backbone_fingerprint
        else:
            training = json.loads(read_checkpoint(path)[1].get("training", "{}"))
            recorded, site = training.get("calibration"), training.get("site")
            data_hash, fp = (training.get("data") or {}).get("hash"), training.get("backbone_fingerprint")
    except (KgmlPeftError, ValueError, AttributeError, TypeError, RecursionError):
        return False
    if isinstance(recorded, dict):  # provenance next to the config (e.g. batched_with) aside
        recorded = {k: v for k, v in recorded.items() if k in expected or k not in PROVENANCE}
    return (recorded == expected and site == unit.name and data_hash == frame_hash(unit.rows)
            and fp == backbone.fingerprint)
