"""Refusing inputs that are not regular files, before anything opens them.

Opening a FIFO blocks until another process writes to it (a command would hang for ever), a
device can be endless, and a directory, a socket, a broken link or a link loop fails deep inside
a reader with an OS error. Every file a user names (adapter, backbone, table, TOML config,
training state, FLUXNET file) passes :func:`check_regular_file` first, after following links, so
such an input is one :class:`~kgml_peft.errors.KgmlPeftError` line naming the path and what it is.
"""

from __future__ import annotations

import errno
import os
import stat

from kgml_peft.errors import KgmlPeftError, os_cause

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, with its article (``a directory``, ``a FIFO ...``)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def check_regular_file(path: str | os.PathLike, what: str) -> os.stat_result:
    """The ``os.stat`` of ``path`` (links followed) if it is a regular file; otherwise a one-line
    :class:`KgmlPeftError` that starts with ``what`` (``adapter``, ``data file`` ...) and the path
    and says what is there instead: nothing, a broken link, a link loop, a directory, a FIFO ..."""
    name = f"{what} {os.fspath(path)}".strip()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise KgmlPeftError(f"{name} is a broken link (its target {os.readlink(path)} does "
                                "not exist)") from None
        raise KgmlPeftError(f"{name} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KgmlPeftError(f"{name} is a symbolic link loop, not a regular file") from None
        raise KgmlPeftError(f"{name} cannot be read ({os_cause(exc)})") from None
    except ValueError as exc:  # a NUL byte in the path
        raise KgmlPeftError(f"{name} is not a usable path ({exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise KgmlPeftError(f"{name} is {file_kind(info.st_mode)}, not a regular file")
    return info
