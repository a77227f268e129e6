"""The reservation queue: XYZ plots stored on disk and run one after another.

``|`` inside an axis' values splits a reservation in several (every combination of the parts).
Entries are waiting / running / finished / stopped / error; an entry that fails is marked error
and the queue goes on; after a restart, an entry left running is waiting again. A running entry
shows its progress (cell n/N); entries can be deleted, moved, cleared and run again.
"""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path

from ..errors import MergeError, MergeStopped
from ..files.paths import data_dir
from .xyz_run import PlotSpec, prepare, run


class ReservationQueue:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else data_dir() / "reservations.json"
        self.lock = threading.RLock()
        self.entries: list[dict] = []
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = []
        for e in self.entries:
            if e["status"] == "running":
                e["status"], e["message"] = "waiting", "interrupted by a restart; will run again"
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.entries, indent=1))
        os.replace(tmp, self.path)

    @staticmethod
    def split(spec: PlotSpec) -> list[PlotSpec]:
        """One spec per combination of the ``|``-separated parts of the axes."""
        names = list(spec.axes)
        parts = [[v.strip() for v in spec.axes[n][1].split("|")] for n in names]
        out = []
        for combo in itertools.product(*parts):
            d = spec.to_dict()
            d["axes"] = {n: (spec.axes[n][0], v) for n, v in zip(names, combo)}
            out.append(PlotSpec.from_dict(d))
        return out

    def add(self, spec: PlotSpec) -> list[int]:
        with self.lock:
            ids = []
            for part in self.split(spec):
                new_id = max((e["id"] for e in self.entries), default=0) + 1
                axes = ", ".join(f"{n}: {t} {v!r}" for n, (t, v) in part.axes.items() if t != "none")
                self.entries.append({"id": new_id, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "status": "waiting", "message": "", "summary": axes, "progress": "",
                                     "spec": part.to_dict(), "grids": []})
                ids.append(new_id)
            self._save()
            return ids

    def duplicates(self, spec: PlotSpec) -> list[int]:
        """IDs of entries that are exactly one of the plots ``spec`` would add."""
        parts = [p.to_dict() for p in self.split(spec)]
        with self.lock:
            return [e["id"] for e in self.entries if e["spec"] in parts]

    def _entry(self, entry_id) -> dict:
        try:
            entry_id = int(entry_id)
        except (TypeError, ValueError):
            raise MergeError(f"pick a reservation first (got {entry_id!r})") from None
        for e in self.entries:
            if e["id"] == entry_id:
                return e
        raise MergeError(f"no reservation #{entry_id}")

    def delete(self, entry_id) -> None:
        with self.lock:
            e = self._entry(entry_id)
            if e["status"] == "running":
                raise MergeError(f"reservation #{e['id']} is running: press Stop first")
            self.entries.remove(e)
            self._save()

    def move(self, entry_id, step: int) -> None:
        """Move an entry ``step`` places (negative: earlier); waiting entries run in list order."""
        with self.lock:
            e = self._entry(entry_id)
            i = self.entries.index(e)
            j = min(max(i + step, 0), len(self.entries) - 1)
            self.entries.insert(j, self.entries.pop(i))
            self._save()

    def retry(self, entry_id) -> None:
        """Queue a finished, stopped or failed entry again."""
        with self.lock:
            e = self._entry(entry_id)
            if e["status"] in ("running", "waiting"):
                raise MergeError(f"reservation #{e['id']} is already {e['status']}")
            self._set(e, status="waiting", message="", progress="", grids=[])

    def clear(self, which: str = "done") -> int:
        """Remove finished / stopped / failed entries (``done``) or every entry not running (``all``)."""
        with self.lock:
            keep = ("running",) if which == "all" else ("running", "waiting")
            before = len(self.entries)
            self.entries = [e for e in self.entries if e["status"] in keep]
            self._save()
            return before - len(self.entries)

    def rows(self) -> list[dict]:
        with self.lock:
            return [dict(e) for e in self.entries]

    def _set(self, entry: dict, **values) -> None:
        with self.lock:
            entry.update(values)
            self._save()

    def run_waiting(self, ws, progress=None, on_update=None) -> int:
        """Run every waiting entry in order; returns how many finished."""
        done = 0
        while True:
            with self.lock:
                entry = next((e for e in self.entries if e["status"] == "waiting"), None)
                if entry is None:
                    return done
                self._set(entry, status="running", message="")
            if on_update:
                on_update()
            try:
                prep = prepare(ws, PlotSpec.from_dict(entry["spec"]))
                self._set(entry, progress=f"0/{len(prep.cells)} cells")

                def on_cell(_grids, done=[0]):      # noqa: B006 - a counter for this entry
                    done[0] += 1
                    self._set(entry, progress=f"{done[0]}/{len(prep.cells)} cells")
                    if on_update:
                        on_update()
                res = run(ws, prep, progress=progress, on_cell=on_cell)
                status = "stopped" if res.stopped else "finished"
                self._set(entry, status=status, grids=[str(g) for g in res.grids],
                          message=f"{res.cells_done}/{res.cells_total} cells")
                done += 1
                if res.stopped:
                    return done
            except MergeStopped as e:
                self._set(entry, status="stopped", message=str(e))
                return done
            except MergeError as e:
                self._set(entry, status="error", message=str(e))
            except Exception as e:  # noqa: BLE001 - one bad entry must not stop the queue
                self._set(entry, status="error", message=f"unexpected {type(e).__name__}: {e}")
            if on_update:
                on_update()
