"""kgml-peft: parameter-efficient site calibration of knowledge-guided carbon-flux models.

The main entry points, importable from the package (loaded on first use, so ``import kgml_peft``
and ``kgml-peft --help`` stay fast)::

    from kgml_peft import load_backbone, calibrate, save_adapter, load_adapter, apply_adapter
    from kgml_peft import AdapterBank, predict_table
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    "load_backbone": "kgml_peft.store.checkpoint",
    "save_backbone": "kgml_peft.store.checkpoint",
    "calibrate": "kgml_peft.calibration.calibrate",
    "run_calibration": "kgml_peft.calibration.runs",
    "CalibrationConfig": "kgml_peft.calibration.config",
    "AdapterConfig": "kgml_peft.tuners.config",
    "load_adapter": "kgml_peft.store.adapter",
    "save_adapter": "kgml_peft.store.adapter",
    "apply_adapter": "kgml_peft.serve.loading",
    "evaluate": "kgml_peft.evaluation",
    "AdapterBank": "kgml_peft.serve.bank",
    "predict_table": "kgml_peft.serve.predict",
    "run_predict": "kgml_peft.serve.predict",
    "run_bench": "kgml_peft.experiments.bench",
    "BenchConfig": "kgml_peft.experiments.bench",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'kgml_peft' has no attribute {name!r}")
