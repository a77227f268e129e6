"""Merge-and-swap into the resident pipeline vs the bandwidth bound and vs save-then-reload.

    python bench/swap_bench.py          # SD1.5 shapes (1.07 B params), fp16 models

Prints, in one run: the time of a weight-sum merge written into the loaded pipeline's
parameters (fp32 on CPU: fp16 inputs, fp32 parameters), the bound for the same bytes (a plain
fp32 copy that reads 4 and writes 4 bytes per parameter, as the swap must), the alternative users have without
this app (merge, save a .safetensors, load it with diffusers' ``from_single_file``), the ratios,
and the peak RSS of each phase.
"""
from __future__ import annotations

import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from bench.merge_bench import best, build, peak_gib, reset_peak  # noqa: E402
from merger.engine import merge, plan_merge  # noqa: E402
from merger.ldm_layout import checkpoint_layout  # noqa: E402
from merger.pipeline import ResidentPipeline  # noqa: E402
from merger.recipe import Recipe  # noqa: E402
from merger.saving import SaveOptions, save_tensors  # noqa: E402


def main() -> None:
    repeat = 3
    layout = checkpoint_layout("sd1")
    numel = sum(math.prod(s) for s in layout.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SD1.5 layout, {numel / 1e9:.3f} B params")

    src, dst = (torch.empty(numel, dtype=torch.float32).uniform_(-1, 1) for _ in range(2))
    bound = best(lambda: dst.copy_(src), repeat)
    moved = numel * (2 + 2 + 4) / 1e9
    print(f"bound: fp32 copy over flat buffers, {moved:.1f} GB moved (= A and B in fp16 read, "
          f"fp32 parameters written): {bound:.3f} s ({moved / bound:.1f} GB/s)")
    del src, dst
    gc.collect()

    A, B = build(layout, 1, "a.safetensors"), build(layout, 2, "b.safetensors")
    rp = ResidentPipeline("cpu", torch.float32)
    reset_peak()
    t0 = time.perf_counter()
    rp.swap(plan_merge(Recipe("a", "b", alpha=0.3), A, B))
    first = time.perf_counter() - t0
    print(f"first merge+swap (builds the pipeline, allocates its 4.3 GB): {first:.2f} s, peak RSS {peak_gib():.1f} GiB")
    alphas = iter([0.4, 0.5, 0.6, 0.7, 0.8])
    reset_peak()
    swap = best(lambda: rp.swap(plan_merge(Recipe("a", "b", alpha=next(alphas)), A, B)), repeat)
    print(f"merge+swap into the resident pipeline: {swap:.3f} s  = {swap / bound:.2f}x bound, "
          f"peak RSS {peak_gib():.1f} GiB")

    from diffusers import StableDiffusionPipeline
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        path = Path(d) / "merged.safetensors"

        def save_and_reload():
            path.unlink(missing_ok=True)
            t = time.perf_counter()
            save_tensors(path, merge(Recipe("a", "b", alpha=0.3), A, B).tensors, SaveOptions())
            t_save = time.perf_counter() - t
            t = time.perf_counter()
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(rp.folder), local_files_only=True, safety_checker=None,
                requires_safety_checker=False, torch_dtype=torch.float32)
            del pipe
            gc.collect()
            return t_save, time.perf_counter() - t
        save_and_reload()   # warm-up
        reset_peak()
        t_save, t_load = min((save_and_reload() for _ in range(2)), key=sum)
        alt = t_save + t_load
        print(f"merge + save .safetensors + diffusers from_single_file: {alt:.2f} s "
              f"(merge+save {t_save:.2f} s, load {t_load:.2f} s), peak RSS {peak_gib():.1f} GiB")
    print(f"\nmerge+swap is {alt / swap:.1f}x faster than save-and-reload and {swap / bound:.2f}x the bound")


if __name__ == "__main__":
    main()
