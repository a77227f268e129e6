"""Guided-search throughput: trials per minute and where a trial's time goes.

    python bench/search_bench.py            # demo (tiny) models and SD1.5-shaped models
    python bench/search_bench.py --tiny     # demo models only (seconds)
    python bench/search_bench.py --imagereward-only   # the ImageReward scorer's cost alone

For each model size: (1) merge+swap only — Optuna ask, the trial's recipe, the incremental
re-merge into the resident pipeline, tell — and (2) whole trials of a "look like this" search
(TPE, 26 block α) with a 64×64 one-step generation per trial, split into merging, generating,
scoring and the optimizer's own time (ask/tell/SQLite/history). SD1.5-shaped models are random
fp16 values with the real key names and shapes, written to a temporary folder.

(3) The ImageReward scorer at its real size (BLIP ViT-L/16 + BERT-base with cross-attention,
random weights, a synthetic 30 522-word vocabulary): seconds per scored image, against the bound
of its multiply-adds at the float32 matrix-multiply rate measured in the same run.
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


def imagereward_row(folder: Path, n: int = 3) -> None:
    """Time ImageReward on full-size random weights: per image, vs its FLOPs at this machine's GEMM rate."""
    import safetensors.torch as st
    from PIL import Image
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from merger.sweeps.imagereward import MED_DEFAULTS, ImageReward
    d, layers, hidden, tokens, text_tokens = 1024, 24, 4096, 197, 35
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=g) * 0.02
    sd = {"blip.visual_encoder.cls_token": rnd(1, 1, d), "blip.visual_encoder.pos_embed": rnd(1, tokens, d),
          "blip.visual_encoder.patch_embed.proj.weight": rnd(d, 3, 16, 16),
          "blip.visual_encoder.patch_embed.proj.bias": rnd(d), "blip.visual_encoder.norm.weight": torch.ones(d),
          "blip.visual_encoder.norm.bias": rnd(d)}
    for i in range(layers):
        for name, shape in (("norm1", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("norm2", (d,)),
                            ("mlp.fc1", (hidden, d)), ("mlp.fc2", (d, hidden))):
            sd[f"blip.visual_encoder.blocks.{i}.{name}.weight"] = rnd(*shape) + (1 if "norm" in name else 0)
            sd[f"blip.visual_encoder.blocks.{i}.{name}.bias"] = rnd(shape[0])
    text = BlipTextModel(BlipTextConfig(encoder_hidden_size=d, **MED_DEFAULTS),
                         add_pooling_layer=False)
    sd.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    for i, (o, n_in) in zip((0, 2, 4, 6, 7), ((1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"] = rnd(o, n_in), rnd(o)
    folder.mkdir(parents=True, exist_ok=True)
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "ImageReward.safetensors"))
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(30522 - len(words))]) + "\n")
    t0 = time.perf_counter()
    model = ImageReward(folder)
    print(f"  ImageReward loaded in {time.perf_counter() - t0:.2f} s (1.8 GB of float32 weights)")
    a = torch.randn(2048, 2048)
    torch.mm(a, a)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.mm(a, a)
    gemm = 3 * 2 * 2048 ** 3 / (time.perf_counter() - t0)
    # multiply-adds: ViT (qkv, proj, MLP, attention) + BERT self/cross attention and FFN over 35 tokens
    vit = layers * (tokens * (4 * d * d + 2 * d * hidden) + 2 * tokens * tokens * d) + tokens * 768 * d
    bert = 12 * (text_tokens * (8 * 768 * 768 + 2 * 768 * 3072) + 2 * tokens * 768 * d + 2 * text_tokens * tokens * 768)
    bound = 2 * (vit + bert) / gemm
    for size in (64, 512):
        im = Image.new("RGB", (size, size), (120, 60, 200))
        model([im], ["a photo of a cat"])
        t0 = time.perf_counter()
        for _ in range(n):
            model([im], ["a photo of a cat"])
        per = (time.perf_counter() - t0) / n
        print(f"  ImageReward, one {size}x{size} image: {per:.3f} s = {per / bound:.2f}x the bound "
              f"({2 * (vit + bert) / 1e9:.0f} GFLOP at {gemm / 1e9:.0f} GFLOP/s float32 GEMM = {bound:.3f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="demo models only")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--imagereward-only", action="store_true", help="only time the ImageReward scorer")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as d:
        if args.imagereward_only:
            print("\nImageReward scorer, real size (random weights)")
            imagereward_row(Path(d) / "imagereward")
            return
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
        print("\nImageReward scorer, real size (random weights)")
        imagereward_row(Path(d) / "imagereward")


if __name__ == "__main__":
    main()
