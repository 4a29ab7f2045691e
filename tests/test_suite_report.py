"""The paper suite's per-target report: site-year errors, the bootstrap cell scores and the
baselines fitted on the experiment's split, each against a reference computed by hand here (numpy
least squares and pandas group means on the table itself, not the windows the code uses)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.report import merge_errors, score_cell
from kgml_peft.metrics import seasonal_cycle, site_year_errors


class _Windows:
    """The two attributes and the method :func:`site_year_errors` reads."""

    def __init__(self, sites, years, observed):
        self.sites, self.years, self._observed = np.asarray(sites), np.asarray(years), observed

    def target(self, name):
        return self._observed[name]


def test_site_year_errors_by_hand() -> None:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, 365))
    obs[0, :100] = np.nan  # a gap
    pred = obs + 0.5
    pred[2] += 1.0  # the third site-year is worse
    windows = _Windows(["A", "A", "B"], [2001, 2002, 2001], {"NEE": obs})
    out = site_year_errors(windows, {"NEE": np.nan_to_num(pred)}, ("NEE",))
    assert out["units"] == ["A:2001", "A:2002", "B:2001"]
    assert out["NEE"]["n"] == [265, 365, 365]
    assert out["NEE"]["sse"] == pytest.approx([265 * 0.25, 365 * 0.25, 365 * 2.25])
    # the anomaly reference uses each site's own cycle: site B's from its one year only
    cycle_a = seasonal_cycle(obs[:2])
    expected_a = np.nansum((obs[1] - cycle_a) ** 2)
    assert out["NEE"]["sst_anomaly"][1] == pytest.approx(expected_a)
    assert out["NEE"]["sst_anomaly"][2] == pytest.approx(np.sum((obs[2] - seasonal_cycle(obs[2:])) ** 2))


def _errors(units, sse, n, sst=None):
    return {"units": units, "NEE": {"sse": sse, "n": n, "sst_anomaly": sst or [10.0] * len(units)}}


def test_score_cell_pools_seeds_picks_the_best_baseline_and_pairs_the_intervals() -> None:
    units = ["A:1", "A:2", "B:1", "B:2"]
    rows = {
        "adapters": [_errors(units, [1.0, 2.0, 3.0, 4.0], [10, 10, 10, 10]),   # pooled 0.25
                     _errors(units, [2.0, 2.0, 2.0, 2.0], [10, 10, 10, 10])],  # pooled 0.20
        "regression_global": [_errors(units, [5.0, 5.0, 5.0, 5.0], [10, 10, 10, 10])],  # 0.5
        "climatology": [_errors(units, [4.0, 4.0, 4.0, 4.0], [10, 10, 10, 10])],  # 0.4: best
    }
    cell = score_cell(rows)
    adapters = cell["adapters"]["NEE"]
    assert adapters["mse"]["mean"] == pytest.approx(0.225) and adapters["mse"]["std"] == pytest.approx(0.025)
    assert cell["adapters"]["best_baseline"] == {"NEE": "climatology"}
    assert adapters["skill"] == pytest.approx(1 - 0.225 / 0.4)
    # R² on anomalies: 1 - pooled sse / pooled reference, mean over seeds
    assert adapters["r2_anomaly"] == pytest.approx(np.mean([1 - 10 / 40, 1 - 8 / 40]))
    lo, hi = adapters["mse_ci"]
    assert 0.1 <= lo < hi <= 0.35  # resamples of units: pooled MSE between 0.15 and 0.35
    # the climatology is the same 0.4 on every unit: a degenerate interval, and no skill interval
    assert cell["climatology"]["NEE"]["mse_ci"] == pytest.approx([0.4, 0.4])
    assert cell["climatology"]["NEE"]["skill_ci"] is None and cell["climatology"]["NEE"]["skill"] == 0
    # paired resamples: the regression is 1.25 x the climatology on every unit, so on every resample
    assert cell["regression_global"]["NEE"]["skill_ci"] == pytest.approx([-0.25, -0.25])
    # one site-year: no interval; different units: refused
    one = score_cell({"adapters": [_errors(["A:1"], [1.0], [10])], "climatology": [_errors(["A:1"], [2.0], [10])]})
    assert one["adapters"]["NEE"]["mse_ci"] is None and one["adapters"]["NEE"]["skill_ci"] is None
    with pytest.raises(KgmlPeftError, match="different site-years"):
        score_cell({"adapters": [_errors(["A:1", "A:2"], [1.0, 1.0], [1, 1])],
                    "climatology": [_errors(["A:1", "B:2"], [1.0, 1.0], [1, 1])]})


def test_merge_errors_joins_units_in_order() -> None:
    merged = merge_errors([_errors(["A:1"], [1.0], [2]), _errors(["B:1", "B:2"], [3.0, 4.0], [5, 6])])
    assert merged["units"] == ["A:1", "B:1", "B:2"]
    assert merged["NEE"]["sse"] == [1.0, 3.0, 4.0] and merged["NEE"]["n"] == [2, 5, 6]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    from kgml_peft.data.synthetic import SynthConfig, simulate
    from kgml_peft.experiments.config import ExperimentConfig
    from kgml_peft.experiments.runs import Experiment

    frame = simulate(SynthConfig(observed=True, obs_years=(6, 6), max_sites_per_region=3, regions=("IA", "IL")))
    config = dataclasses.replace(ExperimentConfig.quick(), new_site_years=(1, 2), scarcity=(1,))
    return frame, Experiment(frame, config, tmp_path_factory.mktemp("suite") / "out")


def _table_rows(frame: pd.DataFrame, keys: set[tuple[str, int]]) -> pd.DataFrame:
    year = frame["date"].dt.year
    return frame[[(s, y) in keys for s, y in zip(frame["site"], year)]].assign(year=year)


def _hand_regression(rows: pd.DataFrame) -> np.ndarray:
    rows = rows[~((rows["date"].dt.month == 2) & (rows["date"].dt.day == 29))]  # 365-day windows
    ok = rows["Reco"].notna()
    ta = rows["TMAX_AIR"] - rows["TDIF_AIR"] / 2  # the demo features have no TAVG_AIR
    x = np.column_stack([np.ones(len(rows)), ta, ta**2, rows["GPP"]])
    coef, *_ = np.linalg.lstsq(x[ok.to_numpy()], rows.loc[ok, "Reco"].to_numpy(), rcond=None)
    return coef


def _units(windows) -> set[tuple[str, int]]:
    return {(str(s), int(y)) for s, y in zip(windows.sites, windows.years)}


def _hand_mse(rows: pd.DataFrame, predicted_reco: np.ndarray) -> dict[str, float]:
    """Daily MSE of NEE and Reco (NEE = Reco - GPP) on the observed days of ``rows`` (Feb 29 out:
    the windows are 365 days)."""
    keep = ~((rows["date"].dt.month == 2) & (rows["date"].dt.day == 29)).to_numpy()
    out = {}
    for name, pred in (("Reco", predicted_reco), ("NEE", predicted_reco - rows["GPP"].to_numpy())):
        obs = rows[name].to_numpy()
        ok = np.isfinite(obs) & keep
        out[name] = float(np.mean((pred[ok] - obs[ok]) ** 2))
    return out


def test_region_baselines_match_a_fit_by_hand_on_the_table(experiment) -> None:
    from kgml_peft.experiments.suite_baselines import region_baselines

    frame, exp = experiment
    scores = region_baselines(exp, "IA")
    test = _table_rows(frame, _units(exp.split.region("test", ("IA",))))
    for name, train in (("regression_global", exp.split.train),
                        ("regression_site", exp.split.region("train", ("IA",))),
                        ("scarcity_regression_site_1y", exp.split.region("train", ("IA",), 1))):
        coef = _hand_regression(_table_rows(frame, _units(train)))
        ta = test["TMAX_AIR"] - test["TDIF_AIR"] / 2
        reco = coef[0] + coef[1] * ta + coef[2] * ta**2 + coef[3] * test["GPP"]
        expected = _hand_mse(test, reco.to_numpy())
        for target in ("NEE", "Reco"):
            got = scores[name][target]
            assert sum(got["sse"]) / sum(got["n"]) == pytest.approx(expected[target], rel=1e-6), (name, target)
    # per-site climatology: each test day predicted by its own site's mean of that day of the
    # window (Feb 29 dropped) over its training years
    from kgml_peft.experiments.suite_baselines import site_climatology

    train_windows, test_windows = exp.split.region("train", ("IA",)), exp.split.region("test", ("IA",))
    preds = site_climatology(train_windows, test_windows)["NEE"]
    train = _table_rows(frame, _units(train_windows))
    train = train[~((train["date"].dt.month == 2) & (train["date"].dt.day == 29))]
    train = train.assign(day=train.groupby(["site", "year"]).cumcount())
    means = train.groupby(["site", "day"])["NEE"].mean()
    checked = 0
    for i, (site, year) in enumerate(zip(test_windows.sites, test_windows.years)):
        hand = means.loc[str(site)].reindex(range(365)).to_numpy()
        ok = np.isfinite(hand)
        assert np.allclose(preds[i][ok], hand[ok]), (site, year)
        assert np.isfinite(preds[i]).all()  # days no training year observed are interpolated
        checked += int(ok.sum())
    assert checked > 0.9 * 365 * len(test_windows)
    assert set(scores) >= {"cross_regression_IA+IL", "scarcity_climatology_1y"}


def test_new_site_baselines_fit_on_the_first_k_years(experiment) -> None:
    from kgml_peft.experiments.suite_baselines import new_site_baselines

    frame, exp = experiment
    site = exp.new_sites["IA"][0]
    calibration, test = exp.new_site_parts(site, 1)
    scores = new_site_baselines(exp, site, 1)
    coef = _hand_regression(_table_rows(frame, _units(calibration)))
    rows = _table_rows(frame, _units(test))
    ta = rows["TMAX_AIR"] - rows["TDIF_AIR"] / 2
    expected = _hand_mse(rows, (coef[0] + coef[1] * ta + coef[2] * ta**2 + coef[3] * rows["GPP"]).to_numpy())
    got = scores["regression_site"]["Reco"]
    assert sum(got["sse"]) / sum(got["n"]) == pytest.approx(expected["Reco"], rel=1e-6)
    # the global regression is fitted without any new field: refitting it on known sites matches
    known = _hand_regression(_table_rows(frame, _units(exp.known(exp.split.train))))
    expected = _hand_mse(rows, (known[0] + known[1] * ta + known[2] * ta**2 + known[3] * rows["GPP"]).to_numpy())
    got = scores["regression_global"]["NEE"]
    assert sum(got["sse"]) / sum(got["n"]) == pytest.approx(expected["NEE"], rel=1e-6)
    assert scores["climatology"]["units"] == [f"{site}:{int(y)}" for y in test.years]


def test_data_a_baseline_cannot_fit_is_refused_before_any_training(experiment, tmp_path) -> None:
    """A new field whose first year has no observed Reco: the Reco regression of k = 1 cannot be
    fitted, and run_experiment says so before it trains anything (no folder is written)."""
    from kgml_peft.experiments.pipeline import run_experiment

    frame, exp = experiment
    site = exp.new_sites["IL"][0]
    first = int(exp.new_windows[site].years[0])
    frame = frame.copy()
    frame.loc[(frame["site"] == site) & (frame["date"].dt.year == first), ["NEE", "Reco"]] = np.nan
    out = tmp_path / "out"
    with pytest.raises(KgmlPeftError, match=f"baseline for new field {site}, first 1 year"):
        run_experiment(frame, exp.config, out, progress=False)
    assert not out.exists()


def test_a_folder_of_older_run_records_is_refused(experiment, tmp_path) -> None:
    """Run records without per-site-year errors cannot be reported per target: a folder whose
    experiment.json predates the record format is refused, not resumed."""
    import json

    from kgml_peft.experiments.pipeline import claim_folder

    _, exp = experiment
    identity = exp.identity()
    older = {k: v for k, v in identity.items() if k != "records"}
    (tmp_path / "experiment.json").write_text(json.dumps(older))
    with pytest.raises(KgmlPeftError, match="record format"):
        claim_folder(tmp_path, identity)


def test_a_region_without_observed_reco_in_its_test_years_is_refused(experiment, tmp_path) -> None:
    from kgml_peft.experiments.runs import Experiment

    frame, exp = experiment
    frame = frame.copy()
    test_years = {int(y) for s, y in zip(exp.split.test.sites, exp.split.test.years) if str(s).startswith("IL")}
    hide = frame["site"].str.startswith("IL") & frame["date"].dt.year.isin(test_years)
    frame.loc[hide, "Reco"] = np.nan
    with pytest.raises(KgmlPeftError, match="region IL has no observed Reco in its test years"):
        Experiment(frame, exp.config, tmp_path / "out")
    # a new field's test years (after its largest k) likewise
    frame, _ = experiment
    frame = frame.copy()
    site = exp.new_sites["IA"][0]
    late = [int(y) for y in exp.new_site_test(site).years]
    frame.loc[(frame["site"] == site) & frame["date"].dt.year.isin(late), "NEE"] = np.nan
    with pytest.raises(KgmlPeftError, match=f"new field {site} has no observed NEE in its test years"):
        Experiment(frame, exp.config, tmp_path / "out2")
