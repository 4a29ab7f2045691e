"""``kgml-peft calibrate`` as a function: load the backbone and data, calibrate every selected
site or region, write one adapter (or site checkpoint) per unit."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kgml_peft.calibration.calibrate import (
    CalibrationResult,
    calibrate_unit,
    calibration_units,
    prepare_unit,
)
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.data.tables import load_table, validate_table
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.adapter import save_adapter
from kgml_peft.store.checkpoint import load_backbone, save_backbone
from kgml_peft.store.library import adapter_path, writable_target


@dataclass
class CalibrationRun:
    """One written output: the result, its file, wall time and the backbone file's size."""

    result: CalibrationResult
    path: Path
    seconds: float
    backbone_bytes: int


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
) -> list[CalibrationRun]:
    """Calibrate ``site`` (site id, region label or ``all``) and write the outputs.

    ``data`` is a table path, a DataFrame or ``None`` for :func:`demo_table`. Every output path is
    checked before any training starts; existing files are replaced only with ``force``.
    """
    config = config or CalibrationConfig()
    out = Path(out_dir)
    if not out.is_dir():
        raise KgmlPeftError(f"output folder {out} does not exist")
    backbone = load_backbone(backbone_path)
    features = backbone.config.features
    if data is None:
        table = validate_table(demo_table(), features)
    elif isinstance(data, pd.DataFrame):
        table = validate_table(data, features)
    else:
        table = load_table(data, features)
    units = calibration_units(table, site)
    paths = [writable_target(output_path(out, name, config.method), force) for name, _, _ in units]
    # every unit's data problems surface before the first unit trains and writes its file
    prepared = [prepare_unit(backbone, rows, name, scope, config) for name, scope, rows in units]
    backbone_bytes = Path(backbone_path).stat().st_size
    runs = []
    for data, path in zip(prepared, paths):
        start = time.perf_counter()
        result = calibrate_unit(backbone, data, config, cpu=cpu, progress=progress)
        if result.adapter is not None:
            save_adapter(path, result.adapter, dtype=config.storage_dtype)
        else:
            training = {"method": config.method, **result.summary, "curves": result.curve}
            save_backbone(path, result.model, backbone.scalers, training)
        runs.append(CalibrationRun(result, path, time.perf_counter() - start, backbone_bytes))
    return runs
