"""Per-cell merge time of a 26-cell pinpoint sweep, with and without incremental re-merge.

    python bench/xyz_bench.py       # SD1.5 shapes (1.07 B params), fp16 models, fp32 CPU pipeline

Each cell sets one MBW block to 1.0 (the others stay 0.5), as a "pinpoint blocks" axis does.
With incremental re-merge only the keys whose ratio changed (the previous and the new block)
are recomputed and written into the resident pipeline; without it every key is. Image
generation is left out: it costs the same either way.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.merge_bench import build  # noqa: E402
from merger.blocks import BLOCKS_SD  # noqa: E402
from merger.engine import plan_merge  # noqa: E402
from merger.ldm_layout import checkpoint_layout  # noqa: E402
from merger.pipeline.resident import ResidentPipeline  # noqa: E402
from merger.recipe import Recipe  # noqa: E402


def sweep(rp, A, B, incremental: bool) -> list[float]:
    times = []
    for blk in BLOCKS_SD:
        vec = [1.0 if b == blk else 0.5 for b in BLOCKS_SD]
        t = time.perf_counter()
        rp.swap(plan_merge(Recipe("a", "b", mbw_alpha=vec), A, B), incremental=incremental)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    layout = checkpoint_layout("sd1")
    A, B = build(layout, 1, "a.safetensors"), build(layout, 2, "b.safetensors")
    rp = ResidentPipeline("cpu", torch.float32)
    rp.swap(plan_merge(Recipe("a", "b", mbw_alpha=[0.5] * 26), A, B))   # builds the pipeline
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SD1.5 shapes, 26-cell pinpoint sweep")
    full = sweep(rp, A, B, incremental=False)
    inc = sweep(rp, A, B, incremental=True)
    print(f"  full re-merge:        {sum(full) / 26:.3f} s per cell (min {min(full):.3f}, max {max(full):.3f})")
    print(f"  incremental re-merge: {sum(inc) / 26:.3f} s per cell (min {min(inc):.3f}, max {max(inc):.3f})")
    print(f"  speed-up: {sum(full) / sum(inc):.1f}x")
    worst = max(zip(inc, BLOCKS_SD))
    print(f"  slowest incremental cell: {worst[1]} {worst[0]:.3f} s (its block and the previous one are recomputed)")


if __name__ == "__main__":
    main()
