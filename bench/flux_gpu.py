"""Flux.1 at full size on a GPU: merge two models into the resident FluxPipeline and generate.

    python bench/flux_gpu.py            # needs a CUDA GPU with ~40 GiB free and ~35 GB of disk
    python bench/flux_gpu.py --tiny     # tiny shapes: a dry run of this script (CPU ok)

Model A is a ComfyUI-style all-in-one Flux.1-dev checkpoint (transformer in fp8, CLIP-L, T5-XXL and
the VAE in bf16), model B a BFL transformer-only fine-tune in fp8 (the common case: merging a
downloaded transformer into an all-in-one model); random values with the real key names and shapes.
The T5 tokenizer is a small stand-in built here (the real vocabulary is a file users have; token
ids are all it feeds the encoder, so timings do not depend on it). Printed, measured in this run:
building the pipeline, a weight-sum merge swapped in (bf16 on the GPU), the same recipe again, α
changed (every key re-merged), a 1024² 20-step image, peak GPU memory, and a spot check of swapped
weights against the merge formula computed directly.
"""
from __future__ import annotations

import argparse
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


def write(path: Path, layout: dict, dtypes, seed: int, pool: torch.Tensor) -> None:
    """Stream a safetensors file (``dtypes(key)`` per tensor), bounded memory."""
    from merger.files.saving import write_safetensors_stream
    spec = {k: (s, dtypes(k)) for k, s in layout.items()}

    def items():
        off = seed * 7919
        for key, (shape, dt) in spec.items():
            n = math.prod(shape)
            off = (off * 31 + 104729) % pool.numel()
            reps = -(-(off + n) // pool.numel())
            flat = pool.repeat(reps)[off:off + n] if reps > 1 else pool[off:off + n]
            v = flat.view(shape)
            if len(shape) == 1 and ("norm" in key or "scale" in key):
                v = v + 1.0
            yield key, v.to(dt)
    with open(path, "wb") as f:
        write_safetensors_stream(f, spec, items())


def t5_stand_in(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast
    words = "a photo of cat dog the on in painting red blue".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -2.0) for w in words] + \
        [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("▁", -3.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                    model_max_length=512).save_pretrained(str(folder))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--dir", help="scratch folder")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from merger.files.model_dirs import ModelDirs
    from merger.flux_layout import PREFIX, flux_layout, strip_prefix
    from merger.pipeline.generate import GenParams
    from merger.workstation import Workstation
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    size = "tiny" if args.tiny else "full"
    print(f"torch {torch.__version__}, {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'no GPU'})")
    pool = torch.empty(1 << 26).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        root = Path(d)
        os.environ["SDMW_DATA_DIR"] = str(root / "data")
        dirs = ModelDirs.from_models_dir(root / "models")
        dirs.create()
        aio = flux_layout(size)
        fp8 = lambda k: torch.float8_e4m3fn if k.startswith(PREFIX) else torch.bfloat16  # noqa: E731
        t = time.perf_counter()
        write(dirs.ckpt / "a.safetensors", aio, fp8, 1, pool)
        write(dirs.ckpt / "b.safetensors", {strip_prefix(k): s for k, s in aio.items() if k.startswith(PREFIX)},
              lambda k: torch.float8_e4m3fn, 2, pool)
        gb = sum((dirs.ckpt / n).stat().st_size for n in ("a.safetensors", "b.safetensors")) / 1e9
        print(f"models written: A all-in-one, B transformer-only, {gb:.1f} GB in {time.perf_counter() - t:.0f} s")
        ws = Workstation(dirs, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32,
                         outputs=root / "out")
        ws.pipeline.t5_tokenizer = t5_stand_in(root / "t5")

        def timed(label, fn):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            print(f"  {label:46} {time.perf_counter() - t0:7.2f} s")
            return out
        print(f"workstation on {dev}, pipeline dtype {ws.pipeline.dtype}:")
        r1 = ws.recipe("a.safetensors", "b.safetensors", alpha=0.3)
        out = timed("first merge: pipeline built + merge + swap", lambda: ws.merge(r1))
        print(f"    ({out.message[:150]})")
        timed("same recipe again", lambda: ws.merge(r1))
        timed("α changed: every key re-merged + swapped", lambda: ws.merge(ws.recipe("a.safetensors",
                                                                                    "b.safetensors", alpha=0.6)))
        side = 64 if args.tiny else 1024
        gen = GenParams(prompt="a photo of a cat", steps=args.steps, width=side, height=side, seed=1, cfg=3.5)
        ws.generate(gen, save=False) if args.tiny else ws.generate(GenParams(**{**gen.__dict__, "steps": 2}),
                                                                  save=False)          # warm-up
        res = timed(f"generate {side}x{side}, {args.steps} steps (flow-matching Euler)",
                    lambda: ws.generate(gen, save=False))
        img = torch.tensor(list(res.result.images[0].image.getdata()), dtype=torch.float32)
        print(f"    image mean {img.mean():.1f} std {img.std():.1f}, finite {bool(torch.isfinite(img).all())}")
        from merger.files.checkpoint_io import load_checkpoint
        a, b = load_checkpoint(dirs.ckpt / "a.safetensors"), load_checkpoint(dirs.ckpt / "b.safetensors")
        tr = ws.pipeline.modules["transformer"]
        worst = 0.0
        for k, name, rows in ((PREFIX + "double_blocks.3.img_attn.qkv.weight", "transformer_blocks.3.attn.to_k.weight",
                               slice(None)), (PREFIX + "single_blocks.20.linear2.weight",
                                              "single_transformer_blocks.20.proj_out.weight", slice(None))):
            want = torch.lerp(a.tensors[k].float(), b.tensors[k].float(), 0.6).to(torch.float8_e4m3fn).float()
            h = want.shape[1] if "qkv" in k else None
            want = want[h:2 * h] if h else want
            got = tr.get_parameter(name).detach().float().cpu()[rows]
            worst = max(worst, (got - want).abs().max().item())
        print(f"  swapped weights vs lerp(A, B, 0.6) rounded to A's fp8: max diff {worst:.2e}")
        if dev == "cuda":
            print(f"  GPU memory: peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
