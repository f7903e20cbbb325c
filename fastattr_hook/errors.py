"""The one exception type users see: every message names the file/row at fault and what to do."""


class FastattrError(Exception):
    """A user-facing error; the CLI prints its message without a traceback and exits 2."""
