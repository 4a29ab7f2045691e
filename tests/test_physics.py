"""Physics terms on hand-made tensors."""

import pytest
import torch

from kgml_peft.model import physics


def test_mass_balance_zero_when_balanced():
    ra, rh, gpp = torch.tensor([2.0, 5.0]), torch.tensor([1.0, 3.0]), torch.tensor([10.0, 1.0])
    nee = ra + rh - gpp
    assert torch.equal(physics.mass_balance_residual(ra, rh, nee, gpp), torch.zeros(2))
    assert physics.mass_balance_loss(ra, rh, nee, gpp, tolerance=0.0) == 0


def test_mass_balance_tolerance_and_scale():
    ra, rh, gpp = torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([6.0])
    nee = torch.tensor([-1.0])  # balanced would be -2: residual 1
    # tolerance 0.1 * |Ra+Rh| = 0.4 -> excess 0.6
    assert physics.mass_balance_loss(ra, rh, nee, gpp, tolerance=0.1).item() == pytest.approx(0.6)
    assert physics.mass_balance_loss(ra, rh, nee, gpp, tolerance=0.1, scale=2.0).item() == pytest.approx(0.3)
    assert physics.mass_balance_loss(ra, rh, nee, gpp, tolerance=0.25).item() == 0.0


def test_mass_balance_mask():
    ra = torch.tensor([1.0, 1.0])
    rh = torch.tensor([1.0, 1.0])
    gpp = torch.tensor([0.0, 0.0])
    nee = torch.tensor([2.0, 5.0])  # second day off by 3
    mask = torch.tensor([True, False])
    assert physics.mass_balance_loss(ra, rh, nee, gpp, 0.0, mask=mask).item() == 0.0
    assert physics.mass_balance_loss(ra, rh, nee, gpp, 0.0).item() == pytest.approx(1.5)


def test_nonnegativity():
    ra = torch.tensor([1.0, -2.0, 0.0])
    rh = torch.tensor([-1.0, 0.5, 0.0])
    assert physics.nonnegativity_loss(ra, rh).item() == pytest.approx(1.0)  # (1 + 2) / 3
    assert physics.nonnegativity_loss(ra.abs(), rh.abs()).item() == 0.0


def test_response_consistency():
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert physics.response_consistency_loss(2 * ref + 1, ref).item() == pytest.approx(0.0, abs=1e-6)
    assert physics.response_consistency_loss(-ref, ref).item() == pytest.approx(2.0, abs=1e-6)


def test_perturbed_response_is_the_difference():
    def predict(x):
        return {"Ra": 0.5 * x[..., 0], "Rh": x[..., 1] ** 2}

    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    resp = physics.perturbed_response(predict, x, 0, 2.0)
    torch.testing.assert_close(resp["Ra"], torch.full((1, 2), 1.0))
    torch.testing.assert_close(resp["Rh"], torch.zeros(1, 2))


def test_violation_metrics_in_physical_units():
    ra = torch.tensor([1.0, -1.0, 2.0, 2.0])
    rh = torch.tensor([1.0, 1.0, -0.5, 1.0])
    gpp = torch.tensor([5.0, 5.0, 5.0, 5.0])
    nee = ra + rh - gpp + torch.tensor([0.0, 0.0, 0.0, 2.0])
    m = physics.violation_metrics(ra, rh, nee, gpp, tolerance=0.1)
    assert m["mass_balance_mae"] == pytest.approx(0.5)
    assert m["mass_balance_violation_rate"] == pytest.approx(0.25)
    assert m["negative_ra_rate"] == pytest.approx(0.25)
    assert m["negative_rh_rate"] == pytest.approx(0.25)
    assert m["negative_flux_mean"] == pytest.approx(1.5 / 4)


def test_violation_rate_has_an_absolute_floor_for_winter_days():
    # winter: Ra + Rh = 0.2, so 5 % is 0.01; residuals of 0.05 break the relative test only,
    # 0.3 breaks both; summer: Ra + Rh = 10 -> 0.5 tolerance, residual 0.6 breaks both
    ra = torch.tensor([0.1, 0.1, 0.1, 6.0, 6.0])
    rh = torch.tensor([0.1, 0.1, 0.1, 4.0, 4.0])
    gpp = torch.tensor([0.0, 0.0, 0.0, 12.0, 12.0])
    nee = ra + rh - gpp + torch.tensor([0.05, 0.3, 0.0, 0.6, 0.4])
    m = physics.violation_metrics(ra, rh, nee, gpp, tolerance=0.05)
    assert m["mass_balance_violation_rate_relative"] == pytest.approx(3 / 5)
    assert m["mass_balance_violation_rate"] == pytest.approx(2 / 5)
    assert physics.violation_metrics(ra, rh, nee, gpp, tolerance=0.05, floor=0.0)[
        "mass_balance_violation_rate"] == pytest.approx(3 / 5)
