"""Tests of the process-based simulator (kgml_peft.data.synthetic)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from kgml_peft import schema
from kgml_peft.data.synthetic import (
    PROCESS_PARAMETERS,
    REGION_PARAMETERS,
    SITE_LAYOUT,
    SynthConfig,
    new_sites,
    simulate,
    site_parameters,
)
from kgml_peft.errors import KgmlPeftError

SMALL = SynthConfig(max_sites_per_region=2, max_years_per_site=3)
EXPECTED_COLUMNS = [
    schema.SITE, schema.REGION, schema.DATE, *schema.KGML_AG_INPUTS, "lat", "lon", "Ra", "Rh", "NEE", "Reco",
    "Yield",
]
WEATHER = ["RADN", "TMAX_AIR", "TDIF_AIR", "HMAX_AIR", "HDIF_AIR", "WIND", "PRECN"]


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return simulate(SMALL)


@pytest.fixture(scope="module")
def full() -> pd.DataFrame:
    return simulate(SynthConfig())


@pytest.fixture(scope="module")
def observed() -> pd.DataFrame:
    return simulate(SynthConfig(observed=True))


@pytest.fixture(scope="module")
def annual(full: pd.DataFrame) -> pd.DataFrame:
    """Annual sums per site-year of the default data set."""
    return full.groupby(["region", "site", "Year"]).agg(
        crop=("Crop_Type", "first"), GPP=("GPP", "sum"), Reco=("Reco", "sum"),
        NEE=("NEE", "sum"), peak=("GPP", "max"), Yield=("Yield", "first"),
        PRECN=("PRECN", "sum"),
    ).reset_index()


def assert_in_ranges(frame: pd.DataFrame) -> None:
    """Every contract column of ``frame`` (all KGML-ag inputs and targets at least) in range."""
    assert set(EXPECTED_COLUMNS[3:]) <= set(frame.columns)
    for name, column in schema.COLUMNS.items():
        if name not in frame.columns:
            continue
        values = frame[name].dropna()
        assert values.between(column.low, column.high).all(), (
            name, values.min(), values.max()
        )


# --- layout of the table -------------------------------------------------------------------------


def test_columns_types_and_order(small: pd.DataFrame) -> None:
    assert list(small.columns) == EXPECTED_COLUMNS
    assert small[schema.DATE].dtype == np.dtype("datetime64[ns]")
    for name in EXPECTED_COLUMNS[3:]:
        assert small[name].dtype == np.float64, name
    assert all(schema.SITE_ID_PATTERN.fullmatch(s) for s in small[schema.SITE].unique())
    assert set(small[schema.REGION]) == {"IA", "IL", "IN"}
    assert set(small["Crop_Type"]) <= {0.0, 1.0}


def test_sorted_and_every_calendar_day(small: pd.DataFrame) -> None:
    keys = small[[schema.SITE, schema.DATE]]
    assert keys.equals(keys.sort_values([schema.SITE, schema.DATE]).reset_index(drop=True))
    for _, group in small.groupby(schema.SITE):
        dates = group[schema.DATE]
        assert (dates.diff().dropna() == pd.Timedelta(days=1)).all()
        assert dates.iloc[0] == pd.Timestamp("2000-01-01")
        assert dates.iloc[-1] == pd.Timestamp("2002-12-31")
        assert pd.Timestamp("2000-02-29") in set(dates)
        assert (group["Year"] == group[schema.DATE].dt.year).all()


def test_yield_and_crop_constant_within_a_year(small: pd.DataFrame) -> None:
    per_year = small.groupby([schema.SITE, "Year"])
    assert (per_year["Yield"].nunique() == 1).all()
    assert (per_year["Crop_Type"].nunique() == 1).all()
    # corn-soybean rotation
    crops = per_year["Crop_Type"].first().unstack()
    assert (crops.diff(axis=1).abs().iloc[:, 1:] == 1).all().all()


# --- physics -------------------------------------------------------------------------------------


def test_mass_balance(small: pd.DataFrame) -> None:
    np.testing.assert_allclose(
        small["NEE"], small["Ra"] + small["Rh"] - small["GPP"], rtol=0, atol=1e-9
    )
    np.testing.assert_allclose(small["Reco"], small["Ra"] + small["Rh"], rtol=0, atol=1e-9)
    assert (small["Ra"] >= 0).all() and (small["Rh"] >= 0).all()
    assert (small["GPP"] >= 0).all()


def test_every_value_in_range_and_complete(full: pd.DataFrame) -> None:
    assert not full.isna().any().any()
    assert_in_ranges(full)
    # the flux-tower inputs derived from its humidity are in range too (synth --tower-weather)
    from kgml_peft.data.meteo import add_flux_tower_weather

    tower = add_flux_tower_weather(full)
    assert set(schema.FLUX_TOWER_INPUTS) <= set(tower.columns) and not tower.isna().any().any()
    assert_in_ranges(tower)


def test_static_soil_per_site(full: pd.DataFrame) -> None:
    soil = ["TBKDS", "TSAND", "TSILT", "TFC", "TWP", "TKSat", "TSOC", "TPH", "TCEC"]
    assert (full.groupby(schema.SITE)[soil].nunique() == 1).all().all()
    sites = full.groupby(schema.SITE)[soil].first()
    assert sites["TBKDS"].between(1.15, 1.55).all()
    assert sites["TSOC"].between(15, 40).all()
    assert (sites["TFC"] > sites["TWP"] + 0.05).all()


def test_state_climates(full: pd.DataFrame, annual: pd.DataFrame) -> None:
    month = full[schema.DATE].dt.month
    tmean = full["TMAX_AIR"] - full["TDIF_AIR"] / 2
    jan = tmean[month == 1].groupby(full[schema.REGION]).mean()
    jul = tmean[month == 7].groupby(full[schema.REGION]).mean()
    assert jan["IA"] < jan["IL"] < jan["IN"]
    assert jan.between(-8, 0).all() and jul.between(22, 27).all()
    precip = annual.groupby("region")["PRECN"].mean()
    assert precip["IA"] < precip["IL"] < precip["IN"]
    assert precip.between(800, 1200).all()
    radn = full["RADN"].groupby([full[schema.REGION], month]).mean().unstack()
    assert radn[1].between(5, 8).all() and radn[[6, 7]].mean(axis=1).between(19, 25).all()


def test_magnitudes_match_midwest_cropland(annual: pd.DataFrame) -> None:
    corn = annual[annual["crop"] == 1].mean(numeric_only=True)
    soy = annual[annual["crop"] == 0].mean(numeric_only=True)
    # ranges of the Nebraska FLUXNET2015 corn and soybean sites (docs/simulator.md)
    assert 1200 <= corn["GPP"] <= 1900
    assert 900 <= corn["Reco"] <= 1400
    assert -450 <= corn["NEE"] <= -200
    assert 18 <= corn["peak"] <= 28
    assert 600 <= soy["GPP"] <= 1100
    assert 600 <= soy["Reco"] <= 1150
    assert -200 <= soy["NEE"] <= 200
    assert 10 <= soy["peak"] <= 16
    assert 8.5 <= corn["Yield"] <= 13
    assert 3 <= soy["Yield"] <= 4.2


# --- data volume and heterogeneity ---------------------------------------------------------------


def test_default_volume_ratio(annual: pd.DataFrame) -> None:
    site_years = annual.groupby("region").size()
    assert site_years.to_dict() == {"IA": 164, "IN": 108, "IL": 88}
    assert site_years["IA"] * 27 == site_years["IN"] * 41
    assert site_years["IA"] * 22 == site_years["IL"] * 41
    assert (annual.groupby("site").size() >= 18).all()
    assert sum(sum(v) for v in SITE_LAYOUT.values()) == len(annual)


def test_shrunk_config_is_a_prefix_of_the_default(small: pd.DataFrame, full: pd.DataFrame) -> None:
    subset = full[full[schema.SITE].isin(set(small[schema.SITE]))
                  & (full[schema.DATE] < pd.Timestamp("2003-01-01"))].reset_index(drop=True)
    pd.testing.assert_frame_equal(subset, small)


def test_state_heterogeneity() -> None:
    for name in PROCESS_PARAMETERS:
        means = [getattr(p, name) for p in REGION_PARAMETERS.values()]
        assert max(means) >= 1.10 * min(means), name
    table = site_parameters()
    assert list(table["site"]) == sorted(table["site"])
    by_state = table.groupby("region")[list(PROCESS_PARAMETERS)]
    means, spread = by_state.mean(), by_state.std() / by_state.mean()
    for name in PROCESS_PARAMETERS:
        assert means[name].max() >= 1.08 * means[name].min(), name
        assert spread[name].between(0.01, 0.15).all(), name
    assert table.groupby("region")["TSOC"].mean().nunique() == 3
    assert (table["n_years"] >= 18).all()


# --- determinism ---------------------------------------------------------------------------------


def test_deterministic(small: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(simulate(SMALL), small)
    other = simulate(SynthConfig(seed=1, max_sites_per_region=2, max_years_per_site=3))
    assert list(other[schema.SITE]) == list(small[schema.SITE])
    assert not np.allclose(other["TMAX_AIR"], small["TMAX_AIR"])
    assert not np.allclose(other["NEE"], small["NEE"])
    pd.testing.assert_frame_equal(site_parameters(SMALL), site_parameters(SMALL))


def test_bad_configs_are_refused() -> None:
    with pytest.raises(KgmlPeftError):
        simulate(SynthConfig(regions=("NE",)))
    with pytest.raises(KgmlPeftError):
        simulate(SynthConfig(max_sites_per_region=0))
    with pytest.raises(KgmlPeftError):
        simulate(SynthConfig(seed=-1))


# --- observed (flux-tower) flavour ---------------------------------------------------------------


def test_observed_targets(observed: pd.DataFrame) -> None:
    assert list(observed.columns) == EXPECTED_COLUMNS
    assert observed["Ra"].isna().all() and observed["Rh"].isna().all()
    assert observed["NEE"].isna().any()
    assert (observed["NEE"].isna() == observed["Reco"].isna()).all()
    assert 0.10 <= observed["NEE"].isna().mean() <= 0.25
    month = observed[schema.DATE].dt.month
    gaps = observed["NEE"].isna()
    assert gaps[month.isin([12, 1, 2])].mean() > gaps[month.isin([6, 7, 8])].mean()
    assert not observed[list(schema.KGML_AG_INPUTS)].isna().any().any()
    assert not observed["Yield"].isna().any()
    assert_in_ranges(observed)
    # Reco is derived from NEE and GPP as in ONEFlux partitioning
    seen = ~gaps
    np.testing.assert_allclose(observed.loc[seen, "Reco"],
                               observed.loc[seen, "NEE"] + observed.loc[seen, "GPP"], atol=1e-9)


def test_observed_years(observed: pd.DataFrame, full: pd.DataFrame) -> None:
    assert set(observed[schema.SITE]) == set(full[schema.SITE])
    years = observed.groupby(schema.SITE)["Year"].agg(["min", "max", "nunique"])
    assert years["nunique"].between(3, 5).all()
    assert (years["max"] - years["min"] + 1 == years["nunique"]).all()
    days = observed.groupby([schema.SITE, "Year"]).size()
    assert days.isin([365, 366]).all()
    table = site_parameters(SynthConfig(observed=True)).set_index("site")
    assert (table["obs_first_year"] == years["min"]).all()
    assert (table["obs_last_year"] == years["max"]).all()


def test_observed_weather_equals_process_model_weather(
    observed: pd.DataFrame, full: pd.DataFrame
) -> None:
    both = observed.merge(full, on=[schema.SITE, schema.DATE], suffixes=("_obs", "_sim"))
    assert len(both) == len(observed)
    for name in [*WEATHER, "Crop_Type", "Year", "TSOC", "TFC"]:
        np.testing.assert_array_equal(both[f"{name}_obs"], both[f"{name}_sim"], err_msg=name)
    # the truth differs from the process model (reality gap + noise), but not wildly
    assert not np.allclose(both["GPP_obs"], both["GPP_sim"])
    assert np.corrcoef(both["GPP_obs"], both["GPP_sim"])[0, 1] > 0.95
    seen = both["NEE_obs"].notna()
    assert np.corrcoef(both.loc[seen, "NEE_obs"], both.loc[seen, "NEE_sim"])[0, 1] > 0.8
    ratio = both.groupby([schema.SITE, "Year_obs"])[["Yield_obs", "Yield_sim"]].first()
    ratio = ratio["Yield_obs"] / ratio["Yield_sim"]
    assert not np.allclose(ratio, 1.0) and ratio.between(0.6, 1.5).all()


def test_hidden_management_is_spatial_hidden_and_only_in_the_truth() -> None:
    """Coordinates lie in the state's box; hidden management changes the observed truth only,
    reveals itself in no input column, and nearby fields are more alike than distant ones."""
    from kgml_peft.data.places import distance_km
    from kgml_peft.data.management import STATE_BOXES, ManagementSpread

    params = site_parameters(SynthConfig())
    for _, row in params.iterrows():
        lat0, lat1, lon0, lon1 = STATE_BOXES[row["region"]]
        assert lat0 <= row["lat"] <= lat1 and lon0 <= row["lon"] <= lon1
    assert params["new_site"].sum() == 6 and set(params.loc[params["new_site"], "site"]) == set(new_sites())
    small = SynthConfig(max_sites_per_region=2, max_years_per_site=3, observed=True)
    plain = simulate(dataclasses.replace(small, management=False))
    managed = simulate(small)
    inputs = [c for c in managed.columns if c not in ("NEE", "Reco", "Yield", "GPP")]
    pd.testing.assert_frame_equal(managed[inputs], plain[inputs])  # no input reveals management
    assert not np.allclose(managed["NEE"].fillna(0), plain["NEE"].fillna(0))
    # the process-model flavour is the same with or without management
    pd.testing.assert_frame_equal(simulate(dataclasses.replace(small, observed=False)),
                                  simulate(dataclasses.replace(small, observed=False, management=False)))
    # no spread: every field as the process model assumes, except residue removal (mean 0.85)
    none = site_parameters(SynthConfig(management_spread=ManagementSpread(scale=0.0, irrigated_fraction=0.0,
                                                                          tilled_fraction=0.0)))
    assert (none["cultivar_lue"] == 1).all() and (none["soc_rate"] == 1).all() and not none["irrigated"].any()
    # spatial correlation of a hidden factor: near pairs alike, far pairs not (20 seeds)
    near, far = [], []
    for seed in range(20):
        p = site_parameters(SynthConfig(seed=seed))
        for i in range(len(p)):
            for j in range(i + 1, len(p)):
                a, b = p.iloc[i], p.iloc[j]
                if a["region"] == b["region"]:
                    pair = (np.log(a["soc_rate"]), np.log(b["soc_rate"]))
                    (near if distance_km(a["lat"], a["lon"], b["lat"], b["lon"]) <= 100 else far).append(pair)
    assert np.corrcoef(np.array(near).T)[0, 1] > 0.2 > abs(np.corrcoef(np.array(far).T)[0, 1])


def test_simulated_neighbours_differ_like_the_development_towers() -> None:
    """docs/simulator.md's table: the default spread is within a factor 1.5 of US-Ne1 vs US-Ne2
    on every statistic; without hidden management it is not."""
    from pathlib import Path

    from kgml_peft.data.heterogeneity import simulated_spread, tower_spread

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "fluxnet2015"
    if not (data / "daily").is_dir():
        pytest.skip("FLUXNET2015 data not found")
    towers = tower_spread(data / "daily", data / "crops.csv")
    assert towers["pair_years"] == 8 and towers["nee_abs_diff"] == pytest.approx(161.27, abs=0.01)
    keys = ("reco_gpp_abs_diff", "reco_rel_abs_diff", "nee_abs_diff")
    default = simulated_spread(SynthConfig())
    assert all(1 / 1.5 < default[k] / towers[k] < 1.5 for k in keys)
    plain = simulated_spread(SynthConfig(management=False))
    assert plain["reco_gpp_abs_diff"] < 0.5 * towers["reco_gpp_abs_diff"]


def test_observed_flavour_of_a_shrunk_config_is_bit_identical() -> None:
    """Hidden management comes from spatial fields evaluated per site: keeping one site per state
    must give exactly (not approximately) the same observed data as keeping every site."""
    one = simulate(SynthConfig(observed=True, max_sites_per_region=1, max_years_per_site=2))
    every = simulate(SynthConfig(observed=True, max_years_per_site=2))
    every = every[every[schema.SITE].isin(set(one[schema.SITE]))].reset_index(drop=True)
    for name in one.columns:
        if one[name].dtype.kind == "f":
            assert np.array_equal(one[name].to_numpy(), every[name].to_numpy(), equal_nan=True), name
    small, full = site_parameters(SynthConfig(max_sites_per_region=1)), site_parameters(SynthConfig())
    full = full[full[schema.SITE].isin(set(small[schema.SITE]))].reset_index(drop=True)
    pd.testing.assert_frame_equal(small, full, check_exact=True)
    assert new_sites(SynthConfig(max_sites_per_region=2)) == ()  # the new fields are IA-007, ...
