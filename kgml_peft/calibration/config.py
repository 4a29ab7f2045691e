"""Configs of site calibration: what a site adapter is made of, and how it is trained.

:class:`AdapterConfig` fixes the adapter's architecture (it travels inside every adapter file and
rebuilds the adapter at load time). :class:`CalibrationConfig` is the whole run: method, objective
weights (rho, mu, lambda), optimiser, early stopping and storage. Both read from and write to plain
dicts (JSON in adapter metadata, TOML for ``kgml-peft calibrate --config``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from kgml_peft import schema
from kgml_peft.config_files import check_keys, read_toml
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.model.backbone import GRU_NAMES

COMPONENTS: tuple[str, ...] = ("lora", "blocks", "head")
LORA_WEIGHTS: tuple[str, ...] = ("ih", "hh")
HEAD_KINDS: tuple[str, ...] = ("affine", "mlp")
METHODS: tuple[str, ...] = ("adapter", "full", "scratch")
STORAGE_DTYPES: tuple[str, ...] = ("float32", "float16")

#: Per-method defaults for the options left unset (``None``) in :class:`CalibrationConfig`.
METHOD_DEFAULTS: dict[str, dict[str, float | int]] = {
    "adapter": {"epochs": 100, "lr": 1e-2},
    "full": {"epochs": 40, "lr": 5e-4},
    "scratch": {"epochs": 150, "lr": 3e-3},
}


def _names(value: object, allowed: tuple[str, ...], what: str, empty_ok: bool = False) -> tuple[str, ...]:
    """A tuple of distinct names from ``allowed`` (order kept); a comma-separated string is split."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    expect_type(value, (list, tuple), what)
    names = tuple(value)
    for name in names:
        if name not in allowed:
            raise KgmlPeftError(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise KgmlPeftError(f"{what} lists a name twice: {', '.join(names)}")
    if not names and not empty_ok:
        raise KgmlPeftError(f"{what} must name at least one of {', '.join(allowed)}")
    return names


@dataclass(frozen=True)
class AdapterConfig:
    """Architecture of a site adapter phi_s: LoRA on GRU weights, bottleneck blocks, output head."""

    #: which parts are present (any non-empty subset of :data:`COMPONENTS`)
    components: tuple[str, ...] = COMPONENTS
    #: LoRA rank r and alpha (the update is alpha / r * B A)
    lora_rank: int = 1
    lora_alpha: float = 2.0
    #: GRUs whose weight matrices get LoRA, and which matrices (input-hidden, hidden-hidden)
    lora_targets: tuple[str, ...] = ("gru_ra", "gru_rh", "gru_nee")
    lora_weights: tuple[str, ...] = ("hh",)
    #: GRUs followed by a bottleneck block, and the block's inner size
    block_targets: tuple[str, ...] = ("gru_rh", "gru_nee")
    bottleneck: int = 2
    #: ``affine`` = per-output scale and shift; ``mlp`` adds a residual MLP on the input features
    head: str = "affine"
    head_hidden: int = 8

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "components", _names(self.components, COMPONENTS, "adapter component"))
        set_(self, "lora_targets", _names(self.lora_targets, GRU_NAMES, "LoRA target"))
        set_(self, "lora_weights", _names(self.lora_weights, LORA_WEIGHTS, "LoRA weight"))
        set_(self, "block_targets", _names(self.block_targets, GRU_NAMES, "block target"))
        for key in ("lora_rank", "bottleneck", "head_hidden"):
            expect_type(getattr(self, key), int, key)
            if getattr(self, key) < 1:
                raise KgmlPeftError(f"{key} must be >= 1, got {getattr(self, key)}")
        expect_type(self.lora_alpha, (int, float), "lora_alpha")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise KgmlPeftError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        set_(self, "lora_alpha", float(self.lora_alpha))
        expect_type(self.head, str, "head")
        if self.head not in HEAD_KINDS:
            raise KgmlPeftError(f"head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}")

    @property
    def lora_parameters(self) -> tuple[str, ...]:
        """The GRU weight names LoRA targets, e.g. ``gru_rh.weight_hh_l1`` (every layer)."""
        layers = {"gru_basis": 2, "gru_ra": 1, "gru_rh": 2, "gru_nee": 1}
        return tuple(f"{gru}.weight_{kind}_l{layer}" for gru in self.lora_targets
                     for layer in range(layers[gru]) for kind in self.lora_weights)

    def to_dict(self) -> dict:
        """JSON-ready form (stored in every adapter file)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        expect_type(data, dict, "adapter config")
        check_keys(data, {f.name for f in dataclasses.fields(cls)}, "adapter config")
        return cls(**data)


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
    #: epochs without validation improvement before stopping (0 = run every epoch)
    patience: int = 30
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
        if self.batch_sites > 1 and self.unfreeze:
            raise KgmlPeftError("batch_sites > 1 cannot be combined with unfreeze: units that "
                                "replace backbone weights cannot share one pass")

    def to_dict(self) -> dict:
        """JSON-ready form with every default resolved (stored in adapter and checkpoint files)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["adapter"] = self.adapter.to_dict()
        data["unfreeze"] = list(self.unfreeze)
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
