"""Atomic file writes: write to a temporary file in the target folder, then rename over the target.

A reader (or a crash) therefore sees either the old file or the complete new one, never a half
written file. ``os.replace`` is atomic on POSIX and Windows when both paths are on one file system,
which is why the temporary file lives next to the target.

A writer killed outright (SIGKILL, power loss) cannot remove its temporary file. Temporary names
carry the writer's host and process id, ``.<name>.<host>-<pid>.<random>.tmp``, and the next write
to the same target removes those left by processes of this host that no longer run, once they are
older than ``STALE_AFTER_S`` (a write takes well under a second; the age also protects a live
writer whose process id this process cannot see, e.g. in another PID namespace).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kgml_peft.errors import KgmlPeftError


def check_writable_target(path: str | os.PathLike) -> Path:
    """Check that ``path`` can be written as a file: its folder exists and it is not a folder."""
    target = Path(path)
    if target.is_dir():
        raise KgmlPeftError(f"{target} is a directory, expected a file path")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise KgmlPeftError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise KgmlPeftError(f"output folder {folder} is not writable")
    return target


def check_not_inputs(targets: list[str | os.PathLike], inputs: list[str | os.PathLike]) -> None:
    """Refuse outputs that are an input file or repeat another output (compared after resolving
    links and relative paths)."""
    seen: dict[Path, str] = {}
    for source in inputs:
        seen[Path(source).resolve()] = f"the input {source}"
    for target in targets:
        resolved = Path(target).resolve()
        if resolved in seen:
            raise KgmlPeftError(f"output {target} is {seen[resolved]}; write to another file")
        seen[resolved] = f"also the output {target}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: A temporary file this old, of a process that no longer runs, is a killed writer's leftover.
STALE_AFTER_S = 600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by another user (or cannot tell: keep its file)
    return True


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of writes to ``path`` whose writer (a process of this host) is
    gone and that are older than ``STALE_AFTER_S``; return what was removed. Temporaries of live
    writers and other hosts are kept."""
    target = Path(path)
    host, removed, now = socket.gethostname(), [], time.time()
    prefix = f".{target.name}."
    for candidate in target.parent.glob(".*.tmp"):
        name = candidate.name
        if not name.startswith(prefix):
            continue
        writer = name[len(prefix):-len(".tmp")].rsplit(".", 1)[0]
        owner, _, pid = writer.rpartition("-")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                if now - candidate.stat().st_mtime < STALE_AFTER_S:
                    continue
                candidate.unlink()
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    If the body raises, the temporary file is removed and ``path`` is left as it was.
    """
    target = check_writable_target(path)
    sweep_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{socket.gethostname()}-{os.getpid()}.",
                                    suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file 0600; give the result the mode a plain open() would (or keep the
    # mode of the file it replaces), so shared checkpoints and tables stay readable. Set again
    # after the body: writers that recreate the file (safetensors' save_file) drop the mode.
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
    os.chmod(tmp, mode)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
