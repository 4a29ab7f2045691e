"""What a site adapter is made of: :class:`AdapterConfig`, which travels inside every adapter file
and rebuilds the adapter at load time (JSON in the file's metadata, ``[adapter]`` in a calibration
TOML)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from kgml_peft.config_files import check_keys
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.model.backbone import GRU_LAYERS, GRU_NAMES

COMPONENTS: tuple[str, ...] = ("lora", "blocks", "head")
LORA_WEIGHTS: tuple[str, ...] = ("ih", "hh")
HEAD_KINDS: tuple[str, ...] = ("affine", "mlp")


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
        return tuple(f"{gru}.weight_{kind}_l{layer}" for gru in self.lora_targets
                     for layer in range(GRU_LAYERS[gru]) for kind in self.lora_weights)

    def to_dict(self) -> dict:
        """JSON-ready form (stored in every adapter file)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        expect_type(data, dict, "adapter config")
        check_keys(data, {f.name for f in dataclasses.fields(cls)}, "adapter config")
        return cls(**data)
