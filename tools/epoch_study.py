"""How many of a calibration's epochs are wasted: early stopping replayed on the validation curves.

    python tools/epoch_study.py --out docs/epoch-study-cpu.json

Calibrates every demo site and the three demo regions (the simulator's demo table: development
data, no flux tower) with the default calibration config, all units side by side in one batched
pass per kind, and keeps each unit's validation curve. Training up to any epoch does not depend on
the patience (the cosine schedule runs over the config's epochs, not over the stopping epoch), so
stopping with a smaller patience is replayed exactly on the curve: the epoch it would stop at, and
the best validation loss it would have kept. Prints JSON per patience: the epochs run (share of
the default's), and the change of the best validation loss (mean and worst unit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PATIENCES = (5, 10, 15, 20, 30)


def replay(val_losses: list[float], patience: int) -> tuple[int, float]:
    """(epochs run, best validation loss kept) of early stopping with ``patience`` on a curve whose
    entry 0 is the start (validated before any step), as :func:`kgml_peft.train.loop.close_epoch`
    decides: an epoch improves when its loss is below the best so far."""
    best, stale = val_losses[0], 0
    for epoch, loss in enumerate(val_losses[1:], start=1):
        if loss < best:
            best, stale = loss, 0
        else:
            stale += 1
        if patience and stale >= patience:
            return epoch, best
    return len(val_losses) - 1, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="checkpoints/demo.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from kgml_peft import schema
    from kgml_peft.calibration.batched import calibrate_batched
    from kgml_peft.calibration.calibrate import calibration_units, prepare_unit
    from kgml_peft.calibration.config import CalibrationConfig
    from kgml_peft.data.tables import validate_table
    from kgml_peft.calibration.runs import demo_table
    from kgml_peft.data.synthetic import SynthConfig, simulate
    from kgml_peft.store.checkpoint import load_backbone

    backbone = load_backbone(args.backbone)
    config = CalibrationConfig(seed=args.seed, cv="none")
    observed = validate_table(demo_table(), backbone.config.features)  # calibrate's demo data
    process = validate_table(simulate(SynthConfig(seed=0)), backbone.config.features)  # kgml-peft synth
    kinds = {"demo sites": (observed, list(dict.fromkeys(observed[schema.SITE]))),
             "demo regions": (observed, list(dict.fromkeys(observed[schema.REGION]))),
             "process-model regions": (process, list(dict.fromkeys(process[schema.REGION])))}
    report: dict = {"config": {"epochs": config.epochs, "patience": config.patience, "batch_size": config.batch_size,
                               "lr": config.lr, "seed": args.seed}, "kinds": {}}
    for kind, (table, names) in kinds.items():
        units = [prepare_unit(backbone, rows, name, scope, config)
                 for name_ in names for name, scope, rows in calibration_units(table, name_)]
        start = time.perf_counter()
        results = calibrate_batched(backbone, units, config, cpu=True, progress=False)
        seconds = time.perf_counter() - start
        curves = {r.name: [e["val_loss"] for e in r.curve if e.get("val_loss") is not None] for r in results}
        today = {name: replay(c, config.patience) for name, c in curves.items()}
        rows = {}
        for patience in PATIENCES:
            runs = {name: replay(c, patience) for name, c in curves.items()}
            changes = [runs[n][1] / today[n][1] - 1 for n in curves]
            rows[str(patience)] = {
                "epochs_run": sum(r[0] for r in runs.values()),
                "epochs_share_of_default": round(sum(r[0] for r in runs.values())
                                                 / sum(t[0] for t in today.values()), 3),
                "best_val_loss_change_mean_pct": round(100 * sum(changes) / len(changes), 2),
                "best_val_loss_change_worst_pct": round(100 * max(changes), 2),
                "units_worse_than_default": sum(c > 0 for c in changes),
            }
        report["kinds"][kind] = {
            "units": len(curves), "seconds_batched": round(seconds, 1),
            "best_epochs": {n: min(range(len(c)), key=c.__getitem__) for n, c in curves.items()},
            "epochs_run_default": {n: t[0] for n, t in today.items()},
            "by_patience": rows,
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
