"""Backbone outputs in physical units and as scaled targets (Reco = Ra + Rh is derived here)."""

from __future__ import annotations

import torch

from kgml_peft import schema
from kgml_peft.data.windows import Scalers


def physical(out: dict[str, torch.Tensor], scalers: Scalers) -> dict[str, torch.Tensor]:
    """Ra, Rh, NEE, Reco (gC m-2 d-1) and Yield (t ha-1) from scaled backbone outputs."""
    phys = {name: scalers.unscale(name, out[name]) for name in (*schema.FLUX_OUTPUTS, "Yield")}
    phys["Reco"] = phys["Ra"] + phys["Rh"]
    return phys


def scaled_targets(
    out: dict[str, torch.Tensor], scalers: Scalers, phys: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Every target in the scaled units of its own scaler, comparable to scaled observations."""
    scaled = {name: out[name] for name in (*schema.FLUX_OUTPUTS, "Yield")}
    phys = phys if phys is not None else physical(out, scalers)
    scaled["Reco"] = scalers.scale("Reco", phys["Reco"])
    return scaled
