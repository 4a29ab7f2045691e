"""What ``kgml-peft experiment`` runs: regimes, seeds, splits and training sizes, as one config.

Every regime uses the same backbone architecture, the same per-site year split (train / validation
for early stopping / test) and the same physics weight, so their test MSEs compare. ``quick()`` is
a small version for CI (smaller model, fewer epochs, one seed) that exercises every regime.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from kgml_peft.tuners.config import COMPONENTS
from kgml_peft.config_files import check_keys, read_toml
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.model.backbone import BackboneConfig

#: The regimes the report compares per region (``regimes.<name>.<region>.<target>.mse``).
MAIN_REGIMES: tuple[str, ...] = ("site_only", "global_only", "full_finetune", "adapters")


#: Upper bound of the counts a config may ask for (epochs, batch sizes, patience, years).
MAX_COUNT = 100_000


@dataclass(frozen=True)
class Training:
    """One way of training: epochs, learning rate, batch size, early-stopping patience."""

    epochs: int
    lr: float
    batch_size: int
    patience: int

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "patience"):
            expect_type(getattr(self, key), int, key)
        expect_type(self.lr, (int, float), "lr")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 0 or not (
                math.isfinite(self.lr) and self.lr > 0):
            raise KgmlPeftError("training needs epochs >= 1, batch_size >= 1, patience >= 0, lr > 0")
        if max(self.epochs, self.batch_size, self.patience) > MAX_COUNT:
            raise KgmlPeftError(f"training epochs, batch_size and patience must be <= {MAX_COUNT}")


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole evaluation (see module docstring); every field has a default."""

    seeds: tuple[int, ...] = (0, 1, 2)
    #: regions to compare (None: every region of the data)
    regions: tuple[str, ...] | None = None
    #: per site: the last ``test_fraction`` of years test, the ``val_fraction`` before them
    #: validate (early stopping), the rest train
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    physics_weight: float = 0.1
    tolerance: float = 0.05
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(hidden_size=16, attention_size=8,
                                                                            yield_hidden=16))
    #: from random weights: global-only, site-only, cross-regional
    scratch: Training = Training(epochs=40, lr=1e-2, batch_size=16, patience=10)
    #: Eq. 2, every weight from the global model, mu-anchored
    finetune: Training = Training(epochs=30, lr=5e-4, batch_size=16, patience=8)
    #: Eq. 3, the adapter on the frozen global model
    adapter: Training = Training(epochs=30, lr=1e-2, batch_size=16, patience=8)
    mu: float = 1.0
    rho: float = 1e-3
    #: adapter component ablations (each a set of components) and LoRA ranks (all components)
    ablations: tuple[tuple[str, ...], ...] = (("lora",), ("blocks",), ("head",), COMPONENTS)
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    #: (lr, batch size) pairs for full fine-tuning and adapters
    sensitivity: tuple[tuple[float, int], ...] = ((1e-3, 32), (1e-3, 16), (1e-2, 32))
    #: site training years for the data-scarcity curves (the most recent ones; all = every year)
    scarcity: tuple[int, ...] = (1, 2, 4)
    #: also train on every pair of regions for the cross-regional matrix
    pairs: bool = True
    #: new fields: the last ``new_sites_per_region`` sites (by id) of each region are left out of
    #: a second global model entirely; each calibrates on its first k years (k in
    #: ``new_site_years``) and is tested on its years after the largest k (0: no new fields)
    new_sites_per_region: int = 2
    new_site_years: tuple[int, ...] = (1, 2, 3)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        expect_type(self.seeds, (list, tuple), "seeds")
        set_(self, "seeds", tuple(self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise KgmlPeftError("seeds must list at least one seed, each once")
        for seed in self.seeds:
            expect_type(seed, int, "seed")
            if not 0 <= seed < 2**32:
                raise KgmlPeftError(f"seed must be in [0, 2**32), got {seed}")
        if self.regions is not None:
            expect_type(self.regions, (list, tuple), "regions")
            set_(self, "regions", tuple(self.regions))
        for key in ("test_fraction", "val_fraction"):
            value = getattr(self, key)
            expect_type(value, (int, float), key)
            if not 0 < value < 0.5:
                raise KgmlPeftError(f"{key} must be in (0, 0.5), got {value}")
        for key in ("physics_weight", "tolerance", "mu", "rho"):
            expect_type(getattr(self, key), (int, float), key)
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise KgmlPeftError(f"{key} must be a finite number >= 0, got {getattr(self, key)}")
        set_(self, "ablations", tuple(tuple(a) for a in self.ablations))
        for parts in self.ablations:
            if not parts or any(p not in COMPONENTS for p in parts):
                raise KgmlPeftError(f"ablation {list(parts)}: choose components from {', '.join(COMPONENTS)}")
        set_(self, "ranks", tuple(self.ranks))
        set_(self, "sensitivity", tuple((float(lr), int(bs)) for lr, bs in self.sensitivity))
        set_(self, "scarcity", tuple(self.scarcity))
        for value in (*self.ranks, *self.scarcity):
            expect_type(value, int, "rank / scarcity years")
            if value < 1:
                raise KgmlPeftError("ranks and scarcity years must be >= 1")
        # before any global model trains: a rank the backbone's GRUs cannot hold (LoRA targets
        # hidden-to-hidden weights, so at most hidden_size) or a huge batch would fail hours later
        if max(self.ranks, default=1) > self.backbone.hidden_size:
            raise KgmlPeftError(f"ranks must be <= the backbone's hidden_size {self.backbone.hidden_size}")
        if any(not 1 <= bs <= MAX_COUNT for _, bs in self.sensitivity):
            raise KgmlPeftError(f"sensitivity batch sizes must be between 1 and {MAX_COUNT}")
        if max(self.scarcity, default=1) > MAX_COUNT:
            raise KgmlPeftError(f"scarcity years must be <= {MAX_COUNT}")
        expect_type(self.new_sites_per_region, int, "new_sites_per_region")
        expect_type(self.new_site_years, (list, tuple), "new_site_years")
        set_(self, "new_site_years", tuple(sorted(self.new_site_years)))
        for value in self.new_site_years:
            expect_type(value, int, "new_site_years entry")
        if self.new_sites_per_region < 0 or (self.new_sites_per_region and (
                not self.new_site_years or min(self.new_site_years) < 1
                or len(set(self.new_site_years)) != len(self.new_site_years))):
            raise KgmlPeftError("new_sites_per_region must be >= 0, and new_site_years must list "
                                "distinct year counts >= 1")

    @classmethod
    def quick(cls) -> ExperimentConfig:
        """Every regime, small: hidden size 8, a few epochs, one seed, two ranks and one
        sensitivity and scarcity point (CI)."""
        small = Training(epochs=2, lr=1e-2, batch_size=16, patience=0)
        return cls(seeds=(0,), backbone=BackboneConfig(hidden_size=8, attention_size=4, yield_hidden=8),
                   scratch=small, finetune=dataclasses.replace(small, lr=5e-4),
                   adapter=dataclasses.replace(small, lr=1e-2), ranks=(1, 2),
                   sensitivity=((1e-3, 32),), scarcity=(1,), new_sites_per_region=1,
                   new_site_years=(1,))

    def to_dict(self) -> dict:
        """JSON-ready form (stored in results.json)."""
        data = dataclasses.asdict(self)
        data["backbone"] = self.backbone.to_dict()
        data["regions"] = list(self.regions) if self.regions is not None else None
        return {k: (list(map(list, v)) if k in ("ablations", "sensitivity") else
                    list(v) if isinstance(v, tuple) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        """Build from a dict shaped like :meth:`to_dict` (every key optional)."""
        return config_from_dict(cls, data, "experiment config")

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> ExperimentConfig:
        """Read a TOML file whose keys are those of :meth:`to_dict`."""
        return cls.from_dict(read_toml(path))


def config_from_dict(cls, data: dict, what: str, backbone_defaults: dict | None = None):
    """A suite config dataclass ``cls`` from a dict (every key optional, unknown keys refused):
    ``backbone`` becomes a :class:`BackboneConfig` (``backbone_defaults`` under the given keys) and
    each :class:`Training` field a Training whose missing keys keep ``cls()``'s values."""
    expect_type(data, dict, what)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(data, set(fields), what)
    data = dict(data)
    defaults = cls()
    try:
        if "backbone" in data:
            data["backbone"] = BackboneConfig.from_dict({**(backbone_defaults or {}), **data["backbone"]})
        for key in [k for k in data if isinstance(getattr(defaults, k), Training)]:
            check_keys(data[key], {f.name for f in dataclasses.fields(Training)}, f"[{key}]")
            data[key] = Training(**{**dataclasses.asdict(getattr(defaults, key)), **data[key]})
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise KgmlPeftError(f"bad {what}: {exc}") from None
