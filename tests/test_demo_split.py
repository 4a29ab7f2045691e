"""What ``kgml-peft demo`` reports as a test is disjoint from everything the shipped backbone's
pretraining (training and early stopping) and the demo's calibrations used.

The pretraining tables are rebuilt from the simulator and checked against the hashes the
checkpoint recorded, so the comparison is with what the backbone really saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kgml_peft import schema
from kgml_peft.data.synthetic import SynthConfig, simulate
from kgml_peft.data.tables import validate_table
from kgml_peft.experiments.new_fields import split_last_year
from kgml_peft.store.checkpoint import load_backbone
from kgml_peft.train.pretrain import exclude_sites, frame_hash, with_reco

DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "demo.safetensors"
WEATHER = ["RADN", "TMAX_AIR", "TDIF_AIR", "PRECN"]


def _pretraining_tables():
    backbone = load_backbone(DEMO)
    features, training = backbone.config.features, backbone.training
    synthetic = validate_table(simulate(SynthConfig(seed=0)), features)
    observed = validate_table(simulate(SynthConfig(seed=0, observed=True)), features)
    synthetic, observed = exclude_sites(synthetic, observed, training["config"]["exclude_sites"])
    # the very tables the checkpoint was trained and early-stopped on (every year of them)
    assert frame_hash(with_reco(synthetic)) == training["data"]["synthetic"]["hash"]
    assert frame_hash(observed) == training["data"]["observed"]["hash"]
    return backbone, synthetic, observed


def test_demo_test_data_shares_no_row_with_pretraining_or_calibration() -> None:
    backbone, synthetic, observed = _pretraining_tables()
    seen = pd.concat([synthetic, observed])[[schema.SITE, schema.DATE, *WEATHER]]
    # 1. the per-state test: the fields of seed 1. Same site ids and dates exist in seed 0, but no
    #    site-day has the same weather, and their fields differ (soil, management)
    other = validate_table(simulate(SynthConfig(seed=1, observed=True)), backbone.config.features)
    assert other.merge(seen, on=[schema.SITE, schema.DATE, *WEATHER]).empty
    overlap = other.merge(seen, on=[schema.SITE, schema.DATE], suffixes=("", "_seen"))
    assert len(overlap) > 1000  # the comparison is not vacuous: the same ids and dates do recur
    assert (overlap["RADN"] != overlap["RADN_seen"]).mean() > 0.99
    soil = other.groupby(schema.SITE)["TSAND"].first()
    seen_soil = observed.groupby(schema.SITE)["TSAND"].first()
    common = soil.index.intersection(seen_soil.index)
    assert len(common) and (soil[common] != seen_soil[common]).all()
    # 2. the new fields' test: each field's last year, which pretraining never saw (the fields
    #    are excluded) and its calibration (the years before the last) did not use
    fresh = tuple(backbone.training["config"]["exclude_sites"])
    demo_observed = validate_table(simulate(SynthConfig(seed=0, observed=True)), backbone.config.features)
    calibration, test = split_last_year(demo_observed, fresh)
    assert not set(test[schema.SITE]) & set(seen[schema.SITE])
    used = set(zip(calibration[schema.SITE], calibration[schema.DATE].dt.year))
    tested = set(zip(test[schema.SITE], test[schema.DATE].dt.year))
    assert tested and not tested & used
    # the per-state calibration's validation years are seed 0's own: the demo labels them
    # selection scores, not a test (test_cli checks the wording)
    assert set(zip(observed[schema.SITE], observed[schema.DATE].dt.year)) <= \
        set(zip(demo_observed[schema.SITE], demo_observed[schema.DATE].dt.year))
    assert np.isfinite(other["NEE"]).any()
