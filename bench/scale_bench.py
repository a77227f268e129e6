"""XYZ cells per minute in-process vs on 1 and 2 Ray workers, and the dispatch overhead per cell.

    python bench/scale_bench.py            # SD1.5 shapes (1.07 B params), fp16 files
    python bench/scale_bench.py --tiny     # the tiny demo models (a dry run)

Two random SD1.5-shaped fp16 checkpoints are written to a temporary model folder; an α sweep of
``--cells`` cells (every cell a full re-merge of every key, swapped into the resident pipeline,
then a small generation: ``--size`` px, ``--steps`` Euler a steps) runs three ways in one run:

- in-process (the default path, all CPU threads);
- one Ray worker (all threads): the difference to in-process is the dispatch overhead per cell
  (task round trip, the image back, the app writing the history row and the PNG);
- two Ray workers (half the threads each): the scale-out on this machine.

Each pool's first cell builds its pipeline and is not counted (a warm-up plot runs first). Also
printed: the round trip of an empty task (Ray's own latency). Benchmarks are not tests.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        os.environ["SDMW_DATA_DIR"] = str(Path(d) / "data")
        from bench.gpu_check import write_models
        from merger.files.model_dirs import ModelDirs
        from merger.pipeline.generate import GenParams
        from merger.sweeps.dispatch import start_pool
        from merger.sweeps.xyz_run import PlotSpec, prepare, run
        from merger.workstation import Workstation
        dirs = ModelDirs.from_models_dir(Path(d) / "models")
        dirs.create()
        _, gb = write_models(dirs.ckpt, "sd1", "tiny" if args.tiny else "full", ("a", "b"))
        threads = torch.get_num_threads()
        print(f"torch {torch.__version__}, {threads} threads; two SD1.5-shaped fp16 models ({gb:.2f} GB each); "
              f"{args.cells} cells of an α sweep, each a full re-merge + swap + a {args.size}px {args.steps}-step image")
        ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=Path(d) / "out")
        gen = GenParams(prompt="a cat", steps=args.steps, width=args.size, height=args.size, seed=1)

        def plot(n: int, offset: float = 0.0):
            values = ",".join(f"{offset + (i + 1) / (n + 1):.4f}" for i in range(n))
            return prepare(ws, PlotSpec(ws.recipe("a.safetensors", "b.safetensors"), gen,
                                        {"X": ("alpha", values), "Y": ("none", ""), "Z": ("none", "")}))

        def timed(n: int) -> float:
            prep = plot(n)
            t = time.perf_counter()
            res = run(ws, prep)
            assert res.cells_done == n
            return time.perf_counter() - t

        busy = {}

        run(ws, plot(2, 0.01))                                 # warm-up: pipeline built, models cached
        results = {"in-process": timed(args.cells)}
        overhead = None
        for workers in (1, 2):
            pool = start_pool(ws, workers)
            try:
                run(ws, plot(workers * 2, 0.01))               # warm-up: each worker builds its pipeline
                before = pool.busy
                results[f"{workers} Ray worker{'s' if workers > 1 else ''}"] = timed(args.cells)
                busy[workers] = pool.busy - before
                if workers == 1:
                    overhead = pool.overhead()
            finally:
                pool.close()
                ws.pool = None
        base = results["in-process"]
        for label, t in results.items():
            print(f"  {label:16} {t:7.2f} s   {60 * args.cells / t:6.1f} cells/min   {base / t:4.2f}x in-process")
        per_cell = (results["1 Ray worker"] - busy[1]) / args.cells
        print(f"dispatch overhead per cell (1 worker: wall time not spent merging or generating on the worker, i.e. "
              f"the round trip, the image coming back, the app's history row, PNG and grid): {per_cell * 1e3:.1f} ms "
              f"(goal < 20 ms); an empty task's round trip: {overhead * 1e3:.2f} ms")
        print("(the 1-worker run and the in-process one differ by more than this overhead: the worker and the "
              "app hold different caches and page-cache states; compare cells/min, not single cells)")


if __name__ == "__main__":
    main()
