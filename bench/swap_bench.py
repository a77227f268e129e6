"""Merge-and-swap into the resident pipeline vs the bandwidth bound and vs save-then-reload.

    python bench/swap_bench.py          # SD1.5 shapes (1.07 B params), fp16 models

Prints, in one run: the time of a weight-sum merge written into the loaded pipeline's
parameters (CPU, fp32 compute), for both storage choices: the default, where an fp16 merge is
stored in fp16 and upcast layer by layer (2 bytes written per parameter), and ``storage="compute"``
(every parameter fp32, 4 bytes written); the memory-bandwidth bound for the bytes each one must
move (A and B read in fp16, the parameters written once), at the bandwidth of a plain fp32 copy
timed between the swaps; the alternative users have without this app (merge, save a .safetensors, load it with
diffusers' ``from_single_file``); the ratios; the peak RSS of each phase; and what the layerwise
upcast costs one U-Net step (a 256x256 image, CFG batch of 2).
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
from merger.pipeline.resident import ResidentPipeline, spec_for  # noqa: E402
from merger.pipeline.pipeline_config import pipeline_folder  # noqa: E402
from merger.recipe import Recipe  # noqa: E402
from merger.files.saving import SaveOptions, save_tensors  # noqa: E402


def bytes_moved(rp: ResidentPipeline) -> int:
    """A and B read in fp16, every parameter written once in its storage dtype."""
    return sum(p.numel() * (2 + 2 + p.element_size()) for m in rp.modules.values() for p in m.parameters())


@torch.no_grad()
def unet_step(rp: ResidentPipeline) -> float:
    unet = rp.modules["unet"]
    x = torch.randn(2, 4, 32, 32)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    return best(lambda: unet(x, torch.tensor([500]), ctx), 2)


def bandwidth_probe():
    """A plain fp32 copy between two 512 MiB buffers (far beyond the caches): GB/s of one run."""
    src, dst = (torch.empty(1 << 27, dtype=torch.float32).uniform_(-1, 1) for _ in range(2))

    def probe() -> float:
        t = time.perf_counter()
        dst.copy_(src)
        return src.numel() * 8 / 1e9 / (time.perf_counter() - t)
    return probe


def swap_phase(storage: str, A, B, repeat: int) -> tuple[float, float]:
    """Swap timings interleaved with bandwidth probes, so that both see the same machine load;
    the bound uses the best bandwidth seen (the most demanding bound)."""
    rp = ResidentPipeline("cpu", torch.float32, storage=storage)
    t0 = time.perf_counter()
    rp.swap(plan_merge(Recipe("a", "b", alpha=0.3), A, B))
    first = time.perf_counter() - t0
    held = sum(p.numel() * p.element_size() for m in rp.modules.values() for p in m.parameters()) / 1e9
    moved = bytes_moved(rp) / 1e9
    probe, bw, times = bandwidth_probe(), [], []
    for i in range(repeat):
        bw.append(probe())
        gc.collect()
        t = time.perf_counter()
        rp.swap(plan_merge(Recipe("a", "b", alpha=0.4 + 0.05 * i), A, B))
        times.append(time.perf_counter() - t)
    del probe
    gc.collect()
    reset_peak()
    rp.swap(plan_merge(Recipe("a", "b", alpha=0.9), A, B))
    swap, bound = min(times), moved / max(bw)
    print(f"\nstorage={storage!r}: parameters hold {held:.2f} GB; first merge+swap (builds the pipeline) {first:.2f} s")
    print(f"  merge+swap: {swap:.3f} s (best of {repeat}), peak RSS {peak_gib():.1f} GiB")
    print(f"  bound: its {moved:.1f} GB at the best copy bandwidth seen between the swaps, "
          f"{max(bw):.1f} GB/s (worst {min(bw):.1f}): {bound:.3f} s -> merge+swap is {swap / bound:.2f}x the bound")
    step = unet_step(rp)
    print(f"  one U-Net step (256x256, batch 2): {step:.2f} s")
    del rp
    gc.collect()
    return swap, step


def main() -> None:
    repeat = 5
    layout = checkpoint_layout("sd1")
    numel = sum(math.prod(s) for s in layout.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SD1.5 layout, {numel / 1e9:.3f} B params")
    A, B = build(layout, 1, "a.safetensors"), build(layout, 2, "b.safetensors")
    swap, step = swap_phase("model", A, B, repeat)
    swap32, step32 = swap_phase("compute", A, B, repeat)

    from diffusers import StableDiffusionPipeline
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        path = Path(d) / "merged.safetensors"
        cfg = pipeline_folder("sd1", spec_for(A.tensors).params())

        def save_and_reload():
            path.unlink(missing_ok=True)
            t = time.perf_counter()
            save_tensors(path, merge(Recipe("a", "b", alpha=0.3), A, B).tensors, SaveOptions())
            t_save = time.perf_counter() - t
            t = time.perf_counter()
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(cfg), local_files_only=True, safety_checker=None,
                requires_safety_checker=False, torch_dtype=torch.float32)
            del pipe
            gc.collect()
            return t_save, time.perf_counter() - t
        save_and_reload()   # warm-up
        reset_peak()
        t_save, t_load = min((save_and_reload() for _ in range(3)), key=sum)
        alt = t_save + t_load
        print(f"\nmerge + save .safetensors + diffusers from_single_file: {alt:.2f} s "
              f"(merge+save {t_save:.2f} s, load {t_load:.2f} s), peak RSS {peak_gib():.1f} GiB")
    print(f"\nmerge+swap (default storage) is {alt / swap:.1f}x faster than save-and-reload "
          f"(all-fp32 storage: {alt / swap32:.1f}x); one U-Net step with the per-layer upcast takes "
          f"{step:.2f} s vs {step32:.2f} s with fp32 weights ({step / step32:.2f}x)")


if __name__ == "__main__":
    main()
