"""A1111 short hashes of models new to the app: one after the other (as before) against
side by side (``checkpoint_io.short_hashes``: one file per core, hashed from a read-only mapping),
against sha256's own rate on bytes already in memory (the bound: on one core, and on as many
cores as files are hashed at once).

    python bench/hash_bench.py                          # 4 files of 1 GiB of random bytes
    python bench/hash_bench.py --dir /path/to/models    # the .safetensors files there

The files are read from the page cache (each is read once before timing); on a disk, both ways
wait for it instead. Every round hashes with an empty hash cache (a fresh SDMW_DATA_DIR).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merger.files import checkpoint_io  # noqa: E402


def read_in_blocks(path: Path, chunk: int = 1 << 22) -> str:
    """The way files were hashed before: ``read()`` in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="hash the .safetensors files in this folder")
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        if args.dir:
            paths = sorted(Path(args.dir).glob("*.safetensors"))
        else:
            paths = []
            for i in range(args.count):
                paths.append(Path(tmp) / f"m{i}.bin")
                with open(paths[-1], "wb") as f:
                    for _ in range(args.size_mb):
                        f.write(os.urandom(1 << 20))
        gb = sum(p.stat().st_size for p in paths) / 1e9
        for p in paths:                                  # into the page cache
            read_in_blocks(p)
        cores = min(len(paths), os.cpu_count() or 1)
        data = os.urandom(1 << 28)

        def in_memory(threads: int):
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda _: hashlib.sha256(data).hexdigest(), range(threads)))
        one = best(lambda: in_memory(1), args.rounds)
        many = best(lambda: in_memory(cores), args.rounds)
        rate1, rate_n = len(data) / one / 1e9, cores * len(data) / many / 1e9
        print(f"{len(paths)} files, {gb:.2f} GB; sha256 of bytes in memory: {rate1:.2f} GB/s on one core, "
              f"{rate_n:.2f} GB/s on {cores}")
        bound = gb / rate_n
        before = best(lambda: [read_in_blocks(p) for p in paths], args.rounds)
        n = [0]

        def side_by_side():
            n[0] += 1
            os.environ["SDMW_DATA_DIR"] = str(Path(tmp) / f"data{n[0]}")      # an empty hash cache
            checkpoint_io.short_hashes(paths)
        now = best(side_by_side, args.rounds)
        print(f"  one after the other, read() in 4 MiB blocks   {before:6.2f} s  {gb / before:5.2f} GB/s  "
              f"{before / bound:4.2f}x the bound")
        print(f"  short_hashes: side by side, from a mapping    {now:6.2f} s  {gb / now:5.2f} GB/s  "
              f"{now / bound:4.2f}x the bound  ({before / now:.2f}x faster)")
        print(f"  bound: sha256 on {cores} cores at {rate_n:.2f} GB/s        {bound:6.2f} s")


if __name__ == "__main__":
    main()
