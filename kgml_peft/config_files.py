"""Reading TOML run configs (pretraining, calibration) into plain dicts with one-line errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kgml_peft.errors import KgmlPeftError
from kgml_peft.readable import check_regular_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def read_toml(path: str | os.PathLike) -> dict:
    """The contents of a TOML file; a missing or unparsable file is a :class:`KgmlPeftError`."""
    source = Path(path)
    check_regular_file(source, "config file")
    try:
        return tomllib.loads(source.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KgmlPeftError(f"cannot parse {source}: {exc}") from None


def check_keys(data: dict, known: set[str] | frozenset[str], what: str) -> None:
    """Raise if ``data`` has a key outside ``known`` (a typo in a config should not pass)."""
    extra = set(data) - set(known)
    if extra:
        raise KgmlPeftError(f"unknown {what} key {sorted(extra)[0]!r}")
