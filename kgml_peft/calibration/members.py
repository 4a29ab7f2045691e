"""The members and interval widths of a cross-validated calibration.

Cross-validation leaves, next to the chosen all-data adapter, one adapter per fold, trained with
the same shape and epochs and scaled to the same strength. They become the adapter file's members:
the all-data adapter first (it serves point predictions), then the first ``members - 1`` fold
adapters. Each fold adapter never trained on its fold's validation days, so its residuals there
are out of sample; with the members' spread on the same days they give the split-conformal daily
and annual widths (:mod:`kgml_peft.uncertainty`) stored in the adapter's ``metrics.intervals``.
When the global model was chosen (strength 0) every member is the identity, so one is stored, and
the widths come from the global model's own residuals. The global model's widths are stored in
any case (``intervals.global``): a site-year of a crop the calibration never saw is served by the
global model (see :func:`calibration_crops`), with those widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kgml_peft import uncertainty
from kgml_peft.calibration.folds import Fold
from kgml_peft.model.inference import predict_windows
from kgml_peft.store.checkpoint import Backbone
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.tuners.site_model import SiteModel


def site_model(backbone: Backbone, adapter: AdapterConfig, tensors: dict[str, torch.Tensor]) -> SiteModel:
    """The site model of adapter tensors (eval mode)."""
    model = SiteModel(backbone.model, adapter)
    model.load_adapter_tensors(tensors)
    return model.eval()


def _predict(backbone: Backbone, adapter: AdapterConfig, tensors: dict[str, torch.Tensor], windows) -> dict:
    return predict_windows(site_model(backbone, adapter, tensors), backbone.scalers, windows)


def interval_record(backbone: Backbone, adapter: AdapterConfig, all_data: dict[str, torch.Tensor],
                    fold_tensors: Sequence[dict[str, torch.Tensor]], folds: Sequence[Fold],
                    stored: int) -> tuple[dict, dict]:
    """The ``metrics.intervals`` record (daily and annual widths of NEE and Reco) and the
    ``metrics.members`` record of a cross-validated calibration whose file keeps ``stored``
    members: the all-data adapter and the first ``stored - 1`` fold adapters."""
    members = [all_data, *fold_tensors[:stored - 1]]
    targets = uncertainty.INTERVAL_TARGETS
    observed, out_of_fold, spread, bare = ({t: [] for t in targets} for _ in range(4))
    with torch.no_grad():
        for f, fold in enumerate(folds):
            runs = [_predict(backbone, adapter, m, fold.val) for m in members] if len(members) > 1 else []
            # fold f's adapter is member f + 2 when it is stored: its predictions are in runs already
            own = runs[f + 1] if f + 1 < len(runs) else _predict(backbone, adapter, fold_tensors[f], fold.val)
            backbone_only = predict_windows(backbone.model.eval(), backbone.scalers, fold.val)
            for target in targets:
                observed[target].append(fold.val.target(target))
                out_of_fold[target].append(own[target])
                bare[target].append(backbone_only[target])
                spread[target].append(uncertainty.member_spread(np.stack([r[target] for r in runs]))
                                      if runs else np.zeros_like(own[target]))
    tables = {}
    for name, predicted, sds in (("adapter", out_of_fold, spread), ("global", bare, None)):
        daily, annual = {}, {}
        for target in targets:
            obs, pred = np.concatenate(observed[target]), np.concatenate(predicted[target])
            sd = np.concatenate(sds[target]) if sds is not None else np.zeros_like(pred)
            daily[target] = uncertainty.daily_table(obs, pred, sd)
            annual[target] = uncertainty.annual_table(obs - pred)
        tables[name] = {"daily": daily, "annual": annual}
    # the global model's widths serve site-years of crops the adapter was not calibrated on
    record = {"method": "split-conformal on out-of-fold residuals", **tables["adapter"],
              "global": tables["global"]}
    members_record = {"count": len(members), "kinds": ["all data", *[f.name for f in folds[:len(members) - 1]]]}
    return record, members_record


def calibration_crops(windows) -> list[float] | None:
    """The crops (``Crop_Type`` codes) of the calibration site-years, when every one is
    documented, else None. Cross-validation only speaks for the crops its folds held, so a
    cross-validated adapter is applied to these crops only (``predict`` serves other crops' years
    with the global model); unknown crops put no limit."""
    crops = np.asarray(windows.crops, dtype=float)
    if len(crops) == 0 or not np.isfinite(crops).all():
        return None
    return sorted({float(c) for c in crops})
