"""Where simulated fields lie and how they are managed: coordinates and hidden management.

Real neighbouring fields differ far more than their weather and soil explain. Two FLUXNET2015
towers 1.6 km apart under the same weather (US-Ne1, US-Ne2) differ by 0.09 in annual Reco/GPP
and by 161 gC m-2 yr-1 in annual NEE in their common maize years (docs/simulator.md). Management
history explains such differences: irrigation, residue removal and tillage, the cultivar, the
field's soil-carbon history. No input column of the data contract names them (GPP, an input,
carries some of their effect), so a global model cannot know them and a field's own data is the
only way to learn them. That is what calibration
is for, and what this module gives the simulator.

* **Coordinates.** Every site gets ``lat``/``lon`` inside a box that lies inside its state
  (:data:`STATE_BOXES`), drawn from a generator keyed by (seed, site).
* **Hidden management** (:data:`HIDDEN_PARAMETERS`), drawn per site from standard normal scores
  ``z = sqrt(SPATIAL_SHARE) * f(lat, lon) + sqrt(1 - SPATIAL_SHARE) * e``: ``f`` is a smooth
  Gaussian random field of unit variance with a Gaussian correlation of length
  :data:`CORRELATION_KM` (one field per state and parameter), ``e`` the field's own nugget. Nearby
  fields are therefore alike, not identical; fields further apart than a few correlation lengths
  are independent apart from their state.

The spatial field is a sum of random Fourier features (Rahimi and Recht 2007): a field whose value
at any coordinate depends only on the seed, the state and the parameter, not on which or how many
sites are simulated, so shrunk configurations stay exact subsets of the default one. numpy has no
such sampler; a Cholesky draw over the sites would depend on the site count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from kgml_peft.errors import KgmlPeftError

#: (lat_min, lat_max, lon_min, lon_max) of a box inside each state, degrees (rounded state
#: outlines; each box lies inside its state).
STATE_BOXES: dict[str, tuple[float, float, float, float]] = {
    "IA": (40.8, 43.3, -95.7, -91.3),
    "IL": (38.5, 42.0, -90.5, -88.0),
    "IN": (38.5, 41.5, -87.4, -85.0),
}

#: Correlation length of the hidden parameters' spatial fields, km (Gaussian correlation
#: exp(-d^2 / (2 L^2)): 0.61 at L, 0.14 at 2 L).
CORRELATION_KM = 100.0
#: Share of a hidden score's variance that is spatial; the rest is the field's own (the nugget).
#: US-Ne1 and US-Ne2 are 1.6 km apart and still differ by 12 % in annual Reco, so the nugget is
#: large.
SPATIAL_SHARE = 0.5
#: Random Fourier features per spatial field.
FOURIER_FEATURES = 256
KM_PER_DEGREE = 111.2

#: The hidden management parameters of a field, in draw order.
HIDDEN_PARAMETERS: tuple[str, ...] = (
    "irrigated", "cultivar_lue", "cultivar_hi", "cultivar_rm", "residue_retention", "tilled",
    "soc_rate",
)


@dataclass(frozen=True)
class ManagementSpread:
    """How widely hidden management varies between fields (see docs/simulator.md).

    ``scale`` multiplies every spread below; its default was chosen so that simulated neighbouring
    fields differ as much as US-Ne1 and US-Ne2 do (annual Reco/GPP, Reco and NEE in common maize
    years; the search is in docs/simulator.md). The relative sizes are assumptions: cultivars
    differ little in light-use efficiency and harvest index, soil-carbon history (manure, former
    grassland, erosion) a lot in the base rate of soil respiration.
    """

    scale: float = 1.75
    #: share of irrigated fields (rainfed Corn Belt states: a few percent of cropland is
    #: irrigated, more in Nebraska; 0.1 keeps one or two irrigated fields in the demo data)
    irrigated_fraction: float = 0.1
    #: lognormal s.d. of the cultivar's light-use efficiency factor (both crops)
    cultivar_lue: float = 0.06
    #: lognormal s.d. of the cultivar's harvest-index factor
    cultivar_hi: float = 0.06
    #: lognormal s.d. of the cultivar's maintenance respiration factor
    cultivar_rm: float = 0.15
    #: centre and s.d. of the fraction of crop residue left on the field (the rest is baled); the
    #: clip to [0.2, 1] puts the mean at about 0.80 with the default scale
    residue_mean: float = 0.85
    residue_sd: float = 0.15
    #: share of fields under conventional tillage, and its factor on decomposition rates
    tilled_fraction: float = 0.5
    tillage_factor: float = 0.3
    #: lognormal s.d. of the soil-carbon history factor on the SOC decomposition rate
    soc_rate: float = 0.5

    def __post_init__(self) -> None:
        for name in ("scale", "cultivar_lue", "cultivar_hi", "cultivar_rm", "residue_sd", "tillage_factor",
                     "soc_rate"):
            if not getattr(self, name) >= 0:
                raise KgmlPeftError(f"management spread: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("irrigated_fraction", "tilled_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise KgmlPeftError(f"management spread: {name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.residue_mean <= 1:
            raise KgmlPeftError(f"management spread: residue_mean must be in (0, 1], got {self.residue_mean}")


def site_coordinates(rng: np.random.Generator, region: str) -> tuple[float, float]:
    """A uniformly random (lat, lon) inside the state's box, rounded to 1e-4 degrees (about 10 m)."""
    lat0, lat1, lon0, lon1 = STATE_BOXES[region]
    u = rng.random(2)
    return round(lat0 + (lat1 - lat0) * u[0], 4), round(lon0 + (lon1 - lon0) * u[1], 4)


def _km(lat: np.ndarray, lon: np.ndarray, region: str) -> np.ndarray:
    """Coordinates in km on a local equirectangular projection of the state (n, 2)."""
    lat0, lat1, _, _ = STATE_BOXES[region]
    scale = np.cos(np.radians(0.5 * (lat0 + lat1)))
    return np.stack([lon * KM_PER_DEGREE * scale, lat * KM_PER_DEGREE], axis=1)


def spatial_field(rng: np.random.Generator, lat: np.ndarray, lon: np.ndarray, region: str,
                  length_km: float = CORRELATION_KM) -> np.ndarray:
    """A unit-variance Gaussian random field with correlation exp(-d^2 / (2 L^2)) at the given
    coordinates (random Fourier features; ``rng`` keyed by state and parameter only)."""
    omega = rng.standard_normal((FOURIER_FEATURES, 2)) / length_km
    phase = rng.uniform(0.0, 2.0 * np.pi, FOURIER_FEATURES)
    x = _km(np.asarray(lat, float), np.asarray(lon, float), region)
    # element-wise, not ``x @ omega.T``, and one exactly rounded sum per site (math.fsum), not
    # ``.sum(axis=1)``: BLAS and numpy's 2-D reductions may round differently for one row than for
    # several, and a field's value must not depend on how many sites are simulated
    angle = x[:, :1] * omega[:, 0] + x[:, 1:] * omega[:, 1] + phase
    sums = np.array([math.fsum(row) for row in np.cos(angle)]).reshape(len(x))
    return np.sqrt(2.0 / FOURIER_FEATURES) * sums


def hidden_scores(field: np.ndarray, nugget: np.ndarray) -> np.ndarray:
    """Standard normal scores: the spatial part and the field's own part mixed by SPATIAL_SHARE."""
    return np.sqrt(SPATIAL_SHARE) * field + np.sqrt(1.0 - SPATIAL_SHARE) * nugget


def management_from_scores(z: np.ndarray, spread: ManagementSpread) -> dict[str, np.ndarray]:
    """Hidden management of each field from its scores ``z`` (n_sites, len(HIDDEN_PARAMETERS)).

    Factors are mean-preserving lognormals; irrigation and tillage are on where a field's score is
    above its threshold, so irrigated and tilled fields cluster in space.
    """
    s = spread.scale
    col = {name: z[:, i] for i, name in enumerate(HIDDEN_PARAMETERS)}

    def lognormal(score: np.ndarray, sd: float) -> np.ndarray:
        return np.exp(sd * s * score - 0.5 * (sd * s) ** 2)

    def above(score: np.ndarray, share: float) -> np.ndarray:
        """True for the ``share`` of fields with the highest scores (in expectation)."""
        return score > NormalDist().inv_cdf(1.0 - share) if share > 0 else np.zeros(score.shape, bool)

    tilled = above(col["tilled"], spread.tilled_fraction)
    return {
        "irrigated": above(col["irrigated"], spread.irrigated_fraction),
        "cultivar_lue": lognormal(col["cultivar_lue"], spread.cultivar_lue),
        "cultivar_hi": lognormal(col["cultivar_hi"], spread.cultivar_hi),
        "cultivar_rm": lognormal(col["cultivar_rm"], spread.cultivar_rm),
        "residue_retention": np.clip(spread.residue_mean + spread.residue_sd * s * col["residue_retention"],
                                     0.2, 1.0),
        "tilled": tilled,
        "decomposition_factor": np.where(tilled, 1.0 + spread.tillage_factor * s, 1.0),
        "soc_rate": lognormal(col["soc_rate"], spread.soc_rate),
    }
