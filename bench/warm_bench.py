"""Merge pressed -> merged into the resident pipeline, with and without the background warm-up of
the picked models (merger/files/warmup.py), SD1.5-shaped fp16 files (2.1 GB each).

    python bench/warm_bench.py [--dir D] [--rounds 3] [--ties] [--new]

Each round picks two models not merged before in this process (the model cache cleared), then:

- *no warm-up*: Merge is pressed at once: the merge loads both files and scans them for NaN/Inf
  (every byte read), then merges into the pipeline's buffers, as before the warm-up existed;
- *warm-up*: the pick starts the warm-up; the user sets ratios until it has finished (its time is
  printed: how long they need to take for the whole gain), then presses Merge.

Both with the files in the page cache (a model used recently) and, when run as root, with the
page cache dropped first (``/proc/sys/vm/drop_caches``: a model not read since boot; on a VM the
host's cache may still serve those reads faster than a real disk would). The bound printed
beside them is the merge alone: the same merge again with the models loaded and scanned.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.merge_bench import write_models  # noqa: E402
from merger.files import checkpoint_io  # noqa: E402
from merger.files.model_dirs import ModelDirs  # noqa: E402
from merger.ldm_layout import checkpoint_layout  # noqa: E402
from merger.workstation import Workstation  # noqa: E402
from mergehistory import MergeHistory  # noqa: E402

NAMES = ["base", "m1", "m2", "m3", "m4"]


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def bench_ties(ws: Workstation, files: list[str], rounds: int, forget_hashes) -> None:
    """TIES (density 0.2, sign by count) over the base and four models, in the page cache: Merge
    pressed at once after the pick, and after the warm-up (load, scan, every key's thresholds on
    one thread) has finished; the bound: the same merge with only α changed."""
    rows: dict[str, list[float]] = {}
    for r in range(rounds):
        for warm in (False, True):
            ws.clear_cache()
            forget_hashes()
            settings = dict(models=files[1:], method="ties", density=0.2, sign="count", alpha=0.5 + 0.01 * (2 * r + warm))
            if warm:
                t = time.perf_counter()
                ws.warm_recipe(ws.recipe(files[0], hashed=False, **settings))    # as the Merge tab does
                ws.warmer.wait()
                rows.setdefault("warm-up itself (one thread)", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            recipe = ws.recipe(files[0], **settings)
            ws.merge(recipe)
            rows.setdefault("warmed" if warm else "no warm-up", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            ws.merge(dataclasses.replace(recipe, alpha=recipe.alpha + 0.2))
            rows.setdefault("α changed (thresholds kept): the bound", []).append(time.perf_counter() - t)
    bound = min(rows["α changed (thresholds kept): the bound"])
    print("TIES, base + 4 models: Merge pressed -> merged into the resident pipeline (best / median):")
    for label in ("no warm-up", "warm-up itself (one thread)", "warmed", "α changed (thresholds kept): the bound"):
        vals = sorted(rows[label])
        print(f"  {label:40} {vals[0]:6.2f} s / {vals[len(vals) // 2]:6.2f} s   {vals[0] / bound:5.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / "bench-models"),
                    help="where the five SD1.5-shaped files are (written there when missing)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", action="store_true", help="forget the files' hashes before each pick: models new "
                    "to the app, whose A1111 hash (the sha256 of the whole file) is not known yet")
    ap.add_argument("--ties", action="store_true", help="TIES over the base and four models instead (files in the "
                    "page cache): the warm-up also computes the thresholds")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = [f"{n}.safetensors" for n in NAMES]
    if not all((folder / f).exists() for f in files):
        write_models(checkpoint_layout("sd1"), NAMES, folder)
    scratch = tempfile.TemporaryDirectory()               # history rows and hashes: not the user's
    os.environ["SDMW_DATA_DIR"] = scratch.name

    def forget_hashes() -> None:
        if args.new:
            (Path(scratch.name) / "cache" / "hashes.json").unlink(missing_ok=True)
            checkpoint_io._default_hashes = None
    ws = Workstation(ModelDirs.from_models_dir(folder, ckpt=folder), device="cpu", dtype=torch.float16,
                     outputs=Path(scratch.name), history=MergeHistory(Path(scratch.name) / "history.csv"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    t = time.perf_counter()
    ws.merge(ws.recipe(files[0], files[1], alpha=0.5))        # builds the resident pipeline once
    print(f"first merge (builds the pipeline): {time.perf_counter() - t:.2f} s\n")
    if args.ties:
        bench_ties(ws, files, args.rounds, forget_hashes)
        return
    pairs = [(files[i % 5], files[(i + 1) % 5]) for i in range(1, 2 * args.rounds + 1)]
    can_drop = drop_page_cache()
    rows: dict[str, list[float]] = {}
    alpha = 0.1
    for a, b in pairs:
        for cold in ((False, True) if can_drop else (False,)):
            for warm in (False, True):
                ws.clear_cache()
                forget_hashes()
                if cold:
                    drop_page_cache()
                else:                                  # in the page cache: read once
                    for f in (a, b):
                        with open(folder / f, "rb") as fh:
                            while fh.read(64 << 20):
                                pass
                alpha += 0.01                          # every merge a new one
                if warm:
                    t = time.perf_counter()
                    ws.warm(a, b)
                    ws.warmer.wait()
                    rows.setdefault(("cold " if cold else "cached ") + "warm-up itself", []).append(time.perf_counter() - t)
                t = time.perf_counter()
                ws.merge(ws.recipe(a, b, alpha=alpha))
                took = time.perf_counter() - t
                rows.setdefault(("cold " if cold else "cached ") + ("warmed" if warm else "no warm-up"), []).append(took)
                t = time.perf_counter()
                ws.merge(ws.recipe(a, b, alpha=alpha + 0.05))
                rows.setdefault("merge alone (loaded, scanned)", []).append(time.perf_counter() - t)
    bound = min(rows["merge alone (loaded, scanned)"])
    print("Merge pressed -> merged into the resident pipeline (best / median of the rounds):")
    order = [f"{w} {k}" for w in ("cached", "cold") for k in ("no warm-up", "warm-up itself", "warmed")]
    for label in [k for k in order if k in rows] + ["merge alone (loaded, scanned)"]:
        vals = rows[label]
        vals.sort()
        print(f"  {label:34} {vals[0]:6.2f} s / {vals[len(vals) // 2]:6.2f} s   {vals[0] / bound:5.1f}x the merge alone")
    if not can_drop:
        print("  (not root: the page cache could not be dropped; cold rows skipped)")


if __name__ == "__main__":
    main()
