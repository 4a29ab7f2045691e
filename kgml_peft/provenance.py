"""Where a results file came from: the toolkit's commit, the date and the versions that made it.

Every results JSON (``kgml-peft experiment``, ``kgml-peft bench``) carries this record next to its
config, so a table in docs/ can be traced to the code that produced it.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch

from kgml_peft import __version__


def git_commit(where: Path = Path(__file__).resolve().parent) -> dict[str, object]:
    """The git commit of the checkout holding ``where`` and whether tracked files differ from it
    (``{"commit": None}`` outside a git checkout, e.g. an installed wheel)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def provenance() -> dict[str, object]:
    """The record stored as ``provenance`` in a results JSON: commit (and whether the checkout had
    uncommitted changes), UTC date and time, toolkit, torch and Python versions."""
    return {**git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "toolkit_version": __version__, "torch": torch.__version__, "python": platform.python_version()}
