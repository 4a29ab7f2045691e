"""Text that leaves the toolkit: untrusted strings made safe to print, values made valid JSON.

Adapter files and tables come from other people. Their strings (a version field, a site's
metadata, an error message that quotes them) may hold newlines or terminal control characters,
which would let a file print a fake ``error:`` line or rewrite the terminal. Python's ``json``
writes non-finite floats as bare ``NaN``/``Infinity``, which is not JSON.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np


def printable(text: object) -> str:
    """``text`` on one line: every non-printable character (newline, tab, escape, NUL ...)
    written as its backslash escape, so nothing it holds can start a line of its own."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in str(text))


def json_ready(value: object) -> object:
    """``value`` as plain JSON data: non-finite floats become ``None`` (null), numpy scalars and
    arrays become numbers and lists, tuples become lists, paths and other objects strings."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_ready(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)
