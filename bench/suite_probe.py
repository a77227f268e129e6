"""A pytest plugin that times a fixed torch workload at the start of every test module, to see
whether the test process itself gets slower as the suite runs (it did, 1.6-2.3x from
``test_lora`` on, until the kernels' workers stopped changing torch's process-wide thread count:
see README, below the test command).

    PYTHONPATH=bench python -m pytest -q -s -p suite_probe tests/

Each module prints one line: the median of 5 × 200 3×3 convolutions (64 channels, 32×32) and of
5 × 200 256² matmuls, each as a ratio to the same figures taken at the first module of the run,
plus the torch and OpenMP thread settings and the process's thread count. A ratio near 2 from
some module on, with the machine otherwise idle, means torch's parallel kernels in this process
lost their second core: look for a thread that opened an OpenMP team of its own (``strace -f -e
clone3`` on the process, then ``gdb -batch -ex 'thread apply all bt'``: helpers wait in
``gomp_thread_start``)."""
from __future__ import annotations

import ctypes
import os
import statistics
import time

_first: dict[str, float] = {}
_seen: set[str] = set()


def _median_time(fn, reps: int = 5, inner: int = 200) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _omp() -> str:
    libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line or "iomp" in line})
    out = []
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
            out.append(f"{os.path.basename(path)}: dynamic={lib.omp_get_dynamic()} max={lib.omp_get_max_threads()}")
        except (OSError, AttributeError) as e:
            out.append(f"{os.path.basename(path)}: {e}")
    return ", ".join(out)


def pytest_runtest_setup(item):
    mod = item.module.__name__
    if mod in _seen:
        return
    _seen.add(mod)
    import torch
    x, w = torch.randn(1, 64, 32, 32), torch.randn(64, 64, 3, 3)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    now = {"conv": _median_time(lambda: torch.nn.functional.conv2d(x, w, padding=1)),
           "matmul": _median_time(lambda: a @ b)}
    for k, v in now.items():
        _first.setdefault(k, v)
    ratios = " ".join(f"{k} {v:.3f} s ({v / _first[k]:.2f}x)" for k, v in now.items())
    print(f"\n[suite_probe] {mod}: {ratios}; torch threads {torch.get_num_threads()}, "
          f"process threads {len(os.listdir('/proc/self/task'))}, load {open('/proc/loadavg').read().split()[0]}; "
          f"{_omp()}", flush=True)
