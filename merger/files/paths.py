"""Where the app keeps its own files (history, caches, outputs, queue)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """``$SDMW_DATA_DIR`` or ``<repo>/data``; created on first use."""
    d = Path(os.environ.get("SDMW_DATA_DIR") or REPO_ROOT / "data")
    d.mkdir(parents=True, exist_ok=True)
    return d
