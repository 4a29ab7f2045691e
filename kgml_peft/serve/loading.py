"""Adapters from files, checked against a backbone and made ready to run: the peft-wrapped site model
(:func:`apply_adapter`) or the plain-tensor serving layout (:func:`serving_adapter`)."""

from __future__ import annotations

import torch

from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.adapter import Adapter
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.store.library import check_fits
from kgml_peft.tuners.serving import ServingAdapter
from kgml_peft.tuners.site_model import SiteModel


def apply_adapter(backbone: Backbone, adapter: Adapter) -> SiteModel:
    """The site model of ``adapter`` on ``backbone`` (eval mode). Refuses an adapter made for
    another backbone or whose tensors do not fit its config (checked before anything is
    allocated); the backbone object itself is not modified."""
    check_fits(adapter, backbone)
    if adapter.member_weights is not None:
        raise KgmlPeftError(f"adapter {adapter.site} is a blend of {adapter.member_count} adapters, not one "
                            "site model; serve it with AdapterBank or kgml-peft predict")
    model = SiteModel(backbone.model, adapter.config)
    model.load_adapter_tensors(adapter.tensors)
    return model.eval()


def serving_adapter(adapter: Adapter, backbone: Backbone,
                    device: str | torch.device = "cpu") -> ServingAdapter:
    """Check ``adapter`` against ``backbone`` (fingerprint, features, tensor names and shapes)
    and lay it out for serving on ``device``."""
    check_fits(adapter, backbone)
    content_hash = str(adapter.info.get("content_hash", ""))

    def layout(name: str, tensors: dict[str, torch.Tensor], **extra) -> ServingAdapter:
        tensors = {k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}
        return ServingAdapter.from_tensors(name, tensors, adapter.config, content_hash=content_hash,
                                           path=adapter.path, **extra)

    members = tuple(layout(f"{adapter.site}#{m + 2}", t) for m, t in enumerate(adapter.members))
    return layout(adapter.site, adapter.tensors, members=members, intervals=adapter.intervals,
                  crops=adapter_crops(adapter), member_weights=adapter.member_weights)


def adapter_crops(adapter: Adapter) -> tuple[float, ...] | None:
    """The crops a cross-validated adapter applies to (``metrics.cv.crops``); None: any crop."""
    crops = ((adapter.info.get("metrics") or {}).get("cv") or {}).get("crops")
    if crops is None:
        return None
    if not isinstance(crops, list) or not all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                              for c in crops):
        raise KgmlPeftError(f"adapter {adapter.site}: metrics.cv.crops must be a list of Crop_Type codes")
    return tuple(float(c) for c in crops)
