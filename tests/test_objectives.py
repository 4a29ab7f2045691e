"""The masked prediction loss and the physics loss."""

import math

import pytest
import torch

from kgml_peft import schema
from kgml_peft.data.windows import Scalers
from kgml_peft.train.objectives import physics_loss, prediction_loss


def batch_with(nee_target, mask):
    b, t = nee_target.shape
    daily = torch.zeros(b, t, len(schema.DAILY_TARGETS))
    daily_mask = torch.zeros(b, t, len(schema.DAILY_TARGETS), dtype=torch.bool)
    j = schema.DAILY_TARGETS.index("NEE")
    daily[..., j] = nee_target
    daily_mask[..., j] = mask
    return {"daily": daily, "daily_mask": daily_mask,
            "annual": torch.zeros(b, 1), "annual_mask": torch.zeros(b, 1, dtype=torch.bool)}


def test_masked_loss_ignores_nan_targets():
    pred = {"NEE": torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)}
    target = torch.tensor([[1.0, float("nan"), 5.0]])
    mask = torch.isfinite(target)
    loss = prediction_loss(pred, batch_with(target, mask), {"NEE": 1.0})
    assert loss.item() == pytest.approx(2.0)  # (0 + 4) / 2 observed days
    loss.backward()
    assert torch.isfinite(pred["NEE"].grad).all()
    assert pred["NEE"].grad[0, 1] == 0


def test_unobserved_target_contributes_nothing():
    pred = {"NEE": torch.zeros(1, 3), "Ra": torch.full((1, 3), 100.0)}
    target = torch.ones(1, 3)
    loss = prediction_loss(pred, batch_with(target, torch.ones(1, 3, dtype=torch.bool)),
                           {"NEE": 1.0, "Ra": 1.0})
    assert loss.item() == pytest.approx(1.0)
    assert not math.isnan(loss.item())


def test_physics_loss_scaled_by_nee_std():
    scalers = Scalers(mean={"NEE": 0.0}, std={"NEE": 2.0})
    phys = {"Ra": torch.tensor([1.0]), "Rh": torch.tensor([-1.0]), "NEE": torch.tensor([3.0])}
    gpp = torch.tensor([0.0])
    # residual 3 beyond tol*0 -> 3; negative Rh 1 -> total 4, / 2
    assert physics_loss(phys, gpp, scalers, tolerance=0.05).item() == pytest.approx(2.0)
