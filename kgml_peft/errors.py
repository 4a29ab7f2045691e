"""The toolkit's own error type: bad input, bad files, bad options."""


class KgmlPeftError(Exception):
    """A problem the user can fix. The CLI prints it as one ``error: ...`` line and exits 2."""


def expect_type(value: object, types: type | tuple[type, ...], what: str) -> None:
    """Raise :class:`KgmlPeftError` unless ``value`` is one of ``types`` (bools are not numbers)."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise KgmlPeftError(f"{what} must be {names}, got {value!r}")


def os_cause(exc: OSError) -> str:
    """Why an OS call failed, for a one-line error (``No space left on device`` ...)."""
    return exc.strerror or str(exc) or type(exc).__name__
