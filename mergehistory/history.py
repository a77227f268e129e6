"""Append-only CSV history of merges, safe under concurrent writers (processes and threads).

Each append takes an exclusive ``flock`` on a side lock file, reads the last ID, and writes the
whole row with one ``write`` followed by ``fsync``. Every row is one physical line (newlines in
values are folded to spaces; the recipe column is JSON, which escapes them), so a row torn by a
crash is confined to its own line: the next append starts a new line and readers skip it.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from merger.errors import MergeError
from merger.files.paths import data_dir
from merger.recipe import Recipe

COLUMNS = ["id", "time", "model_a", "hash_a", "model_b", "hash_b", "model_c", "hash_c", "mode",
           "calcmode", "alpha", "beta", "mbw_alpha", "mbw_beta", "elemental", "include_exclude",
           "adjust", "seed", "label", "source", "saved_to", "seconds", "recipe"]
_thread_lock = threading.Lock()


def _vec(v) -> str:
    return "" if v is None else ",".join(f"{x:g}" for x in v)


def search_rows(rows: list[dict], query: str) -> list[dict]:
    """Words separated by spaces must all appear (case-insensitive) in a row; ``or`` separates
    alternatives and ``and`` may be written explicitly: ``a and b or c`` = (a ∧ b) ∨ c."""
    groups, cur = [], []
    for w in query.lower().split():
        if w == "or":
            groups.append(cur)
            cur = []
        elif w != "and":
            cur.append(w)
    groups.append(cur)
    groups = [g for g in groups if g]
    if not groups:
        return list(rows)
    out = []
    for row in rows:
        text = " ".join(str(v) for k, v in row.items() if k != "recipe").lower()
        if any(all(w in text for w in g) for g in groups):
            out.append(row)
    return out


class MergeHistory:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else data_dir() / "mergehistory.csv"

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _thread_lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[dict]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        rows = []
        for line in raw.split("\n")[1:]:
            try:
                fields = next(csv.reader([line]), [])
            except csv.Error:
                continue
            if len(fields) != len(COLUMNS) or not fields[0].isdigit():
                continue  # blank or torn line
            row = dict(zip(COLUMNS, fields))
            try:
                json.loads(row["recipe"])
            except json.JSONDecodeError:
                continue
            rows.append(row)
        return rows

    def append(self, recipe: Recipe, source: str = "ui", saved_to: str = "", seconds: float = 0.0,
               label: str = "") -> int:
        """Append one merge; returns its ID (1, 2, ...)."""
        from merger.files.saving import model_label
        with self._locked():
            rows = self._read()
            new_id = max((int(r["id"]) for r in rows), default=0) + 1
            r = recipe
            values = {
                "id": new_id, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "model_a": r.model_a, "hash_a": r.hash_a, "model_b": r.model_b, "hash_b": r.hash_b,
                "model_c": r.model_c, "hash_c": r.hash_c, "mode": r.mode, "calcmode": r.calcmode,
                "alpha": f"{r.alpha:g}", "beta": f"{r.beta:g}", "mbw_alpha": _vec(r.mbw_alpha),
                "mbw_beta": _vec(r.mbw_beta), "elemental": r.elemental,
                "include_exclude": "" if r.inex == "off" else
                f"{r.inex}: {' '.join(r.inex_blocks + r.inex_elements)}",
                "adjust": _vec(r.adjust), "seed": r.seed, "label": label or model_label(r),
                "source": source, "saved_to": saved_to, "seconds": f"{seconds:.2f}",
                "recipe": r.to_line()}
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
            new_file = not self.path.exists() or self.path.stat().st_size == 0
            if new_file:
                writer.writeheader()
            writer.writerow({k: str(v).replace("\r", " ").replace("\n", " ") for k, v in values.items()})
            data = buf.getvalue().encode("utf-8")
            with open(self.path, "ab+") as f:
                if not new_file:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return new_id

    def rows(self) -> list[dict]:
        with self._locked():
            return self._read()

    def get(self, ref: int | str) -> dict:
        """``-1`` = last merge, ``-2`` the one before, a positive number = that ID."""
        try:
            ref = int(ref)
        except (TypeError, ValueError):
            raise MergeError(f"history ID must be a number, got {ref!r}") from None
        rows = self.rows()
        if ref < 0:
            if -ref > len(rows):
                raise MergeError(f"the history has only {len(rows)} merges")
            return rows[ref]
        for row in rows:
            if int(row["id"]) == ref:
                return row
        raise MergeError(f"no merge with ID {ref} in the history")

    def recipe(self, ref: int | str) -> Recipe:
        return Recipe.from_line(self.get(ref)["recipe"])

    def search(self, query: str) -> list[dict]:
        return search_rows(self.rows(), query)
