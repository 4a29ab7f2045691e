"""Training objectives: masked multi-target prediction loss plus lambda * L_phys (Eq. 1), and the
regularisers of site calibration: Eq. 2's anchor mu * ||theta_s - theta||^2 and Eq. 3's
rho * ||phi_s||^2 (added by the training loop through its ``penalty`` hook).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from kgml_peft import schema
from kgml_peft.data.windows import Scalers
from kgml_peft.model import physics
from kgml_peft.model.outputs import physical, scaled_targets


def target_errors(
    scaled: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], names: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sum of squared errors and observation counts, [B, len(names)] each."""
    sse, count = [], []
    for name in names:
        if name in schema.DAILY_TARGETS:
            j = schema.DAILY_TARGETS.index(name)
            target, mask = batch["daily"][..., j], batch["daily_mask"][..., j]
            dims = (1,)
        else:
            j = schema.ANNUAL_TARGETS.index(name)
            target, mask = batch["annual"][..., j], batch["annual_mask"][..., j]
            dims = ()
        m = mask.to(scaled[name].dtype)
        sq = torch.where(mask, scaled[name] - target, torch.zeros_like(target)).square() * m
        sse.append(sq.sum(dim=dims) if dims else sq)
        count.append(m.sum(dim=dims) if dims else m)
    return torch.stack(sse, -1), torch.stack(count, -1)


def prediction_loss(
    scaled: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
) -> torch.Tensor:
    """Weighted sum of each target's masked MSE (scaled units); unobserved targets add 0."""
    names = tuple(weights)
    sse, count = target_errors(scaled, batch, names)
    per_target = sse.sum(0) / count.sum(0).clamp_min(1.0)
    w = torch.tensor([weights[n] for n in names], dtype=per_target.dtype, device=per_target.device)
    return (per_target * w).sum()


def physics_loss(
    phys: Mapping[str, torch.Tensor], gpp: torch.Tensor, scalers: Scalers, tolerance: float
) -> torch.Tensor:
    """L_phys = mass-balance excess + negative Ra/Rh, both divided by the NEE scale."""
    scale = scalers.std["NEE"]
    mass = physics.mass_balance_loss(
        phys["Ra"], phys["Rh"], phys["NEE"], gpp, tolerance=tolerance, scale=scale
    )
    return mass + physics.nonnegativity_loss(phys["Ra"], phys["Rh"], scale=scale)


def objective(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    scalers: Scalers,
    weights: Mapping[str, float],
    physics_weight: float,
    tolerance: float,
    reference: torch.nn.Module | None = None,
    response_weight: float = 0.0,
    response_feature: int | None = None,
) -> torch.Tensor:
    """Eq. 1: L_pred + lambda * L_phys (+ response consistency against ``reference``)."""
    out = model(batch["x"])
    loss, phys = output_loss(out, batch, scalers, weights, physics_weight, tolerance)
    if reference is not None and response_weight and response_feature is not None:
        mine, ref = responses(model, reference, batch["x"], scalers, response_feature, phys)
        loss = loss + response_weight * response_loss(mine, ref)
    return loss


def output_loss(
    out: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    scalers: Scalers,
    weights: Mapping[str, float],
    physics_weight: float,
    tolerance: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_pred + lambda * L_phys of a model's outputs ``out`` on ``batch``; also the outputs in
    physical units."""
    phys = physical(out, scalers)
    loss = prediction_loss(scaled_targets(out, scalers, phys), batch, weights)
    if physics_weight:
        loss = loss + physics_weight * physics_loss(phys, batch["gpp"], scalers, tolerance)
    return loss, phys


def responses(
    model: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    reference: torch.nn.Module,
    x: torch.Tensor,
    scalers: Scalers,
    feature: int,
    base: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """How Ra and Rh of ``model`` (physical outputs ``base`` on ``x``) and of the frozen
    ``reference`` respond to input column ``feature`` shifted by one (scaled) unit."""
    def predict(inputs: torch.Tensor, net) -> dict[str, torch.Tensor]:
        return physical(net(inputs), scalers)

    mine = physics.perturbed_response(lambda v: predict(v, model), x, feature, 1.0, base=base)
    with torch.no_grad():
        ref = physics.perturbed_response(lambda v: predict(v, reference), x, feature, 1.0)
    return mine, ref


def response_loss(mine: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Response consistency: sum over outputs of 1 - corr(model response, reference response)."""
    return sum(physics.response_consistency_loss(mine[k], ref[k]) for k in mine)


def squared_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """||phi||^2: the sum of squares of every tensor in ``params`` (Eq. 3's adapter penalty)."""
    terms = [p.float().square().sum() for p in params]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def anchor_distance(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """||theta_s - theta||^2 over (trained, global) tensor pairs (Eq. 2's anchor to the backbone)."""
    terms = [(p.float() - ref.float()).square().sum() for p, ref in pairs]
    return torch.stack(terms).sum() if terms else torch.zeros(())
