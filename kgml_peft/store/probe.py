"""Outputs that must be finite: a probe of typical inputs for backbones and adapters, and the one
check of predicted values that every reader of predictions shares.

A file's hash proves it is as its writer left it, not that its numbers are usable: a backbone or
adapter with huge but finite weights passes every integrity check and then predicts inf or NaN.
:func:`probe_inputs` builds a small batch of realistic site-years from the backbone's own scalers
(every feature at its mean, and at its mean plus or minus two standard deviations following a
seasonal cycle), the same for every caller; :func:`check_adapter_outputs` (``adapters verify`` and
``import``) and :func:`check_backbone_outputs` (``predict``, ``evaluate``) run it and refuse
outputs that :func:`check_values` does not accept. ``predict`` and ``evaluate`` also check the
values they computed before writing or reporting anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.inference import PREDICTED
from kgml_peft.model.outputs import physical
from kgml_peft.store.adapter import Adapter
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.tuners.serving import ServingAdapter

#: Largest magnitude a prediction may have in physical units (gC m-2 d-1, t ha-1): real fluxes are
#: tens, so a larger value is an overflowing model whose squared errors would print as inf.
MAX_ABS = 1e6
#: Days of a probe site-year (the backbone's window length).
DAYS = 365


def probe_inputs(backbone: Backbone, days: int = DAYS) -> torch.Tensor:
    """Scaled inputs [4, days, F] built from ``backbone``'s scalers alone (deterministic): every
    feature at its mean; at its mean plus, and minus, 2 sd times a growing-season cycle; and at its
    mean plus 2 sd times a whole-year cycle."""
    t = np.arange(days) / days
    season = np.clip(np.sin(2 * math.pi * (t - 0.25)), 0, None)
    patterns = (np.zeros(days), 2 * season, -2 * season, 2 * np.sin(2 * math.pi * t))
    scalers = backbone.scalers
    columns = [[scalers.scale(f, scalers.mean[f] + scalers.std[f] * p) for f in backbone.config.features]
               for p in patterns]
    return torch.tensor(np.array(columns), dtype=torch.float32).transpose(1, 2).contiguous()


def first_bad(values: Mapping[str, torch.Tensor | np.ndarray]) -> str | None:
    """The first output in ``values`` (``PREDICTED`` order, then the rest) with a value that is
    not finite or beyond :data:`MAX_ABS`; None when every value is usable."""
    names = [*[n for n in PREDICTED if n in values], *[n for n in values if n not in PREDICTED]]
    for name in names:
        value = values[name]
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
        if not _usable(array, name).all():
            return name
    return None


def _usable(array: np.ndarray, name: str) -> np.ndarray:
    """Finite and within :data:`MAX_ABS`; interval bounds (``*_lo``, ``*_hi``) may also be NaN."""
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(array) & (np.abs(array) <= MAX_ABS)
    return usable | np.isnan(array) if name.endswith(("_lo", "_hi")) else usable


def check_values(values: Mapping[str, torch.Tensor | np.ndarray], what: str) -> None:
    """Raise, naming ``what`` (the adapter or backbone that computed them), unless every value of
    ``values`` is finite and within :data:`MAX_ABS`."""
    bad = first_bad(values)
    if bad is not None:
        raise KgmlPeftError(f"{what} predicts non-finite or overflowing {bad} (beyond +-{MAX_ABS:g}); "
                            "its weights are unusable")


def check_windows(values: Mapping[str, np.ndarray], owners: Sequence[str | None],
                  name: Callable[[str | None], str]) -> None:
    """:func:`check_values` for predictions of several windows (arrays with a leading window
    axis), blaming the owner of the first bad window: ``name(owners[i])`` (an adapter, or None for
    the backbone) says who computed window i."""
    if not len(owners):
        return
    bad = np.zeros(len(owners), dtype=bool)
    for key, value in values.items():
        array = np.asarray(value, dtype=np.float64).reshape(len(owners), -1)
        usable = _usable(array, key)
        bad |= ~usable.all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        check_values({k: v[first] for k, v in values.items()}, name(owners[first]))


def backbone_name(backbone: Backbone) -> str:
    """How messages name a backbone: its file, or its fingerprint."""
    return f"backbone {backbone.path}" if backbone.path else f"backbone {backbone.fingerprint[:16]}"


@torch.no_grad()
def check_backbone_outputs(backbone: Backbone) -> None:
    """Refuse a backbone whose predictions on :func:`probe_inputs` overflow."""
    model = backbone.model.eval()
    x = probe_inputs(backbone).to(next(model.parameters()).device)
    check_values(physical(model(x), backbone.scalers), f"{backbone_name(backbone)} (on typical inputs)")


@torch.no_grad()
def check_adapter_outputs(adapter: Adapter, backbone: Backbone) -> None:
    """Refuse an adapter whose predictions on ``backbone`` overflow on :func:`probe_inputs`, for
    every member (a blend's weighted mean of members is then within bounds too); the backbone
    alone is probed first, so that the message blames the right file. The adapter must already
    fit the backbone (:func:`~kgml_peft.store.library.check_fits`)."""
    check_backbone_outputs(backbone)
    model = backbone.model.eval()
    weights = dict(model.named_parameters())
    device = next(model.parameters()).device
    x = probe_inputs(backbone).to(device)
    where = adapter.path if adapter.path is not None else adapter.site
    members = [adapter.tensors, *adapter.members]
    for number, tensors in enumerate(members, start=1):
        served = ServingAdapter.from_tensors(adapter.site, {k: v.to(device=device, dtype=torch.float32)
                                                            for k, v in tensors.items()}, adapter.config)
        member = f" (member {number} of {len(members)})" if len(members) > 1 else ""
        check_values(physical(served.forward(model, weights, x), backbone.scalers),
                     f"adapter {where}{member} on {backbone_name(backbone)} (on typical inputs)")
