"""Cross-validated calibration (``cv = "folds"``): folds, the strength of an adapter, and the choice
that keeps the global model when an adapter does not beat it out of sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kgml_peft import schema
from kgml_peft.calibration.calibrate import calibrate
from kgml_peft.calibration.folds import GAP_DAYS, block_folds, make_folds, year_folds
from kgml_peft.calibration.selection import STRENGTHS, shape_menu
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.inference import predict_windows
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.tuners.base import scale_adapter
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.tuners.site_model import SiteModel
from tests.conftest import make_frame, random_adapter, tiny_calibration

YEARS = (2003, 2004, 2005, 2006)
FLUXES = {"Ra": 1.0, "Rh": 1.0, "NEE": 1.0}


def _windows(years=YEARS, sites=None):
    frame = make_frame(sites or {"IA-001": "IA"}, years=years)
    features = load_backbone_features()
    return make_windows(validate_table(frame, features), features)


def load_backbone_features():
    from kgml_peft.model.backbone import BackboneConfig
    return BackboneConfig().features


def test_year_folds_leave_each_calendar_year_out_across_sites():
    windows = _windows(sites={"IA-001": "IA", "IA-002": "IA"})
    folds = year_folds(windows)
    assert [f.name for f in folds] == [f"year {y}" for y in YEARS]
    for fold, year in zip(folds, YEARS):
        assert set(fold.val.years) == {year} and len(fold.val) == 2
        assert year not in set(fold.train.years) and len(fold.train) == 6


def test_block_folds_share_out_the_observed_days_of_a_year_that_starts_late():
    windows = _windows(years=(2005,))
    windows.daily[:, :274] = np.nan  # a tower that started on day 275
    folds = make_folds(windows, ["NEE"])
    counts = [int(np.isfinite(f.val.target("NEE")).sum()) for f in folds]
    assert len(folds) == 4 and max(counts) - min(counts) <= 1 and sum(counts) == 91


def test_block_folds_cover_the_year_once_with_a_gap_that_neither_trains_nor_validates():
    windows = _windows(years=(2005,))
    folds = block_folds(windows)
    validated = np.zeros(schema.DAYS_PER_YEAR, dtype=int)
    for fold in folds:
        val_days = np.isfinite(fold.val.daily[0, :, 0])
        train_days = np.isfinite(fold.train.daily[0, :, 0])
        validated += val_days
        assert not (val_days & train_days).any()
        first, last = np.flatnonzero(val_days)[[0, -1]]
        near = np.zeros_like(val_days)
        near[max(first - GAP_DAYS, 0):last + GAP_DAYS + 1] = True
        assert not (train_days & near).any() and (train_days | near).all()
        assert np.isnan(fold.val.annual).all() and np.isfinite(fold.train.annual).any()
        np.testing.assert_array_equal(fold.train.inputs, windows.inputs)  # the whole year is read
    assert (validated == 1).all()


def test_too_little_data_for_folds_says_the_minimum():
    windows = _windows(years=(2005,))
    dry = windows.subset([0])
    dry.daily[:] = np.nan
    with pytest.raises(KgmlPeftError, match="at least 2 blocks of days with observations of NEE"):
        make_folds(dry, ["NEE"], "IA-001")


def test_strength_zero_is_the_backbone_and_one_the_adapter(backbone_path):
    backbone = load_backbone(backbone_path)
    config = AdapterConfig(head="mlp")
    adapter = random_adapter(backbone, "IA-001", config, unfreeze=("nee_out.bias",))
    x = torch.randn(3, schema.DAYS_PER_YEAR, len(backbone.config.features))

    def run(tensors):
        model = SiteModel(backbone.model, config)
        model.load_adapter_tensors(tensors)
        with torch.no_grad():
            return model.eval()(x)

    with torch.no_grad():
        bare = backbone.model.eval()(x)
        fresh = SiteModel(backbone.model, config).eval()(x)  # the identity adapter, same code path
    zero, one = (run(scale_adapter(adapter.tensors, config, backbone.model, t)) for t in (0.0, 1.0))
    half = run(scale_adapter(adapter.tensors, config, backbone.model, 0.5))
    full = run(adapter.tensors)
    for key in ("Ra", "Rh", "NEE", "Yield"):
        assert torch.equal(zero[key], fresh[key]) and torch.equal(one[key], full[key])
        torch.testing.assert_close(zero[key], bare[key], rtol=0, atol=1e-6)
        assert not torch.equal(half[key], fresh[key]) and not torch.equal(half[key], full[key])
    with pytest.raises(KgmlPeftError, match="strength"):
        scale_adapter(adapter.tensors, config, backbone.model, 1.5)


def test_shape_menu_goes_from_the_head_to_the_configured_adapter():
    assert list(shape_menu(AdapterConfig())) == ["head", "head+blocks", "lora+blocks+head"]
    assert list(shape_menu(AdapterConfig(components=("lora", "head")))) == ["head", "lora+head"]
    assert list(shape_menu(AdapterConfig(components=("lora",)))) == ["lora"]
    # one calibration year: the head only (within-year folds cannot judge what carries to next year)
    assert list(shape_menu(AdapterConfig(), years=1)) == ["head"]
    assert list(shape_menu(AdapterConfig(components=("lora",)), years=1)) == ["lora"]


def _site(backbone, scale: float, shift: float, noise: float, seed: int = 0, years=YEARS) -> pd.DataFrame:
    """One site whose targets are the backbone's own predictions, changed by ``scale``/``shift``
    and daily noise of sd ``noise`` (physical units)."""
    frame = make_frame({"IA-001": "IA"}, years=years, seed=seed)
    features = backbone.config.features
    windows = make_windows(validate_table(frame, features), features)
    pred = predict_windows(backbone.model, backbone.scalers, windows)
    rng = np.random.default_rng(seed)
    frame = frame.set_index("date")
    for i in range(len(windows)):
        dates = pd.DatetimeIndex(windows.dates[i])
        for name in ("Ra", "Rh", "NEE"):
            frame.loc[dates, name] = pred[name][i] * scale + shift + rng.normal(0, noise, len(dates))
        frame.loc[frame.index.year == windows.years[i], "Yield"] = pred["Yield"][i] * scale + shift
    frame["Reco"] = frame["Ra"] + frame["Rh"]
    return frame.reset_index()[list(make_frame().columns)]


def test_a_site_the_global_model_already_fits_keeps_the_global_model(backbone_path):
    """Targets = the global model's own predictions plus noise: no adapter can beat it out of
    sample, so cross-validation picks strength 0 and writes an identity adapter."""
    backbone = load_backbone(backbone_path)
    result = calibrate(backbone, _site(backbone, 1.0, 0.0, noise=0.3), "IA-001",
                       tiny_calibration(cv="folds", epochs=15, lr=0.05, targets=FLUXES), progress=False)
    cv = result.summary["metrics"]["cv"]
    assert cv["strength"] == 0.0 and cv["shape"] == "head" and cv["change_mean"] == 0.0
    assert cv["folds"] == [f"year {y}" for y in YEARS]
    assert all(v == 0 for v in result.adapter.tensors.values() for v in v.flatten())
    assert result.adapter.config.components == ("head",)
    # one member (all would be the identity), and widths from the global model's own residuals
    assert result.adapter.member_count == 1 and result.adapter.info["metrics"]["members"]["count"] == 1
    assert result.adapter.intervals["daily"]["NEE"]["scale"] == [0.0, 1.0]
    # every strength was scored on every fold: the adapters were worse than the global model
    losses = cv["shapes"]["head"]["mean_fold_ratio"]
    assert set(losses) == {str(t) for t in STRENGTHS} and min(losses, key=losses.get) == "0.0"
    x = torch.randn(2, schema.DAYS_PER_YEAR, len(backbone.config.features))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x)["NEE"], backbone.model.eval()(x)["NEE"], rtol=0, atol=1e-6)


def test_a_site_with_a_strong_shift_gets_an_adapter_that_beats_the_global_model_on_folds(backbone_path):
    backbone = load_backbone(backbone_path)
    result = calibrate(backbone, _site(backbone, 1.4, 0.8, noise=0.05), "IA-001",
                       tiny_calibration(cv="folds", epochs=15, lr=0.05, targets=FLUXES), progress=False)
    cv = result.summary["metrics"]["cv"]
    assert cv["strength"] > 0 and cv["epochs"] > 0
    assert all(c < g for c, g in zip(cv["chosen_loss"], cv["global_loss"]))
    assert cv["change_mean"] < -0.2
    assert result.summary["metrics"]["in_sample"] is True
    assert result.adapter.info["metrics"]["cv"]["strength"] == cv["strength"]


def test_cv_config_is_checked():
    from kgml_peft.calibration.config import CalibrationConfig

    # auto (the default): folds where they apply, none elsewhere
    assert CalibrationConfig().cv == "folds" and CalibrationConfig(cv="auto").cv == "folds"
    assert CalibrationConfig(batch_sites=2).cv == "none" and CalibrationConfig(method="full").cv == "none"
    assert CalibrationConfig(unfreeze=("nee_out",)).cv == "none"
    assert CalibrationConfig.from_dict(CalibrationConfig().to_dict()).cv == "folds"
    with pytest.raises(KgmlPeftError, match="members must be >= 1"):
        CalibrationConfig(members=0)
    with pytest.raises(KgmlPeftError, match="cv must be one of auto, none, folds"):
        CalibrationConfig(cv="loo")
    with pytest.raises(KgmlPeftError, match="adapter method"):
        CalibrationConfig(cv="folds", method="full")


def test_cli_cv_prints_the_fold_estimate_and_resume_skips_the_written_unit(backbone_path, tmp_path):
    from kgml_peft.cli import cli
    from kgml_peft.store.adapter import read_adapter
    from tests.test_cli_validation import _runner

    table = tmp_path / "sites.csv"
    make_frame({"IA-001": "IA"}, years=(2003, 2004, 2005)).to_csv(table, index=False, date_format="%Y-%m-%d")
    out = tmp_path / "adapters"
    out.mkdir()
    args = ["calibrate", "--data", str(table), "--backbone", str(backbone_path), "--out", str(out),
            "--site", "IA-001", "--cv", "folds", "--epochs", "4", "--batch-size", "2", "--quiet"]
    result = _runner().invoke(cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    assert "3 site-years, all in the folds" in result.stdout
    assert "cross-validation on 3 folds (year 2003, year 2004, year 2005)" in result.stdout
    assert "in-sample (all data)" in result.stdout
    adapter = read_adapter(out / "IA-001.safetensors")
    cv = adapter.info["metrics"]["cv"]
    assert len(cv["global_loss"]) == len(cv["chosen_loss"]) == 3 and cv["strength"] in STRENGTHS
    assert adapter.info["calibration"]["requested_adapter"] == AdapterConfig().to_dict()
    written = (out / "IA-001.safetensors").read_bytes()
    again = _runner().invoke(cli, [*args, "--resume"])
    assert again.exit_code == 0 and "already written by this run" in again.stdout
    assert (out / "IA-001.safetensors").read_bytes() == written


def _user_error(args: list[str], expect: tuple[str, ...], root) -> None:
    from kgml_peft.cli import cli
    from tests.test_cli_validation import _runner, _snapshot, check_user_error

    before = _snapshot(root)
    check_user_error(_runner().invoke(cli, args), args, expect, root, before)


@pytest.mark.parametrize("extra, message", [
    (["--batch-sites", "2"], "use batch_sites 1"),
    (["--method", "full"], "adapter method"),
])
def test_cli_cv_refuses_what_it_cannot_do_in_one_line(backbone_path, tmp_path, extra, message):
    out = tmp_path / "adapters"
    out.mkdir()
    _user_error(["calibrate", "--backbone", str(backbone_path), "--out", str(out), "--site", "IA-001",
                 "--cv", "folds", *extra], (message,), tmp_path)


def test_cli_cv_with_one_dry_year_says_the_minimum(backbone_path, tmp_path):
    frame = make_frame({"IA-001": "IA"}, years=(2005,))
    frame.loc[frame["date"] != "2005-07-01", ["Ra", "Rh", "NEE", "Reco"]] = np.nan  # one day observed
    table = tmp_path / "sites.csv"
    frame.to_csv(table, index=False, date_format="%Y-%m-%d")
    out = tmp_path / "adapters"
    out.mkdir()
    _user_error(["calibrate", "--data", str(table), "--backbone", str(backbone_path), "--out", str(out),
                 "--site", "IA-001", "--cv", "folds", "--targets", "NEE"],
                ("needs at least 2 blocks of days with observations of NEE", "--cv none"), tmp_path)


def test_many_years_are_grouped_into_at_most_three_contiguous_folds():
    windows = _windows(years=tuple(range(2001, 2013)), sites={"IA-001": "IA", "IA-002": "IA"})
    folds = year_folds(windows)
    assert len(folds) == 3 and all(f.name.startswith("years ") for f in folds)
    held = [sorted(set(f.val.years.tolist())) for f in folds]
    assert sorted(y for group in held for y in group) == list(range(2001, 2013))  # each year once
    assert all(group == list(range(group[0], group[-1] + 1)) for group in held)  # contiguous
    assert all(not set(f.train.years.tolist()) & set(group) for f, group in zip(folds, held))
    assert max(len(f.val) for f in folds) - min(len(f.val) for f in folds) <= 2  # ~equal site-years
    five = year_folds(_windows(years=tuple(range(2001, 2006))))  # up to 5 years: each year a fold
    assert [f.name for f in five] == [f"year {y}" for y in range(2001, 2006)]


def test_a_shape_stops_with_its_first_fold_and_its_refit_is_not_validated(backbone_path):
    """Units of one group (a shape's folds and its refit on all data) stop together at the end of
    the epoch in which the first of them early-stopped, not when every unit of the batch stopped;
    the refit (a follower) has no validation loss, and keeps its tensors after every epoch."""
    import dataclasses

    from accelerate.utils import set_seed

    from kgml_peft.calibration.batched import train_side_by_side
    from kgml_peft.calibration.units import prepare_unit

    backbone = load_backbone(backbone_path)
    config = tiny_calibration(cv="folds", epochs=25, lr=0.05, patience=2, targets=FLUXES)
    rows = validate_table(_site(backbone, 1.4, 0.8, noise=0.3), backbone.config.features)
    unit = prepare_unit(backbone, rows, "IA-001", "site", config)
    folds = make_folds(unit.train, list(unit.weights), unit.name)
    assert len(folds) == 4
    units = [dataclasses.replace(unit, name=f.name, train=f.train, val=f.val) for f in folds]
    units += [dataclasses.replace(unit, name=f"all data {i}", val=unit.train) for i in range(2)]
    groups, followers = [0, 1, 0, 1, 0, 1], [False] * 4 + [True] * 2
    set_seed(config.seed, deterministic=True)  # as its callers do: the dropout draws are seeded
    trained = train_side_by_side(backbone, units, config, history=True, groups=groups,
                                 followers=followers, progress=False)
    ran = [len(t.result.curve) - 1 for t in trained]

    def own_stop(curve: list[dict]) -> int:
        """The epoch at which patience stops a curve: ``patience`` epochs without a new best."""
        best = 0
        for c in curve[1:]:
            if c["val_loss"] < curve[best]["val_loss"]:
                best = c["epoch"]
            elif c["epoch"] - best >= config.patience:
                return c["epoch"]
        return len(curve)  # never: it stopped with its group first

    cut_short = 0
    for group in (0, 1):
        members = [i for i, g in enumerate(groups) if g == group]
        end = ran[members[0]]
        assert all(ran[i] == end for i in members), ran  # the group stopped together ...
        # ... at the first epoch at which one of its folds' own patience ran out
        own = [own_stop(trained[i].result.curve) for i in members if not followers[i]]
        assert end == min(own) < config.epochs, (ran, own)
        cut_short += sum(e > end for e in own)
    assert cut_short, ran  # a fold that had not stopped on its own stopped with its group
    assert ran[0] != ran[1], ran  # and the groups ended apart: neither waited for the other
    for t in trained[4:]:
        assert all(c["val_loss"] is None for c in t.result.curve)
        assert len(t.history) == len(t.result.curve)  # tensors kept after every epoch it ran
    for t in trained[:4]:
        assert all(c["val_loss"] is not None for c in t.result.curve)
    with pytest.raises(KgmlPeftError, match="stops on its own"):
        train_side_by_side(backbone, units[:1] + units[4:5], config, groups=[0, 1],
                           followers=[False, True], progress=False)
