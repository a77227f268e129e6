"""Append-only CSV history of merges, safe under concurrent writers (processes and threads).

Writing: each append takes an exclusive ``flock`` on a side lock file, reads the last ID from the
file's *tail* (a few KB, whatever the history's size), and writes the whole row with one
``write`` followed by ``fsync``. Every row is one physical line (newlines in values are folded to
spaces; the recipe column is JSON, which escapes them), so a row torn by a crash is confined to
its own line: the next append starts a new line.

Reading: an index of the rows is kept per :class:`MergeHistory` and extended with only the bytes
appended since the last read, so listing and searching 100k rows stays interactive. Lines are
decoded one by one (a tail cut inside a UTF-8 character costs that row only) and a line counts
only when it is a complete record: the recipe, always the last and always quoted column, must
end with its closing quote (a torn prefix never does). Readers take no lock: a line still being
written has no newline yet and is read next time.
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from merger.errors import MergeError
from merger.files.paths import data_dir
from merger.recipe import Recipe

COLUMNS = ["id", "time", "model_a", "hash_a", "model_b", "hash_b", "model_c", "hash_c", "mode",
           "calcmode", "alpha", "beta", "mbw_alpha", "mbw_beta", "elemental", "include_exclude",
           "adjust", "seed", "label", "source", "saved_to", "seconds", "notes", "recipe"]
_thread_lock = threading.Lock()
TAIL_BLOCK = 64 << 10


def _vec(v) -> str:
    return "" if v is None else ",".join(f"{x:g}" for x in v)


def _query_groups(query: str) -> list[list[str]]:
    groups, cur = [], []
    for w in query.lower().split():
        if w == "or":
            groups.append(cur)
            cur = []
        elif w != "and":
            cur.append(w)
    groups.append(cur)
    return [g for g in groups if g]


def _complete(line: str) -> bool:
    """A whole record: ends with the closing quote of the (always quoted) recipe column and has
    balanced quotes. Any strict prefix of a written row fails this."""
    return line.endswith('}"') and line.count('"') % 2 == 0


def _row_id(line: str) -> int | None:
    """The ID of a complete row, or None for a torn, blank or foreign line."""
    if not _complete(line):
        return None
    head = line[: line.find(",")]
    return int(head) if head.isdigit() else None


def _fields(line: str, columns: list[str]) -> list[str]:
    """A row's values in :data:`COLUMNS` order (parsed when the row is used, not when indexed)."""
    fields = next(csv.reader([line]), [])
    if columns != COLUMNS:
        fields = [fields[columns.index(c)] if c in columns and columns.index(c) < len(fields) else ""
                  for c in COLUMNS]
    return fields + [""] * (len(COLUMNS) - len(fields))


@dataclass
class _Index:
    """The complete rows read so far from one file (identified by its inode), as raw lines."""
    ino: int = -1
    offset: int = 0
    columns: list[str] | None = None
    lines: list[str] = field(default_factory=list)
    by_id: dict[int, int] = field(default_factory=dict)
    _texts: list[str] = field(default_factory=list)

    def add(self, block: bytes) -> None:
        # UTF-8 resynchronises at every newline, so decoding the block at once equals decoding
        # line by line: bytes torn inside a character only spoil their own (torn) line
        lines = block.decode("utf-8", "replace").split("\n")
        if self.columns is None:
            head = next(csv.reader(lines[:1]), [])
            if head[:1] == ["id"]:
                self.columns, lines = head, lines[1:]
            else:
                self.columns = COLUMNS
        for line in lines:
            line = line.rstrip("\r")
            rid = _row_id(line)
            if rid is not None:
                self.by_id[rid] = len(self.lines)
                self.lines.append(line)

    def texts(self) -> list[str]:
        """Lower-cased search text of each row: everything but the recipe column."""
        for line in self.lines[len(self._texts):]:
            self._texts.append(line[: line.rfind(',"{')].lower())
        return self._texts

    def row(self, i: int) -> dict:
        return dict(zip(COLUMNS, _fields(self.lines[i], self.columns)))


class MergeHistory:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else data_dir() / "mergehistory.csv"
        self._index = _Index()
        self._mutex = threading.Lock()

    # ------------------------------------------------------------------ writing
    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _thread_lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _last_id(f) -> int:
        """The ID of the last complete row, reading backwards from the end in blocks."""
        pos = f.seek(0, os.SEEK_END)
        carry = b""          # the (maybe partial) first line of the block read last
        while pos > 0:
            step = min(TAIL_BLOCK, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + carry).split(b"\n")
            carry = lines.pop(0) if pos > 0 else b""
            for raw in reversed(lines):
                rid = _row_id(raw.decode("utf-8", "replace").rstrip("\r"))
                if rid is not None:
                    return rid
        return 0

    def _migrate(self) -> None:
        """Give a history written by an older version (no ``notes`` column) the current header,
        keeping its rows as they are (readers go by the header); atomic, under the lock."""
        with open(self.path, "rb") as f:
            first = f.readline()
        head = next(csv.reader([first.decode("utf-8", "replace")]), [])
        if head == COLUMNS or head[:1] != ["id"]:
            return
        old = list(head)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            src.readline()
            dst.write((",".join(COLUMNS) + "\n").encode())
            for raw in src:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if _row_id(line) is not None:
                    dst.write(_row_bytes(dict(zip(COLUMNS, _fields(line, old)))))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)

    def append(self, recipe: Recipe, source: str = "ui", saved_to: str = "", seconds: float = 0.0,
               label: str = "", notes: list[str] | tuple = ()) -> int:
        """Append one merge; returns its ID (1, 2, ...). Costs the same at any history size."""
        from merger.files.saving import model_label
        r = recipe
        values = {
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model_a": r.model_a, "hash_a": r.hash_a,
            # a method's models share the B column (its base is A); the recipe column has them apart
            "model_b": " + ".join(r.models) if r.method else r.model_b,
            "hash_b": " + ".join(r.model_hashes) if r.method else r.hash_b,
            "model_c": r.model_c, "hash_c": r.hash_c, "mode": r.method or r.mode, "calcmode": r.calcmode,
            "alpha": f"{r.alpha:g}", "beta": f"{r.beta:g}", "mbw_alpha": _vec(r.mbw_alpha),
            "mbw_beta": _vec(r.mbw_beta), "elemental": r.elemental,
            "include_exclude": "" if r.inex == "off" else f"{r.inex}: {' '.join(r.inex_blocks + r.inex_elements)}",
            "adjust": _vec(r.adjust), "seed": r.seed, "label": label or model_label(r),
            "source": source, "saved_to": saved_to, "seconds": f"{seconds:.2f}", "notes": " | ".join(notes),
            "recipe": r.to_line()}
        with self._locked():
            new_file = not self.path.exists() or self.path.stat().st_size == 0
            if not new_file:
                self._migrate()
            with open(self.path, "ab+") as f:
                new_id = 1 if new_file else self._last_id(f) + 1
                data = _row_bytes({"id": new_id, **values})
                if new_file:
                    data = (",".join(COLUMNS) + "\n").encode() + data
                else:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        data = b"\n" + data      # a torn last line stays alone on its line
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return new_id

    # ------------------------------------------------------------------ reading
    def _refresh(self) -> _Index:
        with self._mutex:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._index = _Index()
                return self._index
            idx = self._index
            if idx.ino != st.st_ino or st.st_size < idx.offset:
                idx = self._index = _Index(st.st_ino)
            if st.st_size > idx.offset:
                with open(self.path, "rb") as f:
                    f.seek(idx.offset)
                    data = f.read()
                end = data.rfind(b"\n")
                if end >= 0:          # the part after the last newline may still be being written
                    idx.offset += end + 1
                    idx.add(data[:end])
            return idx

    def rows(self) -> list[dict]:
        idx = self._refresh()
        return [idx.row(i) for i in range(len(idx.lines))]

    def __len__(self) -> int:
        return len(self._refresh().lines)

    def get(self, ref: int | str) -> dict:
        """``-1`` = last merge, ``-2`` the one before, a positive number = that ID."""
        try:
            ref = int(ref)
        except (TypeError, ValueError):
            raise MergeError(f"history ID must be a number, got {ref!r}") from None
        idx = self._refresh()
        if ref < 0:
            if -ref > len(idx.lines):
                raise MergeError(f"the history has only {len(idx.lines)} merges")
            return idx.row(len(idx.lines) + ref)
        if ref not in idx.by_id:
            raise MergeError(f"no merge with ID {ref} in the history")
        return idx.row(idx.by_id[ref])

    def recipe(self, ref: int | str) -> Recipe:
        row = self.get(ref)
        try:
            return Recipe.from_line(row["recipe"])
        except MergeError as e:
            raise MergeError(f"merge #{row['id']} in the history cannot be used: {e}") from None

    def find(self, query: str, newest: int | None = None) -> tuple[list[dict], int]:
        """(matching rows oldest first, number of matches). Words separated by spaces must all
        appear (case-insensitive) in a row's columns other than the recipe; ``or`` separates
        alternatives and ``and`` may be written: ``a and b or c`` = (a ∧ b) ∨ c. With ``newest``,
        only that many of the most recent matches are returned (as rows)."""
        idx = self._refresh()
        groups = _query_groups(query)
        hits = range(len(idx.lines)) if not groups else \
            [i for i, t in enumerate(idx.texts()) if any(all(w in t for w in g) for g in groups)]
        total = len(hits)
        if newest is not None:
            hits = hits[-newest:] if newest else []
        return [idx.row(i) for i in hits], total

    def search(self, query: str, newest: int | None = None) -> list[dict]:
        return self.find(query, newest)[0]


def _row_bytes(values: dict) -> bytes:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n").writerow(
        {k: str(values.get(k, "")).replace("\r", " ").replace("\n", " ") for k in COLUMNS})
    return buf.getvalue().encode("utf-8")
