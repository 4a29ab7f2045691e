"""The GRU day loops from C++: built once per machine on first use, else the Python loops.

:mod:`kgml_peft.model.recurrence` runs a GRU layer as a loop over days of five small ATen ops
forward and four backward. From Python every op also pays an interpreter round trip, about a
fifth of the loop at the batch sizes of calibration and serving on a CPU (docs/scaling.md).
``day_loop.cpp`` makes the same ATen calls in the same order from C++, so its results are the
Python loop's to the last bit, whichever path a machine takes.

torch builds it (:func:`torch.utils.cpp_extension.load`, which needs a C++ compiler and ninja) into
its extension cache, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``: the first process
of a machine compiles (about 30 s on 2 CPU cores), later ones load the cached build in
milliseconds. Where building fails (no compiler, no writable cache), one warning says why and the
Python loops run: slower, same numbers. ``KGML_PEFT_NATIVE=0`` in the environment, or
:func:`enabled`, turns it off.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

#: the C++ source, shipped with the package
SOURCE = Path(__file__).with_name("day_loop.cpp")
#: ``KGML_PEFT_NATIVE=0`` (or ``false``, ``no``, ``off``) keeps every process on the Python loops
ENVIRONMENT = "KGML_PEFT_NATIVE"
#: a build lock older than this was left by a process that died while building (a build takes
#: about 30 s on 2 CPU cores); it is removed
STALE_LOCK_SECONDS = 600


@dataclass(frozen=True)
class NativeStatus:
    """What :func:`extension` found: whether the C++ loops run, the seconds it took to build or
    load them (None before the first try), and why not where they do not."""

    available: bool
    seconds: float | None
    reason: str | None


_lock = threading.Lock()
_module: ModuleType | None = None
_status: NativeStatus | None = None
#: a ``with enabled(...)`` block's choice in this thread (None: the environment's)
_enabled: contextvars.ContextVar[bool | None] = contextvars.ContextVar("kgml_peft_native", default=None)


def _turned_on() -> bool:
    """This thread's :func:`enabled` choice, else the environment's (on unless ``KGML_PEFT_NATIVE=0``)."""
    chosen = _enabled.get()
    if chosen is not None:
        return chosen
    return os.environ.get(ENVIRONMENT, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """Within the block, in this thread, run the C++ loops (``True``, where they build) or the
    Python loops (``False``); tests and benchmarks compare the two this way."""
    token = _enabled.set(bool(flag))
    try:
        yield
    finally:
        _enabled.reset(token)


def _name() -> str:
    """The build's name: the source, the torch build and the Python it is compiled against, so a
    changed source or another torch or Python never loads an old build."""
    key = SOURCE.read_bytes() + f"{torch.__version__} {sys.version}".encode()
    return f"kgml_peft_day_loop_{hashlib.sha256(key).hexdigest()[:12]}"


def build_directory() -> Path:
    """Where the build goes: torch's extension cache (``$TORCH_EXTENSIONS_DIR``, else
    ``~/.cache/torch_extensions``), a folder per build name."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / _name()


def remove_stale_lock(lock: Path) -> bool:
    """Remove torch's build lock ``lock`` if it is older than :data:`STALE_LOCK_SECONDS`: a process
    killed while building leaves it behind, and every later build would wait on it forever.
    Whether it was removed."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
            return True
    except OSError:  # no lock, or another process removed it first
        pass
    return False


def _build() -> ModuleType:
    # imported here: cpp_extension pulls in setuptools, which a process that never runs a day
    # loop need not pay for
    from torch.utils import cpp_extension

    name, folder = _name(), build_directory()
    remove_stale_lock(folder / "lock")
    if not (folder / f"{name}.so").exists():
        print("kgml-peft: compiling the GRU day loop (once per machine and torch build, about "
              f"30 s; {ENVIRONMENT}=0 skips it)", file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name, sources=[str(SOURCE)], extra_cflags=["-O3"],
                              build_directory=str(folder), verbose=False)


def extension() -> ModuleType | None:
    """The built C++ loops, or None where they are turned off or cannot be built (the first call
    of a process builds or loads them; a failure warns once and is not retried)."""
    global _module, _status
    if not _turned_on():
        return None
    if _status is not None:
        return _module
    with _lock:
        if _status is None:
            start = time.perf_counter()
            try:
                _module = _build()
                _status = NativeStatus(True, time.perf_counter() - start, None)
            except Exception as error:  # noqa: BLE001 - any build failure means: run the Python loops
                reason = " ".join(str(error).split())[:300] or type(error).__name__
                _status = NativeStatus(False, time.perf_counter() - start, reason)
                warnings.warn(f"kgml-peft: the C++ GRU day loop could not be built, the Python loop "
                              f"runs instead (same results, slower): {reason}", RuntimeWarning, stacklevel=2)
    return _module


def status() -> NativeStatus:
    """Whether the C++ loops run in this process, trying to build or load them first (unless
    turned off: then unavailable with the reason)."""
    if not _turned_on():
        return NativeStatus(False, None, f"turned off ({ENVIRONMENT}=0 or enabled(False))")
    extension()
    assert _status is not None
    return _status
