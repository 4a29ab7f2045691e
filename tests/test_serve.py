"""AdapterBank: mixed-site batches against per-site peft models, merged single-site batches,
the LRU cache and its memory bound, unknown and foreign adapters, and predict_table."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.serve.loading import apply_adapter
from kgml_peft.data.windows import WindowDataset, make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model.inference import predict_windows
from kgml_peft.model.outputs import physical
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.predict import OUTPUT_COLUMNS, predict_table
from kgml_peft.store.adapter import load_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.store.library import adapter_path
from tests.conftest import make_frame, random_adapter

#: Adapters of different architectures, so a mixed batch mixes ranks, targets and parts.
CONFIGS = {
    "IA-001": (AdapterConfig(), ()),
    "IL-001": (AdapterConfig(lora_rank=2, lora_weights=("ih", "hh"), head="mlp", head_hidden=3,
                             bottleneck=3, block_targets=("gru_basis", "gru_nee")), ()),
    "IN-001": (AdapterConfig(components=("blocks",), block_targets=("gru_basis", "gru_ra")), ()),
    "IA-002": (AdapterConfig(components=("lora", "head"), lora_targets=("gru_basis",),
                             lora_weights=("ih",)), ()),
    "IL-002": (AdapterConfig(), ("nee_out.weight", "gru_nee.weight_hh_l0")),
}
SITES = {"IA-001": "IA", "IL-001": "IL", "IN-001": "IN", "IA-002": "IA", "IL-002": "IL",
         "IN-009": "IN"}  # IN-009 has no adapter


@pytest.fixture(scope="module")
def store(backbone_path, tmp_path_factory) -> Path:
    """A store with one random (non-identity) adapter per entry of CONFIGS."""
    backbone = load_backbone(backbone_path)
    folder = tmp_path_factory.mktemp("store")
    for seed, (site, (config, unfreeze)) in enumerate(CONFIGS.items()):
        save_adapter(adapter_path(folder, site), random_adapter(backbone, site, config, seed, unfreeze))
    return folder


@pytest.fixture(scope="module")
def frame():
    return make_frame(SITES, years=(2003, 2004, 2005))


def _reference(backbone, store: Path, names: list[str | None], x: torch.Tensor, state=None) -> dict:
    """Each row through its own peft SiteModel (or the bare backbone), one row at a time."""
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            model = backbone.model if name is None else apply_adapter(
                backbone, load_adapter(adapter_path(store, name)))
            row_state = None if state is None else {k: v[:, i:i + 1] for k, v in state.items()}
            rows.append(model(x[i:i + 1], row_state))
    out = {k: torch.cat([r[k] for r in rows]) for k in ("Ra", "Rh", "NEE", "Yield")}
    out["state"] = {k: torch.cat([r["state"][k] for r in rows], dim=1) for k in rows[0]["state"]}
    return out


def _mixed_names(n: int) -> list[str | None]:
    cycle = [*CONFIGS, None]
    return [cycle[(5 * i) % len(cycle)] for i in range(n)]


@pytest.mark.parametrize("strategy", ["auto", "batched", "grouped", "naive"])
def test_mixed_batch_equals_per_site_models(strategy, backbone_path, store, frame) -> None:
    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone_path, store)
    windows = make_windows(frame, backbone.config.features)
    x = WindowDataset(windows, backbone.scalers).x[:14]
    names = _mixed_names(len(x))
    assert len(set(names)) == len(CONFIGS) + 1
    out = bank.forward(x, bank.resolve(names), strategy=strategy)
    ref = _reference(backbone, store, names, x)
    for key in ("Ra", "Rh", "NEE", "Yield"):
        assert out[key].shape == ref[key].shape
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-5)
    for gru, h in ref["state"].items():
        torch.testing.assert_close(out["state"][gru], h, rtol=0, atol=1e-5)
    # physical units too (what users read): within 1e-5 gC m-2 d-1 / t ha-1
    phys, phys_ref = physical(out, backbone.scalers), physical(ref, backbone.scalers)
    for key in ("Ra", "Rh", "NEE", "Reco", "Yield"):
        assert float((phys[key] - phys_ref[key]).abs().max()) <= 1e-5
    # and every adapter really changes its rows (the comparison is not trivially bare == bare);
    # bare rows equal the backbone up to float rounding (another kernel runs them in a mixed batch)
    with torch.no_grad():
        bare = backbone.model(x)
    for i, name in enumerate(names):
        change = max(float((out[k][i] - bare[k][i]).abs().max()) for k in ("Ra", "Rh", "NEE", "Yield"))
        assert (change > 1e-3) if name is not None else (change <= 1e-5), (name, change)


def test_carried_state_matches_per_site_models(backbone_path, store, frame) -> None:
    """The hidden state of a previous year carries through mixed batches as through SiteModel."""
    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone, store)
    windows = make_windows(frame, backbone.config.features)
    x = WindowDataset(windows, backbone.scalers).x[:8]
    names = _mixed_names(8)
    rows = bank.resolve(names)
    first = bank.forward(x, rows)
    second = bank.forward(x, rows, state=first["state"])
    ref = _reference(backbone, store, names, x, state=_reference(backbone, store, names, x)["state"])
    torch.testing.assert_close(second["NEE"], ref["NEE"], rtol=0, atol=1e-5)
    assert not torch.allclose(second["NEE"], first["NEE"])


def test_single_site_batch_is_merged_and_equals_peft(backbone_path, store, frame) -> None:
    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone, store)
    x = WindowDataset(make_windows(frame, backbone.config.features), backbone.scalers).x[:6]
    for site in CONFIGS:
        out = bank.predict(x, site=site)
        with torch.no_grad():
            ref = physical(apply_adapter(backbone, load_adapter(adapter_path(store, site)))(x), backbone.scalers)
        for key in ("Ra", "Rh", "NEE", "Reco", "Yield"):
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-5)
    merged = bank.merged_parameters("IA-001")
    assert set(merged) == {f"{g}.weight_hh_l{l}" for g, l in
                           (("gru_ra", 0), ("gru_rh", 0), ("gru_rh", 1), ("gru_nee", 0))}
    assert set(bank.merged_parameters("IL-002")) >= {"nee_out.weight", "gru_nee.weight_hh_l0"}
    # the bank never changes the backbone's own weights
    fresh = load_backbone(backbone_path)
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(bank.model.state_dict()[name], value), name


def test_lru_evicts_least_recently_used_by_count(backbone_path, store) -> None:
    bank = AdapterBank(backbone_path, store, max_adapters=2)
    bank.get("IA-001")
    bank.get("IL-001")
    assert bank.resident() == ["IA-001", "IL-001"]
    bank.get("IA-001")  # now the most recent
    bank.get("IN-001")  # evicts IL-001, the least recently used
    assert bank.resident() == ["IA-001", "IN-001"]
    assert bank.stats == {"hits": 1, "loads": 3, "evictions": 1}
    bank.get("IL-001")
    assert bank.resident() == ["IN-001", "IL-001"] and bank.stats["evictions"] == 2


def test_lru_memory_bound_counts_tensor_bytes(backbone_path, store) -> None:
    bank = AdapterBank(backbone_path, store, max_bytes=None)
    sizes = {}
    for site in ("IA-001", "IA-002", "IN-001"):
        served = bank.get(site)
        sizes[site] = served.nbytes
        assert served.nbytes == load_adapter(adapter_path(store, site)).parameters * 4  # float32
    assert bank.memory_bytes() == sum(sizes.values())
    bounded = AdapterBank(backbone_path, store, max_bytes=sizes["IA-001"] + sizes["IA-002"])
    for site in ("IA-001", "IA-002", "IN-001"):
        bounded.get(site)
    assert bounded.memory_bytes() <= sizes["IA-001"] + sizes["IA-002"]
    assert "IA-001" not in bounded.resident() and bounded.resident()[-1] == "IN-001"
    # an evicted adapter comes back from disk unchanged
    again = bounded.get("IA-001")
    assert torch.equal(again.parts["lora"].factors["gru_ra.weight_hh_l0"].up,
                       bank.get("IA-001").parts["lora"].factors["gru_ra.weight_hh_l0"].up)


def test_added_adapters_are_pinned(backbone_path, store) -> None:
    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone, None, max_adapters=1)
    bank.add(random_adapter(backbone, "MEM-1", seed=7))
    bank.add(random_adapter(backbone, "MEM-2", seed=8))
    assert bank.resident() == ["MEM-1", "MEM-2"] and bank.has("MEM-1")
    with pytest.raises(KgmlPeftError, match="no adapter 'IA-001' in the bank"):
        bank.get("IA-001")
    # pinned adapters do not count against the cache's bounds
    with_store = AdapterBank(backbone, store, max_adapters=2)
    with_store.add(random_adapter(backbone, "MEM-1", seed=7))
    with_store.get("IA-001")
    with_store.get("IL-001")
    assert with_store.resident() == ["MEM-1", "IA-001", "IL-001"] and with_store.stats["evictions"] == 0
    with pytest.raises(KgmlPeftError, match="max_adapters must be a positive integer"):
        AdapterBank(backbone, store, max_adapters=0)


def test_unknown_names_use_the_backbone_only_when_allowed(backbone_path, store, frame) -> None:
    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone, store)
    x = WindowDataset(make_windows(frame, backbone.config.features), backbone.scalers).x[:3]
    with pytest.raises(KgmlPeftError, match="no adapter 'NOPE'"):
        bank.predict(x, site="NOPE")
    out = bank.predict(x, sites=["NOPE", "IA-001", None], require=False)
    with torch.no_grad():
        bare = physical(backbone.model(x), backbone.scalers)
    for row in (0, 2):
        torch.testing.assert_close(out["NEE"][row], bare["NEE"][row], rtol=0, atol=1e-5)
    assert float((out["NEE"][1] - bare["NEE"][1]).abs().max()) > 1e-3
    with pytest.raises(KgmlPeftError, match="unsafe"):
        bank.get("../IA-001")
    assert not bank.has("../IA-001") and not bank.has("Corn Belt")


def test_foreign_or_misnamed_adapters_are_refused(backbone_path, other_backbone_path, store, tmp_path) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    shutil.copyfile(adapter_path(store, "IA-001"), folder / "IA-001.safetensors")
    shutil.copyfile(adapter_path(store, "IL-001"), folder / "XX-001.safetensors")
    with pytest.raises(KgmlPeftError, match="was trained on backbone"):
        AdapterBank(other_backbone_path, folder).get("IA-001")
    with pytest.raises(KgmlPeftError, match="holds the adapter of 'IL-001'"):
        AdapterBank(backbone_path, folder).get("XX-001")
    (folder / "BAD.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KgmlPeftError):
        AdapterBank(backbone_path, folder).get("BAD")
    with pytest.raises(KgmlPeftError, match="not a folder"):
        AdapterBank(backbone_path, tmp_path / "missing")
    with pytest.raises(KgmlPeftError, match="unknown strategy"):
        AdapterBank(backbone_path, folder, strategy="fast")


def test_predict_table_columns_units_and_flags(backbone_path, store, frame) -> None:
    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone, store)
    result = predict_table(bank, frame, site_column="site")
    out = result.frame
    assert tuple(out.columns) == OUTPUT_COLUMNS
    windows = make_windows(frame, backbone.config.features)
    assert len(out) == 365 * len(windows) and result.site_years == len(windows)
    assert result.used == {s: 3 for s in CONFIGS} and result.missing == {"IN-009": 3}
    # units: the same numbers as the per-site models' physical predictions
    for site in ("IL-001", "IN-009"):
        index = np.flatnonzero(windows.sites == site)
        model = backbone.model if site == "IN-009" else apply_adapter(backbone, load_adapter(adapter_path(store, site)))
        ref = predict_windows(model, backbone.scalers, windows.subset(index))
        rows = out[out["site"] == site]
        for key in ("Ra", "Rh", "Reco", "NEE"):
            np.testing.assert_allclose(rows[key].to_numpy(), ref[key].reshape(-1), rtol=0, atol=1e-5)
        np.testing.assert_allclose(rows["Reco"], rows["Ra"] + rows["Rh"], rtol=0, atol=1e-5)
        yields = rows["Yield"].to_numpy()
        last_day = rows["date"].dt.strftime("%m-%d").to_numpy() == "12-31"
        assert np.isnan(yields[~last_day]).all() and last_day.sum() == 3
        np.testing.assert_allclose(yields[last_day], ref["Yield"], rtol=0, atol=1e-5)
        expected_adapter = None if site == "IN-009" else site
        assert (rows["adapter"].isna() if expected_adapter is None else rows["adapter"] == site).all()
    with pytest.raises(KgmlPeftError, match="1 of 6 adapters.*first: IN-009"):
        predict_table(bank, frame, site_column="site", require_adapter=True)
    regions = predict_table(bank, frame, site_column="region")
    assert regions.used == {} and regions.missing == {"IA": 6, "IL": 6, "IN": 6}
    one = predict_table(bank, frame, site="IL-001")
    assert (one.frame["adapter"] == "IL-001").all() and one.used == {"IL-001": 18}
    with pytest.raises(KgmlPeftError, match="not both"):
        predict_table(bank, frame, site="IL-001", site_column="site")


def test_threads_share_one_bank(backbone_path, store, frame) -> None:
    """Concurrent requests for different sites get the same answers as one after another."""
    from concurrent.futures import ThreadPoolExecutor

    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone, store, max_adapters=2)  # evictions and reloads while serving
    x = WindowDataset(make_windows(frame, backbone.config.features), backbone.scalers).x[:4]
    requests = [site for _ in range(3) for site in [*CONFIGS, None]]
    expected = {site: bank.predict(x, site=site)["NEE"] for site in set(requests)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda site: (site, bank.predict(x, site=site)["NEE"]), requests))
    for site, nee in results:
        assert torch.equal(nee, expected[site]), site


def test_fused_grus_with_lora_on_only_one(backbone_path, frame) -> None:
    """gru_ra and gru_rh share one day loop; a batch where only one of them has hidden-to-hidden
    LoRA (the other input-to-hidden only, or none) still equals the per-row models."""
    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone)
    adapters = {
        "RH-HH": random_adapter(backbone, "RH-HH", AdapterConfig(components=("lora",), lora_targets=("gru_rh",)), 11),
        "RA-IH": random_adapter(backbone, "RA-IH", AdapterConfig(components=("lora",), lora_targets=("gru_ra",),
                                                                 lora_weights=("ih",), lora_rank=3), 12),
    }
    for adapter in adapters.values():
        bank.add(adapter)
    x = WindowDataset(make_windows(frame, backbone.config.features), backbone.scalers).x[:6]
    for names in (["RH-HH", None, "RH-HH", None, "RH-HH", None], ["RA-IH", "RH-HH", None, "RA-IH", "RH-HH", None]):
        out = bank.forward(x, bank.resolve(names), strategy="batched")
        with torch.no_grad():
            for i, name in enumerate(names):
                model = backbone.model if name is None else apply_adapter(backbone, adapters[name])
                ref = model(x[i:i + 1])
                for key in ("Ra", "Rh", "NEE", "Yield"):
                    torch.testing.assert_close(out[key][i:i + 1], ref[key], rtol=0, atol=1e-5)


def test_predict_table_edge_cases(backbone_path, store) -> None:
    """Region labels that cannot be adapter names are served by the backbone (or refused with
    require_adapter); an empty table gives an empty prediction with the right columns."""
    backbone = load_backbone(backbone_path)
    bank = AdapterBank(backbone, store)
    frame = make_frame({"IA-001": "Corn Belt", "IL-001": "IL"})
    result = predict_table(bank, frame, site_column="region")
    assert result.missing == {"Corn Belt": 2, "IL": 2} and result.frame["adapter"].isna().all()
    with pytest.raises(KgmlPeftError, match="first: Corn Belt"):
        predict_table(bank, frame, site_column="region", require_adapter=True)
    empty = predict_table(bank, frame.iloc[:0], site_column="site")
    assert tuple(empty.frame.columns) == OUTPUT_COLUMNS and len(empty.frame) == 0 and empty.site_years == 0


def test_batched_plan_refuses_weight_replacing_adapters(backbone_path, store) -> None:
    from kgml_peft.tuners.rows import plan_rows

    bank = AdapterBank(backbone_path, store)
    with pytest.raises(KgmlPeftError, match="IL-002 replaces backbone weights"):
        plan_rows([bank.get("IA-001"), bank.get("IL-002")], torch.zeros(1))
