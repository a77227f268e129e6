"""The merge history: one CSV that every merge appends a row to (see :class:`MergeHistory`)."""
from .history import COLUMNS, MergeHistory, search_rows

__all__ = ["COLUMNS", "MergeHistory", "search_rows"]
