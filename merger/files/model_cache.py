"""An LRU cache of loaded checkpoints with a byte budget (SuperMerger's model cache)."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from .checkpoint_io import Checkpoint, KeyedLocks, load_checkpoint


class ModelCache:
    """Keeps recently used checkpoints in RAM; evicts least recently used ones past ``budget``
    bytes. A file changed on disk (size or mtime) is reloaded. Thread-safe: two threads asking
    for the same file (the background warm-up and a merge) load it once, the second waiting."""

    def __init__(self, budget_bytes: int = 16 << 30):
        self.budget = budget_bytes
        self._items: OrderedDict[Path, tuple[tuple[int, int], Checkpoint]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading = KeyedLocks()                         # per file, held while it is loaded

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        if path.is_dir():
            from .diffusers_format import folder_stamp
            return folder_stamp(path)
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def get(self, path: str | os.PathLike, pinned: tuple = ()) -> Checkpoint:
        """Load (or reuse) ``path``; ``pinned`` paths are never evicted by this call."""
        path = Path(path).resolve()
        with self._loading(path):
            return self._get(path, pinned)

    def _get(self, path: Path, pinned: tuple) -> Checkpoint:
        with self._lock:
            hit = self._items.get(path)
            if hit and path.exists() and hit[0] == self._stamp(path):
                self._items.move_to_end(path)
                return hit[1]
        ck = load_checkpoint(path)
        with self._lock:
            self._items[path] = (self._stamp(path), ck)
            self._items.move_to_end(path)
            keep = {Path(p).resolve() for p in pinned} | {path}
            for p in list(self._items):
                if self.total_bytes() <= self.budget:
                    break
                if p not in keep:
                    del self._items[p]
        return ck

    def total_bytes(self) -> int:
        return sum(ck.nbytes for _, ck in self._items.values())

    def __contains__(self, path) -> bool:
        return Path(path).resolve() in self._items

    def __len__(self) -> int:
        return len(self._items)

    def unload(self, path: str | os.PathLike) -> bool:
        with self._lock:
            return self._items.pop(Path(path).resolve(), None) is not None

    def clear(self) -> int:
        """Drop everything; returns how many models were dropped."""
        with self._lock:
            n = len(self._items)
            self._items.clear()
            return n
