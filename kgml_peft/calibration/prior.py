"""A calibration that starts from what nearby fields already know: the neighbour prior.

With ``prior = "neighbours"`` a unit's adapter starts from the weight-space blend of the
``prior_k`` calibrated adapters nearest to the unit's location (the output store's adapters with
a recorded location; :mod:`kgml_peft.store.blend`), and Eq. 3's penalty pulls it towards that
blend instead of towards zero: rho ||phi - phi_nb||^2. One year of data then refines the
neighbours' adapter instead of starting from the identity. The weight-space blend is used because
the penalty lives in parameter space (the function-space blend has several members).

The prior covers the unit's own adapter config: components the neighbours lack start at zero (the
identity) as without a prior, and components the unit does not have are dropped. Cross-validation
(the default) keeps the whole prior in every fold and shape and trains only the shape's
components (with one calibration year, the head on top of the neighbours' LoRA and blocks); epoch
0 is the prior itself, and the strength t scales the result towards the global model as before
(:mod:`kgml_peft.calibration.selection`).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.units import CalibrationData
from kgml_peft.data.places import table_location
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.blend import find_neighbours, laid_out, merge_in_weight_space, padded_tensors, union_config
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.tuners.config import AdapterConfig


def with_neighbour_prior(data: CalibrationData, store: str | os.PathLike, backbone: Backbone,
                         config: CalibrationConfig) -> CalibrationData:
    """``data`` with its neighbour prior (tensors under the file names of the union of the
    neighbours' components) and the record of where it came from. The unit's own adapter (its
    name or any of its sites) is never its own neighbour."""
    location = table_location(data.rows)
    if location is None:
        raise KgmlPeftError(f"--prior neighbours needs the table's lat and lon columns ({data.name} has none)")
    exclude = {data.name, *[str(s) for s in data.rows["site"].unique()]}
    neighbours = find_neighbours(store, backbone, location["lat"], location["lon"], config.prior_k,
                                 exclude=sorted(exclude))
    union = union_config([n.adapter for n in neighbours])
    own = config.adapter.to_dict()
    for key, value in union.to_dict().items():
        if key != "components" and own.get(key) != value:
            raise KgmlPeftError(f"the neighbours' adapters differ from this calibration's in {key} "
                                f"({value} vs {own.get(key)}); calibrate with their adapter settings")
    members = [padded_tensors(n.adapter, union, backbone) for n in neighbours]
    prior = merge_in_weight_space(members, [n.weight for n in neighbours], union)
    record = {"kind": "neighbours", "k": config.prior_k, "lat": location["lat"], "lon": location["lon"],
              "sources": [{"site": n.adapter.site, "distance_km": round(n.distance_km, 3),
                           "weight": round(n.weight, 6),
                           "content_hash": str(n.adapter.info.get("content_hash", ""))} for n in neighbours]}
    return dataclasses.replace(data, prior=prior, prior_record=record)


def prior_tensors(prior: dict[str, torch.Tensor], adapter: AdapterConfig,
                  backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The prior laid out for ``adapter`` (one shape of the menu, or the unit's config): its
    tensors where the prior has them, zeros (the identity) elsewhere."""
    return laid_out(prior, adapter, backbone, "the neighbour prior")
