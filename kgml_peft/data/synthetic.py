"""A small process-based simulator of Midwest corn-soybean carbon fluxes (a stand-in for ecosys).

KGML-ag is pretrained on the output of a process model and fine-tuned on observations. This module
is the process model of the toolkit: a documented, deterministic, fast simulator that produces the
long table of the data contract (:mod:`kgml_peft.schema`) for sites in Iowa (IA), Illinois (IL) and
Indiana (IN). ``docs/simulator.md`` gives the equations, parameter tables and the check of the
simulated magnitudes against Nebraska FLUXNET2015 cropland towers. In short, for every site-day:

* **weather** (:func:`_weather`): seasonal climatology of each state + AR(1) daily anomalies (a
  state-wide component shared by the sites of a state mixed with a site component) + a state-wide
  year anomaly + small static site offsets; precipitation from a wet/dry Markov chain with gamma
  amounts; radiation = extraterrestrial radiation x atmospheric transmissivity, lower on wet days;
  humidity from a dew point below the daily minimum temperature; snow pack.
* **management** (:func:`_management`): corn-soybean rotation with a random phase per site,
  planting dates with a state-wide year shift and site jitter.
* **phenology** (:func:`_phenology`): growing-degree days from planting drive a logistic green-up
  and senescence of fAPAR; harvest after physiological maturity plus a dry-down period.
* **carbon and water** (:func:`_carbon`): GPP = LUE x fAPAR x PAR x f_T x f_W with a root-zone
  water bucket (capacity (TFC - TWP) x root depth, Priestley-Taylor ET); Ra = growth + maintenance
  respiration (Q10) on live biomass; biomass accumulates NPP; yield = harvest index x biomass;
  residues feed a litter pool; Rh = first-order decay of litter and soil organic carbon (Q10 on a
  lagged soil temperature x a moisture scalar). NEE = Ra + Rh - GPP and Reco = Ra + Rh exactly.

Process parameters differ by state (:data:`REGION_PARAMETERS`) and by site within a state (lognormal
spread ``SynthConfig.param_spread``), so one pooled model is biased per state and per site.

``SynthConfig(observed=True)`` gives the flux-tower flavour: the same sites and weather, but a few
consecutive years per site, a "truth" that differs systematically from the process model per state
(:data:`REALITY_GAP`) and per field (hidden management: irrigation, residue, tillage, cultivar,
soil-carbon history, spatially correlated; :mod:`kgml_peft.data.management`), measurement noise,
gaps in NEE/Reco, hidden Ra/Rh and survey yields. Every site has coordinates (``lat``, ``lon``);
:func:`new_sites` names the fields the demo backbone never saw.

Every random number comes from a generator keyed by (seed, stream, state, site, year), so the
weather of a site-year depends on the seed, site and year only: not on the flavour, nor on how many
sites or years a configuration keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from kgml_peft import schema
from kgml_peft.data.management import (
    HIDDEN_PARAMETERS,
    ManagementSpread,
    hidden_scores,
    management_from_scores,
    site_coordinates,
    spatial_field,
)
from kgml_peft.errors import KgmlPeftError

__all__ = [
    "SynthConfig",
    "RegionParameters",
    "RealityGap",
    "CropTraits",
    "REGION_PARAMETERS",
    "REALITY_GAP",
    "CROPS",
    "SITE_LAYOUT",
    "NEW_SITES_PER_REGION",
    "new_sites",
    "PROCESS_PARAMETERS",
    "SOIL_COLUMNS",
    "OUTPUT_COLUMNS",
    "simulate",
    "site_parameters",
]


# --------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionParameters:
    """Climate, soil and process-parameter means of one state.

    Process parameters are the state means; each site draws its own value around them.
    """

    name: str
    # climate
    latitude: float  #: degrees north (sets extraterrestrial radiation)
    t_mean: float  #: annual mean of the seasonal temperature sinusoid, degC
    t_amplitude: float  #: half the January-July difference of the daily mean temperature, degC
    tdif_mean: float  #: mean diurnal temperature range, degC
    precip_annual: float  #: mean annual precipitation, mm
    precip_seasonality: float  #: relative amplitude of the summer precipitation maximum
    wet_fraction: float  #: mean probability of a wet day
    transmissivity: float  #: dry-day fraction of extraterrestrial radiation reaching the ground
    winter_cloudiness: float  #: extra winter reduction of the dry-day transmissivity
    wind_mean: float  #: mean wind speed, m s-1
    plant_doy_corn: float  #: mean corn planting day of year
    plant_doy_soy: float  #: mean soybean planting day of year
    # soil (means of the site draws)
    tsoc: float  #: soil organic carbon of the top 30 cm, g kg-1
    sand: float  #: %
    silt: float  #: %
    ph: float
    # process parameters (state means)
    lue_corn: float  #: light-use efficiency of corn, gC per MJ absorbed PAR
    lue_soy: float  #: light-use efficiency of soybean, gC per MJ absorbed PAR
    q10_ra: float  #: Q10 of maintenance respiration
    q10_rh: float  #: Q10 of heterotrophic respiration
    rm_ref: float  #: maintenance respiration at 20 degC, gC gC-1 d-1 of live biomass
    k_soc: float  #: soil organic carbon decomposition rate at 20 degC and no water stress, yr-1
    k_litter: float  #: crop-residue decomposition rate at 20 degC and no water stress, yr-1
    hi_corn: float  #: harvest index of corn, grain C / seasonal NPP
    hi_soy: float  #: harvest index of soybean, grain C / seasonal NPP


#: The per-site process parameters (drawn lognormally around the state means).
PROCESS_PARAMETERS: tuple[str, ...] = (
    "lue_corn", "lue_soy", "q10_ra", "q10_rh", "rm_ref", "k_soc", "k_litter", "hi_corn", "hi_soy",
)

#: State means. Climate after Des Moines (IA), Champaign (IL) and Indianapolis (IN); soils after
#: Des Moines-lobe clay loams (IA), Drummer-type silty clay loams (IL) and Crosby/Brookston silt
#: loams (IN). Process parameters differ by 5-21 % between states (LUE least: 5-10 %, so that the
#: states' GPP stays realistic); docs/simulator.md tabulates them.
REGION_PARAMETERS: dict[str, RegionParameters] = {
    "IA": RegionParameters(
        name="Iowa", latitude=41.6, t_mean=9.5, t_amplitude=15.5, tdif_mean=12.5,
        precip_annual=900.0, precip_seasonality=0.60, wet_fraction=0.29, transmissivity=0.63,
        winter_cloudiness=0.02, wind_mean=4.6, plant_doy_corn=118.0, plant_doy_soy=134.0,
        tsoc=30.0, sand=32.0, silt=40.0, ph=6.4,
        lue_corn=1.75, lue_soy=1.27, q10_ra=2.0, q10_rh=2.2, rm_ref=0.010, k_soc=0.030,
        k_litter=1.4, hi_corn=0.56, hi_soy=0.40,
    ),
    "IL": RegionParameters(
        name="Illinois", latitude=40.1, t_mean=10.75, t_amplitude=13.75, tdif_mean=12.0,
        precip_annual=960.0, precip_seasonality=0.35, wet_fraction=0.32, transmissivity=0.63,
        winter_cloudiness=0.05, wind_mean=4.3, plant_doy_corn=115.0, plant_doy_soy=132.0,
        tsoc=26.0, sand=12.0, silt=60.0, ph=6.3,
        lue_corn=1.84, lue_soy=1.18, q10_ra=1.7, q10_rh=2.6, rm_ref=0.0115, k_soc=0.034,
        k_litter=1.7, hi_corn=0.51, hi_soy=0.44,
    ),
    "IN": RegionParameters(
        name="Indiana", latitude=39.8, t_mean=11.25, t_amplitude=13.25, tdif_mean=11.5,
        precip_annual=1065.0, precip_seasonality=0.20, wet_fraction=0.35, transmissivity=0.63,
        winter_cloudiness=0.07, wind_mean=3.9, plant_doy_corn=124.0, plant_doy_soy=138.0,
        tsoc=20.0, sand=18.0, silt=62.0, ph=6.6,
        lue_corn=1.58, lue_soy=1.33, q10_ra=2.4, q10_rh=1.8, rm_ref=0.0085, k_soc=0.036,
        k_litter=1.15, hi_corn=0.62, hi_soy=0.36,
    ),
}


@dataclass(frozen=True)
class RealityGap:
    """Multiplicative factors turning the process model's parameters into the "truth".

    Used only by the observed (flux-tower) flavour: observations come from the same equations with
    these per-state biases, so the process model is systematically wrong in a state-specific way.
    """

    lue: float  #: factor on both crops' light-use efficiency
    q10_rh: float  #: factor on the Q10 of heterotrophic respiration
    rm_ref: float  #: factor on the maintenance respiration rate
    k_soc: float  #: factor on the soil organic carbon decomposition rate


REALITY_GAP: dict[str, RealityGap] = {
    "IA": RealityGap(lue=0.95, q10_rh=1.10, rm_ref=1.10, k_soc=1.10),
    "IL": RealityGap(lue=1.05, q10_rh=0.88, rm_ref=0.90, k_soc=1.20),
    "IN": RealityGap(lue=0.92, q10_rh=1.20, rm_ref=1.15, k_soc=0.85),
}


@dataclass(frozen=True)
class CropTraits:
    """Phenology and physiology of one crop (shared by all sites)."""

    name: str
    t_base: float  #: base temperature of growing-degree days, degC
    t_cap: float  #: temperature above which a day adds no more degree-days, degC
    green_half: float  #: degree-days at half of the green-up
    green_width: float  #: logistic width of the green-up, degree-days
    sen_half: float  #: degree-days at half of the senescence
    sen_width: float  #: logistic width of the senescence, degree-days
    maturity: float  #: degree-days at physiological maturity
    drydown_days: int  #: days from maturity to harvest
    fapar_max: float  #: fAPAR of the closed canopy
    t_min: float  #: photosynthesis temperature response: lower limit, degC
    t_opt: float  #: optimum, degC
    t_max: float  #: upper limit, degC
    grain_c: float  #: carbon fraction of grain dry matter
    seed_c: float  #: seed carbon at planting, gC m-2
    kc: float  #: transpiration coefficient of the closed canopy (x PET)


#: Crop traits, keyed by ``Crop_Type`` (1 = corn, 0 = soybean).
CROPS: dict[int, CropTraits] = {
    1: CropTraits(
        name="corn", t_base=10.0, t_cap=30.0, green_half=400.0, green_width=80.0, sen_half=1430.0,
        sen_width=90.0, maturity=1600.0, drydown_days=21, fapar_max=0.93, t_min=8.0, t_opt=28.0,
        t_max=42.0, grain_c=0.44, seed_c=1.5, kc=1.15,
    ),
    0: CropTraits(
        name="soybean", t_base=10.0, t_cap=30.0, green_half=620.0, green_width=140.0,
        sen_half=1420.0, sen_width=90.0, maturity=1540.0, drydown_days=14, fapar_max=0.90,
        t_min=5.0, t_opt=25.0, t_max=40.0, grain_c=0.52, seed_c=2.5, kc=1.05,
    ),
}

#: Site-years per site of the default data set, per state: IA 164, IN 108, IL 88 site-years
#: (41:27:22, as in the FTBSC-KGML paper).
SITE_LAYOUT: dict[str, tuple[int, ...]] = {
    "IA": (21, 20, 21, 20, 21, 20, 21, 20),
    "IL": (22, 22, 22, 22),
    "IN": (18, 18, 18, 18, 18, 18),
}

# shared constants of the process model
T_REF = 20.0  #: reference temperature of the Q10 functions, degC
PAR_FRACTION = 0.48  #: PAR / shortwave radiation
DIFFUSE_GAIN = 1.5  #: relative LUE gain of a fully overcast day (diffuse light is used better)
GROWTH_RESPIRATION = 0.25  #: fraction of (GPP - Rm) respired for growth
HUMIFICATION = 0.35  #: fraction of decomposed litter carbon that becomes soil organic carbon
SOC_DEPTH_M = 0.30  #: depth of the soil organic carbon pool, m
ROOT_DEPTH_MM = 1000.0  #: root-zone depth of the water bucket, mm
WATER_STRESS_POINT = 0.5  #: relative available water below which GPP is reduced
SOIL_EVAPORATION = 0.3  #: bare-soil evaporation of a wet soil, x PET
RH_MOISTURE_MIN = 0.2  #: moisture scalar of decomposition in a soil at wilting point
RH_MOISTURE_OPT = 0.6  #: relative available water above which decomposition is not water-limited
HARVEST_DOY_MAX = 305  #: latest harvest (1 November; immature crops are killed by frost)
SOIL_LAG_DAYS = 6.0  #: time constant of soil temperature following air temperature, days
LITTER_START = 500.0  #: crop residue carbon on 1 January of the first year, gC m-2
IRRIGATION_TRIGGER = 0.5  #: an irrigated field is watered in season when its bucket falls below this
IRRIGATION_REFILL = 0.8  #: ... up to this share of its capacity (a centre-pivot pass)
STATE_COUPLING = 0.8  #: weight of the state-wide component of daily weather anomalies
PRECIP_GAMMA_SHAPE = 0.8  #: shape of the gamma distribution of wet-day precipitation amounts
WET_PERSISTENCE = 0.5  #: probability that a wet day follows a wet day

SOIL_COLUMNS: tuple[str, ...] = (
    "TBKDS", "TSAND", "TSILT", "TFC", "TWP", "TKSat", "TSOC", "TPH", "TCEC",
)
WEATHER_COLUMNS: tuple[str, ...] = (
    "RADN", "TMAX_AIR", "TDIF_AIR", "HMAX_AIR", "HDIF_AIR", "WIND", "PRECN",
)
#: Column order of :func:`simulate`.
OUTPUT_COLUMNS: tuple[str, ...] = (
    (schema.SITE, schema.REGION, schema.DATE) + schema.KGML_AG_INPUTS + schema.SITE_INPUTS
    + ("Ra", "Rh", "NEE", "Reco", "Yield")
)

#: New fields per state: the highest-numbered sites of each state, which the demo backbone never
#: saw (``exclude_sites`` of configs/demo.toml) and which the demo calibrates (docs/simulator.md).
NEW_SITES_PER_REGION = 2


@dataclass(frozen=True)
class SynthConfig:
    """What to simulate. The defaults give the demo data set (all three states, 360 site-years)."""

    seed: int = 0
    #: False: process-model output (Ra, Rh, NEE, Reco, Yield complete, NEE = Ra + Rh - GPP).
    #: True: flux-tower flavour (a few years per site, model-reality gap, noise, gaps, Ra/Rh NaN).
    observed: bool = False
    regions: tuple[str, ...] = ("IA", "IL", "IN")
    first_year: int = 2000
    #: keep only the first k sites of each state (small test data)
    max_sites_per_region: int | None = None
    #: keep only the first k years of each site (small test data)
    max_years_per_site: int | None = None
    #: lognormal standard deviation of the site process parameters around the state means
    param_spread: float = 0.06
    #: observed flavour: fewest and most consecutive years per site
    obs_years: tuple[int, int] = (3, 5)
    #: observed flavour: mean fraction of days with NEE/Reco missing (more in winter)
    gap_fraction: float = 0.18
    #: observed flavour: mean length of a gap, days
    gap_length: float = 4.0
    #: observed flavour: NEE noise standard deviation = nee_noise + nee_noise_rel * |NEE|
    nee_noise: float = 0.25
    nee_noise_rel: float = 0.08
    #: observed flavour: relative noise of tower GPP (from flux partitioning)
    gpp_noise_rel: float = 0.05
    #: observed flavour: relative noise of survey yields
    yield_noise: float = 0.05
    #: observed flavour: apply REALITY_GAP (False: the truth is the process model)
    reality_gap: bool = True
    #: observed flavour: every field's hidden management (irrigation, residue, tillage, cultivar,
    #: soil-carbon history) shapes the truth; False: every field is managed as the process model
    #: assumes (rainfed, all residue left, no-till, the state's cultivar and soil-carbon history)
    management: bool = True
    #: observed flavour: how widely hidden management varies between fields
    management_spread: ManagementSpread = ManagementSpread()


# --------------------------------------------------------------------------------------------------
# sites, calendar and random streams
# --------------------------------------------------------------------------------------------------

_STREAMS = {
    "state_weather": 1, "site_weather": 2, "site_climate": 3, "params": 4, "soil": 5,
    "rotation": 6, "state_planting": 7, "obs_window": 8, "obs_noise": 9, "coordinates": 10,
    "spatial": 11, "management": 12,
}


def _rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """A generator keyed by (seed, stream, keys): independent of everything else simulated."""
    return np.random.default_rng([seed, _STREAMS[stream], *keys])


def _region_key(region: str) -> int:
    return int.from_bytes(region.encode("ascii"), "big")


@dataclass(frozen=True)
class _Site:
    site: str
    region: str
    number: int  # 1-based within the state
    n_years: int  # years kept by the configuration

    @property
    def key(self) -> tuple[int, int]:
        return _region_key(self.region), self.number


def _check_config(config: SynthConfig) -> None:
    if not isinstance(config.seed, (int, np.integer)) or config.seed < 0:
        raise KgmlPeftError(f"seed must be a non-negative integer, got {config.seed!r}")
    if not config.regions:
        raise KgmlPeftError("no regions to simulate")
    for region in config.regions:
        if region not in REGION_PARAMETERS:
            raise KgmlPeftError(
                f"unknown region {region!r}; known: {', '.join(REGION_PARAMETERS)}"
            )
    if len(set(config.regions)) != len(config.regions):
        raise KgmlPeftError("a region is named twice")
    for name in ("max_sites_per_region", "max_years_per_site"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise KgmlPeftError(f"{name} must be a positive integer or None, got {value!r}")
    longest = max(max(SITE_LAYOUT[r]) for r in config.regions)
    if not 1900 <= config.first_year <= 2100 - longest:
        raise KgmlPeftError(f"first_year {config.first_year} is outside 1900-{2100 - longest}")
    low, high = config.obs_years
    if not 1 <= low <= high:
        raise KgmlPeftError(f"obs_years must be (low, high) with 1 <= low <= high, got {low, high}")
    if not 0.0 <= config.gap_fraction < 0.9 or config.gap_length < 1.0:
        raise KgmlPeftError("gap_fraction must be in [0, 0.9) and gap_length >= 1")
    for name in ("param_spread", "nee_noise", "nee_noise_rel", "gpp_noise_rel", "yield_noise"):
        if getattr(config, name) < 0:
            raise KgmlPeftError(f"{name} must be >= 0")


def _sites(config: SynthConfig) -> list[_Site]:
    """The sites a configuration keeps, sorted by site id."""
    sites = []
    for region in config.regions:
        layout = SITE_LAYOUT[region][: config.max_sites_per_region]
        for number, n_years in enumerate(layout, start=1):
            if config.max_years_per_site is not None:
                n_years = min(n_years, config.max_years_per_site)
            sites.append(_Site(f"{region}-{number:03d}", region, number, n_years))
    return sorted(sites, key=lambda s: s.site)


@dataclass(frozen=True)
class _Calendar:
    dates: pd.DatetimeIndex
    years: np.ndarray  # (n_years,) calendar years
    year_index: np.ndarray  # (n_days,) index into years
    doy: np.ndarray  # (n_days,) day of year, 1..366
    starts: np.ndarray  # (n_years + 1,) first day index of each year, then n_days


def _calendar(first_year: int, n_years: int) -> _Calendar:
    dates = pd.date_range(f"{first_year}-01-01", f"{first_year + n_years - 1}-12-31", freq="D")
    dates = dates.as_unit("ns")
    year = dates.year.to_numpy()
    years = np.arange(first_year, first_year + n_years)
    starts = np.searchsorted(year, np.append(years, years[-1] + 1))
    return _Calendar(dates, years, year - first_year, dates.day_of_year.to_numpy(), starts)


# --------------------------------------------------------------------------------------------------
# site parameters and soils
# --------------------------------------------------------------------------------------------------


def _process_parameters(config: SynthConfig, sites: list[_Site]) -> dict[str, np.ndarray]:
    """Per-site process parameters: state mean x lognormal(param_spread), mean-preserving."""
    out = {name: np.empty(len(sites)) for name in PROCESS_PARAMETERS}
    sigma = config.param_spread
    for i, site in enumerate(sites):
        z = _rng(config.seed, "params", *site.key).standard_normal(len(PROCESS_PARAMETERS))
        mean = REGION_PARAMETERS[site.region]
        for j, name in enumerate(PROCESS_PARAMETERS):
            out[name][i] = getattr(mean, name) * np.exp(sigma * z[j] - 0.5 * sigma**2)
    return out


def _soils(config: SynthConfig, sites: list[_Site]) -> dict[str, np.ndarray]:
    """Per-site top-soil properties from the state texture/carbon means and a pedotransfer rule."""
    out = {name: np.empty(len(sites)) for name in SOIL_COLUMNS}
    for i, site in enumerate(sites):
        p = REGION_PARAMETERS[site.region]
        z = _rng(config.seed, "soil", *site.key).standard_normal(9)
        sand = np.clip(p.sand + 4.0 * z[0], 3.0, 60.0)
        silt = np.clip(p.silt + 5.0 * z[1], 20.0, 75.0)
        clay = 100.0 - sand - silt
        if clay < 8.0:
            silt -= 8.0 - clay
            clay = 8.0
        tsoc = np.clip(p.tsoc * np.exp(0.10 * z[2] - 0.005), 15.0, 40.0)
        om = tsoc * 1.724 / 10.0  # organic matter, %
        twp = np.clip(0.02 + 0.0048 * clay + 0.004 * om + 0.008 * z[3], 0.06, 0.30)
        tfc = np.clip(twp + 0.07 + 0.0015 * silt + 0.006 * om + 0.008 * z[4], twp + 0.08, 0.50)
        out["TSAND"][i] = sand
        out["TSILT"][i] = silt
        out["TSOC"][i] = tsoc
        out["TBKDS"][i] = np.clip(1.58 - 0.045 * om + 0.04 * z[5], 1.15, 1.55)
        out["TWP"][i] = twp
        out["TFC"][i] = tfc
        out["TKSat"][i] = 3.0 * np.exp(0.05 * sand + 0.3 * z[6])
        out["TPH"][i] = np.clip(p.ph + 0.3 * z[7], 5.0, 8.0)
        out["TCEC"][i] = max(5.0, 0.45 * clay + 2.2 * om + 1.5 * z[8])
    return out


def _coordinates(config: SynthConfig, sites: list[_Site]) -> dict[str, np.ndarray]:
    """Per-site latitude and longitude inside the site's state (``lat``, ``lon``, degrees)."""
    points = [site_coordinates(_rng(config.seed, "coordinates", *s.key), s.region) for s in sites]
    return {"lat": np.array([p[0] for p in points]).reshape(len(sites)),
            "lon": np.array([p[1] for p in points]).reshape(len(sites))}


def _hidden_management(config: SynthConfig, sites: list[_Site],
                       coords: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-site hidden management (:mod:`kgml_peft.data.management`): spatially correlated within
    a state (one random field per state and parameter), plus each field's own part."""
    z = np.empty((len(sites), len(HIDDEN_PARAMETERS)))
    for i, site in enumerate(sites):
        z[i] = _rng(config.seed, "management", *site.key).standard_normal(len(HIDDEN_PARAMETERS))
    for region in {s.region for s in sites}:
        idx = np.array([i for i, s in enumerate(sites) if s.region == region])
        for j in range(len(HIDDEN_PARAMETERS)):
            field = spatial_field(_rng(config.seed, "spatial", _region_key(region), j),
                                  coords["lat"][idx], coords["lon"][idx], region)
            z[idx, j] = hidden_scores(field, z[idx, j])
    return management_from_scores(z, config.management_spread)


def new_sites(config: SynthConfig = SynthConfig()) -> tuple[str, ...]:
    """The new fields a configuration keeps: the last NEW_SITES_PER_REGION sites of each state's
    full layout (the same sites for every configuration; a shrunk one may keep none)."""
    _check_config(config)
    kept = {s.site for s in _sites(config)}
    out = [f"{region}-{n:03d}" for region in config.regions
           for n in range(len(SITE_LAYOUT[region]) - NEW_SITES_PER_REGION + 1, len(SITE_LAYOUT[region]) + 1)]
    return tuple(sorted(s for s in out if s in kept))


# --------------------------------------------------------------------------------------------------
# weather
# --------------------------------------------------------------------------------------------------


def _ar1(innovations: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Unit-variance AR(1) series along axis 0 (one persistence per column)."""
    out = np.empty_like(innovations)
    scale = np.sqrt(1.0 - phi**2)
    x = innovations[0].copy()
    out[0] = x
    for t in range(1, len(innovations)):
        x = phi * x + scale * innovations[t]
        out[t] = x
    return out


def _extraterrestrial_radiation(doy: np.ndarray, latitude: np.ndarray) -> np.ndarray:
    """Daily extraterrestrial radiation, MJ m-2 d-1 (FAO-56 eq. 21)."""
    lat = np.radians(latitude)
    angle = 2.0 * np.pi * doy / 365.0
    dr = 1.0 + 0.033 * np.cos(angle)
    decl = 0.409 * np.sin(angle - 1.39)
    ws = np.arccos(np.clip(-np.tan(lat) * np.tan(decl), -1.0, 1.0))
    return 24.0 * 60.0 / np.pi * 0.0820 * dr * (
        ws * np.sin(lat) * np.sin(decl) + np.cos(lat) * np.cos(decl) * np.sin(ws)
    )


def _vapour_pressure(t: np.ndarray) -> np.ndarray:
    """Saturation vapour pressure, kPa (Tetens)."""
    return 0.6108 * np.exp(17.27 * t / (t + 237.3))


def _markov_chain(u: np.ndarray, p_enter: np.ndarray, p_stay: float) -> np.ndarray:
    """Two-state Markov chain along axis 0: on[t] = u[t] < (p_stay if on[t-1] else p_enter[t]).

    Starts from the stationary probability. Used for wet/dry days and for tower data gaps.
    """
    on = np.empty(u.shape, dtype=bool)
    prev = u[0] < p_enter[0] / (1.0 - p_stay + p_enter[0])
    on[0] = prev
    for t in range(1, len(u)):
        prev = u[t] < np.where(prev, p_stay, p_enter[t])
        on[t] = prev
    return on


@dataclass(frozen=True)
class _Anomalies:
    """Standardised random weather anomalies, (n_days, n_sites) unless noted."""

    temperature: np.ndarray  # AR(1), state + site components
    transmissivity: np.ndarray  # AR(1), state + site components
    wind: np.ndarray  # AR(1), state + site components
    dew: np.ndarray  # AR(1), site only
    tdif: np.ndarray  # AR(1), site only
    wet_uniform: np.ndarray  # uniform draws for the wet/dry chain, partly shared by a state
    amount: np.ndarray  # gamma draws with mean 1 for wet-day amounts
    year: np.ndarray  # (n_days, n_sites, 3) state-year anomalies: temperature, precip, radiation
    site: np.ndarray  # (n_sites, 3) static site offsets: temperature, precip, wind


def _anomalies(config: SynthConfig, sites: list[_Site], cal: _Calendar) -> _Anomalies:
    """Draw all random weather numbers: one generator per state-year and per site-year."""
    n_days, n_sites = len(cal.doy), len(sites)
    states = sorted({s.region for s in sites})
    col = np.array([states.index(s.region) for s in sites])
    n_state_ar, n_site_ar = 3, 5  # state: T, transmissivity, wind; site: + dew point, TDIF
    state_eps = np.empty((n_days, len(states), n_state_ar))
    state_u = np.empty((n_days, len(states)))
    state_year = np.empty((len(cal.years), len(states), 3))
    for k, region in enumerate(states):
        for y, year in enumerate(cal.years):
            a, b = cal.starts[y], cal.starts[y + 1]
            rng = _rng(config.seed, "state_weather", _region_key(region), int(year))
            state_year[y, k] = rng.standard_normal(3)
            state_eps[a:b, k] = rng.standard_normal((b - a, n_state_ar))
            state_u[a:b, k] = rng.random(b - a)
    site_eps = np.empty((n_days, n_sites, n_site_ar))
    site_u = np.empty((n_days, n_sites, 2))  # coupling draw, the site's own wet/dry draw
    amount = np.empty((n_days, n_sites))
    for i, site in enumerate(sites):
        for y, year in enumerate(cal.years):
            a, b = cal.starts[y], cal.starts[y + 1]
            rng = _rng(config.seed, "site_weather", *site.key, int(year))
            site_eps[a:b, i] = rng.standard_normal((b - a, n_site_ar))
            site_u[a:b, i] = rng.random((b - a, 2))
            amount[a:b, i] = rng.gamma(PRECIP_GAMMA_SHAPE, 1.0 / PRECIP_GAMMA_SHAPE, b - a)
    offsets = np.array([_rng(config.seed, "site_climate", *s.key).standard_normal(3)
                        for s in sites]).reshape(n_sites, 3)

    phi = np.concatenate([np.tile([0.70, 0.35, 0.50], len(states)),
                          np.tile([0.70, 0.35, 0.50, 0.40, 0.30], n_sites)])
    ar = _ar1(np.concatenate([state_eps.reshape(n_days, -1), site_eps.reshape(n_days, -1)],
                             axis=1), phi)
    state_ar = ar[:, : len(states) * n_state_ar].reshape(n_days, len(states), n_state_ar)
    site_ar = ar[:, len(states) * n_state_ar:].reshape(n_days, n_sites, n_site_ar)
    c_state, c_site = STATE_COUPLING, np.sqrt(1.0 - STATE_COUPLING**2)
    mixed = c_state * state_ar[:, col] + c_site * site_ar[:, :, :n_state_ar]
    return _Anomalies(
        temperature=mixed[:, :, 0], transmissivity=mixed[:, :, 1], wind=mixed[:, :, 2],
        dew=site_ar[:, :, 3], tdif=site_ar[:, :, 4],
        # a site takes the state's uniform draw with probability STATE_COUPLING
        wet_uniform=np.where(site_u[:, :, 0] < STATE_COUPLING, state_u[:, col], site_u[:, :, 1]),
        amount=amount, year=state_year[cal.year_index][:, col], site=offsets,
    )


def _region_arrays(sites: list[_Site]) -> dict[str, np.ndarray]:
    """Every numeric field of REGION_PARAMETERS as an (n_sites,) array."""
    return {f.name: np.array([getattr(REGION_PARAMETERS[s.region], f.name) for s in sites])
            for f in fields(RegionParameters) if f.name != "name"}


def _seasonal(doy: np.ndarray, peak_doy: float) -> np.ndarray:
    """cos of the annual cycle: +1 on ``peak_doy``, -1 half a year later."""
    return np.cos(2.0 * np.pi * (doy - peak_doy) / 365.25)


def _weather(config: SynthConfig, sites: list[_Site], cal: _Calendar) -> dict[str, np.ndarray]:
    """Daily weather, each array (n_days, n_sites).

    Besides the table's weather columns: ``TMEAN`` (daily mean temperature, degC) and
    ``CLOUDINESS`` (1 - RADN / clear-sky radiation).
    """
    par = _region_arrays(sites)
    z = _anomalies(config, sites, cal)
    doy = cal.doy[:, None].astype(float)
    winter = _seasonal(doy, 18.0)  # +1 mid-January, -1 mid-July

    # precipitation: wet/dry Markov chain, gamma amounts, state-year and site factors
    wet_prob = par["wet_fraction"] * (1.0 + 0.15 * _seasonal(doy, 150.0))
    p01 = wet_prob * (1.0 - WET_PERSISTENCE) / (1.0 - wet_prob)  # stationary frequency wet_prob
    wet = _markov_chain(z.wet_uniform, p01, WET_PERSISTENCE)
    mean_daily = par["precip_annual"] / 365.25 * (
        1.0 + par["precip_seasonality"] * _seasonal(doy, 165.0)
    )
    factor = np.exp(0.15 * z.year[:, :, 1] - 0.5 * 0.15**2) * np.exp(
        0.05 * z.site[:, 1] - 0.5 * 0.05**2
    )
    precn = np.where(wet, np.minimum(mean_daily / wet_prob * factor * z.amount, 250.0), 0.0)

    # radiation: extraterrestrial x transmissivity, low on wet (cloudy) days, cloudier winters
    extra = _extraterrestrial_radiation(doy, par["latitude"])
    trans_dry = par["transmissivity"] - 2.0 * par["winter_cloudiness"] * np.maximum(winter, 0.0)
    trans = np.where(wet, 0.30, trans_dry) + 0.08 * z.transmissivity + 0.02 * z.year[:, :, 2]
    trans = np.clip(trans, 0.06, 0.76)
    radn = extra * trans

    # temperature: seasonal sinusoid + AR(1) anomalies (larger in winter) + year/site offsets
    t_sd = 3.6 + 1.4 * winter
    tmean = (par["t_mean"] - par["t_amplitude"] * winter + t_sd * z.temperature
             + 0.8 * z.year[:, :, 0] + 0.3 * z.site[:, 0] - 0.8 * wet)
    tdif_clim = par["tdif_mean"] + np.cos(4.0 * np.pi * (doy - 100.0) / 365.25)
    tdif = np.clip(tdif_clim * (trans / trans_dry) ** 0.7 + 1.3 * z.tdif, 1.0, 25.0)
    tmax, tmin = tmean + 0.5 * tdif, tmean - 0.5 * tdif

    # humidity: dew point a little below the minimum temperature (closer on wet days)
    depression = np.maximum(0.0, (2.2 - 0.8 * winter) * np.where(wet, 0.3, 1.0) + 0.9 * z.dew)
    e_dew = _vapour_pressure(tmin - depression)
    hmax = np.clip(100.0 * e_dew / _vapour_pressure(tmin), 0.0, 100.0)
    hdif = np.clip(hmax - 100.0 * e_dew / _vapour_pressure(tmax), 0.0, 100.0)

    # wind: spring maximum, lognormal AR(1) anomalies, a little windier on wet days
    wind_clim = (par["wind_mean"] + 0.2 * z.site[:, 2]) * (1.0 + 0.18 * _seasonal(doy, 95.0))
    wind = np.clip(wind_clim * np.exp(0.30 * z.wind - 0.045) * np.where(wet, 1.1, 1.0), 0.3, 25.0)

    return {
        "RADN": radn, "TMAX_AIR": tmax, "TDIF_AIR": tdif, "HMAX_AIR": hmax, "HDIF_AIR": hdif,
        "WIND": wind, "PRECN": precn, "TMEAN": tmean,
        "CLOUDINESS": np.clip(1.0 - radn / (0.75 * extra), 0.0, 1.0),
    }


# --------------------------------------------------------------------------------------------------
# management and phenology
# --------------------------------------------------------------------------------------------------


def _management(
    config: SynthConfig, sites: list[_Site], cal: _Calendar
) -> tuple[np.ndarray, np.ndarray]:
    """Crop type (1 corn, 0 soybean) and planting day of year, each (n_years, n_sites)."""
    n_years = len(cal.years)
    crop = np.empty((n_years, len(sites)), dtype=int)
    plant = np.empty((n_years, len(sites)))
    state_shift = {
        region: np.array([
            _rng(config.seed, "state_planting", _region_key(region), int(y)).normal(0.0, 6.0)
            for y in cal.years
        ])
        for region in {s.region for s in sites}
    }
    for i, site in enumerate(sites):
        rng = _rng(config.seed, "rotation", *site.key)
        phase = int(rng.integers(0, 2))
        jitter = rng.normal(0.0, 3.0, size=max(60, n_years))[:n_years]  # prefix-stable
        p = REGION_PARAMETERS[site.region]
        crop[:, i] = (np.arange(n_years) + phase + 1) % 2
        base = np.where(crop[:, i] == 1, p.plant_doy_corn, p.plant_doy_soy)
        plant[:, i] = np.round(base + state_shift[site.region] + jitter)
    return crop, plant


def _trait(crop_day: np.ndarray, name: str) -> np.ndarray:
    return np.where(crop_day == 1, getattr(CROPS[1], name), getattr(CROPS[0], name))


def _phenology(
    tmean: np.ndarray, cal: _Calendar, crop: np.ndarray, plant: np.ndarray
) -> dict[str, np.ndarray]:
    """Degree-day phenology, each array (n_days, n_sites).

    Returns the crop type, fAPAR, the live (not yet senescent) fraction of the biomass, and the
    planting and harvest days (booleans).
    """
    crop_day = crop[cal.year_index]
    plant_day = plant[cal.year_index]
    doy = cal.doy[:, None]
    t_base, t_cap = _trait(crop_day, "t_base"), _trait(crop_day, "t_cap")
    sown = doy >= plant_day
    gdd = np.where(sown, np.clip(tmean - t_base, 0.0, t_cap - t_base), 0.0)
    cumulative = np.empty_like(gdd)
    harvest_doy = np.empty(crop.shape)
    for y in range(len(cal.years)):
        a, b = cal.starts[y], cal.starts[y + 1]
        cumulative[a:b] = np.cumsum(gdd[a:b], axis=0)
        maturity = _trait(crop[y], "maturity")
        mature = cumulative[a:b] >= maturity
        first = np.where(mature.any(axis=0), mature.argmax(axis=0) + 1, 10_000)
        harvest_doy[y] = np.minimum(first + _trait(crop[y], "drydown_days"), HARVEST_DOY_MAX)
    harvest_day = harvest_doy[cal.year_index]
    season = sown & (doy < harvest_day)
    green = 1.0 / (1.0 + np.exp(-(cumulative - _trait(crop_day, "green_half"))
                                / _trait(crop_day, "green_width")))
    live = 1.0 - 1.0 / (1.0 + np.exp(-(cumulative - _trait(crop_day, "sen_half"))
                                     / _trait(crop_day, "sen_width")))
    return {
        "crop": crop_day,
        "fapar": np.where(season, _trait(crop_day, "fapar_max") * green * live, 0.0),
        "live": np.where(season, live, 0.0),
        "planting": doy == plant_day,
        "harvest": doy == harvest_day,
    }


# --------------------------------------------------------------------------------------------------
# carbon and water
# --------------------------------------------------------------------------------------------------


def _temperature_response(t: np.ndarray, crop_day: np.ndarray) -> np.ndarray:
    """Photosynthesis temperature scalar (0 outside [t_min, t_max], 1 at t_opt)."""
    t_min, t_opt, t_max = (_trait(crop_day, n) for n in ("t_min", "t_opt", "t_max"))
    num = (t - t_min) * (t - t_max)
    f = num / (num - (t - t_opt) ** 2)
    return np.where((t > t_min) & (t < t_max), f, 0.0)


def _soil_temperature(tmean: np.ndarray) -> np.ndarray:
    """Soil temperature: air temperature smoothed with a SOIL_LAG_DAYS time constant, >= -2 degC."""
    out = np.empty_like(tmean)
    ts = tmean[:7].mean(axis=0)
    alpha = 1.0 / SOIL_LAG_DAYS
    for t in range(len(tmean)):
        ts = ts + alpha * (tmean[t] - ts)
        out[t] = ts
    return np.maximum(out, -2.0)


def _priestley_taylor(radn: np.ndarray, tmean: np.ndarray) -> np.ndarray:
    """Potential evapotranspiration, mm d-1 (net radiation taken as 0.6 x RADN - 1 MJ)."""
    es = _vapour_pressure(tmean)
    delta = 4098.0 * es / (tmean + 237.3) ** 2
    rn = np.maximum(0.6 * radn - 1.0, 0.0)
    return np.where(tmean > 0.0, 1.26 * delta / (delta + 0.066) * rn / 2.45, 0.0)


def _snow(precn: np.ndarray, tmean: np.ndarray) -> np.ndarray:
    """Water reaching the soil (rain + snow melt), mm d-1; snow melts at 3 mm per degree-day."""
    inflow = np.empty_like(precn)
    pack = np.zeros(precn.shape[1])
    for t in range(len(precn)):
        cold = tmean[t] <= 0.0
        pack = pack + np.where(cold, precn[t], 0.0)
        melt = np.minimum(pack, 3.0 * np.maximum(tmean[t], 0.0))
        pack = pack - melt
        inflow[t] = np.where(cold, 0.0, precn[t]) + melt
    return inflow


def _carbon(
    weather: dict[str, np.ndarray],
    phen: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    soils: dict[str, np.ndarray],
    cal: _Calendar,
    management: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Run the water bucket and the carbon pools day by day (vectorised over sites).

    ``management`` (hidden, observed flavour only) adds irrigation (in season, an irrigated
    field's bucket is refilled to 80 % whenever it falls below 50 %, so its crop is never water
    stressed) and residue removal (only ``residue_retention`` of the non-grain biomass enters the
    litter pool); the other hidden factors act through ``params``.

    Returns GPP, Ra, Rh (n_days, n_sites), the yield in t ha-1 dry grain (n_years, n_sites) and,
    for diagnostics, the litter and soil organic carbon pools (n_days, n_sites), gC m-2.
    """
    crop_day, fapar = phen["crop"], phen["fapar"]
    tmean = weather["TMEAN"]
    corn = crop_day == 1
    lue = np.where(corn, params["lue_corn"], params["lue_soy"])
    tday = weather["TMAX_AIR"] - 0.25 * weather["TDIF_AIR"]
    gpp_potential = (lue * (1.0 + DIFFUSE_GAIN * weather["CLOUDINESS"]) * fapar
                     * PAR_FRACTION * weather["RADN"] * _temperature_response(tday, crop_day))
    rm_rate = params["rm_ref"] * phen["live"] * params["q10_ra"] ** ((tmean - T_REF) / 10.0)
    rh_temperature = params["q10_rh"] ** ((_soil_temperature(tmean) - T_REF) / 10.0)
    pet = _priestley_taylor(weather["RADN"], tmean)
    inflow = _snow(weather["PRECN"], tmean)
    transpiring = _trait(crop_day, "kc") * fapar
    evaporating = SOIL_EVAPORATION * (1.0 - fapar)
    hi = np.where(corn, params["hi_corn"], params["hi_soy"])
    seed = _trait(crop_day, "seed_c")
    grain_c = _trait(crop_day, "grain_c")
    planting, harvest = phen["planting"], phen["harvest"]

    capacity = (soils["TFC"] - soils["TWP"]) * ROOT_DEPTH_MM
    water = 0.8 * capacity
    biomass = np.zeros_like(capacity)
    soc = soils["TSOC"] * soils["TBKDS"] * SOC_DEPTH_M * 1000.0  # g kg-1 x kg m-3 x m -> gC m-2
    k_soc, k_litter = params["k_soc"] / 365.0, params["k_litter"] / 365.0
    litter = np.full_like(capacity, LITTER_START)
    n_sites = len(capacity)
    irrigated = np.zeros(n_sites, bool) if management is None else management["irrigated"]
    retention = np.ones(n_sites) if management is None else management["residue_retention"]
    in_season = fapar > 0.0

    n_days = len(tmean)
    gpp, ra, rh = np.empty_like(tmean), np.empty_like(tmean), np.empty_like(tmean)
    litter_pool, soc_pool = np.empty_like(tmean), np.empty_like(tmean)
    yield_t = np.zeros((len(cal.years), len(capacity)))
    for t in range(n_days):
        water = np.where(irrigated & in_season[t] & (water < IRRIGATION_TRIGGER * capacity),
                         IRRIGATION_REFILL * capacity, water)
        relative = water / capacity
        f_water = np.minimum(relative / WATER_STRESS_POINT, 1.0)
        g = gpp_potential[t] * f_water
        biomass = np.where(planting[t], seed[t], biomass)
        rm = rm_rate[t] * biomass
        r = rm + GROWTH_RESPIRATION * np.maximum(g - rm, 0.0)
        biomass = np.maximum(biomass + g - r, 0.0)
        if harvest[t].any():
            grain = np.where(harvest[t], hi[t] * biomass, 0.0)
            yield_t[cal.year_index[t]] += grain / grain_c[t] / 100.0  # gC m-2 -> t ha-1 dry
            litter = litter + np.where(harvest[t], retention * (biomass - grain), 0.0)
            biomass = np.where(harvest[t], 0.0, biomass)
        et = pet[t] * (transpiring[t] * f_water + evaporating[t] * relative)
        water = np.clip(water + inflow[t] - et, 0.0, capacity)
        moisture = RH_MOISTURE_MIN + (1.0 - RH_MOISTURE_MIN) * relative / RH_MOISTURE_OPT
        scalar = rh_temperature[t] * np.minimum(moisture, 1.0)
        from_soc = k_soc * soc * scalar
        from_litter = k_litter * litter * scalar
        soc = soc + HUMIFICATION * from_litter - from_soc
        litter = litter - from_litter
        gpp[t], ra[t], rh[t] = g, r, from_soc + (1.0 - HUMIFICATION) * from_litter
        litter_pool[t], soc_pool[t] = litter, soc
    return {"GPP": gpp, "Ra": ra, "Rh": rh, "Yield": yield_t, "litter": litter_pool,
            "soc": soc_pool}


# --------------------------------------------------------------------------------------------------
# observed (flux-tower) flavour
# --------------------------------------------------------------------------------------------------


def _truth_parameters(params: dict[str, np.ndarray], sites: list[_Site], reality_gap: bool,
                      management: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The process parameters with the per-state REALITY_GAP factors and each field's hidden
    management factors (cultivar LUE and harvest index, tillage and soil-carbon history on the
    decomposition rates) applied."""
    truth = dict(params)
    if reality_gap:
        gap = [REALITY_GAP[s.region] for s in sites]
        for name, factor in (("lue_corn", "lue"), ("lue_soy", "lue"), ("q10_rh", "q10_rh"),
                             ("rm_ref", "rm_ref"), ("k_soc", "k_soc")):
            truth[name] = truth[name] * np.array([getattr(g, factor) for g in gap])
    if management is not None:
        m = management
        for name, factor in (("lue_corn", m["cultivar_lue"]), ("lue_soy", m["cultivar_lue"]),
                             ("hi_corn", m["cultivar_hi"]), ("hi_soy", m["cultivar_hi"]),
                             ("rm_ref", m["cultivar_rm"]),
                             ("k_soc", m["soc_rate"] * m["decomposition_factor"]),
                             ("k_litter", m["decomposition_factor"])):
            truth[name] = truth[name] * factor
    return truth


def _observed_window(config: SynthConfig, site: _Site) -> tuple[int, int]:
    """First year index and number of years a site's tower observed (deterministic per seed)."""
    rng = _rng(config.seed, "obs_window", *site.key)
    low, high = config.obs_years
    n = min(int(rng.integers(low, high + 1)), site.n_years)
    start = int(rng.integers(0, site.n_years - n + 1))
    return start, n


def _observe(
    config: SynthConfig,
    sites: list[_Site],
    cal: _Calendar,
    fluxes: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Turn true fluxes into tower data: noise, gaps (runs, more in winter), survey yields.

    NEE gets Laplace noise (eddy-covariance errors are heavy-tailed), GPP a small relative error,
    and Reco = NEE + GPP as in ONEFlux partitioning; Ra and Rh are not observed.
    """
    n_days, n_sites = fluxes["GPP"].shape
    z = np.empty((n_days, n_sites, 3))
    u = np.empty((n_days, n_sites))
    yield_noise = np.empty((len(cal.years), n_sites))
    for i, site in enumerate(sites):
        for y, year in enumerate(cal.years):
            a, b = cal.starts[y], cal.starts[y + 1]
            rng = _rng(config.seed, "obs_noise", *site.key, int(year))
            yield_noise[y, i] = rng.standard_normal()
            z[a:b, i] = rng.standard_normal((b - a, 3))
            z[a:b, i, 0] = rng.laplace(0.0, 1.0 / np.sqrt(2.0), b - a)
            u[a:b, i] = rng.random(b - a)

    nee_true = fluxes["Ra"] + fluxes["Rh"] - fluxes["GPP"]
    gpp = fluxes["GPP"] * (1.0 + config.gpp_noise_rel * z[:, :, 1]) + 0.1 * z[:, :, 2]
    nee = nee_true + (config.nee_noise + config.nee_noise_rel * np.abs(nee_true)) * z[:, :, 0]

    # gaps: a two-state Markov chain whose mean gap fraction is higher in winter
    doy = cal.doy[:, None].astype(float)
    fraction = np.clip(config.gap_fraction
                       * (1.0 + 0.6 * np.cos(2.0 * np.pi * (doy - 18.0) / 365.25)), 0.0, 0.9)
    keep_going = 1.0 - 1.0 / config.gap_length
    start = np.broadcast_to(fraction * (1.0 - keep_going) / (1.0 - fraction), (n_days, n_sites))
    gap = np.zeros(u.shape, dtype=bool)
    if config.gap_fraction > 0:
        gap = _markov_chain(u, start, keep_going)

    nee = np.where(gap, np.nan, nee)
    survey = fluxes["Yield"] * np.exp(config.yield_noise * yield_noise
                                      - 0.5 * config.yield_noise**2)
    return {
        "GPP": gpp, "NEE": nee, "Reco": nee + gpp, "Ra": np.full_like(nee, np.nan),
        "Rh": np.full_like(nee, np.nan), "Yield": survey,
    }


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def _run(config: SynthConfig):
    """Everything simulate() and site_parameters() need."""
    _check_config(config)
    sites = _sites(config)
    cal = _calendar(config.first_year, max(s.n_years for s in sites))
    params = _process_parameters(config, sites)
    soils = _soils(config, sites)
    return sites, cal, params, soils


def simulate(config: SynthConfig = SynthConfig()) -> pd.DataFrame:
    """Simulate the long site-day table of the data contract (see the module docstring).

    Columns: site, region, date, the KGML-ag inputs (``schema.KGML_AG_INPUTS``), lat, lon, Ra, Rh,
    NEE, Reco, Yield; one row per site-day (29 February included), sorted by site then date.
    """
    sites, cal, params, soils = _run(config)
    coords = _coordinates(config, sites)
    weather = _weather(config, sites, cal)
    crop, plant = _management(config, sites, cal)
    phen = _phenology(weather["TMEAN"], cal, crop, plant)
    if config.observed:
        hidden = _hidden_management(config, sites, coords) if config.management else None
        truth = _truth_parameters(params, sites, config.reality_gap, hidden)
        out = _observe(config, sites, cal, _carbon(weather, phen, truth, soils, cal, hidden))
        windows = [_observed_window(config, s) for s in sites]
    else:
        out = _carbon(weather, phen, params, soils, cal)
        out["NEE"] = out["Ra"] + out["Rh"] - out["GPP"]
        out["Reco"] = out["Ra"] + out["Rh"]
        windows = [(0, s.n_years) for s in sites]

    # rows: for each site, the days of its kept years
    day_idx = np.concatenate([np.arange(cal.starts[a], cal.starts[a + n]) for a, n in windows])
    lengths = [cal.starts[a + n] - cal.starts[a] for a, n in windows]
    site_idx = np.repeat(np.arange(len(sites)), lengths)

    columns: dict[str, np.ndarray] = {
        schema.SITE: np.repeat(np.array([s.site for s in sites], dtype=object), lengths),
        schema.REGION: np.repeat(np.array([s.region for s in sites], dtype=object), lengths),
        schema.DATE: cal.dates.to_numpy()[day_idx],
    }
    for name in WEATHER_COLUMNS:
        columns[name] = weather[name][day_idx, site_idx]
    columns["Crop_Type"] = phen["crop"][day_idx, site_idx].astype(float)
    columns["GPP"] = out["GPP"][day_idx, site_idx]
    columns["Year"] = cal.years[cal.year_index[day_idx]].astype(float)
    for name in SOIL_COLUMNS:
        columns[name] = soils[name][site_idx]
    for name in schema.SITE_INPUTS:
        columns[name] = coords[name][site_idx]
    for name in ("Ra", "Rh", "NEE", "Reco"):
        columns[name] = out[name][day_idx, site_idx]
    columns["Yield"] = out["Yield"][cal.year_index[day_idx], site_idx]
    frame = pd.DataFrame({name: columns[name] for name in OUTPUT_COLUMNS})
    frame[schema.DATE] = frame[schema.DATE].astype("datetime64[ns]")
    return frame


def site_parameters(config: SynthConfig = SynthConfig()) -> pd.DataFrame:
    """One row per site: region, years simulated, rotation phase, process parameters, soil,
    coordinates, hidden management and whether the site is a new field (:func:`new_sites`).

    ``obs_first_year``/``obs_last_year`` give the years the site's tower observes in the observed
    flavour. The process parameters are the process model's; the observed flavour's truth is them
    times :data:`REALITY_GAP` and the hidden management factors (which apply only when
    ``config.management`` is on; they are listed either way).
    """
    sites, cal, params, soils = _run(config)
    crop, _ = _management(config, sites, cal)
    windows = [_observed_window(config, s) for s in sites]
    coords = _coordinates(config, sites)
    hidden = _hidden_management(config, sites, coords)
    fresh = set(new_sites(config))
    table = {
        schema.SITE: [s.site for s in sites],
        schema.REGION: [s.region for s in sites],
        "first_year": [config.first_year] * len(sites),
        "last_year": [config.first_year + s.n_years - 1 for s in sites],
        "n_years": [s.n_years for s in sites],
        "first_crop": crop[0].astype(float),
        "obs_first_year": [config.first_year + a for a, _ in windows],
        "obs_last_year": [config.first_year + a + n - 1 for a, n in windows],
    }
    table.update({name: params[name] for name in PROCESS_PARAMETERS})
    table.update({name: soils[name] for name in SOIL_COLUMNS})
    table.update(coords)
    table.update(hidden)
    table["new_site"] = [s.site in fresh for s in sites]
    return pd.DataFrame(table)
