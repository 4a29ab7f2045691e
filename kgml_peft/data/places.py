"""Where sites are: great-circle distances, the location an adapter records, nearest neighbours.

A site's coordinates are the table's ``lat``/``lon`` columns (WGS84 degrees, one value per site;
:func:`~kgml_peft.data.tables.validate_table` checks them). An adapter records where its data came
from (:func:`table_location`): the site's point, or for a region adapter the centroid of its
sites and the extent (the largest distance from the centroid to one of them), so a store of
adapters can be searched by location (:func:`nearest`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from kgml_peft import schema
from kgml_peft.errors import KgmlPeftError

#: mean Earth radius, km (the haversine distance's sphere)
EARTH_RADIUS_KM = 6371.0


def check_point(lat: object, lon: object, what: str = "location") -> tuple[float, float]:
    """``(lat, lon)`` as floats if they are finite degrees in range, else a one-line error."""
    out = []
    for name, value, limit in (("lat", lat, 90.0), ("lon", lon, 180.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise KgmlPeftError(f"{what}: {name} must be a number of degrees, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or abs(value) > limit:
            raise KgmlPeftError(f"{what}: {name} must be between -{limit:g} and {limit:g} degrees, got {value:g}")
        out.append(value)
    return out[0], out[1]


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance, km (haversine on a sphere of :data:`EARTH_RADIUS_KM`)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (math.sin((p2 - p1) / 2) ** 2
         + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def centroid(points: list[tuple[float, float]]) -> tuple[float, float]:
    """The spherical centroid of ``(lat, lon)`` points (mean of unit vectors, so regions across
    the antimeridian come out right), rounded to 1e-6 degrees."""
    lat, lon = np.radians(np.asarray(points, dtype=float)).T
    x, y, z = (float(v.mean()) for v in (np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)))
    if math.hypot(x, y, z) < 1e-9:
        raise KgmlPeftError("the sites' coordinates have no centroid (they surround the globe)")
    return (round(math.degrees(math.atan2(z, math.hypot(x, y))), 6),
            round(math.degrees(math.atan2(y, x)), 6))


def site_points(table: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Each site's ``(lat, lon)`` from a validated table (empty when it has no coordinates)."""
    if not all(c in table.columns for c in schema.SITE_INPUTS):
        return {}
    first = table.groupby(schema.SITE, sort=True)[list(schema.SITE_INPUTS)].first()
    return {str(site): (float(row.lat), float(row.lon)) for site, row in first.iterrows()}


def table_location(table: pd.DataFrame) -> dict | None:
    """The location record an adapter calibrated on ``table`` keeps: ``lat``/``lon`` (the site, or
    its sites' centroid), ``sites`` (how many) and ``extent_km`` (largest distance from that point
    to a site; 0 for one site). None when the table has no coordinates."""
    points = site_points(table)
    if not points:
        return None
    lat, lon = centroid(list(points.values())) if len(points) > 1 else next(iter(points.values()))
    extent = max(distance_km(lat, lon, a, b) for a, b in points.values())
    return {"lat": lat, "lon": lon, "sites": len(points), "extent_km": round(extent, 3)}


def check_location(record: object, what: str) -> dict:
    """A stored location record (see :func:`table_location`) with the types it must have."""
    if not isinstance(record, dict) or set(record) != {"lat", "lon", "sites", "extent_km"}:
        raise KgmlPeftError(f"{what}: location must be an object with lat, lon, sites and extent_km")
    check_point(record["lat"], record["lon"], what)
    sites, extent = record["sites"], record["extent_km"]
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise KgmlPeftError(f"{what}: location sites must be a positive integer")
    if isinstance(extent, bool) or not isinstance(extent, (int, float)) or not 0 <= extent <= 2e4:
        raise KgmlPeftError(f"{what}: location extent_km must be a distance in km")
    return record


class NoneInRange(KgmlPeftError):
    """No candidate lies within the largest distance asked for (:func:`nearest`)."""


def check_neighbour_settings(k: object, max_km: object) -> None:
    """``k`` must be an integer >= 1 and ``max_km`` None or a positive distance (km)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
        raise KgmlPeftError(f"the number of neighbours must be an integer >= 1 and <= 1000, got {k!r}")
    if max_km is not None and (isinstance(max_km, bool) or not isinstance(max_km, (int, float))
                               or not max_km > 0):
        raise KgmlPeftError(f"the largest distance must be a positive number of km, got {max_km!r}")


def nearest(candidates: Mapping[str, tuple[float, float]], lat: float, lon: float, k: int,
            max_km: float | None = None) -> list[tuple[str, float]]:
    """The ``k`` candidates (name -> (lat, lon)) nearest to ``(lat, lon)`` within ``max_km``, as
    (name, km), nearest first (ties by name). Fewer than k are returned when fewer lie within
    ``max_km``; none at all is an error naming the nearest and its distance."""
    lat, lon = check_point(lat, lon)
    check_neighbour_settings(k, max_km)
    if not candidates:
        raise KgmlPeftError("no adapter with a recorded location to choose neighbours from")
    ranked = sorted(((distance_km(lat, lon, a, b), name) for name, (a, b) in candidates.items()))
    within = [(name, round(km, 3)) for km, name in ranked if max_km is None or km <= max_km]
    if not within:
        km, name = ranked[0]
        raise NoneInRange(f"no adapter within {max_km:g} km of ({lat:g}, {lon:g}); the nearest is "
                          f"{name} at {km:.1f} km")
    return within[:k]
