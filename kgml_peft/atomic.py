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
from collections.abc import Iterator, Sequence
from pathlib import Path

from kgml_peft.errors import KgmlPeftError, os_cause


def check_writable_target(path: str | os.PathLike) -> Path:
    """Check that ``path`` can be written as a file: it is not a folder or a special file (a FIFO
    would block), and its nearest existing folder is a writable folder. Missing folders are fine:
    :func:`atomic_path` creates them when it writes."""
    target = Path(path)
    if target.is_dir():
        raise KgmlPeftError(f"{target} is a directory, expected a file path")
    if target.exists() and not target.is_file():  # links followed: a link to a FIFO too
        raise KgmlPeftError(f"{target} exists and is not a regular file; choose another output")
    _, folder = _missing_folders(target.parent if str(target.parent) else Path("."))
    if not folder.is_dir():
        raise KgmlPeftError(f"output folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KgmlPeftError(f"output folder {folder} is not writable")
    return target


def check_output_folder(path: str | os.PathLike) -> Path:
    """Check that ``path`` can be an output folder: an existing folder, or a new one whose nearest
    existing parent is a writable folder (the caller creates it, parents included)."""
    folder = Path(path)
    if os.path.lexists(folder) and not folder.is_dir():
        raise KgmlPeftError(f"{folder} is not a folder")
    check_writable_target(folder / "-")  # the nearest existing folder on the way is writable
    return folder


def check_outputs(outputs: Sequence[str | os.PathLike], inputs: Sequence[str | os.PathLike] = (),
                  force: bool = False) -> list[Path]:
    """The one check every output path goes through, before any work is done.

    Refused, with a one-line :class:`KgmlPeftError`: an output that is one of the command's
    ``inputs`` or another output (compared after resolving links and relative paths), even with
    ``force``; an existing output without ``force``; an output that is a folder or a special file,
    or whose nearest existing folder is not a writable folder. Missing folders are allowed (the
    write creates them). Returns the outputs as paths.
    """
    seen: dict[Path, str] = {_real(source): f"the input {source}" for source in inputs}
    checked = []
    for output in outputs:
        target = Path(output)
        resolved = _real(target)
        if resolved in seen:
            raise KgmlPeftError(f"output {target} is {seen[resolved]}; write to another file")
        seen[resolved] = f"also the output {target}"
        check_writable_target(target)
        if os.path.lexists(target) and not force:
            raise KgmlPeftError(f"{target} exists; pass --force to replace it")
        checked.append(target)
    return checked


def _real(path: str | os.PathLike) -> Path:
    """``path`` with links and relative parts resolved; a link loop stays as it is (where
    ``Path.resolve`` would raise)."""
    return Path(os.path.realpath(path))


def _missing_folders(folder: Path) -> tuple[list[Path], Path]:
    """The folders on the way to ``folder`` that do not exist yet (outermost first), and the
    nearest one that does (or the root)."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1], folder


def make_folders(folder: str | os.PathLike) -> list[Path]:
    """Create ``folder`` and its missing parents; return the folders created, outermost first.
    If one cannot be made (a name too long, a full disk), those made so far are removed again."""
    missing, _ = _missing_folders(Path(folder))
    created = []
    for path in missing:
        try:
            path.mkdir()
        except FileExistsError:  # another process (a launched run's peer) made it first
            continue
        except OSError as exc:
            remove_empty(created)
            raise KgmlPeftError(f"cannot create the folder {path}: {write_failure(exc)}") from None
        created.append(path)
    return created


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove folders made by :func:`make_folders` for a write that failed, innermost first, as
    long as they are still empty."""
    for path in reversed(folders):
        with contextlib.suppress(OSError):
            path.rmdir()


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


def write_failure(exc: BaseException) -> str | None:
    """The operating system's reason a write failed (a full disk, a quota, a name too long ...),
    or None when ``exc`` is not such a failure. safetensors reports these in its own exception
    type, with the OS message inside."""
    if isinstance(exc, OSError):
        return os_cause(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        return text.split("I/O error:", 1)[1].strip()
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Missing folders on the way are created. If the body raises, the temporary file and the folders
    it created are removed and ``path`` is left as it was.
    """
    target = check_writable_target(path)
    created = make_folders(target.parent)
    sweep_stale_temporaries(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{socket.gethostname()}-{os.getpid()}.",
                                        suffix=".tmp", dir=target.parent)
    except OSError as exc:  # a full disk, a name too long for the file system ...
        remove_empty(created)
        raise KgmlPeftError(f"cannot write {target}: {write_failure(exc)}") from None
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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        remove_empty(created)
        cause = write_failure(exc)
        if cause is None or getattr(exc, "filename", None) not in (None, str(tmp), str(target)):
            raise  # not this write's failure (e.g. a source read while writing): the caller names it
        raise KgmlPeftError(f"cannot write {target}: {cause}; nothing was written") from None
