"""What a site adapter is made of: :class:`AdapterConfig`, which travels inside every adapter file
and rebuilds the adapter at load time (JSON in the file's metadata, ``[adapter]`` in a calibration
TOML). Each component checks its own settings (:meth:`~kgml_peft.tuners.base.Component.check`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from kgml_peft.config_files import check_keys
from kgml_peft.errors import KgmlPeftError, expect_type
from kgml_peft.model.backbone import GRU_LAYERS
from kgml_peft.tuners import base

#: The built-in components, in the order they apply (``kgml_peft.tuners`` registers them).
COMPONENTS: tuple[str, ...] = ("lora", "blocks", "head")
LORA_WEIGHTS: tuple[str, ...] = ("ih", "hh")
HEAD_KINDS: tuple[str, ...] = ("affine", "mlp")
#: Largest inner size of a bottleneck block or of the head's MLP: a site adapter is kilobytes,
#: and a size beyond this is a typo that would allocate gigabytes (the LoRA rank is bounded by
#: the backbone's weights instead, see :class:`~kgml_peft.tuners.lora.Lora`).
MAX_SIZE = 4096


def names(value: object, allowed: tuple[str, ...], what: str, empty_ok: bool = False) -> tuple[str, ...]:
    """A tuple of distinct names from ``allowed`` (order kept); a comma-separated string is split."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    expect_type(value, (list, tuple), what)
    found = tuple(value)
    for name in found:
        if name not in allowed:
            raise KgmlPeftError(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
    if len(set(found)) != len(found):
        raise KgmlPeftError(f"{what} lists a name twice: {', '.join(found)}")
    if not found and not empty_ok:
        raise KgmlPeftError(f"{what} must name at least one of {', '.join(allowed)}")
    return found


def positive_int(value: object, key: str, most: int | None = None) -> int:
    """``value`` if it is an integer >= 1 (a size setting such as a rank) and, given ``most``, at
    most that: sizes are checked before anything of that size is allocated."""
    expect_type(value, int, key)
    if value < 1:
        raise KgmlPeftError(f"{key} must be >= 1, got {value}")
    if most is not None and value > most:
        raise KgmlPeftError(f"{key} must be <= {most}, got {value}")
    return value


@dataclass(frozen=True)
class AdapterConfig:
    """Architecture of a site adapter phi_s: LoRA on GRU weights, bottleneck blocks, output head,
    and any other registered component (settings in ``options[<component>]``)."""

    #: which parts are present (any non-empty subset of the registered components)
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
    #: settings of components registered beyond the built-ins: component name -> {key: value}
    #: (keys from the component's ``defaults``; left out of :meth:`to_dict` when empty)
    options: Mapping[str, Mapping[str, object]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        known = tuple(c.name for c in base.registered())
        object.__setattr__(self, "components", names(self.components, known, "adapter component"))
        expect_type(self.options, Mapping, "adapter options")
        options = {}
        for name, values in self.options.items():
            if name not in known:
                raise KgmlPeftError(f"adapter options name an unknown component {name!r}; "
                                    f"choose from {', '.join(known)}")
            expect_type(values, Mapping, f"options of component {name}")
            defaults = dict(next(c for c in base.registered() if c.name == name).defaults)
            check_keys(dict(values), set(defaults), f"options of component {name}")
            if defaults:  # a component without settings stores none
                options[name] = {**defaults, **values}
        object.__setattr__(self, "options", options)
        for component in base.registered():  # every component checks its settings, used or not
            for key, value in component.check(self).items():
                object.__setattr__(self, key, value)

    def option(self, component: str, key: str) -> object:
        """Setting ``key`` of ``component`` (its default when not given)."""
        if component in self.options:
            return self.options[component][key]
        return next(c for c in base.registered() if c.name == component).defaults[key]

    @property
    def lora_parameters(self) -> tuple[str, ...]:
        """The GRU weight names LoRA targets, e.g. ``gru_rh.weight_hh_l1`` (every layer)."""
        return tuple(f"{gru}.weight_{kind}_l{layer}" for gru in self.lora_targets
                     for layer in range(GRU_LAYERS[gru]) for kind in self.lora_weights)

    def to_dict(self) -> dict:
        """JSON-ready form (stored in every adapter file)."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if not self.options:  # files of the built-in components keep their original form
            del data["options"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        expect_type(data, dict, "adapter config")
        check_keys(data, {f.name for f in dataclasses.fields(cls)}, "adapter config")
        return cls(**data)
