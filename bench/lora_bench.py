"""LoRA extraction (fast vs full SVD) and merging into a checkpoint, SD1.5 shapes, one run.

    python bench/lora_bench.py [--dim 128]

Model B = A + a rank-64 change plus small full-rank noise on every LoRA-able weight (what a
fine-tune looks like to an extractor). Printed: extraction time with the randomized and the
full SVD and the relative reconstruction error ||ΔW_lora - (B-A)|| / ||B-A|| of each; the time
to merge the extracted LoRA into A vs the bandwidth bound for the same tensors (one
``torch.add`` over flat buffers of the touched weights' size).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.merge_bench import best, build  # noqa: E402
from lora_ops.delta import module_delta  # noqa: E402
from lora_ops.extract import extract_lora, lora_modules  # noqa: E402
from lora_ops.formats import LoraFile, LoraModule  # noqa: E402
from lora_ops.merge_ckpt import merge_loras, parse_specs  # noqa: E402
from merger.ldm_layout import checkpoint_layout  # noqa: E402


def as_lorafile(sd: dict) -> LoraFile:
    mods: dict[str, LoraModule] = {}
    for k, v in sd.items():
        name, param = k.split(".", 1)
        m = mods.setdefault(name, LoraModule(name, "lora"))
        if param == "alpha":
            m.alpha = float(v)
        else:
            m.tensors[param] = v
    return LoraFile(Path("extracted.safetensors"), mods, {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    layout = checkpoint_layout("sd1")
    A = build(layout, 1, "a").tensors
    mods = lora_modules(A, "sd1", conv=False)
    g = torch.Generator().manual_seed(3)
    B = dict(A)
    for name, (key, _) in mods.items():
        w = A[key]
        out, inn = w.shape[0], w[0].numel()
        low = (torch.randn(out, 64, generator=g) @ torch.randn(64, inn, generator=g)) * (0.02 / 64)
        B[key] = (w.float() + low.reshape(w.shape) + 1e-4 * torch.randn(w.shape, generator=g)).to(w.dtype)
    n_params = sum(A[k].numel() for k, _ in mods.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SD1.5 shapes, {len(mods)} LoRA modules "
          f"({n_params / 1e6:.0f} M weights), dim {args.dim}")

    results = {}
    for fast in (True, False):
        t = time.perf_counter()
        sd, _ = extract_lora(B, A, "sd1", dim=args.dim, clamp_quantile=1.0, fast=fast)
        secs = time.perf_counter() - t
        lf = as_lorafile(sd)
        err = tot = 0.0
        for name, (key, _) in mods.items():
            if name in lf.modules:
                d = module_delta(lf.modules[name], tuple(A[key].shape))
                ref = B[key].float() - A[key].float()
                err += (d - ref).norm().item() ** 2
                tot += ref.norm().item() ** 2
        results[fast] = (secs, math.sqrt(err / tot), lf)
        print(f"  extract, {'randomized' if fast else 'full'} SVD: {secs:7.1f} s, relative error {math.sqrt(err / tot):.5f}")
    print(f"  randomized SVD is {results[False][0] / results[True][0]:.1f}x faster, error ratio "
          f"{results[True][1] / results[False][1]:.3f}")

    lf = results[True][2]
    spec = parse_specs("x:1", "sd1")[0]
    merge_t = best(lambda: merge_loras(A, [(lf, spec)], "sd1"), 2)
    flat_a = torch.empty(n_params, dtype=torch.float16).uniform_(-1, 1)
    flat_b, flat_o = torch.empty_like(flat_a).uniform_(-1, 1), torch.empty_like(flat_a)
    bound = best(lambda: torch.add(flat_a, flat_b, out=flat_o), 3)
    print(f"  merge the LoRA into the checkpoint: {merge_t:.2f} s; bound (torch.add over {n_params / 1e6:.0f} M fp16 "
          f"weights) {bound:.3f} s -> {merge_t / bound:.1f}x (the ΔW = up @ down products are compute, not memory)")


if __name__ == "__main__":
    main()
