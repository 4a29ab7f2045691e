"""Adapters for places without data: blends of the nearest calibrated adapters.

Tobler's first law (near things are more related than distant ones) is the premise: a field
without a tower borrows from the calibrated fields around it. :func:`neighbour_blend` finds the k
adapters of a store nearest to a point (their recorded locations, :mod:`kgml_peft.data.places`),
weights them by distance (:func:`distance_weights`) and builds one adapter file from them:

* ``merge = "function"`` (the default) keeps every neighbour as a member of one multi-member
  adapter with the weights stored as a tensor (so the content hash covers them). Its prediction
  is the weighted mean of the neighbours' own predictions, exactly: the bank runs the members as
  rows of one batch and pools them (:class:`~kgml_peft.serve.bank.MemberRows`).
* ``merge = "weights"`` builds one ordinary adapter: each LoRA update merged as the weighted sum
  of ``B_i A_i`` and refactorised by truncated SVD at the adapters' rank (never A and B averaged
  apart), heads and blocks averaged. It is as cheap as one adapter and only approximates the
  weighted mean of predictions (the nonlinear GRUs); how far, the neighbourhood experiment measures.

Neighbours may differ in their components (cross-validation picks a head-only or a head+blocks
adapter for some sites): each is padded with zeros, an exact identity, to the union of the
components. Other settings (rank, targets, head kind) must agree. Blends, adapters that replace
backbone weights and adapters without a location are never used as neighbours.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kgml_peft import schema
from kgml_peft.data.places import check_point, nearest
from kgml_peft.errors import KgmlPeftError
from kgml_peft.atomic import check_outputs
from kgml_peft.store.adapter import BLEND_SCOPE, Adapter, read_adapter, save_adapter
from kgml_peft.store.library import SUFFIX, adapter_path
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.tuners import base
from kgml_peft.tuners.config import AdapterConfig

#: the distance kernel: w_i proportional to 1 / max(d_i, FLOOR_KM)^2, normalised to sum 1
#: (Shepard's inverse-distance weighting, power 2; the floor keeps a co-located field finite)
KERNEL = "inverse squared distance, 1 km floor"
FLOOR_KM = 1.0
MERGES: tuple[str, ...] = ("function", "weights")


@dataclass(frozen=True)
class Neighbour:
    """One source of a blend: the adapter, its distance (km) and weight."""

    adapter: Adapter
    distance_km: float
    weight: float


def distance_weights(distances_km: Sequence[float]) -> tuple[float, ...]:
    """The blend weights of neighbours at ``distances_km`` (see :data:`KERNEL`)."""
    if not distances_km:
        raise KgmlPeftError("a blend needs at least one neighbour")
    raw = [1.0 / max(float(d), FLOOR_KM) ** 2 for d in distances_km]
    total = math.fsum(raw)
    return tuple(w / total for w in raw)


def located_adapters(store: str | os.PathLike) -> dict[str, Adapter]:
    """The store's adapters that can be neighbours, by site: readable, with a recorded location,
    not blends, no replaced backbone weights. Unreadable files are skipped (``adapters list``
    shows them)."""
    folder = Path(store)
    if not folder.is_dir():
        raise KgmlPeftError(f"adapter store {folder} does not exist or is not a folder")
    found = {}
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            adapter = read_adapter(path)
        except KgmlPeftError:
            continue
        if adapter.location is None or adapter.info.get("scope") == BLEND_SCOPE:
            continue
        if any(k.startswith(base.BACKBONE_PREFIX) for k in adapter.tensors):
            continue
        found[adapter.site] = adapter
    return found


def find_neighbours(store: str | os.PathLike, backbone: Backbone, lat: float, lon: float, k: int = 3,
                    max_km: float | None = None, exclude: Sequence[str] = ()) -> list[Neighbour]:
    """The ``k`` adapters of ``store`` nearest to ``(lat, lon)`` within ``max_km`` (see
    :func:`located_adapters`; sites in ``exclude`` left out), weighted by :data:`KERNEL`."""
    located = located_adapters(store)
    return choose_neighbours({s: a for s, a in located.items() if s not in set(exclude)}, backbone,
                             lat, lon, k, max_km)


def choose_neighbours(located: Mapping[str, Adapter], backbone: Backbone, lat: float, lon: float, k: int,
                      max_km: float | None = None) -> list[Neighbour]:
    """The ``k`` of ``located`` (site -> adapter with a location) nearest to ``(lat, lon)`` within
    ``max_km``, weighted by :data:`KERNEL`; none in range raises
    :class:`~kgml_peft.data.places.NoneInRange`. Refuses neighbours made for another backbone
    than ``backbone``, naming them."""
    points = {site: (a.location["lat"], a.location["lon"]) for site, a in located.items()}
    chosen = nearest(points, lat, lon, k, max_km)
    foreign = [site for site, _ in chosen if located[site].backbone_fingerprint != backbone.fingerprint]
    if foreign:
        raise KgmlPeftError(f"neighbour(s) {', '.join(foreign)} were calibrated on another backbone than "
                            f"{backbone.fingerprint[:16]}; blend adapters of one backbone")
    weights = distance_weights([km for _, km in chosen])
    return [Neighbour(located[site], km, w) for (site, km), w in zip(chosen, weights)]


def union_config(adapters: Sequence[Adapter]) -> AdapterConfig:
    """One config that holds every adapter: the union of their components (in registration
    order); every other setting must be the same."""
    first = adapters[0]
    for other in adapters[1:]:
        for key, value in first.config.to_dict().items():
            if key != "components" and other.config.to_dict().get(key) != value:
                raise KgmlPeftError(f"adapters {first.site} and {other.site} differ in {key} "
                                    f"({value} vs {other.config.to_dict().get(key)}); a blend needs one "
                                    "adapter setting apart from the components")
    used = {c for a in adapters for c in a.config.components}
    return replace(first.config, components=tuple(c.name for c in base.registered() if c.name in used))


def padded_tensors(adapter: Adapter, config: AdapterConfig, backbone: Backbone) -> dict[str, torch.Tensor]:
    """``adapter``'s tensors laid out for the larger ``config`` (see :func:`laid_out`)."""
    return laid_out(adapter.tensors, config, backbone.model, f"adapter {adapter.site}")


def laid_out(tensors: Mapping[str, torch.Tensor], config: AdapterConfig, backbone: torch.nn.Module,
             what: str) -> dict[str, torch.Tensor]:
    """The tensors ``config`` has on ``backbone``: copies of ``tensors`` where it has them (the
    shapes must match), zeros elsewhere (every component is an exact identity at zero)."""
    out = {}
    for name, shape in base.adapter_shapes(config, backbone).items():
        tensor = tensors.get(name)
        if tensor is not None and tuple(tensor.shape) != tuple(shape):
            raise KgmlPeftError(f"{what}: tensor {name} has shape {list(tensor.shape)}, "
                                f"{list(shape)} is expected")
        out[name] = torch.zeros(shape) if tensor is None else tensor.detach().float().clone()
    return out


def merge_in_weight_space(members: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
                          config: AdapterConfig) -> dict[str, torch.Tensor]:
    """One set of tensors from ``members`` (same names): each LoRA pair as the rank-r truncated
    SVD of ``sum_i w_i B_i A_i``, every other tensor the weighted mean."""
    out: dict[str, torch.Tensor] = {}
    names = sorted(members[0])
    for name in names:
        if name.startswith("lora.") and name.endswith(".A"):
            stem = name[:-2]
            delta = sum(w * (m[f"{stem}.B"].double() @ m[f"{stem}.A"].double()) for m, w in zip(members, weights))
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            rank = members[0][name].shape[0]
            root = s[:rank].sqrt()
            out[f"{stem}.B"] = (u[:, :rank] * root).float()
            out[f"{stem}.A"] = (root[:, None] * vh[:rank]).float()
        elif not (name.startswith("lora.") and name.endswith(".B")):
            out[name] = sum(w * m[name].double() for m, w in zip(members, weights)).float()
    return out


def blend_adapters(neighbours: Sequence[Neighbour], name: str, backbone: Backbone, *, lat: float,
                   lon: float, merge: str = "function", settings: dict | None = None) -> Adapter:
    """The blend adapter ``name`` of ``neighbours`` for the point ``(lat, lon)`` (see module
    docstring); ``settings`` (k, max_km) are recorded with the sources, weights and distances."""
    schema.check_site_id(name, "blend name")
    lat, lon = check_point(lat, lon)
    if merge not in MERGES:
        raise KgmlPeftError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    if not neighbours:
        raise KgmlPeftError("a blend needs at least one neighbour")
    adapters = [n.adapter for n in neighbours]
    for adapter in adapters:
        if adapter.backbone_fingerprint != backbone.fingerprint:
            raise KgmlPeftError(f"neighbour {adapter.site} was calibrated on another backbone than "
                                f"{backbone.fingerprint[:16]}")
    config = union_config(adapters)
    members = [padded_tensors(a, config, backbone) for a in adapters]
    weights = tuple(n.weight for n in neighbours)
    record = {"lat": lat, "lon": lon, "merge": merge, "kernel": KERNEL, **(settings or {}),
              "sources": [{"site": n.adapter.site, "distance_km": round(n.distance_km, 3),
                           "weight": round(n.weight, 6),
                           "content_hash": str(n.adapter.info.get("content_hash", ""))} for n in neighbours]}
    info = {"scope": BLEND_SCOPE,
            "sites": sorted({s for a in adapters for s in a.info.get("sites") or [a.site]}),
            "regions": sorted({r for a in adapters for r in a.info.get("regions") or []}),
            "features": list(backbone.config.features), "targets": {},
            "calibration": {"method": "blend"}, "data": {}, "metrics": {"blend": record}}
    if merge == "weights":
        return Adapter(site=name, config=config, tensors=merge_in_weight_space(members, weights, config),
                       backbone_fingerprint=backbone.fingerprint, info=info)
    return Adapter(site=name, config=config, tensors=members[0], backbone_fingerprint=backbone.fingerprint,
                   info=info, members=members[1:], member_weights=weights)


def neighbour_blend(store: str | os.PathLike, backbone: Backbone, lat: float, lon: float, name: str,
                    k: int = 3, max_km: float | None = None, merge: str = "function",
                    exclude: Sequence[str] = ()) -> Adapter:
    """The blend of the ``k`` adapters of ``store`` nearest to ``(lat, lon)`` within ``max_km``
    (:func:`find_neighbours`, :func:`blend_adapters`), named ``name``."""
    schema.check_site_id(name, "blend name")
    if merge not in MERGES:
        raise KgmlPeftError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    neighbours = find_neighbours(store, backbone, lat, lon, k, max_km, exclude)
    return blend_adapters(neighbours, name, backbone, lat=lat, lon=lon, merge=merge,
                          settings={"k": k, "max_km": max_km})


def save_blend(adapter: Adapter, out: str | os.PathLike, neighbours: Sequence[Neighbour],
               force: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write a blend as ``<out>/<name>.safetensors`` (missing folders created by the write):
    never over one of its neighbours' files or ``inputs`` (e.g. the backbone's file), an
    existing file only with ``force``."""
    if Path(out).exists() and not Path(out).is_dir():
        raise KgmlPeftError(f"{out} is not a folder")
    target = adapter_path(out, adapter.site)
    sources = [n.adapter.path for n in neighbours if n.adapter.path is not None]
    check_outputs([target], [*sources, *inputs], force)
    return save_adapter(target, adapter)
