"""Calibrating a global backbone to one site or region: the entry points.

``calibrate(backbone, table, "IA")`` selects the unit, checks and splits its data
(:mod:`kgml_peft.calibration.units`) and calibrates it: with ``cv = "none"`` on its own, early
stopped on its last ``val_fraction`` of years (:mod:`kgml_peft.calibration.single`); with
``cv = "folds"`` choosing epochs, adapter shape and strength on cross-validation folds
(:mod:`kgml_peft.calibration.selection`). Many units at once: :mod:`kgml_peft.calibration.runs`.
"""

from __future__ import annotations

import pandas as pd

from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.selection import calibrate_cross_validated
from kgml_peft.calibration.single import calibrate_alone, calibration_state
from kgml_peft.calibration.units import (
    CalibrationData,
    CalibrationResult,
    calibration_units,
    finish_unit,
    prepare_unit,
    validation_metrics,
)
from kgml_peft.data.tables import validate_table
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.train.state import StateFile

__all__ = ["CalibrationData", "CalibrationResult", "calibrate", "calibrate_unit", "calibration_state",
           "calibration_units", "finish_unit", "prepare_unit", "validation_metrics"]


def calibrate(
    backbone: Backbone,
    frame: pd.DataFrame,
    site: str,
    config: CalibrationConfig | None = None,
    *,
    cpu: bool = False,
    progress: bool = True,
) -> CalibrationResult:
    """Calibrate ``backbone`` to ``site`` (a site id or a region label) on ``frame``.

    ``frame`` is a table in the data contract (validated here). Same table, config and seed give
    the same adapter tensors on CPU. Raises :class:`KgmlPeftError` for unusable data.
    """
    config = config or CalibrationConfig()
    if site == "all":
        raise KgmlPeftError("calibrate() takes one site or region; loop over calibration_units() "
                            "for all regions")
    table = validate_table(frame, backbone.config.features)
    (name, scope, rows), = calibration_units(table, site)
    data = prepare_unit(backbone, rows, name, scope, config)
    return calibrate_unit(backbone, data, config, cpu=cpu, progress=progress)


def calibrate_unit(
    backbone: Backbone,
    data: CalibrationData,
    config: CalibrationConfig,
    *,
    cpu: bool = False,
    progress: bool = True,
    state: StateFile | None = None,
    local: bool = False,
) -> CalibrationResult:
    """Calibrate on one prepared unit (see :func:`prepare_unit`), cross-validated when the config
    asks for it. With ``state`` (see :func:`calibration_state`) a unit calibrated alone saves its
    training state after every epoch and continues from a saved one when ``state.resume`` is set
    (a cross-validated unit reruns from the start). ``local``: this process calibrates the unit on
    its own while other processes calibrate others (no data parallelism)."""
    if config.cv == "folds":
        return calibrate_cross_validated(backbone, data, config, cpu=cpu, progress=progress)
    return calibrate_alone(backbone, data, config, cpu=cpu, progress=progress, state=state, local=local)
