"""``python -m lora_ops``: merge LoRAs into a checkpoint, show a LoRA's type, dims and metadata."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merger.arch import detect_arch
from merger.checkpoint_io import load_checkpoint
from merger.errors import MergeError
from merger.saving import SaveOptions, save_tensors

from .formats import load_lora, metadata_table
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge-ckpt":
            ck = load_checkpoint(args.model)
            arch = detect_arch(ck.tensors, ck.name)
            specs = parse_specs(args.loras, arch)
            loras = [(load_lora(lora_path(Path(args.lora_dir), s.name)), s) for s in specs]
            merged = merged_checkpoint(ck.tensors, loras, arch)
            out = save_tensors(args.output, merged, SaveOptions(fp16=args.fp16, overwrite=args.overwrite),
                               {"format": "pt", "sdmw_loras": args.loras, "sdmw_base": ck.name})
            print(out)
        else:
            lf = load_lora(args.lora)
            lin, conv = lf.dims()
            print(f"{lf.path.name}: {lf.network_type()}, {len(lf.modules)} modules, dim {lin}, conv dim {conv}")
            for k, v in metadata_table(lf):
                print(f"{k}: {v}")
        return 0
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
