"""Serving ratios of two source trees of kgml-peft, measured side by side in one run.

    python tools/compare_serving.py OLD_TREE NEW_TREE [--rounds 3]

Each round runs the same timing in a fresh interpreter per tree (PYTHONPATH=<tree>), old and new
alternately, so that drifts of the machine hit both alike: the bench's mixed batch (8 demo sites x
8 synthetic years, the shipped backbone) served by the bare backbone, the merged adapter, the bank
with one adapter on every row and the bank on the mixed batch (8 adapters; random default-config
adapter tensors, which time exactly as trained ones). Prints JSON: per tree, the median over
rounds of merged/bare and mixed/single (throughput ratios, as ``kgml-peft bench`` reports them),
and new/old of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TIMING = r'''
import json, statistics, tempfile, time, torch
from pathlib import Path
torch.set_num_threads(1)
from kgml_peft import schema
from kgml_peft.data.synthetic import SynthConfig, simulate
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import WindowDataset, make_windows
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.store.adapter import Adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
try:
    from kgml_peft.tuners.config import AdapterConfig
    from kgml_peft.tuners.site_model import SiteModel
except ImportError:  # the layout before kgml_peft/tuners
    from kgml_peft.calibration.config import AdapterConfig
    from kgml_peft.calibration.site_model import SiteModel

backbone = load_backbone("checkpoints/demo.safetensors")
table = validate_table(simulate(SynthConfig(seed=0)), backbone.config.features, targets=[])
sites = list(dict.fromkeys(table["site"]))[:8]
windows = make_windows(table[table["site"].isin(sites)], backbone.config.features)
import numpy as np
index = np.concatenate([np.flatnonzero(windows.sites == s)[:8] for s in sites])
windows = windows.subset(index)
x = WindowDataset(windows, backbone.scalers).x
names = [str(s) for s in windows.sites]
store = Path(tempfile.mkdtemp())
shapes = SiteModel(backbone.model, AdapterConfig()).adapter_tensors()
for i, site in enumerate(sites):
    g = torch.Generator().manual_seed(i)
    tensors = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in shapes.items()}
    info = {"sites": [site], "regions": [site[:2]], "features": list(backbone.config.features),
            "targets": {}, "calibration": {}, "data": {}, "metrics": {}}
    save_adapter(store / f"{site}.safetensors", Adapter(site, AdapterConfig(), tensors, backbone.fingerprint, info))
bank = AdapterBank(backbone, store, max_bytes=None)
mixed, single = bank.resolve(names), bank.resolve([sites[0]] * len(names))
methods = {"bare": lambda: bank.model(x), "merged": lambda: bank.run_merged(x, single[0]),
           "single_same_size": lambda: bank.forward(x, single), "mixed": lambda: bank.forward(x, mixed)}
times = {k: [] for k in methods}
with torch.no_grad():
    for fn in methods.values():
        fn()
    for _ in range(REPEATS):
        for k, fn in methods.items():
            start = time.perf_counter(); fn(); times[k].append(time.perf_counter() - start)
sec = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps({"merged_vs_bare": sec["bare"] / sec["merged"],
                  "mixed_vs_single": sec["single_same_size"] / sec["mixed"],
                  "ms": {k: round(v * 1000, 2) for k, v in sec.items()}}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label, tree in (("old", args.old), ("new", args.new)):
            env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, "-c", TIMING.replace("REPEATS", str(args.repeats))],
                                 cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
    summary = {label: {key: round(statistics.median(r[key] for r in rs), 3)
                       for key in ("merged_vs_bare", "mixed_vs_single")} for label, rs in runs.items()}
    summary["new_over_old"] = {key: round(summary["new"][key] / summary["old"][key], 3)
                               for key in ("merged_vs_bare", "mixed_vs_single")}
    summary["runs"] = runs
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
