"""Interrupted runs: the training state saved after every epoch, ``--resume``, and SIGKILL.

Faults are injected for real: a state file that raises right after it was written (the process
dies between two epochs), and subprocesses killed with SIGKILL in the middle of training or in the
middle of writing an adapter. A resumed run must end with exactly the tensors, metrics and curves of
a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kgml_peft import schema
from kgml_peft.calibration.calibrate import calibrate_unit, calibration_state, prepare_unit
from kgml_peft.calibration.runs import run_calibration
from kgml_peft.cli import cli
from kgml_peft.data.synthetic import SynthConfig, simulate
from kgml_peft.data.tables import load_table, validate_table
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.adapter import load_adapter, read_adapter
from kgml_peft.store.checkpoint import compare_checkpoints, load_backbone
from kgml_peft.train.pretrain import pretrain, pretrain_state
from kgml_peft.atomic import STALE_AFTER_S
from kgml_peft.store.hashing import read_safetensors
from kgml_peft.train.state import RESUME_DIR, StateFile, load_state, resume_path
from tests.conftest import make_frame, tiny_calibration
from tests.test_cli_validation import _runner, _snapshot, check_user_error
from tests.test_pretrain import SMALL, TINY, TINY_TOML

ROOT = Path(__file__).resolve().parents[1]


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


class CrashingState(StateFile):
    """A state file that 'dies' right after writing the state of ``(phase_index, epoch)``."""

    at: tuple[int, int] = (0, 1)

    def save(self, state) -> None:
        super().save(state)
        if (state.phase_index, state.phase.epoch) == self.at:
            raise Crash


def crashing(state: StateFile, at: tuple[int, int]) -> StateFile:
    crash = CrashingState(state.path, state.key, state.resume)
    object.__setattr__(crash, "at", at)  # frozen dataclass; the class default stays untouched
    return crash


def _equal_state_dicts(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tables():
    features = schema.DEFAULT_FEATURES
    return (validate_table(simulate(SynthConfig(seed=0, **SMALL)), features),
            validate_table(simulate(SynthConfig(seed=0, observed=True, **SMALL)), features))


@pytest.fixture(scope="module")
def uninterrupted(tables):
    synthetic, observed = tables
    return pretrain(synthetic, observed, TINY, cpu=True, progress=False)


# phases of TINY: yield_ra (2 epochs), fluxes (2), observed (2, with the response reference)
@pytest.mark.parametrize("at", [(0, 1), (1, 2), (2, 1)], ids=["mid-first", "end-of-phase", "reference-phase"])
def test_resumed_pretraining_equals_an_uninterrupted_run(tables, uninterrupted, tmp_path, at):
    synthetic, observed = tables
    output = tmp_path / "backbone.safetensors"
    state = pretrain_state(output, synthetic, observed, TINY)
    with pytest.raises(Crash):
        pretrain(synthetic, observed, TINY, cpu=True, progress=False, state=crashing(state, at))
    saved = load_state(resume_path(output), state.key)
    assert (saved.phase_index, saved.phase.epoch) == at
    assert bool(saved.extra) == (at[0] == 2)  # the frozen reference exists from phase 3 on

    resumed = pretrain(synthetic, observed, TINY, cpu=True, progress=False,
                       state=pretrain_state(output, synthetic, observed, TINY, resume=True))
    assert _equal_state_dicts(resumed.model.state_dict(), uninterrupted.model.state_dict())
    assert resumed.summary == uninterrupted.summary  # curves, best epochs, steps


def test_resume_under_bf16_autocast_is_exact_too(tables, tmp_path):
    """The frozen reference of the response phase is rebuilt from the saved weights; it must run
    under the same autocast wrapper as in an uninterrupted run (crash inside that phase)."""
    synthetic, observed = tables
    config = type(TINY)(**{**TINY.__dict__, "phases": TINY.phases[1:], "mixed_precision": "bf16"})
    plain = pretrain(synthetic, observed, config, cpu=True, progress=False)
    output = tmp_path / "backbone.safetensors"
    state = pretrain_state(output, synthetic, observed, config)
    with pytest.raises(Crash):
        pretrain(synthetic, observed, config, cpu=True, progress=False, state=crashing(state, (1, 1)))
    resumed = pretrain(synthetic, observed, config, cpu=True, progress=False,
                       state=pretrain_state(output, synthetic, observed, config, resume=True))
    assert _equal_state_dicts(resumed.model.state_dict(), plain.model.state_dict())
    assert resumed.summary == plain.summary


def test_a_state_from_another_run_is_refused(tables, tmp_path):
    synthetic, observed = tables
    output = tmp_path / "backbone.safetensors"
    state = pretrain_state(output, synthetic, observed, TINY)
    with pytest.raises(Crash):
        pretrain(synthetic, observed, TINY, cpu=True, progress=False, state=crashing(state, (0, 1)))
    other = type(TINY)(**{**TINY.__dict__, "seed": 3})
    with pytest.raises(KgmlPeftError, match="written by another run"):
        pretrain(synthetic, observed, other, cpu=True, progress=False,
                 state=pretrain_state(output, synthetic, observed, other, resume=True))
    # without --resume the old state is simply replaced by the new run's
    pretrain(synthetic, observed, other, cpu=True, progress=False,
             state=pretrain_state(output, synthetic, observed, other))
    assert load_state(resume_path(output), pretrain_state(output, synthetic, observed, other).key)


@pytest.mark.parametrize("method,config", [
    ("adapter", dict(epochs=6, schedule="cosine", patience=0)),
    ("adapter", dict(epochs=12, patience=2, lr=3e-2)),  # early stopping fires after the crash
    ("full", dict(epochs=4, schedule="cosine")),
], ids=["adapter-cosine", "adapter-early-stop", "full"])
def test_resumed_calibration_equals_an_uninterrupted_run(backbone_path, tmp_path, method, config):
    backbone = load_backbone(backbone_path)
    cfg = tiny_calibration(method=method, **config)
    unit = prepare_unit(backbone, validate_table(make_frame(), backbone.config.features).query(
        "site == 'IA-001'").reset_index(drop=True), "IA-001", "site", cfg)
    plain = calibrate_unit(backbone, unit, cfg, progress=False)

    output = tmp_path / "IA-001.safetensors"
    state = calibration_state(output, backbone, unit, cfg)
    with pytest.raises(Crash):
        calibrate_unit(backbone, unit, cfg, progress=False, state=crashing(state, (0, 2)))
    resumed = calibrate_unit(backbone, unit, cfg, progress=False,
                             state=calibration_state(output, backbone, unit, cfg, resume=True))
    assert _equal_state_dicts(resumed.model.state_dict(), plain.model.state_dict())
    assert resumed.curve == plain.curve and resumed.summary == plain.summary
    if method == "adapter":
        assert _equal_state_dicts(resumed.adapter.tensors, plain.adapter.tensors)


def test_run_calibration_resume_skips_units_this_run_wrote(backbone_path, tmp_path):
    """``--site all --resume`` after a crash in the second region: the first region's adapter is
    kept as written (not retrained), the second continues; a changed config is not 'the same run'."""
    table = make_frame({"IA-001": "IA", "IL-001": "IL"})
    store = tmp_path / "store"
    store.mkdir()
    cfg = tiny_calibration(epochs=4)
    first = run_calibration("all", backbone_path=backbone_path, data=table, out_dir=store, config=cfg,
                            progress=False)
    ia_bytes = (store / "IA.safetensors").read_bytes()
    (store / "IL.safetensors").unlink()  # as if the run had died while calibrating IL
    runs = run_calibration("all", backbone_path=backbone_path, data=table, out_dir=store, config=cfg,
                           progress=False, resume=True)
    assert [r.name for r in runs] == ["IA", "IL"]
    assert runs[0].skipped and not runs[1].skipped
    assert (store / "IA.safetensors").read_bytes() == ia_bytes
    assert _equal_state_dicts(read_adapter(store / "IL.safetensors").tensors, first[1].result.adapter.tensors)
    assert not (store / RESUME_DIR).exists()

    other = tiny_calibration(epochs=4, seed=1)
    with pytest.raises(KgmlPeftError, match="exists; pass --force"):
        run_calibration("all", backbone_path=backbone_path, data=table, out_dir=store, config=other,
                        progress=False, resume=True)


# --- the real command line, killed with SIGKILL -------------------------------------------------

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kgml_peft", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _kill_when(process: subprocess.Popen, path: Path, timeout: float = 120.0) -> None:
    """SIGKILL ``process`` as soon as ``path`` exists (it must not have finished by then)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the training state never appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def _temporaries(store: Path) -> list[str]:
    """Temporary (partial) files anywhere in a store."""
    return sorted(p.name for p in store.rglob("*.tmp"))


@pytest.mark.slow
def test_sigkill_mid_calibration_keeps_the_old_adapter_and_resume_finishes_identically(
        backbone_path, tmp_path):
    table = tmp_path / "sites.csv"
    make_frame().to_csv(table, index=False, date_format="%Y-%m-%d")
    common = ["calibrate", "--site", "IA-001", "--data", str(table), "--backbone", str(backbone_path),
              "--batch-size", "2", "--quiet", "--cv", "none"]  # the plain calibration's training state
    store, clean = tmp_path / "store", tmp_path / "clean"
    store.mkdir()
    clean.mkdir()
    # a good adapter from an earlier run (another seed) is in the store
    subprocess.run(_cli(*common, "--out", str(store), "--epochs", "2", "--seed", "7"), check=True,
                   env=_env(), capture_output=True)
    old = (store / "IA-001.safetensors").read_bytes()

    long_run = [*common, "--epochs", "10", "--patience", "0"]
    process = subprocess.Popen(_cli(*long_run, "--out", str(store), "--force"), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_when(process, store / RESUME_DIR / "IA-001.safetensors")
    assert (store / "IA-001.safetensors").read_bytes() == old
    load_adapter(store / "IA-001.safetensors", load_backbone(backbone_path))
    # nothing partial among the adapters (the kill may land in a write of the training state,
    # whose temporary lies in the state folder until the next write there sweeps it)
    assert sorted(p.name for p in store.iterdir()) == [RESUME_DIR, "IA-001.safetensors"]

    for leftover in store.rglob("*.tmp"):  # the kill landed in a state write: minutes pass
        os.utime(leftover, (time.time() - 2 * STALE_AFTER_S, time.time() - 2 * STALE_AFTER_S))
    resumed = subprocess.run(_cli(*long_run, "--out", str(store), "--force", "--resume"), env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    subprocess.run(_cli(*long_run, "--out", str(clean)), check=True, env=_env(), capture_output=True)
    a, b = read_adapter(store / "IA-001.safetensors"), read_adapter(clean / "IA-001.safetensors")
    assert _equal_state_dicts(a.tensors, b.tensors) and a.info["metrics"] == b.info["metrics"]
    assert sorted(p.name for p in store.iterdir()) == ["IA-001.safetensors"] and _temporaries(store) == []


# Writes half an adapter, then kills its own process with SIGKILL: the fault lands inside the
# atomic writer, between the temporary file's first bytes and the rename.
_DIE_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch
    import kgml_peft.store.adapter as adapter

    def half_then_die(tensors, filename, metadata=None):
        safetensors.torch.save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    adapter.save_file = half_then_die
    from kgml_peft.cli import cli
    cli(sys.argv[1:])
""")


@pytest.mark.slow
def test_sigkill_while_writing_the_adapter_leaves_the_old_one_and_the_next_write_sweeps(
        backbone_path, tmp_path):
    table = tmp_path / "sites.csv"
    make_frame().to_csv(table, index=False, date_format="%Y-%m-%d")
    store = tmp_path / "store"
    store.mkdir()
    args = ["calibrate", "--site", "IA-001", "--data", str(table), "--backbone", str(backbone_path),
            "--out", str(store), "--epochs", "2", "--batch-size", "2", "--quiet", "--cv", "none"]
    subprocess.run(_cli(*args), check=True, env=_env(), capture_output=True)
    old = (store / "IA-001.safetensors").read_bytes()

    died = subprocess.run([sys.executable, "-c", _DIE_WHILE_WRITING, *args, "--force", "--seed", "3"],
                          env=_env(), capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert (store / "IA-001.safetensors").read_bytes() == old
    leftovers = [p.name for p in store.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".IA-001.safetensors.")  # the half file
    # the store still lists and serves only complete adapters
    listing = _runner().invoke(cli, ["adapters", "list", "--store", str(store), "--json"])
    assert listing.exit_code == 0 and [r["file"] for r in json.loads(listing.stdout)] == ["IA-001.safetensors"]

    # a dead writer's temporary is only swept once it is old enough (a live writer in another PID
    # namespace could look dead): age it, and keep a fresh one of a dead writer that must stay
    stale = store / leftovers[0]
    os.utime(stale, (time.time() - 2 * STALE_AFTER_S, time.time() - 2 * STALE_AFTER_S))
    fresh = store / leftovers[0].replace(".tmp", "x.tmp")
    fresh.write_bytes(b"partial")
    again = subprocess.run(_cli(*args, "--force", "--seed", "3", "--resume"), env=_env(),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in store.iterdir() if p.name.endswith(".tmp")] == [fresh.name]  # the old one is gone
    assert read_adapter(store / "IA-001.safetensors").info["calibration"]["seed"] == 3


@pytest.mark.slow
def test_sigkill_mid_pretraining_then_resume_gives_the_same_checkpoint(tmp_path):
    synthetic, observed = tmp_path / "synthetic.parquet", tmp_path / "observed.parquet"
    for path, observed_flavour in ((synthetic, False), (observed, True)):
        subprocess.run(_cli("synth", "--out", str(path), "--max-sites-per-region", "1",
                            "--max-years-per-site", "3", *(["--observed"] if observed_flavour else [])),
                       check=True, env=_env(), capture_output=True)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML.replace("epochs = 2", "epochs = 4"))
    common = ["pretrain", "--data", str(synthetic), "--observed", str(observed), "--config", str(config),
              "--quiet"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir()
    clean.mkdir()
    process = subprocess.Popen(_cli(*common, "--out-dir", str(killed)), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_when(process, killed / RESUME_DIR / "demo.safetensors")
    assert not (killed / "demo.safetensors").exists()

    resumed = subprocess.run(_cli(*common, "--out-dir", str(killed), "--resume"), env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    subprocess.run(_cli(*common, "--out-dir", str(clean)), check=True, env=_env(), capture_output=True)
    assert compare_checkpoints(killed / "demo.safetensors", clean / "demo.safetensors") == []
    assert not (killed / RESUME_DIR).exists()


# --- bad resume states through the CLI: one line, exit 2, nothing changed ------------------------

@pytest.mark.parametrize("kind,expect", [
    ("corrupt", ("training state", "not a readable safetensors file")),
    ("other-run", ("written by another run", "without --resume")),
    ("tampered", ("content hash mismatch", "delete it")),
    ("folder-is-a-file", ("cannot write the training state",)),
])
def test_a_bad_resume_state_is_one_line(backbone_path, tmp_path, kind, expect):
    table = tmp_path / "sites.csv"
    make_frame().to_csv(table, index=False, date_format="%Y-%m-%d")
    store = tmp_path / "store"
    store.mkdir()
    state_file = store / RESUME_DIR / "IA-001.safetensors"
    if kind == "corrupt":
        state_file.parent.mkdir()
        state_file.write_bytes(b"not a safetensors file")
    elif kind == "folder-is-a-file":  # the state cannot be saved: one line after the first epoch
        (store / RESUME_DIR).write_bytes(b"")
    else:  # a real state of the same unit: from a run with another seed, or edited afterwards
        backbone = load_backbone(backbone_path)
        cfg = tiny_calibration(seed=9 if kind == "other-run" else 0)
        rows = load_table(table, backbone.config.features).query("site == 'IA-001'").reset_index(drop=True)
        unit = prepare_unit(backbone, rows, "IA-001", "site", cfg)
        with pytest.raises(Crash):
            calibrate_unit(backbone, unit, cfg, progress=False, state=crashing(
                calibration_state(store / "IA-001.safetensors", backbone, unit, cfg), (0, 1)))
        if kind == "tampered":  # a valid file whose recorded epoch was changed by hand
            tensors, metadata = read_safetensors(state_file, "training state")
            metadata["state"] = metadata["state"].replace('"epoch": 1', '"epoch": 2')
            save_file(tensors, str(state_file), metadata=metadata)
    before = _snapshot(tmp_path)
    args = ["calibrate", "--site", "IA-001", "--data", str(table), "--backbone", str(backbone_path),
            "--out", str(store), "--epochs", "3", "--batch-size", "2", "--quiet", "--resume",
            "--cv", "none"]  # the mid-training state of a plain calibration
    check_user_error(_runner().invoke(cli, args), args, expect, tmp_path, before)
