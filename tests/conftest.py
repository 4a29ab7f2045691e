"""Shared fixtures: a small valid site-day table and a real (untrained) backbone on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kgml_peft.data.windows import Scalers, make_windows
from kgml_peft.data.tables import validate_table
from kgml_peft.model.backbone import BackboneConfig, build_backbone
from kgml_peft.store.checkpoint import save_backbone


@pytest.fixture
def isolated_globals():
    """CLI cases that get as far as training (a bad value found after set-up) touch process-wide
    state: torch's deterministic mode and Accelerate's singleton state. Put both back."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:  # pragma: no cover
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# The backbone's GRUs are latency bound: one thread is as fast as two and immune to a busy CPU.
torch.set_num_threads(1)


def pytest_sessionstart(session):
    """Build (or load) the C++ day loop before any test runs, so that no test's output carries the
    one-time compile message and the subprocesses that tests start find the build in the cache
    (two workers starting at once: torch's build lock makes one wait for the other)."""
    from kgml_peft.model import native

    native.status()


def make_frame(sites: dict[str, str] | None = None, years: tuple[int, ...] = (2003, 2004),
               seed: int = 0) -> pd.DataFrame:
    """A small in-range table with a seasonal cycle and exact mass balance (not the simulator)."""
    sites = sites or {"IA-001": "IA", "IL-001": "IL"}
    rng = np.random.default_rng(seed)
    frames = []
    for site, region in sites.items():
        dates = pd.date_range(f"{years[0]}-01-01", f"{years[-1]}-12-31", freq="D")
        season = np.sin(2 * np.pi * (dates.day_of_year.to_numpy() - 100) / 365).clip(0)
        n = len(dates)
        frame = pd.DataFrame({"site": site, "region": region, "date": dates})
        frame["RADN"] = 5 + 18 * season + rng.uniform(0, 2, n)
        frame["TMAX_AIR"] = -2 + 28 * season + rng.normal(0, 2, n)
        frame["TDIF_AIR"] = 10 + rng.uniform(0, 3, n)
        frame["HMAX_AIR"] = 90 + rng.uniform(0, 5, n)
        frame["HDIF_AIR"] = 30 + rng.uniform(0, 10, n)
        frame["WIND"] = 4 + rng.uniform(0, 2, n)
        frame["PRECN"] = rng.exponential(2.5, n)
        frame["Crop_Type"] = (dates.year % 2).astype(float)
        frame["GPP"] = 15 * season ** 2 + rng.uniform(0, 0.5, n)
        frame["Year"] = dates.year.astype(float)
        for name, value in {"TBKDS": 1.3, "TSAND": 20.0, "TSILT": 60.0, "TFC": 0.33, "TWP": 0.15,
                            "TKSat": 15.0, "TSOC": 25.0, "TPH": 6.5, "TCEC": 20.0}.items():
            frame[name] = value + rng.uniform(0, 0.01)
        frame["Ra"] = 0.45 * frame["GPP"] + 0.2
        frame["Rh"] = 0.5 + 2.5 * season
        frame["NEE"] = frame["Ra"] + frame["Rh"] - frame["GPP"]
        frame["Reco"] = frame["Ra"] + frame["Rh"]
        frame["Yield"] = 10.0 + 0.1 * (dates.year - years[0]) + rng.uniform(0, 0.1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture
def frame() -> pd.DataFrame:
    """A valid two-site, two-year table."""
    return make_frame()


def _tiny_backbone(tmp_path_factory, name: str, seed: int) -> Path:
    """An untrained hidden-size-8 backbone with scalers fitted on ``make_frame``, saved to disk."""
    config = BackboneConfig(hidden_size=8, attention_size=4, yield_hidden=8)
    table = validate_table(make_frame(), config.features)
    scalers = Scalers.fit(make_windows(table, config.features))
    path = tmp_path_factory.mktemp("backbone") / f"{name}.safetensors"
    save_backbone(path, build_backbone(config, seed=seed), scalers, {"note": "untrained test backbone"})
    return path


@pytest.fixture(scope="session")
def backbone_path(tmp_path_factory) -> Path:
    """A real, untrained backbone checkpoint (fixed seed) with scalers fitted on ``make_frame``."""
    return _tiny_backbone(tmp_path_factory, "tiny", seed=0)


def tiny_calibration(**kwargs):
    """A calibration config small enough for unit tests (a few epochs on the tiny backbone)."""
    from kgml_peft.calibration.config import CalibrationConfig

    kwargs.setdefault("epochs", 3)
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("cv", "none")  # tests that cross-validate ask for it
    return CalibrationConfig(**kwargs)


@pytest.fixture(scope="session")
def adapter_path(backbone_path, tmp_path_factory) -> Path:
    """A real adapter for IA-001, trained for a few epochs on ``backbone_path``."""
    from kgml_peft.calibration.calibrate import calibrate
    from kgml_peft.store.adapter import save_adapter
    from kgml_peft.store.checkpoint import load_backbone

    result = calibrate(load_backbone(backbone_path), make_frame(), "IA-001", tiny_calibration(),
                       progress=False)
    path = tmp_path_factory.mktemp("adapters") / "IA-001.safetensors"
    save_adapter(path, result.adapter)
    return path


@pytest.fixture(scope="session")
def other_backbone_path(tmp_path_factory) -> Path:
    """A second tiny backbone (another seed, so another fingerprint) with the same architecture."""
    return _tiny_backbone(tmp_path_factory, "other", seed=1)


def random_adapter(backbone, site: str, config=None, seed: int = 0, unfreeze: tuple[str, ...] = ()):
    """An adapter for ``backbone`` whose every tensor is random and non-zero (so each component
    changes the predictions), with well-formed metadata; ``unfreeze`` adds ``backbone.<name>``
    weights (the global value plus noise)."""
    from kgml_peft.tuners.config import AdapterConfig
    from kgml_peft.tuners.site_model import SiteModel
    from kgml_peft.store.adapter import Adapter

    config = config or AdapterConfig()
    generator = torch.Generator().manual_seed(seed)
    shapes = SiteModel(backbone.model, config).adapter_tensors()
    tensors = {k: 0.2 * torch.randn(v.shape, generator=generator) for k, v in shapes.items()}
    base = dict(backbone.model.named_parameters())
    for name in unfreeze:
        tensors[f"backbone.{name}"] = base[name].detach() + 0.1 * torch.randn(base[name].shape,
                                                                               generator=generator)
    info = {"sites": [site], "regions": [site[:2]], "features": list(backbone.config.features),
            "targets": {}, "calibration": {}, "data": {}, "metrics": {}}
    return Adapter(site=site, config=config, tensors=tensors,
                   backbone_fingerprint=backbone.fingerprint, info=info)


def pytest_collection_modifyitems(config, items) -> None:
    """Put the modules with slow end-to-end tests first, the longest one (test_pretrain.py, which
    regenerates the shipped backbone) at the front: under ``-n 2 --dist loadfile`` (CI) the two
    workers then finish at about the same time instead of one running the longest file last."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path.name != "test_pretrain.py", item.path not in slow))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per worker: two workers on two cores must not oversubscribe them
    torch.set_num_threads(1)
