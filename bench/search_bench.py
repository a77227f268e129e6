"""Guided-search throughput: trials per minute and where a trial's time goes.

    python bench/search_bench.py            # demo (tiny) models and SD1.5-shaped models
    python bench/search_bench.py --tiny     # demo models only (seconds)

For each model size: (1) merge+swap only — Optuna ask, the trial's recipe, the incremental
re-merge into the resident pipeline, tell — and (2) whole trials of a "look like this" search
(TPE, 26 block α) with a 64×64 one-step generation per trial, split into merging, generating,
scoring and the optimizer's own time (ask/tell/SQLite/history). SD1.5-shaped models are random
fp16 values with the real key names and shapes, written to a temporary folder.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from merger.files.model_dirs import ModelDirs  # noqa: E402
from merger.pipeline.generate import GenParams  # noqa: E402
from merger.sweeps.search import Search, SearchSpace, SearchSpec, recipe_for, suggest  # noqa: E402
from merger.workstation import Workstation  # noqa: E402


class Timer:
    def __init__(self):
        self.t = {"merge": 0.0, "generate": 0.0, "score": 0.0}

    def wrap(self, obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[key] += time.perf_counter() - t0
        setattr(obj, name, timed)


def merge_only(ws, a, b, n: int, storage: str) -> float:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="merge-only", storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    base = ws.recipe(a, b, mbw_alpha=[0.5] * 26)
    space = SearchSpace(blocks=["BASE", "IN00-IN11", "M00", "OUT00-OUT11"])
    ws.merge(base)
    t0 = time.perf_counter()
    for _ in range(n):
        trial = study.ask()
        ws.merge(recipe_for(suggest(trial, space, "sd1"), base, "sd1"), source="search", interruptible=False)
        study.tell(trial, 0.0)
    return (time.perf_counter() - t0) / n


def whole_trials(ws, a, b, n: int, storage: str) -> tuple[float, dict]:
    gen = GenParams(prompt="a photo of a cat", steps=1, width=64, height=64, seed=1)
    ws.merge(ws.recipe(a, b, mbw_alpha=[0.3] * 26))
    ref = ws.generate(gen, save=False).result.images[0].image
    spec = SearchSpec(ws.recipe(a, b, mbw_alpha=[0.5] * 26), SearchSpace(blocks=["BASE", "IN00-IN11", "M00", "OUT00-OUT11"]),
                      gen, prompts=["a photo of a cat"], seeds=[1], objective="like", trials=n, references=[ref],
                      study="whole")
    search = Search(ws, spec, storage)
    timer = Timer()
    timer.wrap(ws, "merge", "merge")
    timer.wrap(ws, "generate", "generate")
    timer.wrap(search, "objective", "score")
    t0 = time.perf_counter()
    search.run()
    total = time.perf_counter() - t0
    del ws.merge, ws.generate
    shares = dict(timer.t)
    shares["optimizer, SQLite, history"] = total - sum(shares.values())
    return total / n, shares


def report(title: str, per_merge: float, per_trial: float, shares: dict) -> None:
    total = sum(shares.values())
    print(f"\n{title}")
    print(f"  merge+swap only: {per_merge * 1000:7.1f} ms per trial = {60 / per_merge:6.0f} trials/min")
    print(f"  whole trial (64×64, 1 step): {per_trial * 1000:7.1f} ms = {60 / per_trial:6.0f} trials/min")
    print("  share: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in shares.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="demo models only")
    ap.add_argument("--trials", type=int, default=30)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as d:
        from merger.demo import ensure_demo_models
        dirs = ModelDirs.from_models_dir(Path(d) / "models")
        ensure_demo_models(dirs)
        storage = f"sqlite:///{Path(d) / 'search.db'}"
        ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=Path(d) / "out")
        a, b = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors"
        per_merge = merge_only(ws, a, b, args.trials, storage)
        per_trial, shares = whole_trials(ws, a, b, args.trials, storage.replace("search.db", "tiny.db"))
        report("demo models (tiny SD1 layout)", per_merge, per_trial, shares)
        if args.tiny:
            return
        import safetensors.torch as st

        from merger.synthetic import random_checkpoint
        for seed, name in ((1, "sd15-A.safetensors"), (2, "sd15-B.safetensors")):
            st.save_file(random_checkpoint("sd1", size="full", seed=seed, dtype=torch.float16, extras=False),
                         str(dirs.ckpt / name))
        ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=Path(d) / "out")
        n = max(5, args.trials // 3)
        per_merge = merge_only(ws, "sd15-A.safetensors", "sd15-B.safetensors", n, storage.replace("search", "m15"))
        per_trial, shares = whole_trials(ws, "sd15-A.safetensors", "sd15-B.safetensors", n,
                                         storage.replace("search", "w15"))
        report("SD1.5-shaped models (1.07 B params, fp16 files, fp32 CPU pipeline)", per_merge, per_trial, shares)


if __name__ == "__main__":
    main()
