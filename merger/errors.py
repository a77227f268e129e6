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


def run_cli(command) -> int:
    """Run a CLI command (a function of no arguments): exit code 0, or 1 with exactly one stderr
    line starting ``error:`` for bad input and for bugs alike (130 for Ctrl-C)."""
    import sys
    try:
        command()
        return 0
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no file was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        print(f"error: {report_unexpected(e)}", file=sys.stderr)
        return 1


class MergeStopped(MergeError):
    """Raised when the user pressed Stop; nothing half-done is kept."""

    def __init__(self, message: str = "merge stopped by user"):
        super().__init__(message)
