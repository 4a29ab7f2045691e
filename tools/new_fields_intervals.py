"""The demo's new fields calibrated the default way (cross-validated) with 90 % intervals on their
last year: a table for docs/results.md.

    python tools/new_fields_intervals.py --out /tmp/new-fields-cv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kgml_peft.data.synthetic import SynthConfig, simulate
from kgml_peft.experiments.new_fields import cross_validated_new_fields, new_field_sites
from kgml_peft.store.checkpoint import load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="checkpoints/demo.safetensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sites = new_field_sites(load_backbone(args.backbone))
    observed = simulate(SynthConfig(seed=args.seed, observed=True))
    truth = simulate(SynthConfig(seed=args.seed))
    table = cross_validated_new_fields(args.backbone, observed, truth, sites, args.out, force=True,
                                       progress=False, cpu=True)
    print(table.round(3).to_string(index=False))
    print(json.dumps({"daily_coverage_mean": float(table["daily_coverage"].mean()),
                      "annual_inside": int(table["annual_inside"].sum()), "fields": len(table),
                      "NEE_change_mean_%": float(table["NEE_change_%"].mean())}))


if __name__ == "__main__":
    main()
