"""``kgml-peft experiment --suite neighbours --quick`` through the real CLI: every field and method
scored, the means computed from the rows, the spatial correlation measured."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from kgml_peft.cli import cli
from kgml_peft.store.adapter import read_adapter
from tests.test_cli_validation import _runner

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_globals")
def test_quick_neighbours_suite(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped backbone is the suite's
    out = tmp_path / "nb"
    result = _runner().invoke(cli, ["experiment", "--suite", "neighbours", "--quick", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    fields = results["fields"]
    assert len(fields) == 6 and (out / "results.md").read_text().startswith("# Neighbourhood adapters")
    rows = results["rows"]
    # every field: global, blend and both 1-year calibrations, for NEE and Reco
    assert len(rows) == len(fields) * 2 * 4
    for target in ("NEE", "Reco"):
        mine = [r for r in rows if r["target"] == target]
        for method, key in (("global", "global"), ("blend", "blend_0y"), ("prior", "prior_1y")):
            want = statistics.fmean(r["mse"] for r in mine if r["method"] == method)
            assert results["means"][target][key] == pytest.approx(want, rel=1e-12)
    # the blends are real: not the global model's predictions
    blend = {r["site"]: r["mse"] for r in rows if r["method"] == "blend" and r["target"] == "NEE"}
    glob = {r["site"]: r["mse"] for r in rows if r["method"] == "global" and r["target"] == "NEE"}
    assert any(abs(blend[s] - glob[s]) > 1e-6 for s in fields)
    # the prior runs recorded their sources: training sites, never a new field
    prior = read_adapter(out / "seed0" / "prior_1y" / f"{fields[0]}.safetensors")
    sources = [s["site"] for s in prior.info["calibration"]["prior_sources"]["sources"]]
    assert len(sources) == 3 and not set(sources) & set(fields)
    merges = results["weight_space_merge"]["rows"]
    assert [m["site"] for m in merges] == fields and all(m["nee_rms_difference"] >= 0 for m in merges)
    function = {m["site"]: m["mse_function"] for m in merges}
    assert function == pytest.approx(blend, rel=1e-6)  # the same blend as predict --neighbours served
    c = results["spatial_correlation"]
    assert c["near_pairs"] + c["far_pairs"] == 12 * 11 // 2 and -1 <= c["near_mean_r"] <= 1


def test_calibration_years_include_the_test_years_crop():
    """A cross-validated adapter serves only its calibration crops: on a maize/soybean rotation the
    one-year cell must calibrate on a year of the test year's crop, or it measures the global model."""
    from kgml_peft.calibration.runs import demo_table
    from kgml_peft.experiments.neighbours import _years_before_test

    table = demo_table()
    year = table["date"].dt.year
    fields = ("IA-007", "IL-003", "IN-005")
    for years in (1, 2):
        chosen = _years_before_test(table, fields, years)
        for field in fields:
            mine = table[table["site"] == field]
            crops = mine.groupby(mine["date"].dt.year)["Crop_Type"].first()
            test = int(year[table["site"] == field].max())
            picked = sorted(set(chosen.loc[chosen["site"] == field, "date"].dt.year.tolist()))
            assert len(picked) == years and max(picked) < test
            assert crops[test] in {crops[y] for y in picked}, (field, years, picked)
            if years == 2:
                assert test - 1 in picked  # the most recent year stays
