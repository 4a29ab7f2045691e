"""Calibration throughput, measured for ``kgml-peft bench``: sites per minute one after another,
batched in one process (``--batch-sites``) and sharded over several processes (``torchrun``).

The in-process figures time the library calls on prepared units. The process figures time the
real command line (``python -m kgml_peft calibrate`` and ``torchrun --nproc_per_node N -m
kgml_peft calibrate``) as a user runs it, start-up included, each into a fresh folder; both the
one- and the N-process command are timed so that their ratio compares like with like.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kgml_peft.calibration.batched import calibrate_batched
from kgml_peft.calibration.calibrate import CalibrationData, CalibrationResult, calibrate_unit
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.checkpoint import Backbone


#: the longest a timed ``calibrate`` command may take before the bench gives up on it
COMMAND_TIMEOUT_S = 3 * 3600


@dataclass
class InProcess:
    """Units calibrated one after another and batched: results and wall seconds of each way."""

    sequential: list[CalibrationResult]
    sequential_seconds: list[float]
    batched: list[CalibrationResult]
    batched_seconds: float


def time_in_process(backbone: Backbone, units: Sequence[CalibrationData], config: CalibrationConfig,
                    cpu: bool) -> InProcess:
    """Calibrate ``units`` one after another, then all together in one batched pass (after an
    untimed one-epoch warm-up, so that neither figure carries the device's start-up)."""
    calibrate_unit(backbone, units[0], replace(config, epochs=1), cpu=cpu, progress=False)
    sequential, seconds = [], []
    for unit in units:
        start = time.perf_counter()
        sequential.append(calibrate_unit(backbone, unit, config, cpu=cpu, progress=False))
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    batched = calibrate_batched(backbone, units, config, cpu=cpu, progress=False)
    return InProcess(sequential, seconds, batched, time.perf_counter() - start)


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def time_command(backbone_path: str | os.PathLike, sites: Sequence[str], config: CalibrationConfig,
                 processes: int, batch_sites: int = 1, cpu: bool = True) -> float:
    """Wall seconds of ``kgml-peft calibrate --site <sites>`` on the demo data in ``processes``
    processes (``torchrun`` for more than one), start-up included; checks every adapter was
    written exactly once."""
    if processes == 1:
        prefix = [sys.executable, "-m", "kgml_peft"]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                  "--master_port", _free_port(), "-m", "kgml_peft"]
    with tempfile.TemporaryDirectory(prefix="kgml-peft-throughput-") as out:
        args = ["calibrate", "--site", ",".join(sites), "--backbone", str(backbone_path), "--out", out,
                "--epochs", str(config.epochs), "--seed", str(config.seed),
                "--batch-sites", str(batch_sites), "--cv", config.cv, "--quiet", "--json",
                *(["--cpu"] if cpu else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        try:
            done = subprocess.run([*prefix, *args], env=env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # e.g. one process died and the others wait for it
            raise KgmlPeftError(f"bench: the {processes}-process calibration did not finish in "
                                f"{COMMAND_TIMEOUT_S} s") from None
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            # the toolkit's own one-line error if there is one (launchers add banners of their own)
            reason = next((line for line in lines if line.startswith("error: ")),
                          next((line for line in reversed(lines) if line.strip("=- ")), "no output"))
            raise KgmlPeftError(f"bench: the {processes}-process calibration failed: {reason}")
        written = sorted(p.name for p in Path(out).iterdir())
        reported = sorted(r["site"] for r in json.loads(done.stdout))
        if written != sorted(f"{s}.safetensors" for s in sites) or reported != sorted(sites):
            raise KgmlPeftError(f"bench: the {processes}-process calibration wrote {written}")
    return seconds


def calibration_throughput(backbone_path: str | os.PathLike, sites: Sequence[str], config: CalibrationConfig,
                           timed: InProcess, processes: int, cpu: bool, skip_commands: str | None = None) -> dict:
    """Sites per minute of every way (see module docstring) and their ratios, JSON-ready. With
    ``skip_commands`` (the reason) only the in-process figures are reported."""
    n = len(sites)
    per_min = {"sequential_in_process": 60 * n / sum(timed.sequential_seconds),
               "batched_in_process": 60 * n / timed.batched_seconds}
    ratios = {"batched_vs_sequential": per_min["batched_in_process"] / per_min["sequential_in_process"]}
    if skip_commands is None:
        share = math.ceil(n / processes)
        commands = {"command_1_process": (1, 1), f"command_{processes}_processes": (processes, 1),
                    "command_1_process_batched": (1, n),
                    f"command_{processes}_processes_batched": (processes, share)}
        for key, (count, batch) in commands.items():
            per_min[key] = 60 * n / time_command(backbone_path, sites, config, count, batch, cpu)
        one = per_min["command_1_process"]
        ratios[f"{processes}_processes_vs_1"] = per_min[f"command_{processes}_processes"] / one
        ratios[f"{processes}_processes_batched_vs_1_process"] = per_min[f"command_{processes}_processes_batched"] / one
    loss = {
        "sequential_mean": sum(r.metrics["after"]["loss"] for r in timed.sequential) / n,
        "batched_mean": sum(r.metrics["after"]["loss"] for r in timed.batched) / n,
        "before_mean": sum(r.metrics["before"]["loss"] for r in timed.sequential) / n,
    }
    return {
        "sites": n, "epochs": config.epochs, "processes": processes,
        "sites_per_min": {k: round(v, 2) for k, v in per_min.items()},
        "ratios": {k: round(v, 2) for k, v in ratios.items()},
        "validation_loss": {k: round(v, 5) for k, v in loss.items()},
        **({"commands_skipped": skip_commands} if skip_commands else {}),
    }
