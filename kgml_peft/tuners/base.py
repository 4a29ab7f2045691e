"""The protocol every adapter component implements, and the registry that lists them.

An adapter is a set of *components* (LoRA on GRU weights, bottleneck blocks, the calibration
head, ...). Each is one :class:`Component` subclass in its own module; everything else (the config,
the training-side :class:`~kgml_peft.tuners.site_model.SiteModel`, the serving layout
:class:`~kgml_peft.tuners.serving.ServingAdapter`, mixed-batch rows and the compatibility check)
loops over :func:`registered` components instead of knowing any of them. A component:

* names and shapes its tensors for a config and backbone (:meth:`Component.shapes`): the names,
  all under the component's namespace ``<name>.``, are the adapter file format;
* makes its trainable tensors for training, starting as an exact identity
  (:meth:`Component.attach`), and says how they act in a training forward pass
  (:meth:`Component.training_part`);
* lays checked file tensors out for serving (:meth:`Component.layout`) and stacks several
  adapters' layouts for a batch whose rows use different adapters (:meth:`Component.stack`).

What a laid-out component does to a forward pass is a :class:`Part`: it may replace backbone
weights when one adapter runs on every row (:meth:`Part.merge`), transform a GRU's output sequence
(:meth:`Part.taps`), transform the output dict (:meth:`Part.outputs`) or add per-row low-rank
updates to GRU weights (:meth:`Part.row_updates`). docs/extending.md walks through adding one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.backbone import KGMLag, run_grus

if TYPE_CHECKING:  # type names only: the config module asks this registry which names are valid
    from kgml_peft.tuners.config import AdapterConfig
    from kgml_peft.tuners.rows import RowLora

#: Tensor-name prefix of backbone weights a calibration unfroze (not a component: ``unfreeze``)
BACKBONE_PREFIX = "backbone."

Tap = Callable[[torch.Tensor], torch.Tensor]


class Part:
    """What one component of one adapter (or of a mixed batch's rows) does to a forward pass.

    Every hook defaults to "nothing", so a part overrides only what it changes.
    """

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this part keeps resident (counted by the bank's memory bound)."""
        return []

    def merge(self, weights: MutableMapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
        """Put the backbone weights this part changes into ``weights`` (parameter name -> tensor;
        an entry already there is the value to build on, otherwise ``base``'s)."""

    def taps(self) -> dict[str, Tap]:
        """GRU name -> function applied to that GRU's output sequence [B, T, H]."""
        return {}

    def outputs(self, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The output dict (scaled units) after this part, given the inputs ``x`` [B, T, F]."""
        return out

    def row_updates(self) -> dict[str, RowLora]:
        """Per-row low-rank updates of GRU weights (``"gru_rh.weight_hh_l0"`` -> rows), for a
        mixed batch's hand-written GRU loop (:mod:`kgml_peft.tuners.rows`)."""
        return {}


class Component(ABC):
    """One kind of adapter part; subclass it in a module of its own and :func:`register` it."""

    #: the component's name in ``AdapterConfig.components`` and its tensors' namespace
    name: ClassVar[str]
    #: defaults of its settings in ``AdapterConfig.options[name]`` (components added after the
    #: built-in ones keep their settings there; the built-ins have fields of their own)
    defaults: ClassVar[Mapping[str, object]] = {}

    def check(self, config: AdapterConfig) -> dict[str, object]:
        """Validate this component's settings in ``config``; return the normalised values of the
        config fields it owns (field name -> value), or ``{}``. Raise :class:`KgmlPeftError`."""
        return {}

    @abstractmethod
    def shapes(self, config: AdapterConfig, backbone: KGMLag) -> dict[str, tuple[int, ...]]:
        """Tensor name (``<name>.…``, as stored in adapter files) -> shape, for ``config`` on
        ``backbone``. Must not allocate: ``backbone`` may live on the meta device."""

    @abstractmethod
    def attach(self, config: AdapterConfig, backbone: KGMLag) -> dict[str, nn.Parameter]:
        """Make this component's trainable tensors for training on ``backbone`` (a private copy
        it may modify in place, e.g. wrap with peft), with initial values that leave the
        backbone's predictions unchanged; random initial values come from torch's global RNG
        (the caller seeds it). Names and shapes as :meth:`shapes`."""

    def training_part(self, config: AdapterConfig, params: Mapping[str, torch.Tensor]) -> Part:
        """How the tensors of :meth:`attach` act in a training forward pass (default: as
        :meth:`layout` lays them out; a component that modified the backbone returns ``Part()``)."""
        return self.layout(config, params)

    @abstractmethod
    def layout(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> Part:
        """The serving layout of this component's checked tensors (file names). Take views and
        products only, so that gradients reach ``tensors`` (batched calibration trains this way)."""

    def scale(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        """This component's tensors with its change to the backbone scaled by ``strength``: 0 gives
        its identity values exactly, 1 the tensors unchanged (calibration chooses a strength on
        held-out folds). A component that cannot be scaled keeps the default, which refuses."""
        raise KgmlPeftError(f"component {self.name} cannot scale its change (it does not implement "
                            "Component.scale); choose the strength 1 or leave it out")

    @abstractmethod
    def stack(self, parts: Sequence[Part | None], index: torch.Tensor, like: torch.Tensor) -> Part:
        """One part for a batch whose row ``b`` uses ``parts[index[b]]`` (parts from this
        component's :meth:`layout`; ``None``: no such part, an exact identity). ``like`` gives
        dtype and device."""


_REGISTRY: dict[str, Component] = {}


def register(component: Component) -> Component:
    """Add ``component`` to the registry (order of registration = order of application and of
    random initialisation); a name may be registered once."""
    name = getattr(component, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or f"{name}." == BACKBONE_PREFIX:
        raise KgmlPeftError(f"a component needs an identifier as its name (not {name!r} or 'backbone')")
    if name in _REGISTRY and _REGISTRY[name] is not component:
        raise KgmlPeftError(f"a component named {name!r} is already registered")
    _REGISTRY[name] = component
    return component


def unregister(name: str) -> None:
    """Remove a registered component (tests that register a toy component clean up with this)."""
    _REGISTRY.pop(name, None)


def registered() -> tuple[Component, ...]:
    """Every registered component, in registration order."""
    return tuple(_REGISTRY.values())


def namespaces() -> tuple[str, ...]:
    """Tensor-name prefixes an adapter file may hold: one per component, plus ``backbone.``."""
    return (*(f"{c.name}." for c in registered()), BACKBONE_PREFIX)


def active(config: AdapterConfig) -> tuple[Component, ...]:
    """The components ``config`` uses, in registration order."""
    return tuple(c for c in registered() if c.name in config.components)


def own_tensors(component: Component, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` in ``component``'s namespace."""
    prefix = f"{component.name}."
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def adapter_shapes(config: AdapterConfig, backbone: KGMLag) -> dict[str, tuple[int, ...]]:
    """Every adapter tensor's name -> shape for ``config`` on ``backbone`` (no allocation)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for component in active(config):
        own = component.shapes(config, backbone)
        outside = [k for k in own if not k.startswith(f"{component.name}.")]
        if outside:
            raise KgmlPeftError(f"component {component.name} names tensor {outside[0]} outside "
                                f"its namespace {component.name}.")
        shapes.update(own)
    return shapes


def check_tensors(tensors: Mapping[str, torch.Tensor], config: AdapterConfig, backbone: KGMLag) -> list[str]:
    """Raise unless ``tensors`` holds exactly the adapter tensors of ``config`` on ``backbone``
    (names and shapes) plus ``backbone.<name>`` copies of backbone parameters; return the backbone
    parameter names those replace. This is the whole check of an adapter's fit to a backbone
    (the store adds the fingerprint and feature list)."""
    return check_named(tensors, adapter_shapes(config, backbone),
                       {k: tuple(v.shape) for k, v in backbone.named_parameters()})


def check_named(tensors: Mapping[str, torch.Tensor], own: Mapping[str, tuple[int, ...]],
                base: Mapping[str, tuple[int, ...]]) -> list[str]:
    """:func:`check_tensors` against known shapes: ``own`` (adapter tensor name -> shape) and
    ``base`` (backbone parameter name -> shape)."""
    unfrozen = sorted(k[len(BACKBONE_PREFIX):] for k in tensors if k.startswith(BACKBONE_PREFIX))
    unknown = [n for n in unfrozen if n not in base]
    if unknown:
        raise KgmlPeftError(f"adapter tensor {BACKBONE_PREFIX}{unknown[0]} names no backbone parameter")
    expected = {**own, **{f"{BACKBONE_PREFIX}{n}": base[n] for n in unfrozen}}
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        what = f"lacks {missing[0]}" if missing else f"has unexpected tensor {extra[0]}"
        raise KgmlPeftError(f"adapter {what} for its adapter config")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise KgmlPeftError(f"adapter tensor {name} has shape {list(tensor.shape)}, this "
                                f"backbone needs {list(expected[name])}")
    return unfrozen


def scale_adapter(tensors: Mapping[str, torch.Tensor], config: AdapterConfig, backbone: KGMLag,
                  strength: float) -> dict[str, torch.Tensor]:
    """An adapter's tensors with its whole change to ``backbone`` scaled by ``strength`` in [0, 1]:
    each component's :meth:`Component.scale`, and unfrozen ``backbone.<name>`` weights moved that
    fraction of the way from the global value. Strength 0 is the backbone itself."""
    if not 0.0 <= strength <= 1.0:
        raise KgmlPeftError(f"an adapter's strength must be in [0, 1], got {strength}")
    scaled: dict[str, torch.Tensor] = {}
    for component in active(config):
        scaled.update(component.scale(config, own_tensors(component, tensors), strength))
    weights = dict(backbone.named_parameters())
    for name, value in tensors.items():
        if name.startswith(BACKBONE_PREFIX):
            global_value = weights[name[len(BACKBONE_PREFIX):]].detach().to(value)
            scaled[name] = torch.lerp(global_value, value, strength)  # exact at 0 and 1
    if set(scaled) != set(tensors):
        raise KgmlPeftError(f"scaling the adapter lost or added tensors: {sorted(set(scaled) ^ set(tensors))[:1]}")
    return scaled


def run_parts(backbone: KGMLag, x: torch.Tensor, state: dict[str, torch.Tensor] | None,
              parts: Sequence[Part], *, weights: Mapping[str, torch.Tensor] | None = None,
              runner=run_grus) -> dict[str, torch.Tensor]:
    """The backbone's forward on ``x`` with ``parts`` applied: their taps after the GRUs (several
    on one GRU run in order), ``weights`` (parameter name -> tensor) in place of the backbone's,
    then each part's output transform. Scaled outputs, as :meth:`KGMLag.forward`."""
    taps: dict[str, Tap] = {}
    for part in parts:
        for gru, tap in part.taps().items():
            taps[gru] = tap if gru not in taps else _chain(taps[gru], tap)
    args, kwargs = (x, state), {"taps": taps, "runner": runner}
    out = functional_call(backbone, dict(weights), args, kwargs, strict=False) if weights else backbone(*args, **kwargs)
    for part in parts:
        out = part.outputs(out, x)
    return out


def _chain(first: Tap, second: Tap) -> Tap:
    return lambda h: second(first(h))
