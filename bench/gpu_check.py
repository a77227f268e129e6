"""The CUDA path, end to end, on full-size shapes: merge on the GPU, swap into a GPU pipeline in
fp16, generate; compared with the CPU merge of the same files, and timed.

    python bench/gpu_check.py                 # SD1.5 shapes (needs a CUDA GPU)
    python bench/gpu_check.py --xl            # also SDXL shapes (7 GB per model)
    python bench/gpu_check.py --tiny          # tiny demo shapes: a dry run of this script (CPU ok)
    python bench/gpu_check.py --profile       # also: GPU TIES with its inputs already on the GPU, and a profile

Models are random fp16 values with the real key names and shapes, written as .safetensors files
into a temporary model folder. Printed, each measured in this run:

- the host-to-device copy bandwidth (pageable and pinned) and the on-GPU copy bandwidth: the
  bounds a merge that reads mmapped files and computes on the GPU is held to;
- weight sum / add difference / TIES (base + 4 models) with ``device="cuda"`` vs the same merge
  on the CPU: time, and the largest difference between the two results (the CPU merge computes
  in fp32 per chunk, as the GPU one does, so they agree to fp16 rounding);
- sd-mecha's ``ties_sum`` on the GPU (``merge_device="cuda"``) over the same files, when installed;
- the workstation on the GPU: building the pipeline, a merge swapped into it (fp16), an
  incremental re-merge with another α (only the changed blocks), and a 512x512 20-step Euler a
  generation; the swapped weights are compared with the CPU merge and the image checked finite
  and not flat.
"""
from __future__ import annotations

import argparse
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
import safetensors.torch as st  # noqa: E402

from bench.merge_bench import Silent, peak_gib, reset_peak  # noqa: E402
from merger.engine import merge  # noqa: E402
from merger.files.checkpoint_io import load_checkpoint  # noqa: E402
from merger.files.model_dirs import ModelDirs  # noqa: E402
from merger.ldm_layout import sized_layout  # noqa: E402
from merger.pipeline.generate import GenParams  # noqa: E402
from merger.recipe import Recipe  # noqa: E402


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: str, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        out = None
        gc.collect()
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best, out


def bandwidths(numel: int, dev: str) -> dict[str, float]:
    """GB/s of: a pageable host->device copy, a pinned one, and an on-device fp16 add (3 buffers)."""
    n = min(numel, 256 << 20)
    host = torch.empty(n, dtype=torch.float16).uniform_(-1, 1)
    out = {}
    if dev == "cuda":
        d = torch.empty_like(host, device=dev)
        t, _ = timed(lambda: d.copy_(host), dev, 3)
        out["host->device (pageable)"] = n * 2 / t / 1e9
        pinned = host.pin_memory()
        t, _ = timed(lambda: d.copy_(pinned, non_blocking=True), dev, 3)
        out["host->device (pinned)"] = n * 2 / t / 1e9
        del pinned
    a = host.to(dev)
    b = torch.empty_like(a).uniform_(-1, 1)
    c = torch.empty_like(a)
    t, _ = timed(lambda: torch.add(a, b, out=c), dev, 5)
    out[f"fp16 add on {dev} (2 read + 1 written)"] = 3 * n * 2 / t / 1e9
    return out


def max_diff(x: dict, y: dict) -> float:
    worst = 0.0
    for k, v in x.items():
        if v.is_floating_point():
            worst = max(worst, (v.float().cpu() - y[k].float().cpu()).abs().max().item())
    return worst


def check_merges(paths: dict[str, Path], dev: str, mecha: bool, gbytes: float, profile: bool = False) -> None:
    A, B, C = (load_checkpoint(paths[n]) for n in "abc")
    ms = [load_checkpoint(paths[n]) for n in ("m1", "m2", "m3", "m4")]
    cases = [
        ("weight sum α=0.3", Recipe("a", "b", alpha=0.3), (A, B, None), {}, 3),
        ("add difference α=0.5", Recipe("a", "b", "c", mode="add_difference", alpha=0.5), (A, B, C), {}, 4),
        ("TIES base + 4 (density 0.2, count)", Recipe("a", method="ties", models=["1", "2", "3", "4"], alpha=1.0,
                                                     density=0.2, sign="count"), (A, None, None), {"models": ms}, 6),
    ]
    print("\nmerges from mmapped files (result tensors on the merge device):")
    for label, recipe, (a, b, c), extra, n_models in cases:
        t_cpu, ref = timed(lambda: merge(recipe, a, b, c, **extra).tensors, "cpu")
        t_dev, got = timed(lambda: merge(recipe, a, b, c, device=dev, **extra).tensors, dev, 2)
        moved = gbytes * n_models
        print(f"  {label:36} cpu {t_cpu:7.2f} s   {dev} {t_dev:6.2f} s ({moved / t_dev:5.1f} GB/s of "
              f"{moved:.1f} GB read+written)   {t_cpu / t_dev:5.1f}x   max |{dev} - cpu| {max_diff(got, ref):.2e}")
        del got, ref
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    if profile:
        profile_ties(cases[2][1], A, ms, dev)
    if not mecha:
        return
    try:
        import sd_mecha
        from sd_mecha.extensions.builtin.merge_methods import linear
    except ImportError:
        print("  sd-mecha not installed: its GPU TIES skipped")
        return
    names = ("a", "m1", "m2", "m3", "m4")

    def run_mecha():
        models = [sd_mecha.model(str(paths[n]), "sd1-ldm") for n in names]
        deltas = [sd_mecha.subtract(m, models[0]) for m in models[1:]]
        r = linear.add_difference(models[0], sd_mecha.ties_sum(*deltas, k=0.2), alpha=1.0)
        out: dict = {}
        sd_mecha.merge(r, output=out, tqdm=Silent, merge_device=dev, output_device=dev)
        return out
    recipe = cases[2][1]
    t_m, theirs = timed(run_mecha, dev)
    t_o, ours = timed(lambda: merge(recipe, A, models=ms, device=dev).tensors, dev, 2)
    keys = [k for k in theirs if k in ours and ours[k].is_floating_point()]
    diff = max_diff({k: ours[k] for k in keys}, theirs)
    print(f"  sd-mecha {getattr(sd_mecha, '__version__', '')} ties_sum on {dev}: {t_m:.2f} s; ours {t_o:.2f} s "
          f"-> ours {t_m / t_o:.1f}x faster; max |ours - sd-mecha| {diff:.2e} over {len(keys)} keys")


def profile_ties(recipe: Recipe, A, ms, dev: str) -> None:
    """Where a GPU TIES merge spends its time: the same merge with every input already on the
    device (the arithmetic alone, no host->device copies), and the top ops of a profiled run."""
    from merger.files.checkpoint_io import Checkpoint
    on_dev = [Checkpoint(ck.path, {k: v.to(dev) for k, v in ck.tensors.items()}) for ck in (A, *ms)]
    t, _ = timed(lambda: merge(recipe, on_dev[0], models=on_dev[1:], device=dev).tensors, dev, 2)
    print(f"  TIES with every input already on {dev} (arithmetic only): {t:.2f} s")
    on_dev.clear()
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        merge(recipe, A, models=ms, device=dev)
        sync(dev)
    for key in ("self_cpu_time_total",) + (("self_cuda_time_total",) if dev == "cuda" else ()):
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40))


def check_every_calcmode(folder: Path, dev: str) -> None:
    """Every mode x calcmode and every method on tiny models, on ``dev`` against the CPU: a
    device mix-up anywhere (a temporary made on the CPU) fails here in seconds."""
    from merger.engine.calcmodes import ALL_MODES, calcmode_names
    from merger.engine.methods import get_method, method_names
    paths, _ = write_models(folder, "sd1", "tiny", ("a", "b", "c", "m1", "m2"), tag="tiny_")
    A, B, C, M1, M2 = (load_checkpoint(paths[n]) for n in ("a", "b", "c", "m1", "m2"))
    cases = [(f"{m}/{cm}", Recipe("a", "b", "c", mode=m, calcmode=cm, alpha=0.3, beta=0.4, seed=5), {"c": C})
             for m in ALL_MODES for cm in calcmode_names(m)]
    cases += [(f"method {n}", Recipe("a", method=n, models=["1", "2"], alpha=0.8, seed=5), {"models": [M1, M2]})
              for n in method_names()]
    bad, worst = [], 0.0
    for label, recipe, extra in cases:
        try:
            ref = merge(recipe, A, B, **extra).tensors
            got = merge(recipe, A, B, device=dev, **extra).tensors
            d = max_diff(got, ref)
            random = recipe.method and get_method(recipe.method).random
            if not random:
                worst = max(worst, d)
            if d > 1e-2 and not random:
                bad.append(f"{label}: max diff {d:.2e}")
        except Exception as e:       # noqa: BLE001 - reported, the sweep goes on
            bad.append(f"{label}: {type(e).__name__}: {str(e)[:120]}")
    print(f"\nevery mode x calcmode and method on {dev} vs cpu (tiny models): {len(cases)} cases, "
          f"{len(bad)} failures, largest difference of the deterministic ones {worst:.2e}")
    for line in bad:
        print("  FAIL", line)


def check_workstation(folder: Path, dev: str, tiny: bool, xl: bool) -> None:
    from merger.workstation import Workstation
    dirs = ModelDirs.from_models_dir(folder)
    ws = Workstation(dirs, device=dev, dtype=torch.float16 if dev == "cuda" else torch.float32,
                     outputs=folder / "out")
    tag = "xl_" if xl else ""
    size = 64 if tiny else (1024 if xl else 512)
    print(f"\nworkstation on {dev} ({'SDXL' if xl else 'SD1.5'} shapes), pipeline dtype {ws.pipeline.dtype}:")
    for alpha, what in ((0.3, "first merge: pipeline built + merge + swap"), (0.3, "same recipe again"),
                        (0.6, "α changed: re-merge + swap")):
        recipe = ws.recipe(f"{tag}a.safetensors", f"{tag}b.safetensors", alpha=alpha)
        t, out = timed(lambda: ws.merge(recipe, source="gpu_check"), dev)
        print(f"  {what:44} {t:6.2f} s   ({out.message[:70]})")
    params = GenParams(prompt="a photo of a cat", seed=1, steps=4 if tiny else 20, width=size, height=size,
                       sampler="Euler a")
    ws.generate(params, save=False)        # warm-up (kernels, cudnn autotune)
    t, out = timed(lambda: ws.generate(params, save=False), dev)
    img = torch.tensor(list(out.result.images[0].image.getdata()), dtype=torch.float32)
    print(f"  generate {size}x{size}, {params.steps} steps, Euler a{'':7} {t:6.2f} s   image mean {img.mean():.1f} "
          f"std {img.std():.1f} (finite: {bool(torch.isfinite(img).all())})")
    # the swapped weights against the CPU merge of the same recipe
    a, b = load_checkpoint(dirs.ckpt / f"{tag}a.safetensors"), load_checkpoint(dirs.ckpt / f"{tag}b.safetensors")
    ref = merge(Recipe("a", "b", alpha=0.6), a, b).tensors
    sd = ws.pipeline.state_dict()
    worst, n = 0.0, 0
    for k, v in sd.items():
        if k in ref and v.is_floating_point() and ("diffusion_model" in k or "first_stage" in k):
            worst = max(worst, (v.float().cpu() - ref[k].float()).abs().max().item())
            n += 1
    dts = {str(v.dtype) for v in sd.values() if v.is_floating_point()}
    devs = {p.device.type for m in ws.pipeline.modules.values() for p in m.parameters()}
    print(f"  swapped weights vs CPU merge: max diff {worst:.2e} over {n} U-Net/VAE keys; "
          f"weights on {sorted(devs)}, dtypes {sorted(dts)}")
    if dev == "cuda":
        print(f"  GPU memory: peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    ws.unload()
    del ws, sd, ref
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def write_models(folder: Path, arch: str, size: str, names, tag: str = "") -> tuple[dict, float]:
    """Random fp16 files: each tensor a slice of one shared random pool at an offset that depends
    on the model and the key (filling billions of values from a seeded generator is serial and
    took a minute per run on 16 cores)."""
    layout = sized_layout(arch, size)
    numel = sum(math.prod(s) for s in layout.values())
    pool = torch.empty(1 << 26, dtype=torch.float16).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0))
    paths = {}
    for seed, n in enumerate(names, 1):
        sd, off = {}, seed * 7919
        for shape in layout.values():
            k = math.prod(shape)
            off = (off * 31 + 104729) % (pool.numel() - k) if k < pool.numel() else 0
            sd_t = pool[off: off + k] if k <= pool.numel() else pool.repeat(k // pool.numel() + 1)[:k]
            sd[len(sd)] = sd_t.reshape(shape).clone()
        keys = list(layout)
        paths[n] = folder / f"{tag}{n}.safetensors"
        st.save_file({keys[i]: t for i, t in sd.items()}, str(paths[n]))
        del sd
        gc.collect()
    return paths, numel * 2 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--xl", action="store_true")
    ap.add_argument("--no-mecha", action="store_true")
    ap.add_argument("--skip-merges", action="store_true", help="skip the full-size merge timings")
    ap.add_argument("--dir", help="scratch folder (default: a temporary one)")
    ap.add_argument("--profile", action="store_true", help="also break a GPU TIES merge's time down")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else "no GPU"
    print(f"torch {torch.__version__}, {dev} ({name}), {torch.get_num_threads()} CPU threads")
    size = "tiny" if args.tiny else "full"
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        folder = Path(d)
        os.environ["SDMW_DATA_DIR"] = str(folder / "data")      # this run's history, not the user's
        ckpt = folder / "Stable-diffusion"
        ckpt.mkdir()
        t0 = time.perf_counter()
        paths, gbytes = write_models(ckpt, "sd1", size, ("a", "b", "c", "m1", "m2", "m3", "m4"))
        print(f"7 SD1.5-shaped fp16 files written ({gbytes:.2f} GB each) in {time.perf_counter() - t0:.1f} s")
        for k, v in bandwidths(int(gbytes * 5e8), dev).items():
            print(f"  bandwidth, {k}: {v:.1f} GB/s")
        check_every_calcmode(folder, dev)
        if not args.skip_merges:
            check_merges(paths, dev, not args.no_mecha, gbytes, args.profile)
        reset_peak()
        check_workstation(folder, dev, args.tiny, False)
        if args.xl:
            for n in ("c", "m1", "m2", "m3", "m4"):
                paths[n].unlink()
            write_models(ckpt, "sdxl", size, ("a", "b"), tag="xl_")
            check_workstation(folder, dev, args.tiny, True)
    print(f"\npeak RSS {peak_gib():.1f} GiB")


if __name__ == "__main__":
    main()
