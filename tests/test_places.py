"""Where adapters live: distances, the location a calibration records, nearest neighbours, and
``adapters list/show`` through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kgml_peft.calibration.calibrate import calibrate
from kgml_peft.cli import cli
from kgml_peft.data import places
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.adapter import read_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from tests.conftest import make_frame, tiny_calibration
from tests.test_cli_validation import _runner

# two sites 0.1 degree of latitude apart and one across the state
POINTS = {"IA-001": (42.0, -93.5), "IA-002": (42.1, -93.5), "IA-003": (41.6, -91.5)}


def test_distances_are_great_circle_km():
    # one degree along the equator and along a meridian: 2 pi R / 360 (hand-computed reference)
    degree = 2 * math.pi * places.EARTH_RADIUS_KM / 360
    assert places.distance_km(0, 0, 0, 1) == pytest.approx(degree, rel=1e-12)
    assert places.distance_km(10, 20, 11, 20) == pytest.approx(degree, rel=1e-12)
    # across the antimeridian the short way round; the poles are half a circumference apart
    assert places.distance_km(0, 179.5, 0, -179.5) == pytest.approx(degree, rel=1e-9)
    assert places.distance_km(90, 0, -90, 0) == pytest.approx(180 * degree, rel=1e-12)


def test_centroid_is_spherical():
    assert places.centroid([(10.0, 20.0), (10.0, 20.0)]) == (10.0, 20.0)
    lat, lon = places.centroid([(0.0, 179.0), (0.0, -179.0)])  # not (0, 0): the antimeridian
    assert lat == pytest.approx(0.0, abs=1e-6) and abs(lon) == pytest.approx(180.0, abs=1e-6)
    with pytest.raises(KgmlPeftError, match="no centroid"):
        places.centroid([(0.0, 0.0), (0.0, 180.0)])


def _with_coordinates(frame, points=POINTS):
    frame = frame.copy()
    frame["lat"] = frame["site"].map(lambda s: points[s][0])
    frame["lon"] = frame["site"].map(lambda s: points[s][1])
    return frame


def test_table_location_of_a_site_and_of_a_region():
    one = _with_coordinates(make_frame({"IA-001": "IA"}))
    assert places.table_location(one) == {"lat": 42.0, "lon": -93.5, "sites": 1, "extent_km": 0.0}
    two = _with_coordinates(make_frame({"IA-001": "IA", "IA-002": "IA"}))
    got = places.table_location(two)
    assert got["sites"] == 2 and got["lat"] == pytest.approx(42.05, abs=1e-4) and got["lon"] == -93.5
    # half of the 0.1-degree separation
    assert got["extent_km"] == pytest.approx(places.distance_km(42.0, -93.5, 42.1, -93.5) / 2, abs=1e-3)
    assert places.table_location(make_frame({"IA-001": "IA"})) is None  # no coordinates


def test_nearest_ranks_limits_and_says_what_is_nearest():
    got = places.nearest(POINTS, 42.0, -93.4, k=2)
    assert [name for name, _ in got] == ["IA-001", "IA-002"]
    assert got[0][1] == pytest.approx(places.distance_km(42.0, -93.4, 42.0, -93.5), abs=1e-3)
    assert [n for n, _ in places.nearest(POINTS, 42.0, -93.4, k=3, max_km=20)] == ["IA-001", "IA-002"]
    km = places.distance_km(41.0, -90.0, *POINTS["IA-003"])
    with pytest.raises(KgmlPeftError, match=rf"no adapter within 1 km of \(41, -90\); the nearest is "
                                            rf"IA-003 at {km:.1f} km"):
        places.nearest(POINTS, 41.0, -90.0, k=3, max_km=1)
    for bad_k in (0, -1, 1.5, True):
        with pytest.raises(KgmlPeftError, match="integer >= 1"):
            places.nearest(POINTS, 42.0, -93.4, k=bad_k)
    for lat, lon in ((91, 0), (0, -181), (float("nan"), 0), ("42", 0)):
        with pytest.raises(KgmlPeftError, match="lat|lon"):
            places.nearest(POINTS, lat, lon, k=1)
    with pytest.raises(KgmlPeftError, match="positive number of km"):
        places.nearest(POINTS, 42.0, -93.4, k=1, max_km=0)


@pytest.fixture(scope="module")
def located(backbone_path, tmp_path_factory):
    """A store with a real site adapter and a real region adapter, both calibrated on a table
    with coordinates, and one calibrated on a table without."""
    backbone = load_backbone(backbone_path)
    frame = _with_coordinates(make_frame({"IA-001": "IA", "IA-002": "IA", "IA-003": "IA"}))
    store = tmp_path_factory.mktemp("located")
    for name in ("IA-001", "IA"):
        result = calibrate(backbone, frame, name, tiny_calibration(epochs=1), progress=False)
        save_adapter(store / f"{name}.safetensors", result.adapter)
    plain = calibrate(backbone, make_frame({"IA-001": "IA"}), "IA-001", tiny_calibration(epochs=1),
                      progress=False)
    save_adapter(store / "IA-009.safetensors", plain.adapter.__class__(
        **{**plain.adapter.__dict__, "site": "IA-009"}))
    return store


def test_calibrate_records_where_its_data_came_from(located):
    site = read_adapter(located / "IA-001.safetensors")
    assert site.location == {"lat": 42.0, "lon": -93.5, "sites": 1, "extent_km": 0.0}
    region = read_adapter(located / "IA.safetensors")
    want = places.centroid(list(POINTS.values()))
    assert (region.location["lat"], region.location["lon"]) == want and region.location["sites"] == 3
    assert region.location["extent_km"] == pytest.approx(
        max(places.distance_km(*want, *p) for p in POINTS.values()), abs=1e-3)
    assert read_adapter(located / "IA-009.safetensors").location is None


def test_adapters_list_and_show_print_the_location(located):
    result = _runner().invoke(cli, ["adapters", "list", "--store", str(located), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["site"]: r for r in json.loads(result.stdout)}
    assert (rows["IA-001"]["lat"], rows["IA-001"]["lon"], rows["IA-001"]["extent_km"]) == (42.0, -93.5, 0.0)
    assert rows["IA-009"]["lat"] is None
    text = _runner().invoke(cli, ["adapters", "list", "--store", str(located)])
    assert text.exit_code == 0
    line = next(l for l in text.output.splitlines() if l.startswith("IA-001.safetensors"))
    assert line.split()[-2:] == ["42.00000", "-93.50000"]
    assert next(l for l in text.output.splitlines() if l.startswith("IA-009")).split()[-2:] == ["-", "-"]
    shown = _runner().invoke(cli, ["adapters", "show", str(located / "IA.safetensors")])
    assert shown.exit_code == 0 and "(centroid of 3 sites, within" in shown.output


@pytest.mark.parametrize("location", [{"lat": 95.0, "lon": 0.0, "sites": 1, "extent_km": 0.0},
                                      {"lat": 42.0, "lon": -93.5}, "42,-93", None])
def test_a_file_with_a_bad_location_record_is_refused(located, tmp_path, location):
    path = tmp_path / "IA-001.safetensors"
    path.write_bytes((located / "IA-001.safetensors").read_bytes())
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    data = json.loads(metadata["data"])
    data["location"] = location
    metadata["data"] = json.dumps(data)
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(KgmlPeftError, match="location"):
        read_adapter(path)
    result = _runner().invoke(cli, ["adapters", "show", str(path)])
    assert result.exit_code == 2 and "location" in result.output and "Traceback" not in result.output
