"""``python -m lora_ops``: merge LoRAs into a checkpoint, show a LoRA's type, dims and metadata."""
from __future__ import annotations

import argparse
from pathlib import Path


from merger.arch import detect_arch
from merger.files.checkpoint_io import load_checkpoint
from merger.cli import join_negative_values
from merger.errors import run_cli
from merger.files.saving import SaveOptions, save_tensors

from .formats import load_lora, metadata_table, save_lora
from .merge_ckpt import lora_path, merged_checkpoint, parse_specs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_ops", description="LoRA operations")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge-ckpt", help="merge LoRAs into a checkpoint")
    m.add_argument("--model", required=True, help="checkpoint file")
    m.add_argument("--loras", required=True, help="'name:ratio[:blocks], ...' (blocks: preset or 12/17/20/26 values)")
    m.add_argument("--lora-dir", default=".", help="folder the LoRA names are looked up in")
    m.add_argument("--output", required=True)
    m.add_argument("--fp16", action="store_true")
    m.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("info", help="type, dims and ss_* metadata of a LoRA file")
    i.add_argument("lora")
    ml = sub.add_parser("merge-loras", help="merge LoRAs into one LoRA")
    ml.add_argument("--loras", required=True, help="'file:ratio, file:ratio, ...'")
    ml.add_argument("--lora-dir", default=".")
    ml.add_argument("--output", required=True)
    ml.add_argument("--method", choices=["same-rank", "concat", "svd"], default="svd")
    ml.add_argument("--same-strength", action="store_true", help="same-rank: sqrt(ratio) on each side")
    ml.add_argument("--shuffle", action="store_true", help="concat: shuffle the rank order")
    ml.add_argument("--new-rank", type=int, default=64)
    ml.add_argument("--new-conv-rank", type=int)
    ml.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    ml.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="calculation precision")
    ml.add_argument("--clamp-quantile", type=float, default=0.99,
                    help="svd: clamp the factors' values at this quantile (kohya's default 0.99; 1 = no clamp)")
    ml.add_argument("--metadata", choices=["create new", "merge", "save all", "use first LoRA"], default="create new")
    ml.add_argument("--overwrite", action="store_true")
    el = sub.add_parser("extract-loras", help="(dis)similar features of two LoRAs (SuperMerger extract)")
    el.add_argument("--lora-b", required=True)
    el.add_argument("--lora-c", required=True)
    el.add_argument("--alpha", type=float, default=0.5)
    el.add_argument("--beta", type=float, default=0.0)
    el.add_argument("--gamma", type=float, default=1.0)
    el.add_argument("--rank", type=int, default=64)
    el.add_argument("--output", required=True)
    el.add_argument("--overwrite", action="store_true")
    ex = sub.add_parser("extract", help="extract a LoRA approximating alpha*A - beta*B")
    ex.add_argument("--model-a", required=True, help="the fine-tuned model")
    ex.add_argument("--model-b", required=True, help="its base")
    ex.add_argument("--alpha", type=float, default=1.0)
    ex.add_argument("--beta", type=float, default=1.0)
    ex.add_argument("--dim", type=int, default=128)
    ex.add_argument("--conv-dim", type=int)
    ex.add_argument("--clamp-quantile", type=float, default=0.99)
    ex.add_argument("--conv-in-out", action="store_true",
                    help="with --conv-dim, also extract the U-Net's conv_in/conv_out (kohya never does)")
    ex.add_argument("--full-svd", action="store_true", help="exact SVD instead of the randomized one")
    ex.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    ex.add_argument("--output", required=True)
    ex.add_argument("--overwrite", action="store_true")
    dy = sub.add_parser("extract-dylora", help="a fixed-rank LoRA from a DyLoRA file (sd-scripts' DyLoRA split)")
    dy.add_argument("--lora", required=True, help="the DyLoRA file")
    dy.add_argument("--rank", type=int, required=True, help="a multiple of its unit, at most its dim")
    dy.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    dy.add_argument("--output", required=True)
    dy.add_argument("--overwrite", action="store_true")
    return p


def cli_lora_path(folder: str, name: str) -> Path:
    """The CLI takes a LoRA's path (its user's own shell) or a name inside ``--lora-dir``."""
    return Path(name) if Path(name).is_file() else lora_path(Path(folder), name)


def main(argv: list[str] | None = None) -> int:
    import sys
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    return run_cli(lambda: _run(args))


def _run(args) -> None:
    if args.command == "merge-ckpt":
        ck = load_checkpoint(args.model)
        arch = detect_arch(ck.tensors, ck.name)
        specs = parse_specs(args.loras, arch)
        loras = [(load_lora(cli_lora_path(args.lora_dir, s.name)), s) for s in specs]
        merged = merged_checkpoint(ck.tensors, loras, arch)
        out = save_tensors(args.output, merged, SaveOptions(fp16=args.fp16, overwrite=args.overwrite),
                           {"format": "pt", "sdmw_loras": args.loras, "sdmw_base": ck.name})
        print(out)
    elif args.command == "merge-loras":
        from .merge_loras import merge_lora_set, merged_metadata, parse_ratio_list
        pairs = [(load_lora(cli_lora_path(args.lora_dir, n)), r) for n, r in parse_ratio_list(args.loras)]
        sd = merge_lora_set(pairs, args.method, same_strength=args.same_strength, shuffle=args.shuffle,
                            new_rank=args.new_rank, new_conv_rank=args.new_conv_rank, precision=args.precision,
                            clamp_quantile=args.clamp_quantile)
        meta = merged_metadata(pairs, args.metadata, {"ss_network_module": "networks.lora",
                                                      "sdmw_merged_from": args.loras, "sdmw_method": args.method}, sd)
        print(save_lora(args.output, sd, meta, args.save_precision, args.overwrite))
    elif args.command == "extract-loras":
        from .extract import extract_from_loras
        sd = extract_from_loras(load_lora(args.lora_b), load_lora(args.lora_c), args.alpha, args.beta,
                                args.gamma, args.rank)
        print(save_lora(args.output, sd, {"ss_network_module": "networks.lora"}, "fp16", args.overwrite))
    elif args.command == "extract-dylora":
        from .dylora import extract_dylora_rank
        sd, meta = extract_dylora_rank(load_lora(args.lora), args.rank)
        print(save_lora(args.output, sd, meta, args.save_precision, args.overwrite))
    elif args.command == "extract":
        from .extract import extract_lora
        a, b = load_checkpoint(args.model_a), load_checkpoint(args.model_b)
        from merger.arch import check_same_arch
        arch = check_same_arch({a.name: detect_arch(a.tensors, a.name), b.name: detect_arch(b.tensors, b.name)})
        sd, meta = extract_lora(a.tensors, b.tensors, arch, args.dim, args.conv_dim, args.alpha, args.beta,
                                args.clamp_quantile, fast=not args.full_svd, conv_in_out=args.conv_in_out)
        print(save_lora(args.output, sd, meta, args.save_precision, args.overwrite))
    else:
        lf = load_lora(args.lora)
        lin, conv = lf.dims()
        print(f"{lf.path.name}: {lf.network_type()}, {len(lf.modules)} modules, dim {lin}, conv dim {conv}")
        for k, v in metadata_table(lf):
            print(f"{k}: {v}")
