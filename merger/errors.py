"""The one exception type the engine raises for bad input: its message is shown to users as is."""


class MergeError(Exception):
    """A problem with the user's input (files, recipe, values); ``str(e)`` is a one-line reason."""


def report_unexpected(e: BaseException) -> str:
    """One line for an error that is a bug, not bad input (``SDMW_DEBUG=1`` prints the trace)."""
    import os
    import traceback
    if os.environ.get("SDMW_DEBUG"):
        traceback.print_exc()
    first = (str(e).splitlines() or [""])[0][:200]
    return f"unexpected {type(e).__name__}: {first} (a bug: please report it; SDMW_DEBUG=1 shows the trace)"


class MergeStopped(MergeError):
    """Raised when the user pressed Stop; nothing half-done is kept."""

    def __init__(self, message: str = "merge stopped by user"):
        super().__init__(message)
