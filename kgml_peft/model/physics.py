"""Physics guidance of KGML-ag: loss terms for training and violation metrics in physical units.

All functions take fluxes in gC m-2 d-1 (physical units, not z-scores):

* mass balance: NEE should equal Ra + Rh - GPP. The loss penalises the part of the residual that
  exceeds a tolerance relative to respiration, ``relu(|NEE - Ra - Rh + GPP| - tol * |Ra + Rh|)``.
* non-negativity: Ra >= 0 and Rh >= 0, penalised by ``relu(-Ra) + relu(-Rh)``.
* response consistency: how Ra and Rh respond to a perturbed driver (GPP, soil carbon) should stay
  correlated with a reference model's response (the pretrained model); loss = 1 - correlation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F


def mass_balance_residual(
    ra: torch.Tensor, rh: torch.Tensor, nee: torch.Tensor, gpp: torch.Tensor
) -> torch.Tensor:
    """NEE - (Ra + Rh - GPP), element-wise (gC m-2 d-1)."""
    return nee - (ra + rh - gpp)


def _mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def mass_balance_loss(
    ra: torch.Tensor,
    rh: torch.Tensor,
    nee: torch.Tensor,
    gpp: torch.Tensor,
    tolerance: float = 0.05,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean excess mass-balance residual beyond ``tolerance * |Ra + Rh|``, divided by ``scale``."""
    excess = F.relu(mass_balance_residual(ra, rh, nee, gpp).abs() - tolerance * (ra + rh).abs())
    return _mean(excess, mask) / scale


def nonnegativity_loss(
    ra: torch.Tensor, rh: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean negative part of Ra and Rh, divided by ``scale``."""
    return _mean(F.relu(-ra) + F.relu(-rh), mask) / scale


def correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of two tensors, flattened."""
    a = a.flatten() - a.mean()
    b = b.flatten() - b.mean()
    return (a * b).sum() / (a.norm() * b.norm() + eps)


def response_consistency_loss(response: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1 - correlation between a model's response to a perturbation and a reference response."""
    return 1.0 - correlation(response, reference)


def perturbed_response(
    predict: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    x: torch.Tensor,
    feature_index: int,
    delta: float,
    outputs: tuple[str, ...] = ("Ra", "Rh"),
    base: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Change of ``outputs`` when input column ``feature_index`` of ``x`` is shifted by ``delta``.

    ``predict`` maps inputs to physical outputs; ``base`` (its output on ``x``) is reused if given.
    """
    shifted = x.clone()
    shifted[..., feature_index] = shifted[..., feature_index] + delta
    base = base if base is not None else predict(x)
    moved = predict(shifted)
    return {name: moved[name] - base[name] for name in outputs}


#: Absolute floor of the mass-balance violation test, gC m-2 d-1. In winter Ra + Rh is near 0, so a
#: 5 % relative tolerance is a few thousandths of a gram and any residual of the separate NEE branch
#: counts as a violation, although it is far below what towers resolve (their daily NEE noise alone
#: is about 0.25 gC m-2 d-1). With the floor a day counts only when its residual is also >= 0.1.
MASS_BALANCE_FLOOR = 0.1


def violation_metrics(
    ra: torch.Tensor,
    rh: torch.Tensor,
    nee: torch.Tensor,
    gpp: torch.Tensor,
    tolerance: float = 0.05,
    floor: float = MASS_BALANCE_FLOOR,
) -> dict[str, float]:
    """Physics violations in physical units over all given days.

    ``mass_balance_mae``: mean |NEE - (Ra + Rh - GPP)| (gC m-2 d-1);
    ``mass_balance_violation_rate``: share of days whose residual exceeds
    ``max(tolerance * |Ra + Rh|, floor)``;
    ``mass_balance_violation_rate_relative``: the same without the floor (the rate reported before
    the floor existed; winter days with Ra + Rh near 0 dominate it);
    ``negative_ra_rate`` / ``negative_rh_rate``: share of days with Ra < 0 / Rh < 0;
    ``negative_flux_mean``: mean of relu(-Ra) + relu(-Rh) (gC m-2 d-1).
    """
    residual = mass_balance_residual(ra, rh, nee, gpp).abs()
    relative = tolerance * (ra + rh).abs()
    return {
        "mass_balance_mae": float(residual.mean()),
        "mass_balance_violation_rate": float((residual > relative.clamp_min(floor)).float().mean()),
        "mass_balance_violation_rate_relative": float((residual > relative).float().mean()),
        "negative_ra_rate": float((ra < 0).float().mean()),
        "negative_rh_rate": float((rh < 0).float().mean()),
        "negative_flux_mean": float((F.relu(-ra) + F.relu(-rh)).mean()),
    }
