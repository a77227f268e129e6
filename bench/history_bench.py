"""Merge-history benchmark: append latency vs history size, search over 100k rows, concurrent writers.

    python bench/history_bench.py [--writers 8] [--rows-per-writer 2000]

Goals (issue 10): append < 2 ms and flat from 1k to 100k rows; search over 100k rows < 300 ms;
8 writers x 2,000 rows: all 16,000 rows back with unique IDs in < 30 s. The bound printed next
to the append time is one ``write`` + ``fsync`` of a row of the same size on the same disk,
measured in the same run (what an append cannot go below).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergehistory.history import COLUMNS, MergeHistory, _row_bytes  # noqa: E402
from merger.recipe import Recipe  # noqa: E402

MODELS = ["animeMix_v3", "realisticVision_v51", "dreamshaper_8", "counterfeit_v30", "epicPhoto"]


def _recipe(i: int) -> Recipe:
    return Recipe(MODELS[i % 5] + ".safetensors", MODELS[(i + 1) % 5] + ".safetensors", hash_a="0123456789",
                  hash_b="abcdef0123", alpha=round((i % 100) / 100, 2),
                  mbw_alpha=[round(((i * 7 + k) % 10) / 10, 1) for k in range(26)] if i % 3 == 0 else None)


def fill(path: Path, n: int) -> None:
    """``n`` rows written directly (what a long campaign leaves behind), no fsync per row."""
    h = MergeHistory(path)
    with open(path, "wb") as f:
        f.write((",".join(COLUMNS) + "\n").encode())
        for i in range(1, n + 1):
            r = _recipe(i)
            f.write(_row_bytes({"id": i, "time": "2026-11-26 03:00:00", "model_a": r.model_a, "hash_a": r.hash_a,
                                "model_b": r.model_b, "hash_b": r.hash_b, "mode": r.mode, "calcmode": r.calcmode,
                                "alpha": r.alpha, "label": f"merge {i}", "source": "xyz", "recipe": r.to_line()}))
    return h


def bound_write_fsync(folder: Path, size: int, n: int = 50) -> float:
    p = folder / "fsync-probe"
    times = []
    with open(p, "ab") as f:
        for _ in range(n):
            t = time.perf_counter()
            f.write(b"x" * size)
            f.flush()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t)
    p.unlink()
    return statistics.median(times)


def append_latency(h: MergeHistory, n: int = 50) -> float:
    times = []
    for i in range(n):
        r = _recipe(i)
        t = time.perf_counter()
        h.append(r, source="bench")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _writer(path: str, k: int, n: int) -> None:
    h = MergeHistory(path)
    for i in range(n):
        h.append(_recipe(k * n + i), source=f"writer{k}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--rows-per-writer", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        d = Path(d)
        row_size = len(_row_bytes({"id": 1, "recipe": _recipe(0).to_line()}))
        bound = bound_write_fsync(d, row_size)
        print(f"bound: write+fsync of one {row_size}-byte row: {bound * 1e3:.2f} ms")
        for n in (1_000, 10_000, 100_000):
            path = d / f"h{n}.csv"
            fill(path, n)
            h = MergeHistory(path)
            lat = append_latency(h)
            print(f"append at {n:>7,} rows: {lat * 1e3:.2f} ms median of 50 ({lat / bound:.2f}x the bound); "
                  f"file {path.stat().st_size / 1e6:.1f} MB")
        h = MergeHistory(d / "h100000.csv")
        t = time.perf_counter()
        n_rows = len(h)
        cold = time.perf_counter() - t
        print(f"first read of {n_rows:,} rows (index built once per process): {cold * 1e3:.0f} ms")
        for q in ("dreamshaper", "animeMix or epicPhoto", "realisticVision 0.37", "nothing-matches-this"):
            for newest, what in ((None, "every match as a row"), (500, "newest 500 (History tab)")):
                times = []
                for _ in range(5):
                    t = time.perf_counter()
                    found = h.search(q, newest=newest)
                    times.append(time.perf_counter() - t)
                print(f"search {q!r:26} over {n_rows:,} rows, {what:24}: {statistics.median(times) * 1e3:4.0f} ms "
                      f"({len(found):,} rows)")
        t = time.perf_counter()
        h.append(_recipe(1))
        h.search("dreamshaper", newest=500)
        print(f"append + search again (incremental index): {(time.perf_counter() - t) * 1e3:.1f} ms")

        path = d / "concurrent.csv"
        procs = [mp.Process(target=_writer, args=(str(path), k, args.rows_per_writer)) for k in range(args.writers)]
        t = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        took = time.perf_counter() - t
        rows = MergeHistory(path).rows()
        ids = [int(r["id"]) for r in rows]
        want = args.writers * args.rows_per_writer
        print(f"{args.writers} writers x {args.rows_per_writer:,} rows: {took:.1f} s, {len(rows):,}/{want:,} rows back, "
              f"{'unique' if len(set(ids)) == len(ids) else 'DUPLICATE'} IDs, 1..{max(ids)}; "
              f"{took / want * 1e3:.2f} ms per append ({took / want / bound:.2f}x the bound)")


if __name__ == "__main__":
    main()
