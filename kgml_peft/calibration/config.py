"""The config of a site calibration run: :class:`CalibrationConfig` is the whole run (method,
adapter architecture, objective weights rho, mu, lambda, optimiser, early stopping and storage).
It reads from and writes to plain dicts (JSON in adapter metadata, TOML for
``kgml-peft calibrate --config``); the adapter's architecture is
:class:`~kgml_peft.tuners.config.AdapterConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from kgml_peft import schema
from kgml_peft.config_files import check_keys, read_toml
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.store.adapter import STORAGE_DTYPES
from kgml_peft.tuners.config import AdapterConfig, positive_int

METHODS: tuple[str, ...] = ("adapter", "full", "scratch")
#: Upper bounds of the integer settings that size a run (loops, batches, member files): far above
#: any real run, low enough that a typo (1e11) is refused instead of allocated or looped over.
LIMITS: dict[str, int] = {"epochs": 100_000, "batch_size": 100_000, "patience": 100_000,
                          "batch_sites": 10_000, "members": 1000, "prior_k": 1000}
CV_MODES: tuple[str, ...] = ("auto", "none", "folds")
#: where an adapter starts and what rho pulls it towards: zero (Eq. 3) or its neighbours' blend
PRIORS: tuple[str, ...] = ("none", "neighbours")

#: Per-method defaults for the options left unset (``None``) in :class:`CalibrationConfig`.
METHOD_DEFAULTS: dict[str, dict[str, float | int]] = {
    "adapter": {"epochs": 100, "lr": 1e-2},
    "full": {"epochs": 40, "lr": 5e-4},
    "scratch": {"epochs": 150, "lr": 3e-3},
}


@dataclass(frozen=True)
class CalibrationConfig:
    """One calibration run (Eq. 2 or Eq. 3 of DESIGN.md) for one site or region.

    ``method``: ``adapter`` trains phi_s on the frozen backbone (Eq. 3); ``full`` fine-tunes every
    backbone weight with the anchor mu (Eq. 2); ``scratch`` trains the backbone architecture from
    random weights on the site's data alone (the site-only baseline). ``epochs`` and ``lr`` left
    at ``None`` take :data:`METHOD_DEFAULTS`.
    """

    method: str = "adapter"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    #: target -> loss weight; ``None`` = every target observed in the site's training years
    targets: dict[str, float] | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 8
    schedule: str = "cosine"
    #: epochs without validation improvement before stopping (0 = run every epoch). 20: the
    #: smallest that lost nothing on the development units' validation curves, replayed
    #: (tools/epoch_study.py, docs/scaling.md); 30 until issue 22 ran 13-21 % more epochs
    patience: int = 20
    #: Eq. 3's weight on ||phi_s||^2
    rho: float = 1e-3
    #: Eq. 2/3's weight on ||theta_s - theta||^2 (full method, or weights unfrozen with ``unfreeze``)
    mu: float = 1.0
    #: lambda: weight of L_phys (mass balance + non-negative Ra/Rh)
    physics_weight: float = 0.1
    tolerance: float = 0.05
    #: weight of the GPP-response consistency with the global backbone
    response_weight: float = 0.0
    #: fraction of each site's years (the last ones) held out for early stopping and metrics
    val_fraction: float = 0.2
    #: backbone parameter-name prefixes that also train (adapter method), mu-anchored
    unfreeze: tuple[str, ...] = ()
    seed: int = 0
    mixed_precision: str = "no"
    #: dtype of the adapter tensors in the file (training is always float32)
    storage_dtype: str = "float32"
    #: units calibrated side by side in one pass over the backbone (1 = one after another); see
    #: :mod:`kgml_peft.calibration.batched`
    batch_sites: int = 1
    #: ``folds``: epochs, adapter shape and strength chosen on cross-validation folds, the folds'
    #: estimate reported, members and interval widths kept (:mod:`kgml_peft.calibration.selection`);
    #: ``none``: early stopping on the last ``val_fraction`` of years, reported as "after";
    #: ``auto`` (default): folds wherever they apply (the adapter method without unfreeze, one unit
    #: per pass), none elsewhere. Resolved when the config is made.
    cv: str = "auto"
    #: most members an adapter file keeps with ``cv = "folds"`` (the all-data adapter and fold
    #: adapters; their spread shapes prediction intervals)
    members: int = 5
    #: ``neighbours``: the adapter starts from the weight-space blend of the ``prior_k`` calibrated
    #: adapters nearest to the unit (in the output store) and rho pulls it towards that blend,
    #: rho ||phi - phi_nb||^2 instead of rho ||phi||^2 (:mod:`kgml_peft.calibration.prior`)
    prior: str = "none"
    prior_k: int = 3

    def __post_init__(self) -> None:
        expect_type(self.method, str, "method")
        if self.method not in METHODS:
            raise KgmlPeftError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        expect_type(self.adapter, AdapterConfig, "adapter")
        if self.targets is not None:
            expect_type(self.targets, dict, "targets")
            if not self.targets:
                raise KgmlPeftError("targets must name at least one target")
            for name, weight in self.targets.items():
                if name not in schema.TARGETS:
                    raise KgmlPeftError(f"unknown target {name!r}; choose from {', '.join(schema.TARGETS)}")
                expect_type(weight, (int, float), f"weight of target {name}")
                if not (math.isfinite(weight) and weight > 0):
                    raise KgmlPeftError(f"weight of target {name} must be > 0, got {weight}")
            object.__setattr__(self, "targets", {k: float(v) for k, v in self.targets.items()})
        for key in ("epochs", "lr"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, METHOD_DEFAULTS[self.method][key])
        for key in ("epochs", "batch_size", "patience", "seed", "batch_sites"):
            expect_type(getattr(self, key), int, key)
        for key in ("lr", "rho", "mu", "physics_weight", "tolerance", "response_weight", "val_fraction"):
            expect_type(getattr(self, key), (int, float), key)
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise KgmlPeftError(f"{key} must be a finite number >= 0, got {getattr(self, key)}")
        for key, most in LIMITS.items():
            value = getattr(self, key)
            expect_type(value, int, key)
            if value > most:
                raise KgmlPeftError(f"{key} must be <= {most}, got {value}")
        if not 0 <= self.seed < 2**32:
            raise KgmlPeftError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 0 or not self.lr > 0:
            raise KgmlPeftError("epochs >= 1, batch_size >= 1, patience >= 0 and lr > 0 are needed")
        if not 0 < self.val_fraction < 1:
            raise KgmlPeftError(
                f"val_fraction must be in (0, 1): calibration holds out the last years of each "
                f"site for early stopping and before/after metrics, got {self.val_fraction}"
            )
        expect_type(self.schedule, str, "schedule")
        if self.schedule not in ("constant", "cosine"):
            raise KgmlPeftError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if isinstance(self.unfreeze, str):
            object.__setattr__(self, "unfreeze", tuple(u.strip() for u in self.unfreeze.split(",") if u.strip()))
        expect_type(self.unfreeze, (list, tuple), "unfreeze")
        for prefix in self.unfreeze:
            expect_type(prefix, str, "unfreeze prefix")
        object.__setattr__(self, "unfreeze", tuple(self.unfreeze))
        if self.unfreeze and self.method != "adapter":
            raise KgmlPeftError(f"unfreeze only applies to the adapter method (method {self.method} "
                                "trains every backbone weight)")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise KgmlPeftError("mixed_precision must be no, fp16 or bf16")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise KgmlPeftError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}")
        if self.batch_sites < 1:
            raise KgmlPeftError(f"batch_sites must be >= 1, got {self.batch_sites}")
        if self.batch_sites > 1 and self.method != "adapter":
            raise KgmlPeftError(f"batch_sites > 1 needs the adapter method; method {self.method} "
                                "trains backbone weights, one unit at a time")
        positive_int(self.members, "members")
        positive_int(self.prior_k, "prior_k")
        expect_type(self.prior, str, "prior")
        if self.prior not in PRIORS:
            raise KgmlPeftError(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        if self.prior != "none" and (self.method != "adapter" or self.unfreeze):
            raise KgmlPeftError("a neighbour prior is a starting adapter: it needs the adapter method "
                                "without unfreeze")
        expect_type(self.cv, str, "cv")
        if self.cv not in CV_MODES:
            raise KgmlPeftError(f"cv must be one of {', '.join(CV_MODES)}, got {self.cv!r}")
        if self.cv == "auto":  # folds wherever they apply: the adapter method, one unit per pass
            folds = self.method == "adapter" and not self.unfreeze and self.batch_sites == 1
            object.__setattr__(self, "cv", "folds" if folds else "none")
        if self.cv == "folds" and self.batch_sites > 1:
            raise KgmlPeftError("cv folds already trains each unit's folds side by side in one pass; "
                                "use batch_sites 1 with it")
        if self.cv == "folds" and (self.method != "adapter" or self.unfreeze):
            raise KgmlPeftError("cv folds choose an adapter's shape and strength: they need the adapter "
                                "method without unfreeze")
        if self.batch_sites > 1 and self.unfreeze:
            raise KgmlPeftError("batch_sites > 1 cannot be combined with unfreeze: units that "
                                "replace backbone weights cannot share one pass")

    def to_dict(self) -> dict:
        """JSON-ready form with every default resolved (stored in adapter and checkpoint files)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["adapter"] = self.adapter.to_dict()
        data["unfreeze"] = list(self.unfreeze)
        if self.prior == "none":  # written only when used: files without a prior stay as they were
            del data["prior"], data["prior_k"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationConfig:
        """Build from a dict shaped like :meth:`to_dict` (every key optional)."""
        expect_type(data, dict, "calibration config")
        check_keys(data, {f.name for f in dataclasses.fields(cls)}, "calibration config")
        data = dict(data)
        if "adapter" in data:
            data["adapter"] = AdapterConfig.from_dict(data["adapter"])
        try:
            return cls(**data)
        except TypeError as exc:
            raise KgmlPeftError(f"bad calibration config: {exc}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> CalibrationConfig:
        """Read a TOML file whose keys are those of :meth:`to_dict` (``[adapter]`` table)."""
        return cls.from_dict(read_toml(path))
