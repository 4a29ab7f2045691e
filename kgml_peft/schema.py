"""The data contract: column names, units, physical ranges and site-id rules.

Everything that reads or writes a table refers to the names here, so that one place says what a
column means. Units follow DESIGN.md: fluxes in gC m-2 d-1, radiation in MJ m-2 d-1, temperatures
in degC, humidity in percent relative humidity, wind in m s-1, precipitation in mm d-1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kgml_peft.errors import KgmlPeftError

#: Identifier columns of the long table.
SITE = "site"
REGION = "region"
DATE = "date"
ID_COLUMNS: tuple[str, ...] = (SITE, REGION, DATE)
#: Columns that hold names, never numbers: site and region ids, the crop name of a crops table
#: and the adapter name of a prediction table. They are read as written (``001`` stays ``001``,
#: ``NA`` and ``TRUE`` are names); only an empty cell means missing.
TEXT_COLUMNS: tuple[str, ...] = (SITE, REGION, "crop", "adapter")


@dataclass(frozen=True)
class Column:
    """One column of the data contract: its unit and the range a physical value can take."""

    name: str
    unit: str
    low: float
    high: float
    description: str
    #: True for site properties (soil, coordinates) that are constant for a site.
    static: bool = False


_COLUMNS: tuple[Column, ...] = (
    # daily weather
    Column("RADN", "MJ m-2 d-1", 0.0, 45.0, "incoming shortwave radiation, daily total"),
    Column("TMAX_AIR", "degC", -50.0, 55.0, "daily maximum air temperature"),
    Column("TDIF_AIR", "degC", 0.0, 40.0, "daily air temperature range (max - min)"),
    Column("HMAX_AIR", "%", 0.0, 100.0, "daily maximum relative humidity"),
    Column("HDIF_AIR", "%", 0.0, 100.0, "daily relative humidity range (max - min)"),
    Column("WIND", "m s-1", 0.0, 40.0, "daily mean wind speed"),
    Column("PRECN", "mm d-1", 0.0, 500.0, "daily precipitation"),
    # management and vegetation
    Column("Crop_Type", "1 = corn, 0 = soybean", 0.0, 1.0, "crop grown in the year"),
    # -10: night-time partitioning gives slightly negative winter GPP at cold towers (FLUXNET2015
    # US-CRT reaches -5.2 gC m-2 d-1); the range only has to catch values in another unit
    Column("GPP", "gC m-2 d-1", -10.0, 50.0, "gross primary production (an input, as in KGML-ag)"),
    Column("Year", "year", 1900.0, 2100.0, "calendar year"),
    # flux-tower weather (FLUXNET2015 TA_F, VPD_F, VPD_F_MAX): not KGML-ag inputs, but what towers
    # record in place of relative humidity
    Column("TAVG_AIR", "degC", -50.0, 55.0, "daily mean air temperature"),
    Column("VPD_AIR", "hPa", 0.0, 100.0, "daily mean vapour pressure deficit"),
    Column("VPDMAX_AIR", "hPa", 0.0, 150.0, "daily maximum vapour pressure deficit"),
    # static soil properties (top soil)
    Column("TBKDS", "g cm-3", 0.5, 2.5, "bulk density", static=True),
    Column("TSAND", "%", 0.0, 100.0, "sand content", static=True),
    Column("TSILT", "%", 0.0, 100.0, "silt content", static=True),
    Column("TFC", "m3 m-3", 0.0, 1.0, "volumetric water content at field capacity", static=True),
    Column("TWP", "m3 m-3", 0.0, 1.0, "volumetric water content at wilting point", static=True),
    Column("TKSat", "mm h-1", 0.0, 2000.0, "saturated hydraulic conductivity", static=True),
    Column("TSOC", "g kg-1", 0.0, 600.0, "soil organic carbon concentration", static=True),
    Column("TPH", "pH", 2.0, 12.0, "soil pH", static=True),
    Column("TCEC", "cmol kg-1", 0.0, 200.0, "cation exchange capacity", static=True),
    # site coordinates (WGS84): optional, checked whenever present, features only by choice
    Column("lat", "degrees north", -90.0, 90.0, "site latitude, WGS84", static=True),
    Column("lon", "degrees east", -180.0, 180.0, "site longitude, WGS84", static=True),
    # targets
    Column("Ra", "gC m-2 d-1", -10.0, 60.0, "autotrophic respiration"),
    Column("Rh", "gC m-2 d-1", -10.0, 60.0, "heterotrophic respiration"),
    Column("NEE", "gC m-2 d-1", -60.0, 60.0, "net ecosystem exchange = Reco - GPP (+ = source)"),
    Column("Reco", "gC m-2 d-1", -10.0, 80.0, "ecosystem respiration = Ra + Rh"),
    Column("Yield", "t ha-1", 0.0, 30.0, "annual grain yield, dry matter"),
)

COLUMNS: dict[str, Column] = {c.name: c for c in _COLUMNS}

#: KGML-ag inputs in their canonical order.
KGML_AG_INPUTS: tuple[str, ...] = (
    "RADN", "TMAX_AIR", "TDIF_AIR", "HMAX_AIR", "HDIF_AIR", "WIND", "PRECN", "Crop_Type", "GPP",
    "Year", "TBKDS", "TSAND", "TSILT", "TFC", "TWP", "TKSat", "TSOC", "TPH", "TCEC",
)
#: Weather that flux towers record and KGML-ag does not use (mean temperature, VPD).
FLUX_TOWER_INPUTS: tuple[str, ...] = ("TAVG_AIR", "VPD_AIR", "VPDMAX_AIR")
#: Site coordinates (degrees, WGS84), constant per site. Optional columns: a table that has them
#: is checked (range, no NaN, one value per site) whether or not a backbone uses them. They are
#: features only when a backbone config names them, never by default: a backbone that knows where
#: its training sites are extrapolates at a site outside that area.
SITE_INPUTS: tuple[str, ...] = ("lat", "lon")
#: Every input a backbone may be built for.
ALL_INPUTS: tuple[str, ...] = KGML_AG_INPUTS + FLUX_TOWER_INPUTS + SITE_INPUTS
#: The default backbone features: all KGML-ag inputs except ``Year``, which carries no physics and
#: extrapolates outside its training range whenever validation years come after training years.
DEFAULT_FEATURES: tuple[str, ...] = tuple(f for f in KGML_AG_INPUTS if f != "Year")
#: The features of the daily FLUXNET2015 files in ../shared (no precipitation, wind, humidity,
#: crop or soil): a backbone for flux-tower sites is built for these.
FLUXNET_FEATURES: tuple[str, ...] = (
    "RADN", "TMAX_AIR", "TDIF_AIR", "TAVG_AIR", "VPD_AIR", "VPDMAX_AIR", "GPP",
)
#: The features of official FLUXNET2015 DD files (``TA_F``, ``SW_IN_F``, ``VPD_F``, ``P_F``,
#: ``WS_F``; no daily minimum or maximum).
FLUXNET_DD_FEATURES: tuple[str, ...] = ("RADN", "TAVG_AIR", "VPD_AIR", "PRECN", "WIND", "GPP")

#: Crop names (lower case) and their ``Crop_Type`` code, as crop tables spell them (1 = corn,
#: 0 = soybean). Other crops have no code: KGML-ag was trained on the corn-soybean rotation.
CROP_CODES: dict[str, float] = {"maize": 1.0, "corn": 1.0, "soybean": 0.0, "soy": 0.0}

#: Daily flux targets predicted by the backbone, in output order.
FLUX_OUTPUTS: tuple[str, ...] = ("Ra", "Rh", "NEE")
#: Daily targets a table may carry; ``Reco`` is compared with the predicted Ra + Rh.
DAILY_TARGETS: tuple[str, ...] = ("Ra", "Rh", "NEE", "Reco")
#: Annual target (one value per site-year, repeated or given on any day of the year).
ANNUAL_TARGETS: tuple[str, ...] = ("Yield",)
TARGETS: tuple[str, ...] = DAILY_TARGETS + ANNUAL_TARGETS

#: Days per year window. Leap years lose 29 February, so every window has the same length.
DAYS_PER_YEAR = 365

SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_site_id(site: object, what: str = "site id") -> str:
    """Return ``site`` as a string if it is a safe site id, else raise :class:`KgmlPeftError`.

    Site ids become file names (``adapters/<site>.safetensors``), so they may only contain
    letters, digits, ``_``, ``.`` and ``-``, must start with a letter or digit, and are at most 64
    characters long.
    """
    text = str(site)
    if not SITE_ID_PATTERN.fullmatch(text):
        raise KgmlPeftError(
            f"unsafe {what} {text!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return text


def check_feature_names(features: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate a backbone feature list against the known KGML-ag inputs."""
    features = tuple(features)
    if not features:
        raise KgmlPeftError("the feature list is empty")
    unknown = [f for f in features if f not in ALL_INPUTS]
    if unknown:
        raise KgmlPeftError(
            f"unknown feature {unknown[0]!r}; known inputs are: {', '.join(ALL_INPUTS)}"
        )
    if len(set(features)) != len(features):
        raise KgmlPeftError("the feature list names a column twice")
    if "GPP" not in features:
        raise KgmlPeftError("the feature list must contain GPP (the mass balance needs it)")
    return features
