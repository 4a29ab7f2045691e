"""The neighbour prior: ``calibrate --prior neighbours`` starts a site's adapter from the blend of
its nearest calibrated adapters and pulls it towards that blend (rho ||phi - phi_nb||^2)."""

from __future__ import annotations

import pytest
import torch

from kgml_peft import schema
from kgml_peft.calibration.batched import train_side_by_side
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.prior import prior_tensors, with_neighbour_prior
from kgml_peft.calibration.selection import cross_validate
from kgml_peft.calibration.units import prepare_unit
from kgml_peft.data.tables import validate_table
from kgml_peft.calibration.runs import run_calibration
from kgml_peft.cli import cli
from kgml_peft.store import blend as blending
from kgml_peft.store.adapter import read_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.tuners.site_model import SiteModel
from tests.conftest import make_frame, random_adapter
from tests.test_cli_validation import _runner

NEIGHBOURS = {"IA-002": (42.05, -93.50), "IA-003": (42.00, -93.20), "IA-004": (43.00, -95.00)}
SITE = (42.00, -93.45)


def _located(backbone, site, point, seed):
    adapter = random_adapter(backbone, site, AdapterConfig(), seed=seed)
    adapter.info["data"] = {"location": {"lat": point[0], "lon": point[1], "sites": 1, "extent_km": 0.0}}
    return adapter


@pytest.fixture
def world(backbone_path, tmp_path):
    """A store with three located neighbours and the site's own earlier adapter (same point), and a
    table of the site with its coordinates."""
    backbone = load_backbone(backbone_path)
    store = tmp_path / "adapters"
    store.mkdir()
    for i, (site, point) in enumerate(NEIGHBOURS.items()):
        save_adapter(store / f"{site}.safetensors", _located(backbone, site, point, seed=i + 1))
    save_adapter(store / "IA-001.safetensors", _located(backbone, "IA-001", SITE, seed=9))
    frame = make_frame({"IA-001": "IA"}, years=(2003, 2004, 2005))
    frame["lat"], frame["lon"] = SITE
    table = tmp_path / "site.csv"
    frame.to_csv(table, index=False, date_format="%Y-%m-%d")
    return backbone, store, frame, table


def _distance(tensors, reference):
    return sum(float((tensors[k] - reference[k]).square().sum()) for k in reference) ** 0.5


def test_the_prior_is_where_the_adapter_starts_and_what_rho_pulls_towards(world, backbone_path):
    backbone, store, frame, _ = world
    neighbours = blending.find_neighbours(store, backbone, *SITE, k=2, exclude=["IA-001"])
    assert [n.adapter.site for n in neighbours] == ["IA-002", "IA-003"]
    prior = blending.merge_in_weight_space([n.adapter.tensors for n in neighbours],
                                           [n.weight for n in neighbours], AdapterConfig())
    runs = {}
    for kind in ("none", "neighbours"):
        # a strong pull and a tiny step: the adapter stays where it started
        config = CalibrationConfig(prior=kind, prior_k=2, cv="none", epochs=2, batch_size=2, rho=1e4, lr=1e-4)
        out = store if kind == "neighbours" else store.parent / "plain"
        out.mkdir(exist_ok=True)
        [run] = run_calibration("IA-001", backbone_path=backbone_path, data=frame, out_dir=out,
                                config=config, progress=False, force=True)
        runs[kind] = read_adapter(run.path)
    near = runs["neighbours"].tensors
    # without a prior an adapter starts at the identity (peft's LoRA A and the blocks' down
    # projections random, the rest zero)
    start = SiteModel(backbone.model, AdapterConfig(), seed=0).adapter_tensors()
    assert _distance(near, prior) < 0.05 * _distance(start, prior)
    assert _distance(runs["none"].tensors, start) < 0.05 * _distance(start, prior)
    record = runs["neighbours"].info["calibration"]["prior_sources"]
    assert [s["site"] for s in record["sources"]] == ["IA-002", "IA-003"]  # never its own IA-001
    assert runs["neighbours"].info["calibration"]["prior"] == "neighbours"
    assert "prior" not in runs["none"].info["calibration"]  # files without a prior are as before


def test_cross_validated_calibration_with_a_prior(world, backbone_path):
    _, store, frame, _ = world
    config = CalibrationConfig(prior="neighbours", cv="folds", epochs=2, batch_size=2)
    [run] = run_calibration("IA-001", backbone_path=backbone_path, data=frame, out_dir=store,
                            config=config, progress=False, force=True)
    adapter = read_adapter(run.path)
    assert adapter.info["metrics"]["cv"]["folds"] == ["year 2003", "year 2004", "year 2005"]
    assert len(adapter.info["calibration"]["prior_sources"]["sources"]) == 3


def test_cli_calibrate_prior_prints_its_sources_and_refuses_bad_input(world, backbone_path, tmp_path):
    _, store, frame, table = world
    base = ["calibrate", "--site", "IA-001", "--data", str(table), "--backbone", str(backbone_path),
            "--out", str(store), "--cv", "none", "--epochs", "1", "--batch-size", "2"]
    result = _runner().invoke(cli, [*base, "--prior", "neighbours", "--prior-k", "1", "--force"])
    assert result.exit_code == 0, result.output
    assert "started from its neighbours' blend: IA-002 (" in result.output
    plain = tmp_path / "plain.csv"
    frame.drop(columns=["lat", "lon"]).to_csv(plain, index=False, date_format="%Y-%m-%d")
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    for args, message in (
            (["--data", str(plain), "--prior", "neighbours"], "needs the table's lat and lon columns"),
            (["--prior", "neighbours", "--method", "full"], "needs the adapter method"),
            (["--prior", "neighbours", "--prior-k", "0"], "prior_k must be >= 1"),
            (["--prior", "elsewhere"], "Invalid value for '--prior'")):
        result = _runner().invoke(cli, [*base, *args, "--force"])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _runner().invoke(cli, [*base[:-6], "--out", str(empty), "--cv", "none", "--epochs", "1",
                                    "--prior", "neighbours"])
    assert result.exit_code == 2 and "no adapter with a recorded location" in result.output
    assert list(empty.iterdir()) == []
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before


def test_one_year_with_a_prior_trains_the_head_on_top_of_the_whole_prior(world):
    """With one calibration year only the head trains, but the neighbours' LoRA and blocks stay in
    every fold's adapter (before, the head-only shape dropped them): epoch 0 is the whole prior."""
    backbone, store, frame, _ = world
    one_year = validate_table(frame[frame[schema.DATE].dt.year == 2004], backbone.config.features)
    config = CalibrationConfig(prior="neighbours", prior_k=2, cv="folds", epochs=2, batch_size=2)
    unit = prepare_unit(backbone, one_year, "IA-001", "site", config)
    unit = with_neighbour_prior(unit, store, backbone, config)
    whole = prior_tensors(unit.prior, AdapterConfig(), backbone.model)
    assert any(float(v.abs().max()) > 0 for k, v in whole.items() if not k.startswith("head."))
    [trained] = train_side_by_side(backbone, [unit], config, adapters=[AdapterConfig()], history=True,
                                   trains=[AdapterConfig(components=("head",))], progress=False)
    assert set(trained.history[0]) == set(whole)
    for name, value in whole.items():
        assert torch.equal(trained.history[0][name], value)  # epoch 0 is the prior itself
        after = trained.history[-1][name]
        if name.startswith("head."):
            continue
        assert torch.equal(after, value), name  # only the head took steps
    assert any(not torch.equal(trained.history[-1][k], whole[k]) for k in whole if k.startswith("head."))

    selection = cross_validate(backbone, unit, config, progress=False)
    assert list(selection.table) == ["head"]
    assert selection.table["head"]["holds"] == "lora+blocks+head"
    if selection.strength > 0:  # the kept adapter carries the neighbours' LoRA and blocks
        assert selection.adapter.components == AdapterConfig().components
        assert set(selection.tensors) == set(whole)
    else:
        assert selection.adapter.components == ("head",)
