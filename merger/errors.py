"""The one exception type the engine raises for bad input: its message is shown to users as is."""


class MergeError(Exception):
    """A problem with the user's input (files, recipe, values); ``str(e)`` is a one-line reason."""


class MergeStopped(MergeError):
    """Raised when the user pressed Stop; nothing half-done is kept."""

    def __init__(self, message: str = "merge stopped by user"):
        super().__init__(message)
