"""Inputs that are not regular files (issue 20, classes 3 and 4), through the real command line.

A FIFO opened for reading blocks until someone writes to it, so before the fix
``mkfifo store/X.safetensors; kgml-peft adapters list`` hung for ever; a directory, a socket, a
device, a broken link or a link loop gave a traceback or a misleading message. Each row puts one
such thing where a command expects a file (adapter, backbone, store entry, data table, TOML
config, FLUXNET file, training state) and checks: exit code 2, exactly one ``error: ...`` line
naming the path and what it is, nothing on stdout, no traceback, nothing created, every file that
was there before byte for byte the same (and with the same modification time).

Listings go on past bad entries: ``adapters list`` marks each as unreadable with the reason, the
neighbour search of ``adapters blend`` and ``predict --site-column`` skip entries they do not need.

Because a regression would hang, every row runs in one child interpreter (the real ``cli`` under
click's runner, one case after another, a per-case alarm) under a ``timeout``; the child prints
each case's id before running it, so a hang names its case. Two more tests run the installed
entry point (``python -m kgml_peft``) on a FIFO store entry and a FIFO adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kgml_peft.store.adapter import save_adapter
from kgml_peft.store.checkpoint import load_backbone
from tests.conftest import make_frame, random_adapter

ROOT = Path(__file__).resolve().parents[1]
FLUX_NAME = "FLX_US-Ne1_FLUXNET2015_FULLSET_DD_2001-2012_1-3.csv"
PER_CASE_S = 20  # the child's alarm for one case
ALL_CASES_S = 240  # the child's whole run: a regression that hangs in several cases ends here
LOCATIONS = {"IA-001": (41.98, -93.69), "IL-001": (40.06, -88.20)}

# --- things that are not regular files ------------------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


def _socket(path: Path) -> None:
    """A bound (then closed) UNIX socket; bound by its bare name from its folder, since the
    absolute path may be longer than a socket address may be."""
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(here)


def _device(path: Path) -> None:
    path.symlink_to("/dev/null")  # a character device (through a link: links are followed)


def _loop(path: Path) -> None:
    path.symlink_to(path.name)  # a link to itself


def _dangling(path: Path) -> None:
    path.symlink_to("gone.safetensors")


KINDS: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (_fifo, "is a FIFO"),
    "dir": (_directory, "is a directory"),
    "socket": (_socket, "is a socket"),
    "device": (_device, "is a character device"),
    "loop": (_loop, "is a symbolic link loop"),
    "dangling": (_dangling, "is a broken link"),
}

# --- where a command reads a file -------------------------------------------------------------


@dataclass
class HEnv:
    """One case's folder (the command's working directory) and the shared valid inputs."""

    dir: Path
    shared: Path

    @property
    def bb(self) -> str:
        return str(self.shared / "bb.safetensors")

    @property
    def data(self) -> str:
        return str(self.shared / "data.csv")

    def good(self, site: str) -> Path:
        return self.shared / f"{site}.safetensors"

    def folder(self, name: str) -> str:
        (self.dir / name).mkdir(exist_ok=True)
        return name

    def store(self, bad: dict[str, str] | None = None, good: tuple[str, ...] = ("IA-001", "IL-001")) -> str:
        """``store/`` with copies of the valid adapters of ``good`` and, for each ``name: kind``
        of ``bad``, that kind of thing as ``name.safetensors``."""
        folder = self.dir / self.folder("store")
        for site in good:
            shutil.copyfile(self.good(site), folder / f"{site}.safetensors")
        for name, kind in (bad or {}).items():
            KINDS[kind][0](folder / f"{name}.safetensors")
        return "store"

    def calibrate(self, *extra: str) -> list[str]:
        (self.dir / "adapters").mkdir(exist_ok=True)
        return ["calibrate", "--data", self.data, "--backbone", self.bb, "--out", "adapters", "--site",
                "IA-001", "--epochs", "1", "--quiet", "--cpu", *extra]

    def predict(self, *extra: str, data: str | None = None, backbone: str | None = None) -> list[str]:
        return ["predict", "--data", data or self.data, "--backbone", backbone or self.bb, "--out",
                "pred.csv", "--quiet", "--cpu", *extra]


@dataclass(frozen=True)
class Slot:
    """A place a command reads a file: where the hostile thing goes (relative to the case's
    folder), the command line that reads it, and how the error names that file."""

    where: str
    args: Callable[[HEnv, str], list[str]]
    what: str


SLOTS: dict[str, Slot] = {
    "show": Slot("X.safetensors", lambda e, p: ["adapters", "show", p], "adapter"),
    "verify": Slot("X.safetensors", lambda e, p: ["adapters", "verify", p, "--backbone", e.bb], "adapter"),
    "import": Slot("X.safetensors", lambda e, p: ["adapters", "import", p, "--store", e.store(),
                                                  "--backbone", e.bb], "adapter"),
    "export": Slot("X.safetensors", lambda e, p: ["adapters", "export", p, e.folder("share") + "/",
                                                  "--backbone", e.bb], "adapter"),
    "predict-site": Slot("store/XX-1.safetensors",
                         lambda e, p: e.predict("--site", "XX-1", "--adapters", e.store()), "adapter"),
    "predict-backbone": Slot("bb.safetensors", lambda e, p: e.predict(backbone=p), "backbone"),
    "evaluate-backbone": Slot("bb.safetensors", lambda e, p: ["evaluate", "--data", e.data, "--backbone", p],
                              "backbone"),
    "backbone-show": Slot("bb.safetensors", lambda e, p: ["backbone", "show", p], "backbone"),
    "verify-backbone": Slot("bb.safetensors", lambda e, p: ["adapters", "verify", str(e.good("IA-001")),
                                                            "--backbone", p], "backbone"),
    "evaluate-data": Slot("data.csv", lambda e, p: ["evaluate", "--data", p, "--backbone", e.bb], "data file"),
    "predict-data": Slot("data.csv", lambda e, p: e.predict(data=p), "data file"),
    "calibrate-config": Slot("calib.toml", lambda e, p: e.calibrate("--config", p), "config file"),
    "fluxnet-file": Slot(FLUX_NAME, lambda e, p: ["import", "fluxnet", p, "--out", "flux.csv"], "FLUXNET file"),
    "fluxnet-folder": Slot(f"towers/{FLUX_NAME}", lambda e, p: ["import", "fluxnet", "towers", "--out",
                                                                "flux.csv"], "FLUXNET file"),
    "calibrate-resume": Slot("adapters/.kgml-resume/IA-001.safetensors",
                             lambda e, p: e.calibrate("--resume"), "training state"),
}

# Which kinds go in which slots: a FIFO everywhere; the other kinds where each reader starts.
# (A broken link or a link loop as the training state is "no state yet": the run starts over.)
MATRIX = {
    "fifo": list(SLOTS),
    "dir": ["show", "predict-site", "backbone-show", "evaluate-data", "calibrate-config", "fluxnet-folder",
            "calibrate-resume"],
    "socket": ["verify", "predict-backbone", "predict-data", "calibrate-config", "fluxnet-file"],
    "device": ["show", "evaluate-backbone", "evaluate-data", "calibrate-config", "fluxnet-file",
               "calibrate-resume"],
    "loop": ["show", "verify", "import", "predict-site", "backbone-show", "evaluate-data", "calibrate-config",
             "fluxnet-folder"],
    "dangling": ["show", "export", "predict-site", "verify-backbone", "predict-data", "calibrate-config",
                 "fluxnet-file"],
}


@dataclass(frozen=True)
class Case:
    """One row: ``setup`` builds the case's folder and returns the command line; an error row
    expects the words of ``expect`` in its one line, a success row is checked by ``check``."""

    id: str
    setup: Callable[[HEnv], list[str]]
    expect: tuple[str, ...] = ()
    check: Callable[[dict, Path], None] | None = None


def _matrix_case(kind: str, slot_name: str) -> Case:
    slot = SLOTS[slot_name]
    make, words = KINDS[kind]

    def setup(env: HEnv) -> list[str]:
        path = env.dir / slot.where
        path.parent.mkdir(parents=True, exist_ok=True)
        args = slot.args(env, slot.where)  # builds the store first (a slot inside it)
        make(path)
        return args

    return Case(f"{slot_name}-{kind}", setup, (f"{slot.what} ", Path(slot.where).name, words))


# --- rows beyond the matrix: listings go on, commands that need the entry stop ------------------

BAD_ENTRIES = {"ZZ-fifo": "fifo", "ZZ-dir": "dir", "ZZ-loop": "loop", "ZZ-dangling": "dangling",
               "ZZ-socket": "socket"}


def _lines(result: dict) -> list[str]:
    return result["stdout"].splitlines()


def _check_listing(result: dict, folder: Path) -> None:
    lines = _lines(result)
    for site in ("IA-001", "IL-001"):
        assert any(line.startswith(f"{site}.safetensors") and f" {site} " in line for line in lines), lines
    for name, kind in BAD_ENTRIES.items():
        row = [line for line in lines if line.startswith(f"{name}.safetensors")]
        assert len(row) == 1 and "unreadable: adapter store/" in row[0] and KINDS[kind][1] in row[0], lines
    assert len(lines) == 1 + 2 + len(BAD_ENTRIES), lines  # the header, two adapters, the bad entries


def _check_listing_json(result: dict, folder: Path) -> None:
    rows = {row["file"]: row for row in json.loads(result["stdout"])}
    assert {rows[f"{s}.safetensors"]["kind"] for s in ("IA-001", "IL-001")} == {"adapter"}
    for name, kind in BAD_ENTRIES.items():
        row = rows[f"{name}.safetensors"]
        assert row["kind"] == "unreadable" and row["bytes"] is None and KINDS[kind][1] in row["error"], row
    assert len(rows) == 2 + len(BAD_ENTRIES)


def _show_link(env: HEnv) -> list[str]:
    """Links are followed: one to a real adapter is fine."""
    (env.dir / "ln.safetensors").symlink_to(env.good("IA-001"))
    return ["adapters", "show", "ln.safetensors"]


def _check_shown(result: dict, folder: Path) -> None:
    assert "kgml-peft adapter for site IA-001" in result["stdout"], result


def _check_predicted(result: dict, folder: Path) -> None:
    assert (folder / "pred.csv").stat().st_size > 0 and "pred.csv" in result["stdout"], result


def _check_blend(result: dict, folder: Path) -> None:
    assert (folder / "blends" / "BL-1.safetensors").is_file(), result
    assert "IA-001" in result["stdout"] and "IL-001" in result["stdout"], result


EXTRA = [
    Case("list-goes-on-past-bad-entries", lambda e: ["adapters", "list", "--store", e.store(BAD_ENTRIES)],
         check=_check_listing),
    Case("list-json-goes-on-past-bad-entries",
         lambda e: ["adapters", "list", "--json", "--store", e.store(BAD_ENTRIES)], check=_check_listing_json),
    Case("show-link-to-a-regular-file", _show_link, check=_check_shown),
    Case("predict-site-column-skips-unneeded-bad-entries",
         lambda e: e.predict("--site-column", "site", "--adapters", e.store(BAD_ENTRIES)), check=_check_predicted),
    Case("blend-neighbour-search-skips-bad-entries",
         lambda e: ["adapters", "blend", "--lat", "41.0", "--lon", "-91.0", "--name", "BL-1", "--k", "2",
                    "--store", e.store(BAD_ENTRIES), "--out", "blends", "--backbone", e.bb],
         check=_check_blend),
    # a needed entry that is broken: the backbone must not silently stand in for its adapter
    Case("predict-site-column-needed-entry-dangling",
         lambda e: e.predict("--site-column", "site", "--adapters", e.store({"IL-001": "dangling"}, ("IA-001",))),
         ("adapter store/IL-001.safetensors", "is a broken link")),
    Case("predict-site-column-needed-entry-fifo",
         lambda e: e.predict("--site-column", "site", "--adapters", e.store({"IL-001": "fifo"}, ("IA-001",))),
         ("adapter store/IL-001.safetensors", "is a FIFO")),
    Case("verify-store-entry-loop",
         lambda e: ["adapters", "verify", e.store({"ZZ-loop": "loop"}) + "/ZZ-loop.safetensors", "--backbone", e.bb],
         ("adapter store/ZZ-loop.safetensors", "is a symbolic link loop")),
]

CASES = [_matrix_case(kind, slot) for kind, slots in MATRIX.items() for slot in slots] + EXTRA

# --- running the cases in a child interpreter ------------------------------------------------

CHILD = r"""
import json, os, signal, sys, traceback
from click.testing import CliRunner
from kgml_peft.cli import cli

def hung(signum, frame):
    raise TimeoutError("the case did not finish within the alarm")

signal.signal(signal.SIGALRM, hung)
try:
    runner = CliRunner(mix_stderr=False)
except TypeError:  # click 8.2+ keeps stderr apart anyway
    runner = CliRunner()
for item in json.load(sys.stdin):
    print(json.dumps({"start": item["id"]}), flush=True)
    os.chdir(item["cwd"])
    signal.alarm(item["alarm"])
    result = runner.invoke(cli, item["args"], catch_exceptions=True)
    signal.alarm(0)
    exc = result.exception
    crash = None if exc is None or isinstance(exc, SystemExit) else "".join(traceback.format_exception(exc))
    print(json.dumps({"id": item["id"], "exit": result.exit_code, "stdout": result.stdout,
                      "stderr": result.stderr, "crash": crash}), flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` without opening anything but regular files (reading a FIFO
    would block the test itself): bytes and modification time of files, targets of links, the
    kind of everything else."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = os.lstat(path)
            key = str(path.relative_to(root))
            if stat.S_ISREG(info.st_mode):
                found[key] = ("file", path.read_bytes(), info.st_mtime_ns)
            elif stat.S_ISLNK(info.st_mode):
                found[key] = ("link", os.readlink(path), info.st_mtime_ns)
            else:
                found[key] = (stat.S_IFMT(info.st_mode),)
    return found


@dataclass
class Outcome:
    """One case: its command line, folder, the folder's snapshot before, and the child's record."""

    args: list[str]
    folder: Path
    before: dict
    result: dict | None = None


@dataclass
class Run:
    """Every case's outcome, the shared inputs' folder, whether they were left alone, and where
    the child was when it ended (for a hang)."""

    cases: dict[str, Outcome]
    shared: Path
    shared_same: bool
    child: str


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, backbone_path: Path) -> Run:
    """Set every case's folder up, run all cases in one child interpreter, and return what each
    did (see :class:`Run`)."""
    root = tmp_path_factory.mktemp("hostile")
    shared = root / "shared"
    shared.mkdir()
    shutil.copyfile(backbone_path, shared / "bb.safetensors")
    backbone = load_backbone(shared / "bb.safetensors")
    for seed, (site, (lat, lon)) in enumerate(LOCATIONS.items()):
        adapter = random_adapter(backbone, site, seed=seed)
        adapter.info["data"] = {"location": {"lat": lat, "lon": lon, "sites": 1, "extent_km": 0.0}}
        save_adapter(shared / f"{site}.safetensors", adapter)
    make_frame().to_csv(shared / "data.csv", index=False, date_format="%Y-%m-%d")

    found: dict[str, Outcome] = {}
    for spec in CASES:
        env = HEnv(root / spec.id, shared)
        env.dir.mkdir()
        args = spec.setup(env)
        found[spec.id] = Outcome(args, env.dir, _snapshot(env.dir))
    shared_before = _snapshot(shared)
    items = [{"id": s.id, "cwd": str(found[s.id].folder), "args": found[s.id].args, "alarm": PER_CASE_S}
             for s in CASES]
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(items), capture_output=True,
                              text=True, timeout=ALL_CASES_S, env=_env(), cwd=root)
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = f"the child timed out after {ALL_CASES_S} s"
    started = None
    for line in out.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        else:
            found[record["id"]].result = record
    return Run(found, shared, _snapshot(shared) == shared_before,
               f"last case started: {started}; child stderr: {err[-2000:]}")


@pytest.mark.parametrize("spec", [c for c in CASES if c.check is None], ids=lambda c: c.id)
def test_not_a_regular_file_is_one_line(spec: Case, outcomes: Run) -> None:
    got = outcomes.cases[spec.id]
    result = got.result
    assert result is not None, f"{spec.id} never finished (hung?): {outcomes.child}"
    detail = f"args={got.args}\n{result}"
    assert result["crash"] is None, detail
    assert result["exit"] == 2, detail
    assert "Traceback" not in result["stdout"] + result["stderr"], detail
    lines = result["stderr"].splitlines()
    assert len(lines) == 1 and result["stderr"].endswith("\n") and lines[0].startswith("error: "), detail
    for word in spec.expect:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}\n{detail}"
    assert result["stdout"] == "", detail
    assert _snapshot(got.folder) == got.before, "the command created, removed or changed files"
    assert outcomes.shared_same, "a shared input changed"


@pytest.mark.parametrize("spec", [c for c in CASES if c.check is not None], ids=lambda c: c.id)
def test_listings_go_on_past_bad_entries(spec: Case, outcomes: Run) -> None:
    got = outcomes.cases[spec.id]
    result = got.result
    assert result is not None, f"{spec.id} never finished (hung?): {outcomes.child}"
    detail = f"args={got.args}\n{result}"
    assert result["crash"] is None and result["exit"] == 0 and result["stderr"] == "", detail
    spec.check(result, got.folder)
    after = _snapshot(got.folder)
    new = set(after) - set(got.before)
    assert {k: v for k, v in after.items() if k not in new} == got.before, "an earlier file changed"
    assert all(k in ("pred.csv", "blends", "blends/BL-1.safetensors") for k in new), new


def test_matrix_covers_every_reader() -> None:
    assert set(MATRIX["fifo"]) == set(SLOTS) and set(MATRIX) == set(KINDS)
    assert all(slot in SLOTS for slots in MATRIX.values() for slot in slots)
    assert len({c.id for c in CASES}) == len(CASES) >= 50


# --- the installed entry point, in its own process ----------------------------------------------


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kgml_peft", *args], capture_output=True, text=True,
                          timeout=60, env=_env(), cwd=cwd)


def test_entry_point_fifo_store_and_adapter(outcomes: Run, tmp_path: Path) -> None:
    """``mkfifo store/X.safetensors; kgml-peft adapters list`` lists the rest; ``adapters show``
    of that FIFO is one line."""
    shared = outcomes.shared
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(shared / "IA-001.safetensors", store / "IA-001.safetensors")
    os.mkfifo(store / "X.safetensors")
    before = _snapshot(tmp_path)

    listed = _run(["adapters", "list", "--store", "store"], tmp_path)
    assert listed.returncode == 0 and listed.stderr == "", listed
    rows = listed.stdout.splitlines()
    assert rows[1].startswith("IA-001.safetensors") and " IA-001 " in rows[1], rows
    assert rows[2] == ("X.safetensors               unreadable: adapter store/X.safetensors is a FIFO "
                       "(named pipe), not a regular file"), rows

    shown = _run(["adapters", "show", "store/X.safetensors"], tmp_path)
    assert shown.returncode == 2 and shown.stdout == "", shown
    assert shown.stderr == "error: adapter store/X.safetensors is a FIFO (named pipe), not a regular file\n"
    assert _snapshot(tmp_path) == before
