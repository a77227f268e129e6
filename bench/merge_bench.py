"""Merge speed against the memory-bandwidth bound and against sd-mecha, measured in one run.

    python bench/merge_bench.py            # SD1.5 shapes (1.07 B params), fp16
    python bench/merge_bench.py --xl       # SDXL shapes (3.47 B params), weight sum only
    python bench/merge_bench.py --no-mecha # skip the sd-mecha comparison
    python bench/merge_bench.py --ties     # only the TIES row (base + 4 models, from files)
    python bench/merge_bench.py --methods  # DARE, DELLA, Model Stock, geometric median on those files

Models are random values with the real key names and shapes, held in RAM. Printed: the time of
weight sum and add difference (fresh output tensors, and into preallocated buffers as the
resident pipeline does), the bound for the same bytes (one ``torch.add`` / ``torch.addcmul``
over flat buffers as large as the whole model), their ratios, peak RSS of each phase, and
sd-mecha's weighted sum of the same two models saved as files (with ours from the same files).
SDXL is benchmarked one component at a time (U-Net, text encoders, VAE) so three full copies
never need to be in RAM together on a 24 GiB machine.

The TIES row merges a base and four fine-tunes (density 0.2, sign by count as sd-mecha's
``ties_sum``) from .safetensors files, against the bandwidth bound for the bytes read and written
(five models in, one out, at the ``torch.add`` bandwidth of the same run) and against sd-mecha's
``ties_sum`` over the same files. Beside the first merge: what mapping the five files' pages costs
(fresh mappings, one byte read per 4 KiB page), which depends on how their pages sit in the page
cache: 0.03-0.06 s for 10.7 GB held almost all in 2 MiB pieces (files read from disk, and these
files as written here), 0.55-0.6 s for files of which only a fifth were (written another way):
time a first merge pays and the bound does not.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from merger.files.checkpoint_io import Checkpoint, load_checkpoint  # noqa: E402
from merger.engine import iter_merge, merge, plan_merge  # noqa: E402
from merger.ldm_layout import checkpoint_layout  # noqa: E402
from merger.recipe import Recipe  # noqa: E402


# where the model files are written: beside the checkout (the system's /tmp may be a small tmpfs);
# --dir elsewhere (on a machine whose checkout sits on a slow mount)
SCRATCH = Path(__file__).resolve().parent.parent


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def build(layout: dict, seed: int, name: str) -> Checkpoint:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        t = torch.empty(shape, dtype=torch.float16)
        t.uniform_(-0.05, 0.05, generator=g)
        sd[k] = t
    return Checkpoint(Path(name), sd)


def bound(numel: int, inputs: int, repeat: int) -> tuple[float, float]:
    """One elementwise op over flat fp16 buffers of the model's size: (into a preallocated
    output, into a freshly allocated output)."""
    bufs = [torch.empty(numel, dtype=torch.float16).uniform_(-1, 1) for _ in range(inputs + 1)]
    op = (lambda **o: torch.add(bufs[0], bufs[1], **o)) if inputs == 2 else \
        (lambda **o: torch.addcmul(bufs[0], bufs[1], bufs[2], **o))
    pre = best(lambda: op(out=bufs[-1]), repeat)
    del bufs[-1]
    fresh = best(lambda: op(), repeat)
    del bufs
    gc.collect()
    return pre, fresh


def ours(recipe, A, B, C, repeat: int, arch: str) -> tuple[float, float, float]:
    """(fresh-output seconds, preallocated-output seconds, peak GiB of the fresh run)."""
    reset_peak()
    fresh = best(lambda: merge(recipe, A, B, C, arch=arch), 1)
    pk = peak_gib()
    fresh = min(fresh, best(lambda: merge(recipe, A, B, C, arch=arch), repeat - 1) if repeat > 1 else fresh)
    plan = plan_merge(recipe, A, B, C, arch=arch)
    bufs = {k: torch.empty_like(v) for k, v in A.tensors.items()}

    def into():
        for _ in iter_merge(plan, out_for=lambda k, like: bufs[k]):
            pass
    into()
    pre = best(into, repeat)
    del bufs
    gc.collect()
    return fresh, pre, pk


def row(label: str, t: float, b: float, gb: float, extra: str = "") -> None:
    print(f"  {label:38} {t:7.3f} s  {gb / t:6.1f} GB/s  {t / b:5.2f}x bound  {extra}")


def bench_layout(layout: dict, modes: list[str], repeat: int, title: str, arch: str = "sd1") -> dict:
    numel = sum(math.prod(s) for s in layout.values())
    gbytes = numel * 2 / 1e9
    print(f"\n{title}: {len(layout)} tensors, {numel / 1e9:.3f} B params, {gbytes:.2f} GB per fp16 model")
    results = {}
    for mode in modes:
        n_in = 2 if mode == "weight_sum" else 3
        reset_peak()
        b, b_fresh = bound(numel, n_in, repeat)
        moved = gbytes * (n_in + 1)
        op = "torch.add" if n_in == 2 else "torch.addcmul"
        print(f" {mode}: bound = one {op} over flat buffers, {moved:.1f} GB moved: {b:.3f} s into a "
              f"preallocated output ({moved / b:.1f} GB/s), {b_fresh:.3f} s into a fresh one")
        A, B = build(layout, 1, "a"), build(layout, 2, "b")
        C = build(layout, 3, "c") if n_in == 3 else None
        recipe = Recipe("a", "b", "c" if C else "", mode=mode, alpha=0.3)
        fresh, pre, pk = ours(recipe, A, B, C, repeat, arch)
        row("ours, fresh output tensors", fresh, b_fresh, moved, f"(vs fresh bound) peak RSS {pk:.1f} GiB")
        row("ours, into preallocated buffers", pre, b, moved, "(vs preallocated bound)")
        results[mode] = (fresh, pre, b, b_fresh)
        del A, B, C
        gc.collect()
    return results


def bench_mecha(layout: dict, repeat: int) -> None:
    try:
        import sd_mecha
    except ImportError:
        print("\nsd-mecha not installed (pip install sd-mecha): comparison skipped")
        return

    import safetensors.torch as st
    recipe = Recipe("a", "b", alpha=0.3)
    with tempfile.TemporaryDirectory(dir=SCRATCH) as d:
        paths = []
        for seed, name in ((1, "a"), (2, "b")):
            ck = build(layout, seed, name)
            p = Path(d) / f"{name}.safetensors"
            st.save_file(ck.tensors, str(p))
            paths.append(p)
            del ck
        gc.collect()
        print("\nweighted sum α=0.3 of two SD1.5 fp16 models, sd-mecha vs ours:")

        def mecha(a, b):
            out: dict = {}
            r = sd_mecha.weighted_sum(sd_mecha.model(a, "sd1-ldm"), sd_mecha.model(b, "sd1-ldm"), alpha=0.3)
            sd_mecha.merge(r, output=out, tqdm=Silent, merge_device="cpu", output_device="cpu")
            return out

        def ours_files():
            return merge(recipe, load_checkpoint(paths[0]), load_checkpoint(paths[1]))

        results = {}
        A, B = load_checkpoint(paths[0]), load_checkpoint(paths[1])
        for label, fn, n in (
                ("sd-mecha, from the .safetensors files", lambda: mecha(str(paths[0]), str(paths[1])), 1),
                ("sd-mecha, from state dicts in RAM", lambda: mecha(A.tensors, B.tensors), 1),
                ("ours, load (mmap) + merge from the files", ours_files, repeat),
                ("ours, inputs in RAM", lambda: merge(recipe, A, B), repeat)):
            fn()  # warm-up: page cache, first-touch
            reset_peak()
            results[label] = best(fn, n)
            print(f"  {label:42} {results[label]:7.2f} s  peak RSS {peak_gib():.1f} GiB")
        ver = getattr(sd_mecha, "__version__", "")
        t_m = min(v for k, v in results.items() if k.startswith("sd-mecha"))
        print(f"  speed-up over sd-mecha {ver} (its best vs ours): files {t_m / results['ours, load (mmap) + merge from the files']:.0f}x, "
              f"in RAM {t_m / results['ours, inputs in RAM']:.0f}x")


class Silent:
    """A do-nothing tqdm for sd-mecha."""

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def update(self, *a, **k):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def settle() -> None:
    """Write the files just made to disk before timing anything: the kernel's writeback of
    10.7 GB of dirty pages otherwise runs during the first measurements (on 2 cores it took
    0.3-0.8 s off a re-merge's timing, at random)."""
    if hasattr(os, "sync"):
        os.sync()


def write_models(layout: dict, names: list[str], folder: Path) -> list[Path]:
    """One random fp16 .safetensors file per name (seeds 1, 2, ...), written one at a time."""
    import safetensors.torch as st
    paths = []
    for seed, name in enumerate(names, 1):
        ck = build(layout, seed, name)
        paths.append(folder / f"{name}.safetensors")
        st.save_file(ck.tensors, str(paths[-1]))
        del ck
        gc.collect()
    settle()
    return paths


def map_seconds(paths: list[Path]) -> float:
    """Seconds to map every page of fresh private mappings of ``paths`` (one byte read per 4 KiB
    page), as a merge's first reads of freshly loaded files do; the files are in the page cache."""
    maps = []
    for p in paths:
        with open(p, "rb") as f:
            maps.append(mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))
    t = time.perf_counter()
    for m in maps:
        torch.frombuffer(m, dtype=torch.uint8)[::4096].sum()
    dt = time.perf_counter() - t
    gc.collect()
    return dt


def bench_ties(layout: dict, repeat: int, with_mecha: bool) -> None:
    numel = sum(math.prod(s) for s in layout.values())
    gbytes = numel * 2 / 1e9
    names = ["base", "m1", "m2", "m3", "m4"]
    pre, _ = bound(numel, 2, repeat)
    bw = 3 * gbytes / pre
    ties_bound = 6 * gbytes / bw
    print(f"\nTIES, base + 4 models (density 0.2, sign by count), SD1.5 fp16 files: {6 * gbytes:.1f} GB read "
          f"and written; bound at {bw:.1f} GB/s (torch.add, flat buffers) = {ties_bound:.2f} s")
    with tempfile.TemporaryDirectory(dir=SCRATCH) as d:
        paths = write_models(layout, names, Path(d))
        recipe = Recipe("base.safetensors", method="ties", models=[f"{n}.safetensors" for n in names[1:]],
                        alpha=1.0, density=0.2, sign="count")

        def ours():
            cks = [load_checkpoint(p) for p in paths]
            return merge(recipe, cks[0], models=cks[1:])
        reset_peak()
        t_map = map_seconds(paths)
        t_ours = best(ours, repeat)
        print(f"  {'ours, load (mmap) + merge from the files':42} {t_ours:7.2f} s  {t_ours / ties_bound:5.1f}x bound  "
              f"peak RSS {peak_gib():.1f} GiB; mapping their pages {t_map:.2f} s = {t_map / ties_bound:.1f}x")
        held = [load_checkpoint(p) for p in paths]            # the workstation's case: models stay loaded
        merge(recipe, held[0], models=held[1:])

        def alpha_changed():
            return merge(dataclasses.replace(recipe, alpha=0.5), held[0], models=held[1:])
        t_alpha = best(alpha_changed, repeat)
        print(f"  {'ours, α changed, same loaded models':42} {t_alpha:7.2f} s  {t_alpha / ties_bound:5.1f}x bound  "
              f"(thresholds kept)")
        bufs = {k: torch.empty_like(v) for k, v in held[0].tensors.items()}
        plan = plan_merge(dataclasses.replace(recipe, alpha=0.5), held[0], models=held[1:])

        def into():                     # the resident pipeline's case: results land in its buffers
            for _ in iter_merge(plan, out_for=lambda k, like: bufs[k]):
                pass
        into()
        t_into = best(into, repeat)
        print(f"  {'ours, α changed, into preallocated buffers':42} {t_into:7.2f} s  {t_into / ties_bound:5.1f}x bound  "
              f"(the resident-pipeline path)")
        del bufs, plan
        import merger.engine.methods.ties as ties_mod     # inductor's compiled combination, as without numba
        numba_combine = ties_mod._numba_combine
        ties_mod._numba_combine = lambda *a: None
        try:
            t_ind = best(ours, repeat)
            t_ind_alpha = best(alpha_changed, repeat)
        finally:
            ties_mod._numba_combine = numba_combine
        label = "ours, inductor's combination, not numba's"
        print(f"  {label:42} {t_ind:7.2f} s  {t_ind / ties_bound:5.1f}x bound  "
              f"(α changed: {t_ind_alpha:.2f} s = {t_ind_alpha / ties_bound:.1f}x)")
        held.clear()
        if not with_mecha:
            return
        import sd_mecha
        from sd_mecha.extensions.builtin.merge_methods import linear

        def mecha():
            models = [sd_mecha.model(str(p), "sd1-ldm") for p in paths]
            deltas = [sd_mecha.subtract(m, models[0]) for m in models[1:]]
            # linear.add_difference: sd-mecha 1.1.8's add_difference_ties wrapper fails on a delta node
            r = linear.add_difference(models[0], sd_mecha.ties_sum(*deltas, k=0.2), alpha=1.0)
            out: dict = {}
            sd_mecha.merge(r, output=out, tqdm=Silent, merge_device="cpu", output_device="cpu")
            return out
        reset_peak()
        t_m = best(mecha, 1)
        print(f"  {'sd-mecha ties_sum, from the same files':42} {t_m:7.2f} s  {t_m / ties_bound:5.1f}x bound  "
              f"peak RSS {peak_gib():.1f} GiB")
        print(f"  ours is {t_m / t_ours:.1f}x faster than sd-mecha {getattr(sd_mecha, '__version__', '')}")


def bench_methods(layout: dict, names: list[str]) -> None:
    """The other N-model methods on the TIES row's files (base + 4, SD1.5 fp16), one merge each
    with the inputs loaded and scanned, against the same bound (the method's second parameter
    at its default, seed 1)."""
    numel = sum(math.prod(s) for s in layout.values())
    gbytes = numel * 2 / 1e9
    pre, _ = bound(numel, 2, 2)
    bw = 3 * gbytes / pre
    b6 = 6 * gbytes / bw
    print(f"\nN-model methods, base + 4 models, SD1.5 fp16 files: bound {b6:.2f} s at {bw:.1f} GB/s")
    with tempfile.TemporaryDirectory(dir=SCRATCH) as d:
        paths = write_models(layout, ["base", "m1", "m2", "m3", "m4"], Path(d))
        held = [load_checkpoint(p) for p in paths]
        for ck in held:
            ck.value_stats()
        for name in names:
            recipe = Recipe("base.safetensors", method=name, models=[p.name for p in paths[1:]], alpha=1.0, seed=1)
            gc.collect()
            t = time.perf_counter()
            merge(recipe, held[0], models=held[1:])
            dt = time.perf_counter() - t
            print(f"  {name:42} {dt:7.2f} s  {dt / b6:5.1f}x bound")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xl", action="store_true")
    ap.add_argument("--no-mecha", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ties", action="store_true", help="only the TIES row")
    ap.add_argument("--methods", nargs="*", metavar="NAME",
                    help="only the other N-model methods (default: dare_linear dare_ties della model_stock "
                         "geometric_median)")
    ap.add_argument("--dir", help="where to write the model files (default: beside the checkout)")
    args = ap.parse_args()
    global SCRATCH
    if args.dir:
        SCRATCH = Path(args.dir)
        SCRATCH.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.methods is not None:
        bench_methods(checkpoint_layout("sd1"), args.methods or
                      ["dare_linear", "dare_ties", "della", "model_stock", "geometric_median"])
        return
    if args.ties:
        bench_ties(checkpoint_layout("sd1"), args.repeat, not args.no_mecha)
        return
    if args.xl:
        full = checkpoint_layout("sdxl")
        parts = {"U-Net": "model.diffusion_model.", "text encoders": "conditioner.", "VAE": "first_stage_model."}
        total = {}
        for title, prefix in parts.items():
            res = bench_layout({k: v for k, v in full.items() if k.startswith(prefix)}, ["weight_sum"],
                               args.repeat, f"SDXL {title}", "sdxl")
            for k, v in res.items():
                total[k] = [x + y for x, y in zip(total.get(k, (0, 0, 0, 0)), v)]
        for mode, (fresh, pre, b, bf) in total.items():
            print(f"\nSDXL whole model, {mode}: ours {fresh:.2f} s fresh / {pre:.2f} s preallocated, "
                  f"bound {bf:.2f} s fresh / {b:.2f} s preallocated -> {fresh / bf:.2f}x / {pre / b:.2f}x")
        return
    layout = checkpoint_layout("sd1")
    bench_layout(layout, ["weight_sum", "add_difference"], args.repeat, "SD1.5")
    if not args.no_mecha:
        bench_mecha(layout, args.repeat)
    bench_ties(layout, args.repeat, not args.no_mecha)
    print(f"\npeak RSS of the whole run: {peak_gib():.1f} GiB")


if __name__ == "__main__":
    main()
