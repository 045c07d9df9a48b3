"""One exception type for problems the user can fix (bad arguments, missing or foreign files).

The CLI prints these as a single ``error: ...`` line and exits with status 2; anything else is a
bug in sc-steer and keeps its traceback.
"""


class ScSteerError(ValueError):
    """Bad input or files: the message names the argument and what was expected."""
