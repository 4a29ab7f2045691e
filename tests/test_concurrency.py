"""Two processes calibrating into one adapter store at the same time.

Same site: both write ``IA-001.safetensors`` (and share its training-state file while they train);
the store must end with one complete adapter, exactly what one of the two runs produced. Different
sites: both adapters complete. Either way nothing partial is left behind.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from kgml_peft.calibration.calibrate import calibrate
from kgml_peft.store.adapter import load_adapter
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.train.state import RESUME_DIR
from tests.conftest import make_frame, tiny_calibration
from tests.test_resume import _cli, _env

EPOCHS = 6


def _start(backbone_path: Path, table: Path, store: Path, site: str, seed: int) -> subprocess.Popen:
    return subprocess.Popen(
        _cli("calibrate", "--site", site, "--data", str(table), "--backbone", str(backbone_path),
             "--out", str(store), "--epochs", str(EPOCHS), "--patience", "0", "--batch-size", "2",
             "--seed", str(seed), "--force", "--quiet", "--cv", "none"),  # compared with tiny_calibration
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(*processes: subprocess.Popen) -> None:
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err


def _expected(backbone, site: str, seed: int) -> dict[str, torch.Tensor]:
    result = calibrate(backbone, make_frame(), site, tiny_calibration(epochs=EPOCHS, patience=0, seed=seed),
                       progress=False)
    return result.adapter.tensors


def _only_complete_adapters(store: Path, names: list[str], backbone) -> dict:
    assert sorted(p.name for p in store.iterdir()) == names  # no temporaries, no state folder left
    return {name: load_adapter(store / name, backbone) for name in names}  # each verifies in full


@pytest.mark.slow
@pytest.mark.parametrize("sites", [("IA-001", "IA-001"), ("IA-001", "IL-001")], ids=["same-site", "two-sites"])
def test_two_processes_calibrating_into_one_store(backbone_path, tmp_path, sites):
    table = tmp_path / "sites.csv"
    make_frame().to_csv(table, index=False, date_format="%Y-%m-%d")
    store = tmp_path / "store"
    store.mkdir()
    backbone = load_backbone(backbone_path)
    seeds = (1, 2)
    a = _start(backbone_path, table, store, sites[0], seeds[0])
    b = _start(backbone_path, table, store, sites[1], seeds[1])
    _finish(a, b)
    assert not (store / RESUME_DIR).exists()
    names = sorted({f"{site}.safetensors" for site in sites})
    adapters = _only_complete_adapters(store, names, backbone)
    if sites[0] == sites[1]:
        # the last writer wins: the file is one run's whole output, never a mix of the two
        adapter = adapters[names[0]]
        seed = adapter.info["calibration"]["seed"]
        assert seed in seeds
        expected = _expected(backbone, sites[0], seed)
        assert all(torch.equal(adapter.tensors[k], expected[k]) for k in expected)
    else:
        for site, seed in zip(sites, seeds):
            expected = _expected(backbone, site, seed)
            adapter = adapters[f"{site}.safetensors"]
            assert all(torch.equal(adapter.tensors[k], expected[k]) for k in expected)
