"""Two CPU processes (gloo), launched the way users launch them: ``accelerate launch`` and
``torchrun``. Pretraining is data-parallel and must land close to the single-process run; sharded
calibration must write every adapter exactly once, each equal to its single-process result."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kgml_peft.store.adapter import load_adapter
from kgml_peft.store.checkpoint import load_backbone
from tests.conftest import make_frame
from tests.test_pretrain import TINY_TOML

ROOT = Path(__file__).resolve().parents[1]
SITES = {"IA-001": "IA", "IA-002": "IA", "IL-001": "IL", "IL-002": "IL"}


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launch(launcher: str, *args: str) -> subprocess.CompletedProcess:
    """``kgml-peft ARGS`` under two CPU processes, or one (``launcher`` ``single``)."""
    if launcher == "single":
        prefix = [sys.executable, "-m", "kgml_peft"]
    elif launcher == "accelerate":
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", _free_port(), "-m", "kgml_peft"]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", _free_port(), "-m", "kgml_peft"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tables")
    paths = folder / "synthetic.parquet", folder / "observed.parquet"
    for path, observed in zip(paths, (False, True)):
        done = _launch("single", "synth", "--out", str(path), "--max-sites-per-region", "2",
                       "--max-years-per-site", "3", *(["--observed"] if observed else []))
        assert done.returncode == 0, done.stderr
    return paths


@pytest.mark.slow
def test_data_parallel_pretraining_matches_one_process(tables, tmp_path):
    synthetic, observed = tables
    config = tmp_path / "tiny.toml"
    # the observed phase also runs the response term: a second forward pass through the DDP model
    config.write_text(TINY_TOML.replace("epochs = 1", "epochs = 2\nresponse_weight = 0.05"))
    outputs = {}
    for launcher in ("single", "accelerate"):
        out = tmp_path / launcher
        out.mkdir()
        done = _launch(launcher, "pretrain", "--data", str(synthetic), "--observed", str(observed),
                       "--config", str(config), "--out-dir", str(out), "--cpu", "--quiet")
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in out.iterdir()) == ["demo.safetensors"]  # written once, no leftovers
        assert done.stdout.count("wrote ") == 1  # only the main process reports
        outputs[launcher] = load_backbone(out / "demo.safetensors")
    single, parallel = outputs["single"], outputs["accelerate"]
    # the same steps over the same global batches; only how the mean is taken differs
    assert parallel.training["total_steps"] == single.training["total_steps"]
    for a, b in zip(single.training["phases"], parallel.training["phases"]):
        assert b["best_val_loss"] == pytest.approx(a["best_val_loss"], rel=0.05)
    sa, sb = single.model.state_dict(), parallel.model.state_dict()
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert 0 < worst < 0.05  # close, and truly computed by two processes (not a copy)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, batch_sites", [("accelerate", 1), ("torchrun", 1), ("torchrun", 3)])
def test_sharded_calibration_writes_each_adapter_once(backbone_path, tmp_path, launcher, batch_sites):
    """One unit per process at a time, or (``--batch-sites 3``) a batched group of three units in
    one process and the fourth unit, a group of its own, calibrated alone in the other: the same
    groups as in one process, so the same tensors."""
    table = tmp_path / "sites.csv"
    make_frame(SITES, years=(2003, 2004, 2005)).to_csv(table, index=False, date_format="%Y-%m-%d")
    args = ["calibrate", "--site", ",".join(SITES), "--data", str(table), "--backbone", str(backbone_path),
            "--epochs", "4", "--batch-size", "2", "--batch-sites", str(batch_sites), "--quiet", "--json"]
    reports = {}
    for how in ("single", launcher):
        out = tmp_path / how / "new" / "store"  # missing folders: created by whichever process is first
        # with --cpu, and without: on a machine with no GPU the launched processes find the CPU
        done = _launch(how, *args, "--out", str(out), *(["--cpu"] if how == "accelerate" else []))
        assert done.returncode == 0, done.stderr
        runs = json.loads(done.stdout)  # one JSON document: only the main process prints
        assert sorted(r["site"] for r in runs) == sorted(SITES)  # none lost, none twice
        assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.safetensors" for s in SITES)
        reports[how] = {r["site"]: r for r in runs}
    assert {r["process"] for r in reports[launcher].values()} == {0, 1}  # both processes worked
    if batch_sites > 1:
        names = list(SITES)
        assert [reports[launcher][s]["calibration"].get("batched_with") for s in names] == \
            [names[:3]] * 3 + [None]
        assert len({reports[launcher][s]["process"] for s in names[:3]}) == 1  # a group stays together
    backbone = load_backbone(backbone_path)
    for site in SITES:
        one, two = reports["single"][site], reports[launcher][site]
        assert two["metrics"]["after"]["loss"] <= one["metrics"]["after"]["loss"] * (1 + 1e-6)
        a = load_adapter(tmp_path / "single" / "new" / "store" / f"{site}.safetensors", backbone)
        b = load_adapter(tmp_path / launcher / "new" / "store" / f"{site}.safetensors", backbone)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.slow
def test_an_error_in_a_launched_run_is_one_line(backbone_path, tmp_path):
    table = tmp_path / "sites.csv"
    make_frame(SITES, years=(2003, 2004, 2005)).to_csv(table, index=False, date_format="%Y-%m-%d")
    done = _launch("torchrun", "calibrate", "--site", "IA-001,XX-999", "--data", str(table),
                   "--backbone", str(backbone_path), "--out", str(tmp_path), "--cpu", "--quiet")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unknown site or region 'XX-999'" in errors[0]
    # torchrun reports the failed workers with a traceback of its own; none comes from the toolkit
    assert "kgml_peft/" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sites.csv"]


#: a launched worker whose main process is slow to reach its error (rank 1 fails at once)
SLOW_MAIN = """
import os, sys, time
from kgml_peft.cli import main
if os.environ["RANK"] == "0":
    time.sleep(3)  # torchrun checks its workers every 0.1 s: without waiting, rank 1's exit ends this
sys.argv = ["kgml-peft", *sys.argv[1:]]
main()
"""


def test_the_main_process_reports_an_error_even_when_another_fails_first(tmp_path):
    """The launcher stops every worker once one fails; the failed one waits (on the launcher's
    store) until the main process has printed its one ``error:`` line."""
    script = tmp_path / "slow_main.py"
    script.write_text(SLOW_MAIN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", _free_port(), str(script), "backbone", "compare",
                           "no-a", "no-b"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no-a" in errors[0], done.stderr
    # the main process ended by itself, with the error's code (not SIGTERMed by the launcher)
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\n\s*exitcode\s*: 2 ", done.stderr), done.stderr


#: runs the CLI's entry point as a launched worker would, with an exit hook that finalization runs
LAUNCHED_MAIN = """
import atexit, sys
import torch.distributed
atexit.register(lambda: print("finalized", file=sys.stderr, flush=True))
from kgml_peft.cli import main
print("partial line without a newline", end="")
sys.argv = ["kgml-peft", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("args, code", [(["--version"], 0), (["backbone", "compare", "no-a", "no-b"], 2)])
def test_a_launched_worker_exits_without_finalization_and_keeps_its_output(tmp_path, args, code):
    """A launched process (``WORLD_SIZE`` > 1) leaves through ``os._exit``: its status and all its
    output arrive, buffered stdout included, and no exit hook runs (finalization is where gloo's
    threads could abort it). The same command unlaunched finalizes as usual."""
    for world, finalized in (("2", False), ("1", True)):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": world, "RANK": "0"}
        done = subprocess.run([sys.executable, "-c", LAUNCHED_MAIN, *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == code, done.stderr
        assert done.stdout.startswith("partial line without a newline")
        if code == 0:
            assert "version" in done.stdout
        else:
            assert [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert ("finalized" in done.stderr) is finalized, done.stderr
