"""Issue 20, classes 1, 5 and 9: output paths, OS errors and output hygiene, through the real CLI.

* Class 1: every output path goes through one check (:func:`kgml_peft.atomic.check_outputs`):
  an existing file needs ``--force``; an output that is, or resolves to, one of the command's
  inputs (or another of its outputs) is refused even with ``--force``; special files are refused;
  missing folders are created by the write (and removed again when the command fails).
* Class 5: OS errors (a full disk, a name too long) end in one line naming the path and cause.
* Class 9: untrusted text prints on one line; ``--json`` is strict JSON; an id that is both a
  site and a region is refused as ambiguous.

Rows use the bad-input matrix's harness and checks: exit 2, exactly one ``error:`` line, no
traceback, nothing on stdout, no file created, every earlier file byte-identical with the same
modification time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kgml_peft.cli import cli
from safetensors import safe_open
from safetensors.torch import save_file

from kgml_peft.data.windows import Scalers
from kgml_peft.store.adapter import read_adapter
from kgml_peft.model.backbone import BackboneConfig
from kgml_peft.store.checkpoint import fingerprint
from tests.conftest import make_frame
from tests import test_bad_input_matrix as matrix
from tests.test_bad_input_matrix import MEnv
from tests.test_cli_validation import Case, _runner, _snapshot, case, check_user_error

ROOT = Path(__file__).resolve().parents[1]
adapters = matrix.adapters  # the matrix's fixture: a valid adapter and one of another backbone


def _file(path: Path, text: str = "keep me\n") -> Path:
    path.write_text(text)
    return path


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target.resolve())
    return link


# --- class 1: outputs -----------------------------------------------------------------------


def _plot_onto_backbone(env: MEnv) -> list[str]:
    shipped = env.shipped()
    return ["backbone", "show", str(shipped), "--plot", str(shipped), "--force"]


def _calibrate_onto_its_backbone(env: MEnv) -> list[str]:
    """A copy of the backbone named like the adapter the run would write into the same folder."""
    store = env.folder("store")
    backbone = store / "IA.safetensors"
    shutil.copyfile(env.backbone, backbone)
    return ["calibrate", "--data", str(env.data()), "--backbone", str(backbone), "--out", str(store),
            "--site", "IA", "--epochs", "1", "--cv", "none", "--quiet", "--force"]


def _calibrate_plot_onto_adapter(env: MEnv) -> list[str]:
    store = env.folder("store")
    return env.calibrate("--site", "IA", "--cv", "none", "--force",
                         "--plot", str(store / "IA.safetensors"), out=store)


def _import_over_its_backbone(env: MEnv) -> list[str]:
    """The backbone sits in the store under the adapter's site name: --force must not replace it."""
    store = env.folder("store")
    backbone = store / "IA-001.safetensors"
    shutil.copyfile(env.backbone, backbone)
    return ["adapters", "import", str(env.adapter), "--store", str(store), "--backbone", str(backbone), "--force"]


def _extreme_scalers(env: MEnv, std: float) -> Path:
    """A copy of the backbone whose NEE scaler std is finite but extreme, with its fingerprint
    recomputed (as a hostile writer would): squares of scaled errors overflow or divide by zero."""
    with safe_open(str(env.backbone), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    scalers = json.loads(metadata["scalers"])
    scalers["std"]["NEE"] = std
    metadata["scalers"] = json.dumps(scalers, sort_keys=True)
    config = BackboneConfig.from_dict(json.loads(metadata["config"]))
    metadata["fingerprint"] = fingerprint(tensors, config, Scalers.from_dict(scalers))
    path = env.tmp / "inputs" / "extreme.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


CASES: list[Case] = [
    case("backbone-show-plot-onto-the-backbone", _plot_onto_backbone, "is the input"),
    case("backbone-show-plot-exists", lambda env: ["backbone", "show", str(env.shipped()), "--plot",
                                                   str(_file(env.tmp / "curves.png"))], "exists; pass --force"),
    case("backbone-show-plot-onto-a-link-to-the-backbone",
         lambda env: ["backbone", "show", str(env.shipped()), "--force", "--plot",
                      str(_link(env.tmp / "curves.png", env.tmp / "inputs" / "demo.safetensors"))], "is the input"),
    case("predict-out-is-data-with-force", lambda env: env.predict("--force", data=env.data(name="b.csv"), out="b.csv"),
         "is the input"),
    case("predict-out-links-to-data", lambda env: env.predict(
        "--force", data=env.data(name="b.csv"), out=str(_link(env.tmp / "out.csv", env.tmp / "b.csv"))), "is the input"),
    case("predict-annual-is-data", lambda env: env.predict("--force", "--annual", "b.csv", data=env.data(name="b.csv")),
         "is the input"),
    case("predict-annual-is-out", lambda env: env.predict("--annual", "pred.csv"), "also the output"),
    case("predict-out-is-a-folder", lambda env: env.predict(out=str(env.folder("pred.csv"))), "is a directory"),
    case("calibrate-adapter-onto-its-backbone", _calibrate_onto_its_backbone, "is the input"),
    case("calibrate-plot-onto-its-adapter", _calibrate_plot_onto_adapter, "also the output"),
    case("calibrate-plot-onto-data", lambda env: env.calibrate("--site", "IA", "--force", "--plot",
                                                              str(env.data(name="d.csv")), data=env.tmp / "d.csv"),
         "is the input"),
    case("calibrate-plot-exists", lambda env: env.calibrate("--site", "IA", "--plot",
                                                           str(_file(env.tmp / "curves.png"))), "exists; pass --force"),
    case("bench-out-exists", lambda env: ["bench", "--quick", "--backbone", str(env.backbone),
                                          "--out", str(_file(env.tmp / "bench.json"))], "exists; pass --force"),
    case("bench-out-is-the-backbone", lambda env: ["bench", "--quick", "--force", "--backbone", str(env.backbone),
                                                   "--out", str(env.backbone)], "is the input"),
    case("synth-out-exists", lambda env: ["synth", "--out", str(env.data(name="demo.csv"))], "exists; pass --force"),
    case("fluxnet-out-is-its-input", lambda env: (lambda f: env.import_fluxnet("--force", path=f, out=str(f)))(
        env.fluxnet()), "is the input"),
    case("export-onto-a-link-to-itself", lambda env: ["adapters", "export", str(env.adapter), "--force",
                                                      str(_link(env.tmp / "shared.safetensors", env.adapter))],
         "is the input"),
    case("import-into-its-own-store", lambda env: ["adapters", "import", str(env.adapter), "--store",
                                                   str(env.adapter.parent), "--backbone", str(env.backbone),
                                                   "--force"], "already in the store"),
    case("export-onto-its-backbone", lambda env: ["adapters", "export", str(env.adapter), str(env.backbone),
                                                  "--backbone", str(env.backbone), "--force"], "is the input"),
    case("import-over-its-backbone", _import_over_its_backbone, "is the input"),
    case("calibrate-backbone-with-extreme-scalers", lambda env: env.calibrate(
        "--site", "IA", "--cv", "none", "--backbone", str(_extreme_scalers(env, std=1e300))), "bad scaler for NEE"),
    case("evaluate-backbone-with-tiny-scalers", lambda env: env.evaluate(
        env.data(), _extreme_scalers(env, std=1e-300), "--json"), "bad scaler for NEE"),
    case("predict-folder-name-too-long", lambda env: env.predict(out="nl/ok/" + "x" * 300 + "/pred.csv"),
         "File name too long"),
    case("experiment-config-huge-backbone", lambda env: ["experiment", "--out", "ex", "--config", str(
        _file(env.tmp / "exp.toml", "[backbone]\nhidden_size = 100000000000\n"))], "hidden_size must be <= 4096"),
    case("experiment-config-rank-beyond-the-backbone", lambda env: ["experiment", "--out", "ex", "--config", str(
        _file(env.tmp / "exp.toml", "ranks = [100000]\n"))], "ranks must be <="),
    case("experiment-config-huge-epochs", lambda env: ["experiment", "--out", "ex", "--config", str(
        _file(env.tmp / "exp.toml", "[scratch]\nepochs = 100000000000\nlr = 0.01\nbatch_size = 16\npatience = 10\n"))],
         "must be <= 100000"),
    # --- class 9: an id that names a site and a region
    case("calibrate-site-and-region", lambda env: env.calibrate(
        "--site", "IA", data=env.data(frame=make_frame({"IA": "IA", "IA-002": "IA"}))),
         "'IA' is both a site and a region", "rename"),
    case("calibrate-site-and-region-of-equal-size", lambda env: env.calibrate(  # same row counts
        "--site", "IA", data=env.data(frame=make_frame({"IA": "IL", "IA-001": "IA"}))),
         "'IA' is both a site and a region"),
    case("evaluate-site-and-region", lambda env: env.evaluate(
        env.data(frame=make_frame({"IA": "IA", "IA-002": "IA"})), None, "--site", "IA"),
         "'IA' is both a site and a region"),
    # --- class 5: a name too long for the file system
    case("predict-out-name-too-long", lambda env: env.predict(out="p" * 300 + ".csv"), "File name too long"),
    case("evaluate-data-name-too-long", lambda env: env.evaluate(Path("d" * 300 + ".csv")), "File name too long"),
]


@pytest.mark.parametrize("spec", CASES)
@pytest.mark.usefixtures("isolated_globals")
def test_hostile_output_is_one_line_and_changes_nothing(spec: Case, tmp_path: Path, backbone_path: Path,
                                                         other_backbone_path: Path, adapters, monkeypatch) -> None:
    matrix.run_case(spec, tmp_path, backbone_path, other_backbone_path, adapters, monkeypatch)


def test_a_fifo_as_output_is_refused_without_opening_it(tmp_path: Path, backbone_path: Path) -> None:
    """Opening a FIFO for writing blocks until a reader comes: a subprocess with a timeout."""
    data = MEnv(tmp_path, backbone_path).data()
    fifo = tmp_path / "pred.csv"
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, "-m", "kgml_peft", "predict", "--data", str(data), "--backbone",
                          str(backbone_path), "--out", str(fifo), "--force", "--quiet", "--adapters",
                          str(tmp_path / "none")], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [f"error: {fifo} exists and is not a regular file; "
                                               "choose another output"], run.stderr


# --- missing folders are created, and removed again when the command fails ------------------


@pytest.mark.usefixtures("isolated_globals")
def test_missing_output_folders_are_created(tmp_path: Path, backbone_path: Path, adapter_path: Path,
                                            monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = MEnv(tmp_path, backbone_path, adapter_path)
    data = env.data()
    runner = _runner()
    calibrated = runner.invoke(cli, ["calibrate", "--data", str(data), "--backbone", str(backbone_path),
                                     "--out", "new/store", "--site", "IA-001", "--epochs", "1", "--cv", "none",
                                     "--quiet", "--plot", "figs/cal.png"])
    assert calibrated.exit_code == 0, calibrated.output
    assert read_adapter(tmp_path / "new" / "store" / "IA-001.safetensors").site == "IA-001"
    assert (tmp_path / "figs" / "cal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "new" / "store" / ".kgml-resume").exists()
    predicted = runner.invoke(cli, ["predict", "--data", str(data), "--backbone", str(backbone_path),
                                    "--out", "out/a/b/pred.csv", "--quiet", "--adapters", "new/store",
                                    "--site-column", "site"])
    assert predicted.exit_code == 0, predicted.output
    served = pd.read_csv(tmp_path / "out" / "a" / "b" / "pred.csv")
    assert set(served["site"]) == set(pd.read_csv(data)["site"]) and served["NEE"].notna().all()
    exported = runner.invoke(cli, ["adapters", "export", "new/store/IA-001.safetensors", "share/"])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "share" / "IA-001.safetensors").read_bytes() == \
        (tmp_path / "new" / "store" / "IA-001.safetensors").read_bytes()
    assert (tmp_path / "share" / "IA-001.txt").is_file()


@pytest.mark.usefixtures("isolated_globals")
def test_a_failed_command_leaves_no_new_folder(tmp_path: Path, backbone_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = MEnv(tmp_path, backbone_path)
    bad = env.data(lambda f: f.drop(columns=["GPP"]), name="bad.csv")
    before = _snapshot(tmp_path)
    for args in (["calibrate", "--data", str(bad), "--backbone", str(backbone_path), "--out", "new/store",
                  "--site", "IA-001", "--epochs", "1", "--quiet"],
                 ["predict", "--data", str(bad), "--backbone", str(backbone_path), "--out", "new/pred.csv",
                  "--quiet"]):
        result = _runner().invoke(cli, args, catch_exceptions=True)
        check_user_error(result, args, ("GPP",), tmp_path, before)
    assert not (tmp_path / "new").exists()


# --- class 5: a full disk --------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A 1 MiB tmpfs filled to the last byte (root only; skipped with the reason otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("disk-full cases need root to mount a small tmpfs")
    mount = tmp_path_factory.mktemp("full")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        with open(mount / "filler", "wb", buffering=0) as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 4096)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _full_cases(env: MEnv, full: Path) -> dict[str, list[str]]:
    data = env.data()
    return {
        "predict": env.predict("--force", data=data, out=str(full / "pred.csv")),
        "calibrate": env.calibrate("--site", "IA-001", "--cv", "none", data=data, out=full / "store"),
        "calibrate-into-the-disk": env.calibrate("--site", "IA-001", "--cv", "none", data=data, out=full),
        "synth": ["synth", "--out", str(full / "demo.csv"), "--max-sites-per-region", "1",
                  "--max-years-per-site", "1"],
        "export": ["adapters", "export", str(env.adapter), str(full) + "/"],
        "import": ["adapters", "import", str(env.adapter), "--store", str(full), "--backbone", str(env.backbone)],
        "fluxnet": env.import_fluxnet(out=str(full / "flux.parquet")),
    }


@pytest.mark.parametrize("command", ["predict", "calibrate", "calibrate-into-the-disk", "synth", "export",
                                     "import", "fluxnet"])
@pytest.mark.usefixtures("isolated_globals")
def test_a_full_disk_is_one_line_and_leaves_nothing(command: str, full_disk: Path, tmp_path: Path,
                                                    backbone_path: Path, adapter_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = MEnv(tmp_path, backbone_path, shutil.copyfile(adapter_path, tmp_path / "IA-001.safetensors"))
    args = _full_cases(env, full_disk)[command]
    before = _snapshot(tmp_path)
    result = _runner().invoke(cli, args, catch_exceptions=True)
    check_user_error(result, args, ("No space left on device",), tmp_path, before)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"], "a file or folder was left behind"


# --- class 9: output hygiene -----------------------------------------------------------------


def _hostile_adapter(adapter: Path, folder: Path, **fields: str) -> Path:
    """A copy of a valid adapter with unhashed metadata ``fields`` replaced, as someone else's
    tool could write them."""
    with safe_open(str(adapter), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    metadata.update(fields)
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / "IA-001.safetensors"), metadata=metadata)
    return folder / "IA-001.safetensors"


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in --json output"))


@pytest.mark.usefixtures("isolated_globals")
def test_metadata_cannot_print_a_line_of_its_own(tmp_path: Path, adapter_path: Path) -> None:
    path = _hostile_adapter(adapter_path, tmp_path / "store",
                            torch_version="2.13\nerror: this adapter is fine, ignore the checks\x1b[2K")
    shown = _runner().invoke(cli, ["adapters", "show", str(path)])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert not [line for line in lines if line.startswith("error")], lines
    assert any("torch 2.13\\nerror: this adapter" in line and "\\x1b[2K" in line for line in lines), lines
    assert "\x1b" not in shown.stdout
    for args in (["adapters", "show", str(path), "--json"], ["adapters", "list", "--store", str(path.parent), "--json"]):
        result = _runner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        _strict(result.stdout)  # the JSON encoder escapes the text: no line of its own, no raw escape
        assert "\x1b" not in result.stdout and not [line for line in result.stdout.splitlines()
                                                     if line.lstrip().startswith("error")]


@pytest.mark.usefixtures("isolated_globals")
def test_non_finite_metrics_are_refused_and_listings_stay_strict_json(tmp_path: Path, adapter_path: Path) -> None:
    """A NaN where a number belongs is refused on reading (class 8); listings mark the file and
    print strict JSON, with null for the size they cannot report."""
    path = _hostile_adapter(adapter_path, tmp_path / "store", metrics='{"before": {"loss": NaN}}')
    before = _snapshot(tmp_path)
    args = ["adapters", "show", str(path), "--json"]
    check_user_error(_runner().invoke(cli, args, catch_exceptions=True), args, ("before.loss", "finite"),
                     tmp_path, before)
    listed = _runner().invoke(cli, ["adapters", "list", "--store", str(path.parent), "--json"])
    assert listed.exit_code == 0, listed.output
    [row] = _strict(listed.stdout)
    assert row["kind"] == "unreadable" and "before.loss" in row["error"], row


@pytest.mark.usefixtures("isolated_globals")
def test_json_reports_are_strict(tmp_path: Path, backbone_path: Path, monkeypatch) -> None:
    """``evaluate --json`` on a table where R^2 is undefined (constant observations) and metrics
    are missing: strict JSON, with null where a number cannot be given."""
    monkeypatch.chdir(tmp_path)
    frame = make_frame()
    frame["NEE"] = 1.0  # no variance: R^2 undefined
    data = MEnv(tmp_path, backbone_path).data(frame=frame)
    result = _runner().invoke(cli, ["evaluate", "--data", str(data), "--backbone", str(backbone_path), "--json"])
    assert result.exit_code == 0, result.output
    report = _strict(result.stdout)
    assert "null" in result.stdout and report


def test_json_ready_keeps_finite_values_and_nulls_the_rest() -> None:
    from kgml_peft.text import json_ready, printable

    import numpy as np

    data = {"a": [1, 2.5, float("inf"), -float("inf"), float("nan")], "b": np.float32(0.5),
            "c": np.array([1.0, np.nan]), "d": (Path("x"), None, True), 3: "k"}
    assert json_ready(data) == {"a": [1, 2.5, None, None, None], "b": 0.5, "c": [1.0, None],
                                "d": ["x", None, True], "3": "k"}
    assert math.isclose(json.loads(json.dumps(json_ready(data), allow_nan=False))["b"], 0.5)
    assert printable("a\nb\tc\x00\x1b") == "a\\nb\\tc\\x00\\x1b"
    assert printable("Ne3 ✓ café") == "Ne3 ✓ café"


# --- issue 21: progress bars only on a terminal ------------------------------------------------


@pytest.mark.usefixtures("isolated_globals")
def test_progress_bars_only_on_a_terminal_or_when_asked(tmp_path: Path, backbone_path: Path, monkeypatch) -> None:
    """The test runner's stderr is not a terminal (like a log file): no bars unless --progress."""
    monkeypatch.chdir(tmp_path)
    data = MEnv(tmp_path, backbone_path).data()
    args = ["calibrate", "--site", "IA-001", "--data", str(data), "--backbone", str(backbone_path),
            "--epochs", "2", "--cv", "none", "--force"]
    plain = _runner().invoke(cli, [*args, "--out", "a"])
    assert plain.exit_code == 0, plain.output
    assert "%|" not in plain.stderr and "\r" not in plain.stderr, plain.stderr
    asked = _runner().invoke(cli, ["--progress", *args, "--out", "b"])
    assert asked.exit_code == 0, asked.output
    assert "%|" in asked.stderr, asked.stderr
    quiet = _runner().invoke(cli, ["--progress", *args, "--out", "c", "--quiet"])
    assert quiet.exit_code == 0 and "%|" not in quiet.stderr, quiet.stderr
    a, b = (read_adapter(tmp_path / d / "IA-001.safetensors").tensors for d in ("a", "b"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)  # bars change nothing
