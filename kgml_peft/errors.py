"""The toolkit's own error type: bad input, bad files, bad options."""


class KgmlPeftError(Exception):
    """A problem the user can fix. The CLI prints it as one ``error: ...`` line and exits 2."""
