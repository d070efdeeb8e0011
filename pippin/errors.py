"""The one exception type pippin raises for problems a user can fix.

A `PippinError` carries a complete sentence that says what was wrong and what to do; the CLI prints it
without a traceback. Programming errors stay ordinary exceptions so they keep their tracebacks.
"""


class PippinError(Exception):
    """A user-facing error: bad input, a missing or corrupt file, an impossible request."""
