"""Where the time of one calibration goes: ``kgml-peft calibrate`` under cProfile, split into parts.

    python tools/profile_calibration.py --data data/demo.csv --site IA --epochs 10 --threads 1

Prints JSON: wall time, steps and epochs run, and seconds (and shares of the wall time) in the
parts that matter for speed: start-up (imports, reading, windows), the training steps' forward
pass and loss, their backward pass, the optimizer, fetching batches, and validation. A written
profile (``--out profile.prof``) opens in snakeviz or ``python -m pstats``. cProfile adds
overhead to Python-level calls (about 10-20 % here), so compare runs of this tool with each
other, not with timings of the plain command.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

#: part -> (file suffix, function name) whose cumulative time is that part
PARTS = {
    "train_steps": ("kgml_peft/train/loop.py", "step"),
    "forward_and_loss": ("kgml_peft/train/objectives.py", "objective"),
    "backward": ("torch/_tensor.py", "backward"),
    "optimizer": ("torch/optim/adam.py", "step"),
    "batches": ("torch/utils/data/dataloader.py", "__next__"),
    "validation": ("kgml_peft/train/loop.py", "validate"),
    "epoch_loop": ("kgml_peft/train/loop.py", "fit"),
}


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """The largest cumulative time of a function ``name`` defined in a file ending in ``suffix``
    (closures of the same name in one file: the outermost call holds the others)."""
    times = [ct for (file, _, func), (_, _, _, ct, _) in stats.stats.items()  # type: ignore[attr-defined]
             if func == name and file.replace("\\", "/").endswith(suffix)]
    return max(times, default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--backbone", default="checkpoints/demo.safetensors")
    parser.add_argument("--epochs", type=int, default=None, help="default: the calibration config's")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cv", default="none", choices=["none", "folds", "auto"])
    parser.add_argument("--out", default=None, help="also write the raw profile here")
    args = parser.parse_args(argv)

    from click.testing import CliRunner

    from kgml_peft.cli import cli  # imported before timing: start-up below is the command's own

    with tempfile.TemporaryDirectory() as tmp:
        command = ["--threads", str(args.threads), "calibrate", "--site", args.site, "--data", args.data,
                   "--backbone", args.backbone, "--out", tmp, "--cv", args.cv, "--quiet", "--json"]
        if args.epochs is not None:
            command += ["--epochs", str(args.epochs)]
        if args.batch_size is not None:
            command += ["--batch-size", str(args.batch_size)]
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        try:
            result = CliRunner().invoke(cli, command)
        finally:
            profile.disable()
        wall = time.perf_counter() - start
    if result.exit_code != 0:
        print(result.output, file=sys.stderr)
        return result.exit_code
    runs = json.loads(result.stdout)
    stats = pstats.Stats(profile)
    if args.out:
        stats.dump_stats(args.out)
    seconds = {part: round(_cumulative(stats, *where), 3) for part, where in PARTS.items()}
    seconds["start_up_and_writing"] = round(wall - seconds["epoch_loop"], 3)
    metrics = runs[0]["metrics"]
    report = {
        "command": "kgml-peft " + " ".join("<out>" if c == tmp else c for c in command),
        "batch_size": runs[0]["calibration"]["batch_size"],
        "wall_s": round(wall, 3),
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics["best_epoch"],
        "steps": metrics["steps"],
        "seconds": seconds,
        "share_of_wall": {k: round(v / wall, 3) for k, v in seconds.items()},
        "val_loss_after": metrics["after"]["loss"],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
