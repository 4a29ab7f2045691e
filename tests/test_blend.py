"""Blends of neighbours' adapters for places without data: function-space blends against the
weighted mean of each neighbour's own site model, the weight-space merge, the file, and
``adapters blend`` through the real CLI (bad input included)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kgml_peft.cli import cli
from kgml_peft.data import places
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.inference import predict_windows
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.loading import apply_adapter
from kgml_peft.store import blend as blending
from kgml_peft.store.adapter import MEMBER_WEIGHTS, read_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.tuners.config import AdapterConfig
from tests.conftest import make_frame, random_adapter
from tests.test_cli_validation import _runner

# three calibrated fields around a point, of three shapes (cross-validation picks such mixes)
FIELDS = {"IA-001": ((42.00, -93.50), ("head",)),
          "IA-002": ((42.05, -93.50), ("blocks", "head")),
          "IA-003": ((42.00, -93.20), ("lora", "blocks", "head"))}
POINT = (42.02, -93.45)


def _located(backbone, site, seed=0):
    (lat, lon), components = FIELDS[site]
    adapter = random_adapter(backbone, site, replace(AdapterConfig(), components=components), seed=seed)
    adapter.info["data"] = {"location": {"lat": lat, "lon": lon, "sites": 1, "extent_km": 0.0}}
    return adapter


@pytest.fixture
def store(backbone_path, tmp_path):
    backbone = load_backbone(backbone_path)
    folder = tmp_path / "adapters"
    folder.mkdir()
    for i, site in enumerate(FIELDS):
        save_adapter(folder / f"{site}.safetensors", _located(backbone, site, seed=i + 1))
    return folder


def _windows(backbone):
    table = validate_table(make_frame({"IA-009": "IA"}, years=(2003, 2004)), backbone.config.features)
    return make_windows(table, backbone.config.features)


def test_weights_fall_with_squared_distance():
    w = blending.distance_weights([2.0, 4.0, 0.1])
    # 1/4, 1/16 and the 1 km floor's 1/1, normalised (hand-computed)
    np.testing.assert_allclose(w, np.array([0.25, 0.0625, 1.0]) / 1.3125, rtol=1e-12)
    assert sum(w) == pytest.approx(1.0, abs=1e-15)


def test_function_space_blend_is_the_weighted_mean_of_the_neighbours_own_models(store, backbone_path, tmp_path):
    backbone = load_backbone(backbone_path)
    neighbours = blending.find_neighbours(store, backbone, *POINT, k=3)
    assert [n.adapter.site for n in neighbours] == ["IA-001", "IA-002", "IA-003"]
    km = [places.distance_km(*POINT, *FIELDS[n.adapter.site][0]) for n in neighbours]
    np.testing.assert_allclose([n.distance_km for n in neighbours], km, atol=1e-3)
    blend = blending.blend_adapters(neighbours, "IA-009", backbone, lat=POINT[0], lon=POINT[1])
    assert blend.member_count == 3 and blend.config.components == ("lora", "blocks", "head")
    path = save_adapter(tmp_path / "IA-009.safetensors", blend)
    back = read_adapter(path)
    np.testing.assert_allclose(back.member_weights, blending.distance_weights(km), rtol=1e-3)
    assert [s["site"] for s in back.blend["sources"]] == ["IA-001", "IA-002", "IA-003"]

    windows = _windows(backbone)
    # the reference: each neighbour's own (peft-wrapped) site model, unpadded, weighted by hand
    own = [predict_windows(apply_adapter(backbone, n.adapter), backbone.scalers, windows) for n in neighbours]
    bank = AdapterBank(backbone)
    bank.add(back)
    for predict in (lambda: bank.predict_windows(windows, ["IA-009"] * len(windows)),
                    lambda: bank.predict_members(windows, ["IA-009"] * len(windows))):
        got = predict()
        for name in ("Ra", "Rh", "NEE", "Reco", "Yield"):
            want = sum(w * o[name] for w, o in zip(back.member_weights, own))
            np.testing.assert_allclose(got[name], want, atol=1e-5)
        # and not just one neighbour's
        assert np.abs(got["NEE"] - own[0]["NEE"]).max() > 1e-3
    # a blend row in a mixed batch next to a plain adapter and the bare backbone
    bank.add(read_adapter(store / "IA-003.safetensors"))
    mixed = bank.predict_windows(windows.subset([0, 0, 1]), ["IA-003", "IA-009", None])
    np.testing.assert_allclose(mixed["NEE"][0], own[2]["NEE"][0], atol=1e-5)
    np.testing.assert_allclose(mixed["NEE"][1], sum(w * o["NEE"][0] for w, o in zip(back.member_weights, own)),
                               atol=1e-5)
    np.testing.assert_allclose(mixed["NEE"][2], predict_windows(backbone.model, backbone.scalers,
                                                                windows.subset([1]))["NEE"][0], atol=1e-5)
    with pytest.raises(KgmlPeftError, match="is a blend of 3 adapters"):
        apply_adapter(backbone, back)
    with pytest.raises(KgmlPeftError, match="is a blend of 3 members"):
        bank.run_merged(torch.zeros(1, 365, len(backbone.config.features)), bank.get("IA-009"))


def test_zero_padding_is_an_exact_identity(store, backbone_path):
    backbone = load_backbone(backbone_path)
    head = read_adapter(store / "IA-001.safetensors")
    full = replace(head, config=AdapterConfig(),
                   tensors=blending.padded_tensors(head, AdapterConfig(), backbone))
    assert set(full.tensors) > set(head.tensors)
    windows = _windows(backbone)
    a = predict_windows(apply_adapter(backbone, head), backbone.scalers, windows)
    b = predict_windows(apply_adapter(backbone, full), backbone.scalers, windows)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6)


def test_weight_space_merge_refactorises_the_weighted_lora_update(backbone_path):
    backbone = load_backbone(backbone_path)
    config = AdapterConfig(lora_rank=2)
    members = [random_adapter(backbone, f"IA-00{i}", config, seed=i).tensors for i in (1, 2)]
    weights = (0.7, 0.3)
    merged = blending.merge_in_weight_space(members, weights, config)
    stem = next(k[:-2] for k in merged if k.startswith("lora.") and k.endswith(".A"))
    delta = sum(w * m[f"{stem}.B"].double() @ m[f"{stem}.A"].double() for m, w in zip(members, weights))
    u, s, vh = torch.linalg.svd(delta)
    best = (u[:, :2] * s[:2]) @ vh[:2]  # the best rank-2 approximation (Eckart-Young)
    torch.testing.assert_close((merged[f"{stem}.B"] @ merged[f"{stem}.A"]).double(), best, atol=1e-5, rtol=1e-5)
    head = "head.shift"
    torch.testing.assert_close(merged[head], 0.7 * members[0][head] + 0.3 * members[1][head])
    # one source: the merge gives its own update back
    same = blending.merge_in_weight_space([members[0]], (1.0,), config)
    torch.testing.assert_close(same[f"{stem}.B"] @ same[f"{stem}.A"],
                               members[0][f"{stem}.B"] @ members[0][f"{stem}.A"], atol=1e-5, rtol=1e-5)


def test_changed_or_bad_member_weights_are_refused(store, backbone_path, tmp_path):
    backbone = load_backbone(backbone_path)
    blend = blending.neighbour_blend(store, backbone, *POINT, "IA-009", k=2)
    path = save_adapter(tmp_path / "IA-009.safetensors", blend)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors[MEMBER_WEIGHTS] = tensors[MEMBER_WEIGHTS].flip(0)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(KgmlPeftError, match="content hash mismatch"):
        read_adapter(path)
    for weights in ((0.5, 0.6), (1.2, -0.2), (1.0,)):
        with pytest.raises(KgmlPeftError, match="member weights"):
            save_adapter(tmp_path / "bad.safetensors", replace(blend, member_weights=weights))
    assert not (tmp_path / "bad.safetensors").exists()


def test_neighbours_of_other_settings_or_backbones_are_named(store, backbone_path, other_backbone_path):
    backbone = load_backbone(backbone_path)
    other = replace(_located(backbone, "IA-002", seed=9), site="IA-004",
                    config=replace(AdapterConfig(), components=("blocks", "head"), bottleneck=4))
    other = replace(other, tensors=blending.padded_tensors(
        replace(other, tensors={k: v for k, v in other.tensors.items() if k.startswith("head.")}),
        other.config, backbone))
    first = blending.find_neighbours(store, backbone, *POINT, k=1)[0]
    with pytest.raises(KgmlPeftError, match="IA-001 and IA-004 differ in bottleneck"):
        blending.blend_adapters([first, blending.Neighbour(other, 1.0, 0.5)], "IA-009", backbone,
                                lat=POINT[0], lon=POINT[1])
    with pytest.raises(KgmlPeftError, match=r"neighbour\(s\) IA-001, IA-002 were calibrated on another backbone"):
        blending.find_neighbours(store, load_backbone(other_backbone_path), *POINT, k=2)


# ---- the CLI ---------------------------------------------------------------------------------------

def _blend(*args):
    return _runner().invoke(cli, ["adapters", "blend", *args])


def test_cli_blend_writes_a_blend_and_list_and_show_describe_it(store, backbone_path, tmp_path):
    out = tmp_path / "new" / "blends"  # missing folders are created
    result = _blend("--lat", str(POINT[0]), "--lon", str(POINT[1]), "--name", "IA-009", "--k", "2",
                    "--store", str(store), "--out", str(out), "--backbone", str(backbone_path))
    assert result.exit_code == 0, result.output
    assert "blend of IA-001 (" in result.output and "IA-002 (" in result.output
    blend = read_adapter(out / "IA-009.safetensors")
    assert blend.member_count == 2 and blend.blend["k"] == 2 and blend.blend["merge"] == "function"
    verified = _runner().invoke(cli, ["adapters", "verify", str(out / "IA-009.safetensors"),
                                      "--backbone", str(backbone_path)])
    assert verified.exit_code == 0 and verified.output.startswith("ok: "), verified.output
    shown = _runner().invoke(cli, ["adapters", "show", str(out / "IA-009.safetensors")])
    assert shown.exit_code == 0 and "blend (function) for 42.02000, -93.45000 of IA-001" in shown.output
    assert "trained with" not in shown.output  # a blend was not trained
    rows = json.loads(_runner().invoke(cli, ["adapters", "list", "--store", str(out), "--json"]).stdout)
    assert rows[0]["blend"] == "IA-001+IA-002" and (rows[0]["lat"], rows[0]["lon"]) == POINT
    # a weight-space merge: one ordinary adapter of the union shape
    result = _blend("--lat", str(POINT[0]), "--lon", str(POINT[1]), "--name", "IA-010", "--merge", "weights",
                    "--store", str(store), "--out", str(out), "--backbone", str(backbone_path))
    assert result.exit_code == 0, result.output
    merged = read_adapter(out / "IA-010.safetensors")
    assert merged.member_count == 1 and merged.member_weights is None and merged.blend["merge"] == "weights"
    # blends are never neighbours: blending the blend folder finds nothing
    again = _blend("--lat", "42", "--lon", "-93", "--name", "IA-011", "--store", str(out),
                   "--backbone", str(backbone_path))
    assert again.exit_code == 2 and "no adapter with a recorded location" in again.output


@pytest.mark.parametrize("args, message", [
    (["--max-km", "1"], r"no adapter within 1 km of \(42.02, -93.45\); the nearest is IA-001 at 4\.7 km"),
    (["--k", "0"], "integer >= 1"),
    (["--lat", "95"], "lat must be between -90 and 90"),
    (["--lon", "nan"], "lon must be between -180 and 180"),
    (["--name", "../IA"], "unsafe"),
    (["--name", "IA-001", "--force"], "is the input"),  # would overwrite a neighbour
    (["--name", "IA-002", "--k", "1"], "exists; pass --force"),
    (["--store", "missing-folder"], "does not exist"),
])
def test_cli_blend_bad_input_is_one_line_exit_2_nothing_written(store, backbone_path, args, message):
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    base = {"--lat": str(POINT[0]), "--lon": str(POINT[1]), "--name": "IA-009", "--store": str(store),
            "--backbone": str(backbone_path)}
    for flag, value in zip(args[::2], args[1::2]):
        if flag.startswith("--") and value is not None and not value.startswith("--"):
            base[flag] = value
    flat = [x for kv in base.items() for x in kv] + [a for a in args if a == "--force"]
    result = _blend(*flat)
    assert result.exit_code == 2, result.output
    import re

    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before


def test_cli_blend_never_replaces_its_backbone(store, backbone_path, tmp_path):
    """``--out`` holds the backbone under the blend's name: even with --force it stays intact."""
    folder = tmp_path / "share"
    folder.mkdir()
    backbone = folder / "IA-009.safetensors"
    shutil.copyfile(backbone_path, backbone)
    before = backbone.read_bytes()
    result = _blend("--lat", str(POINT[0]), "--lon", str(POINT[1]), "--name", "IA-009", "--store", str(store),
                    "--backbone", str(backbone), "--out", str(folder), "--force")
    assert result.exit_code == 2 and "is the input" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and backbone.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["IA-009.safetensors"]


# ---- predict --neighbours ----------------------------------------------------------------------------

def _field_table(path, points):
    frame = make_frame({site: "IA" for site in points}, years=(2003, 2004))
    frame["lat"] = frame["site"].map(lambda s: points[s][0])
    frame["lon"] = frame["site"].map(lambda s: points[s][1])
    frame.to_csv(path, index=False, date_format="%Y-%m-%d")
    return frame


def _predict(*args):
    return _runner().invoke(cli, ["predict", *args])


def test_cli_predict_neighbours_blends_sites_without_an_adapter(store, backbone_path, tmp_path):
    points = {**{s: p for s, (p, _) in FIELDS.items()}, "IA-009": POINT, "IA-050": (45.0, -100.0)}
    frame = _field_table(tmp_path / "fields.csv", points)
    out = tmp_path / "daily.csv"
    result = _predict("--data", str(tmp_path / "fields.csv"), "--backbone", str(backbone_path), "--adapters",
                      str(store), "--site-column", "site", "--neighbours", "3", "--max-km", "100",
                      "--out", str(out), "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    label = "blend:IA-001+IA-002+IA-003"
    assert summary["blended"]["IA-009"]["adapter"] == label
    assert summary["missing_adapters"] == {"IA-050": 2}  # 600 km away: the backbone
    daily = __import__("pandas").read_csv(out)
    assert set(daily.loc[daily["site"] == "IA-009", "adapter"]) == {label}
    assert daily.loc[daily["site"] == "IA-050", "adapter"].isna().all()
    assert set(daily.loc[daily["site"] == "IA-002", "adapter"]) == {"IA-002"}
    # the blend's NEE is the distance-weighted mean of the neighbours' own site models
    backbone = load_backbone(backbone_path)
    windows = make_windows(validate_table(frame[frame["site"] == "IA-009"], backbone.config.features),
                           backbone.config.features)
    neighbours = blending.find_neighbours(store, backbone, *POINT, k=3)
    want = sum(n.weight * predict_windows(apply_adapter(backbone, n.adapter), backbone.scalers, windows)["NEE"]
               for n in neighbours)
    got = daily.loc[daily["site"] == "IA-009", "NEE"].to_numpy().reshape(want.shape)
    np.testing.assert_allclose(got, want, atol=1e-4)  # the CSV keeps 6 significant digits
    # strict: a site with nothing in range is refused
    strict = _predict("--data", str(tmp_path / "fields.csv"), "--backbone", str(backbone_path), "--adapters",
                      str(store), "--site-column", "site", "--neighbours", "3", "--max-km", "100",
                      "--require-adapter", "--out", str(tmp_path / "strict.csv"))
    assert strict.exit_code == 2 and "IA-050" in strict.output and "within --max-km" in strict.output
    assert not (tmp_path / "strict.csv").exists()


@pytest.mark.parametrize("extra, message, coordinates", [
    (["--neighbours", "3"], "needs the table's lat and lon columns", False),
    (["--neighbours", "0"], "integer >= 1", True),
    (["--neighbours", "3", "--site-column", "region"], "needs --site-column site", True),
    (["--max-km", "10", "--site-column", "site"], "--max-km applies to --neighbours", True),
    (["--neighbours", "2", "--interval", "0.9"], "blends carry no interval widths", True),
])
def test_cli_predict_neighbours_bad_input(store, backbone_path, tmp_path, extra, message, coordinates):
    table = tmp_path / "fields.csv"
    if coordinates:
        _field_table(table, {"IA-009": POINT})
    else:
        make_frame({"IA-009": "IA"}).to_csv(table, index=False, date_format="%Y-%m-%d")
    args = ["--data", str(table), "--backbone", str(backbone_path), "--adapters", str(store),
            "--out", str(tmp_path / "daily.csv"), *extra]
    if "--site-column" not in extra:
        args += ["--site-column", "site"]
    result = _predict(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "daily.csv").exists()
