"""Adapter members and conformal prediction intervals: the quantiles, the file format, serving the
members as one mixed batch, and ``predict --interval/--annual`` through the real CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kgml_peft import uncertainty
from kgml_peft.calibration.calibrate import calibrate
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.inference import predict_windows
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.predict import predict_table
from kgml_peft.store.adapter import MEMBER_PREFIX, read_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.tuners.site_model import SiteModel
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import make_windows
from tests.conftest import make_frame, tiny_calibration

YEARS = (2003, 2004, 2005)


# ---- the conformal quantiles ------------------------------------------------------------------

@pytest.mark.parametrize("draw", ["normal", "student_t3", "lognormal"])
@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_conformal_intervals_cover_synthetic_residuals_within_3_percent(draw, level):
    """Exchangeable residuals: widths from 2000 calibration residuals cover 20000 new ones at the
    nominal level, within +-3 % (both the absolute and the spread-scaled score)."""
    rng = np.random.default_rng(7)
    sample = {"normal": lambda n: rng.normal(0, 1.5, n), "student_t3": lambda n: rng.standard_t(3, n),
              "lognormal": lambda n: rng.lognormal(0, 1, n) - np.exp(0.5)}[draw]
    spread = lambda n: rng.uniform(0.2, 2.0, n)  # noqa: E731 - heteroscedastic: error ~ spread
    s_cal, s_new = spread(2000), spread(20000)
    y_cal, y_new = sample(2000) * s_cal, sample(20000) * s_new
    record = uncertainty.daily_table(y_cal, np.zeros(2000), s_cal)
    assert record["scale"][0] == 1.0 and record["n"] == 2000
    lo, hi = uncertainty.daily_interval(np.zeros(20000), s_new, record, level, "test")
    got = uncertainty.coverage(y_new, lo, hi)["coverage"]
    assert abs(got - level) <= 0.03, (draw, level, got)
    # absolute scores (one member): the same guarantee
    flat = uncertainty.daily_table(y_cal, np.zeros(2000), np.zeros(2000))
    assert flat["scale"] == [0.0, 1.0]
    lo, hi = uncertainty.daily_interval(np.zeros(20000), np.zeros(20000), flat, level, "test")
    assert abs(uncertainty.coverage(y_new, lo, hi)["coverage"] - level) <= 0.03


def test_conformal_quantile_is_the_finite_sample_rank_and_says_when_scores_are_too_few():
    scores = np.arange(1, 10, dtype=float)  # 9 scores: level 0.9 needs rank ceil(10 * 0.9) = 9
    table = uncertainty.conformal_quantiles(scores)
    assert table[uncertainty.LEVELS.index(0.9)] == 9.0
    assert table[uncertainty.LEVELS.index(0.5)] == 5.0  # ceil(10 * 0.5) = 5
    assert table[uncertainty.LEVELS.index(0.91)] is None  # rank 10 > 9 scores
    assert uncertainty.quantile_at(table, 0.895, "x") == 9.0  # the next stored level up
    with pytest.raises(KgmlPeftError, match="too few out-of-sample residuals for a 0.95 interval"):
        uncertainty.quantile_at(table, 0.95, "x")
    for bad in (0, 1, -0.1, 1.5, True, "0.9"):
        with pytest.raises(KgmlPeftError, match="between 0 and 1"):
            uncertainty.check_level(bad)


def test_annual_scores_are_block_means_of_observed_days():
    residuals = np.full((1, 365), np.nan)
    residuals[0, :30] = 2.0           # block 1: 30 days, mean 2
    residuals[0, 30:39] = -5.0        # block 2: 9 observed days < MIN_BLOCK_DAYS: skipped
    residuals[0, 60:90:2] = -1.0      # block 3: 15 observed days, mean -1
    assert sorted(uncertainty.block_scores(residuals)) == [1.0, 2.0]


# ---- members in the adapter file and the bank ----------------------------------------------------

@pytest.fixture(scope="module")
def cv_result(backbone_path):
    """A real cross-validated calibration on a site with a strong shift (so the adapter is kept
    and its members differ)."""
    from tests.test_cv import _site

    backbone = load_backbone(backbone_path)
    return calibrate(backbone, _site(backbone, 1.4, 0.8, noise=0.05, years=YEARS), "IA-001",
                     tiny_calibration(cv="folds", epochs=8, lr=0.05, targets={"NEE": 1.0, "Reco": 1.0}),
                     progress=False)


def test_cross_validated_adapter_keeps_fold_members_and_widths(cv_result, tmp_path):
    adapter = cv_result.adapter
    cv = cv_result.summary["metrics"]["cv"]
    assert cv["strength"] > 0
    assert adapter.member_count == 1 + len(YEARS)  # all data + one per leave-one-year-out fold
    assert adapter.info["metrics"]["members"]["kinds"] == ["all data", *[f"year {y}" for y in YEARS]]
    assert any(not torch.equal(m[k], adapter.tensors[k]) for m in adapter.members for k in m)
    intervals = uncertainty.check_record(adapter.intervals, "test")
    assert intervals["daily"]["NEE"]["n"] > 900 and intervals["annual"]["NEE"]["n"] >= 30
    path = save_adapter(tmp_path / "IA-001.safetensors", adapter)
    assert path.stat().st_size < 64 * 1024
    back = read_adapter(path)
    assert back.member_count == adapter.member_count and back.intervals == adapter.intervals
    from kgml_peft.store.library import adapter_summary

    summary = adapter_summary(back)
    assert f"cross-validated on {len(YEARS)} folds" in summary and "the loss above is in-sample" in summary
    assert f"{1 + len(YEARS)} member(s); interval widths stored" in summary
    for got, want in zip(back.members, adapter.members):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_changed_member_tensor_is_refused(cv_result, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = save_adapter(tmp_path / "IA-001.safetensors", cv_result.adapter)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith(MEMBER_PREFIX))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(KgmlPeftError, match="content hash mismatch"):
        read_adapter(path)


def test_members_run_as_one_mixed_batch_each_row_as_its_own_site_model(cv_result, backbone_path):
    """predict_members: member 1 is the point prediction and the spread is the standard deviation
    of the members' own site-model predictions (an independent path: peft-wrapped, one at a time)."""
    backbone = load_backbone(backbone_path)
    windows = make_windows(validate_table(make_frame({"IA-001": "IA", "IL-001": "IL"}, years=(2003,)),
                                          backbone.config.features), backbone.config.features)
    bank = AdapterBank(backbone)
    bank.add(cv_result.adapter)
    out = bank.predict_members(windows, ["IA-001", None])
    own = []
    for tensors in (cv_result.adapter.tensors, *cv_result.adapter.members):
        model = SiteModel(backbone.model, cv_result.adapter.config)
        model.load_adapter_tensors(tensors)
        own.append(predict_windows(model.eval(), backbone.scalers, windows.subset([0])))
    bare = predict_windows(backbone.model, backbone.scalers, windows.subset([1]))
    np.testing.assert_allclose(out["NEE"][0], own[0]["NEE"][0], atol=1e-5)
    np.testing.assert_allclose(out["NEE"][1], bare["NEE"][0], atol=1e-5)
    spread = np.stack([o["NEE"][0] for o in own]).std(axis=0)
    np.testing.assert_allclose(out["NEE_spread"][0], spread, atol=1e-5)
    assert out["NEE_spread"][0].max() > 1e-3 and np.all(out["NEE_spread"][1] == 0)


@pytest.mark.parametrize("components", [("head",), ("blocks", "head"), ("lora", "blocks", "head")])
def test_members_share_the_gru_passes_before_their_first_difference(components, backbone_path):
    """A window's members read the same inputs: every GRU whose rows are identical within a window
    (same inputs, start state and LoRA columns) runs once per window, and the predictions are
    bit-identical to computing every row. Checked with an independent count of GRU rows run."""
    from dataclasses import replace

    from kgml_peft.tuners.config import AdapterConfig
    from kgml_peft.tuners import rows as rows_module
    from tests.conftest import random_adapter

    backbone = load_backbone(backbone_path)
    config = replace(AdapterConfig(), components=components)
    adapter = random_adapter(backbone, "IA-001", config, seed=1)
    members = [random_adapter(backbone, "IA-001", config, seed=s).tensors for s in (2, 3, 4, 5)]
    adapter = replace(adapter, members=members)
    windows = make_windows(validate_table(make_frame({"IA-001": "IA", "IL-001": "IL"}, years=(2003, 2004)),
                                          backbone.config.features), backbone.config.features)
    bank = AdapterBank(backbone)
    bank.add(adapter)
    names = ["IA-001" if s == "IA-001" else None for s in windows.sites]
    computed = []
    real_gru_rows, real_module_call = rows_module.gru_rows, torch.nn.GRU.__call__

    def counting_gru_rows(modules, inputs, *args):
        computed.append((tuple(id(m) for m in modules), inputs.shape[0]))
        return real_gru_rows(modules, inputs, *args)

    def counting_call(module, inputs, *args, **kwargs):
        computed.append(((id(module),), inputs.shape[0]))
        return real_module_call(module, inputs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rows_module, "gru_rows", counting_gru_rows)
        patch.setattr(torch.nn.GRU, "__call__", counting_call)
        shared = bank.predict_members(windows, names)
        shared_runs = list(computed)
        computed.clear()
        patch.setattr(rows_module, "shared_rows", lambda *a: None)  # every row computed
        every = bank.predict_members(windows, names)
        every_runs = list(computed)
    for key in every:
        assert np.array_equal(shared[key], every[key]), key
    assert shared["NEE_spread"][names.index("IA-001")].max() > 1e-3
    gru = {id(getattr(bank.model, n)): n for n in ("gru_basis", "gru_ra", "gru_rh", "gru_nee")}
    rows = {"+".join(gru[i] for i in ids): n for ids, n in shared_runs}
    ia, other = names.count("IA-001"), names.count(None)
    full, once = ia * adapter.member_count + other, ia + other
    assert all(n == full for ids, n in every_runs)
    # the backbone's first GRU never differs between members; the rest depends on the shape
    assert rows["gru_basis"] == once
    want = {("head",): (once, once), ("blocks", "head"): (once, full),
            ("lora", "blocks", "head"): (full, full)}[components]
    assert (rows.get("gru_ra+gru_rh", rows.get("gru_ra")), rows["gru_nee"]) == want


# ---- predict --interval / --annual through the CLI -----------------------------------------------

@pytest.fixture(scope="module")
def served(cv_result, backbone_path, tmp_path_factory):
    """A store with the cross-validated adapter and a table to predict."""
    root = tmp_path_factory.mktemp("intervals")
    store = root / "adapters"
    store.mkdir()
    save_adapter(store / "IA-001.safetensors", cv_result.adapter)
    table = root / "sites.csv"
    make_frame({"IA-001": "IA"}, years=(2006, 2007)).to_csv(table, index=False, date_format="%Y-%m-%d")
    return root, store, table


def _invoke(args):
    from kgml_peft.cli import cli
    from tests.test_cli_validation import _runner

    return _runner().invoke(cli, args)


def test_cli_predict_interval_writes_bounds_and_an_annual_table(served, backbone_path):
    root, store, table = served
    base = ["predict", "--data", str(table), "--backbone", str(backbone_path), "--adapters", str(store),
            "--site", "IA-001", "--quiet"]
    plain = _invoke([*base, "--out", str(root / "plain.csv")])
    assert plain.exit_code == 0, plain.output
    result = _invoke([*base, "--out", str(root / "daily.csv"), "--interval", "0.9",
                      "--annual", str(root / "annual.csv")])
    assert result.exit_code == 0, result.output
    assert "with 0.9 intervals" in result.stdout
    daily, point = pd.read_csv(root / "daily.csv"), pd.read_csv(root / "plain.csv")
    assert list(daily.columns[-4:]) == ["NEE_lo", "NEE_hi", "Reco_lo", "Reco_hi"]
    np.testing.assert_allclose(daily["NEE"], point["NEE"], atol=1e-5)
    assert (daily["NEE_lo"] < daily["NEE"]).all() and (daily["NEE"] < daily["NEE_hi"]).all()
    assert (daily["Reco_lo"] < daily["Reco_hi"]).all()
    annual = pd.read_csv(root / "annual.csv")
    assert list(annual["year"]) == [2006, 2007] and (annual["days"] == 365).all()
    sums = daily.assign(year=pd.to_datetime(daily["date"]).dt.year).groupby("year")["NEE"].sum()
    np.testing.assert_allclose(annual["NEE"], sums.values, rtol=1e-9)
    assert (annual["NEE_lo"] < annual["NEE"]).all() and (annual["NEE"] < annual["NEE_hi"]).all()
    assert (annual["level"] == 0.9).all()
    # a wider level gives wider bounds
    wide = _invoke([*base, "--out", str(root / "wide.csv"), "--interval", "0.95"])
    assert wide.exit_code == 0
    wider = pd.read_csv(root / "wide.csv")
    assert ((wider["NEE_hi"] - wider["NEE_lo"]) >= (daily["NEE_hi"] - daily["NEE_lo"]) - 1e-9).all()


@pytest.mark.parametrize("extra, message", [
    (["--interval", "0"], "between 0 and 1"),
    (["--interval", "1"], "between 0 and 1"),
    (["--interval", "-0.5"], "between 0 and 1"),
    (["--interval", "0.9", "--annual", "{out}"], "is also the output"),
    (["--interval", "0.9", "--out", "{data}", "--force"], "is the input"),
])
def test_cli_predict_interval_bad_input_is_one_line_and_writes_nothing(served, backbone_path, extra, message):
    from tests.test_cli_validation import _snapshot, check_user_error

    root, store, table = served
    out = root / "bad.csv"
    extra = [e.format(out=out, data=table) for e in extra]
    args = ["predict", "--data", str(table), "--backbone", str(backbone_path), "--adapters", str(store),
            "--site", "IA-001", "--quiet", *(["--out", str(out)] if "--out" not in extra else []), *extra]
    before = _snapshot(root)
    check_user_error(_invoke(args), args, (message,), root, before)


def test_cli_predict_interval_with_a_one_member_adapter_says_so(adapter_path, backbone_path, tmp_path):
    """Old single-member adapters still serve; an interval from one is refused in one line."""
    from tests.test_cli_validation import _snapshot, check_user_error

    store = tmp_path / "adapters"
    store.mkdir()
    (store / "IA-001.safetensors").write_bytes(adapter_path.read_bytes())
    assert read_adapter(store / "IA-001.safetensors").member_count == 1
    table = tmp_path / "sites.csv"
    make_frame({"IA-001": "IA"}, years=(2006,)).to_csv(table, index=False, date_format="%Y-%m-%d")
    base = ["predict", "--data", str(table), "--backbone", str(backbone_path), "--adapters", str(store),
            "--site", "IA-001", "--quiet", "--out", str(tmp_path / "p.csv")]
    assert _invoke(base).exit_code == 0
    args = [*base[:-1], str(tmp_path / "q.csv"), "--interval", "0.9"]
    before = _snapshot(tmp_path)
    check_user_error(_invoke(args), args, ("has no members or interval widths", "--cv folds"), tmp_path, before)


# ---- crops: a cross-validated adapter serves the crops it was calibrated on ----------------------

def test_adapter_calibrated_on_one_crop_leaves_other_crops_to_the_global_model(backbone_path, tmp_path):
    """Calibrated on two maize years (Crop_Type 1): a soybean year of the same site is served by
    the backbone, with the global model's stored widths; a table without Crop_Type, or with the
    crop undocumented (NaN, not a feature), puts no limit."""
    from tests.test_cv import _site

    backbone = load_backbone(backbone_path)
    site = _site(backbone, 1.4, 0.8, noise=0.05, years=(2003, 2005))
    site = site[pd.to_datetime(site["date"]).dt.year != 2004]  # make_frame spans 2003-2005; 2004 is soybean
    result = calibrate(backbone, site, "IA-001",
                       tiny_calibration(cv="folds", epochs=8, lr=0.05, targets={"NEE": 1.0, "Reco": 1.0}),
                       progress=False)
    assert result.summary["metrics"]["cv"]["crops"] == [1.0]
    assert result.summary["metrics"]["cv"]["strength"] > 0
    store = tmp_path / "adapters"
    store.mkdir()
    save_adapter(store / "IA-001.safetensors", result.adapter)
    table = make_frame({"IA-001": "IA"}, years=(2006, 2007))  # 2006 soybean (0), 2007 maize (1)
    bank = AdapterBank(backbone, store)
    got = predict_table(bank, table, site="IA-001", interval=0.9)
    assert got.other_crop == {"IA-001": 1} and got.used == {"IA-001": 1}
    soy = got.frame[pd.to_datetime(got.frame["date"]).dt.year == 2006]
    maize = got.frame[pd.to_datetime(got.frame["date"]).dt.year == 2007]
    assert soy["adapter"].isna().all() and (maize["adapter"] == "IA-001").all()
    features = backbone.config.features
    bare = predict_windows(backbone.model, backbone.scalers, make_windows(validate_table(table, features), features))
    np.testing.assert_allclose(soy["NEE"], bare["NEE"][0], atol=1e-5)
    assert np.abs(maize["NEE"].to_numpy() - bare["NEE"][1]).max() > 1e-3
    # the soybean year's bounds are the global model's widths (one member: constant half-width)
    width = (soy["NEE_hi"] - soy["NEE_lo"]).to_numpy()
    q = uncertainty.quantile_at(result.adapter.intervals["global"]["daily"]["NEE"]["quantiles"], 0.9, "x")
    np.testing.assert_allclose(width, 2 * q, rtol=1e-9)
    assert list(got.annual["adapter"].fillna("")) == ["", "IA-001"]
    # an undocumented crop (NaN) or an adapter without recorded crops puts no limit (the tiny
    # backbone reads Crop_Type, so a table cannot leave it out here: the rule itself is checked)
    from kgml_peft.serve.predict import _other_crop

    assert _other_crop((1.0,), float("nan")) is False and _other_crop(None, 0.0) is False
    assert _other_crop((1.0,), 0.0) is True and _other_crop((0.0, 1.0), 0.0) is False


def test_aggregation_slope_tells_independent_errors_from_a_persistent_bias():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1, (3, 365))
    assert uncertainty.aggregation_slope(noise) == pytest.approx(-0.5, abs=0.1)
    assert uncertainty.aggregation_slope(noise * 0.05 + 2.0) == pytest.approx(0.0, abs=0.02)
    # the annual scores of independent errors shrink by about sqrt(30 / 365)
    record = uncertainty.annual_table(noise)
    assert record["factor"] == pytest.approx((365 / 30) ** record["slope"]) and record["factor"] < 0.4
    few = np.full((1, 365), np.nan)
    few[0, :40] = 1.0  # too few blocks to measure: no shrinking
    assert uncertainty.aggregation_slope(few) == 0.0
