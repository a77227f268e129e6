"""The merge history: one CSV that every merge appends a row to (see :class:`MergeHistory`)."""
from .history import COLUMNS, MergeHistory

__all__ = ["COLUMNS", "MergeHistory"]
