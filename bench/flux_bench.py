"""A full-size Flux.1 fp8 merge streamed to a file, in bounded memory.

    python bench/flux_bench.py                   # two 11.9 GB fp8 transformers, 8 GiB memory limit
    python bench/flux_bench.py --limit-gb 0      # no limit (report peak RSS only)
    python bench/flux_bench.py --depth 2 --single 4   # a smaller model (a dry run)

Two Flux.1-dev transformers in BFL's bare layout (11.9 B params each, float8_e4m3fn, random values:
slices of one random pool at per-model offsets) are streamed to disk; then ``python -m merger
merge`` (weight sum α=0.5, output fp8) runs in a child process. Where this machine allows (cgroup v1
memory controller writable, as root), the child runs in a memory cgroup limited to ``--limit-gb``,
less than either input file: it must finish, with the kernel reclaiming the page cache of the
memory-mapped inputs as it goes. Printed, all measured in this run:

- the disk's write bandwidth (4 GB from memory, fsync included) and cold read bandwidth (one
  input read back after dropping the page cache, when allowed);
- the merge's time against the bound for its bytes (two inputs read, one output written, at those
  bandwidths);
- the child's peak RSS (file-backed pages of the mapped inputs included), its peak anonymous memory
  (what the merge itself holds), and the cgroup's peak usage (page cache included) against its limit;
- a spot check that the output equals lerp(A, B, 0.5) in float32 rounded to fp8 for a few tensors.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CGROUP = Path("/sys/fs/cgroup/memory/sdmw-flux-bench")


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def write_model(path: Path, layout: dict, seed: int, pool: torch.Tensor) -> float:
    """Stream a float8 safetensors file tensor by tensor (bounded memory); returns seconds."""
    from merger.files.saving import write_safetensors_stream
    spec = {k: (shape, torch.float8_e4m3fn) for k, shape in layout.items()}

    def items():
        off = seed * 7919
        for key, shape in layout.items():
            n = math.prod(shape)
            off = (off * 31 + 104729) % pool.numel()
            reps = -(-(off + n) // pool.numel())
            flat = pool.repeat(reps)[off:off + n] if reps > 1 else pool[off:off + n]
            yield key, flat.view(shape)
    t = time.perf_counter()
    with open(path, "wb") as f:
        write_safetensors_stream(f, spec, items())
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def write_bw(folder: Path, gb: float = 4.0) -> float:
    """GB/s of writing ``gb`` GB from memory with fsync (the output's bound)."""
    buf = memoryview(bytearray(1 << 26))
    path = folder / "probe.bin"
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(int(gb * 1e9) // len(buf)):
            f.write(buf)
        os.fsync(f.fileno())
    took = time.perf_counter() - t
    path.unlink()
    return int(gb * 1e9) // len(buf) * len(buf) / took / 1e9


def read_cold(path: Path) -> float:
    """GB/s of reading ``path`` once (after dropping the page cache when allowed)."""
    drop_caches()
    buf = bytearray(1 << 26)
    t, n = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(buf)) > 0:
            n += k
    return n / (time.perf_counter() - t) / 1e9


def make_cgroup(limit: int) -> bool:
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit))
        try:
            (CGROUP / "memory.memsw.limit_in_bytes").write_text(str(limit))   # no swapping around it
        except OSError:
            pass
        return True
    except OSError:
        return False


def watch(pid: int, peaks: dict, done: threading.Event) -> None:
    while not done.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("VmHWM", "RssAnon", "RssFile"):
                    peaks[name] = max(peaks.get(name, 0), int(value.split()[0]) * 1024)
        except OSError:
            pass
        done.wait(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="scratch folder (default: a temporary one; needs 3 x 12 GB)")
    ap.add_argument("--limit-gb", type=float, default=8.0)
    ap.add_argument("--depth", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    args = ap.parse_args()
    from merger.flux_layout import flux_layout
    layout = flux_layout("full", all_in_one=False, bare=True, depth=args.depth, depth_single=args.single)
    params = sum(math.prod(s) for s in layout.values())
    gb = params / 1e9                                  # float8: one byte per parameter
    print(f"Flux.1 transformer, {len(layout)} tensors, {params / 1e9:.2f} B params = {gb:.1f} GB per fp8 file")
    pool = torch.empty(1 << 26).uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(0)).to(torch.float8_e4m3fn)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        a, b, out = Path(d) / "a.safetensors", Path(d) / "b.safetensors", Path(d) / "merged.safetensors"
        t_w = write_model(a, layout, 1, pool) + write_model(b, layout, 2, pool)
        w_bw = write_bw(Path(d))
        r_bw = read_cold(a)
        dropped = drop_caches()
        print(f"inputs written in {t_w:.0f} s; disk: write {w_bw:.2f} GB/s (4 GB from memory, fsync'd), cold read "
              f"{r_bw:.2f} GB/s (page cache {'dropped' if dropped else 'NOT dropped: not allowed here'})")
        limit = int(args.limit_gb * 2**30)
        limited = args.limit_gb > 0 and make_cgroup(limit)
        cmd = [sys.executable, "-m", "merger", "merge", "--model-a", str(a), "--model-b", str(b), "--mode",
               "weight_sum", "--alpha", "0.5", "--output", str(out), "--no-history", "--quiet"]
        if limited:
            cmd = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *cmd]
        peaks: dict = {}
        done = threading.Event()
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watcher = threading.Thread(target=watch, args=(proc.pid, peaks, done), daemon=True)
        watcher.start()
        so, se = proc.communicate()
        took = time.perf_counter() - t
        done.set()
        if proc.returncode:
            print(f"merge FAILED (exit {proc.returncode}): {se.strip()[-500:]}")
            return
        cg_peak = None
        if limited:
            cg_peak = int((CGROUP / "memory.max_usage_in_bytes").read_text())
        bound = 2 * gb / r_bw + gb / w_bw
        print(f"merge (weight sum, fp8 in, fp8 out, streamed): {took:.1f} s for {3 * gb:.1f} GB read+written; "
              f"bound {bound:.1f} s (2 x {gb:.1f} GB at {r_bw:.2f} GB/s + {gb:.1f} GB at {w_bw:.2f} GB/s) "
              f"-> {took / bound:.2f}x the bound")
        print(f"child peak RSS {peaks.get('VmHWM', 0) / 2**30:.2f} GiB (mapped input pages included), peak "
              f"anonymous {peaks.get('RssAnon', 0) / 2**30:.2f} GiB, peak file-backed {peaks.get('RssFile', 0) / 2**30:.2f} GiB")
        if limited:
            print(f"memory cgroup limit {args.limit_gb:.1f} GiB (each input is {gb / 1.073741824:.1f} GiB): finished; "
                  f"cgroup peak usage {cg_peak / 2**30:.2f} GiB (page cache included)")
        else:
            print("no memory limit applied (cgroup v1 memory controller not writable here, or --limit-gb 0)")
        from merger.files.checkpoint_io import load_checkpoint
        ca, cb, co = (load_checkpoint(p) for p in (a, b, out))
        keys = ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                "model.diffusion_model.single_blocks.0.linear1.weight", "model.diffusion_model.final_layer.linear.bias"]
        for k in keys:
            want = torch.lerp(ca.tensors[k].float(), cb.tensors[k].float(), 0.5).to(torch.float8_e4m3fn)
            assert torch.equal(co.tensors[k].view(torch.uint8), want.view(torch.uint8)), k
        print(f"spot check: {len(keys)} tensors equal lerp(A, B, 0.5) rounded to fp8; output "
              f"{out.stat().st_size / 1e9:.1f} GB, {len(co.tensors)} tensors")
    if limited:
        try:
            CGROUP.rmdir()
        except OSError:
            pass


if __name__ == "__main__":
    main()
