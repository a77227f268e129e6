"""Command line: ``python -m merger merge ...`` (see README) and ``python -m merger elements``."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

from .engine.calcmodes import calcmode_names
from .files.checkpoint_io import load_checkpoint, short_hashes, unhashed
from .elements import list_elements
from .engine import plan_for
from .engine.methods import MAX_MODELS, SIGNS, STOCKS, method_names
from .errors import MergeError, run_cli
from .presets import parse_vector
from .recipe import MODES, Recipe
from .files.diffusers_format import is_diffusers_folder
from .files.saving import SAVE_DTYPES, SaveOptions, auto_filename, exists_error, save_merge


def _floats(text: str, n: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise MergeError(f"{what} must be {n} comma-separated numbers") from None
    if len(values) != n:
        raise MergeError(f"{what} needs {n} values, got {len(values)}")
    return values


_NEGATIVE_LIST = re.compile(r"^-(\d|\.\d)[^\s]*,")


def join_negative_values(argv: list[str]) -> list[str]:
    """``--adjust -6,0,...`` as ``--adjust=-6,0,...``: argparse takes a value that starts with '-'
    and is not a single number for an option name."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and "=" not in tok and i + 1 < len(argv) and _NEGATIVE_LIST.match(argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
        else:
            out.append(tok)
            i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m merger", description="Merge SD checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge checkpoints into a file (a mode over A/B/C, or a method over a "
                                      "base and N models)")
    m.add_argument("--model-a", "--base", dest="model_a", metavar="MODEL",
                   help="model A; with --method, the base whose task vectors the models define")
    m.add_argument("--model-b")
    m.add_argument("--model-c")
    m.add_argument("--mode", choices=MODES, help="merge mode (needed unless --method is given)")
    m.add_argument("--method", choices=method_names(), help="N-model method over --base and --models")
    m.add_argument("--models", nargs="+", metavar="MODEL", default=[], help=f"2-{MAX_MODELS} models for --method")
    m.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per --models entry")
    m.add_argument("--density", type=float, help="TIES: fraction of each task vector kept (method default)")
    m.add_argument("--drop", type=float, help="DARE/DELLA: drop probability p (method default)")
    m.add_argument("--sign", choices=SIGNS, default="sum",
                   help="TIES sign election: sum of values (paper, default) or count of signs (sd-mecha)")
    m.add_argument("--della-eps", type=float, default=0.1, help="DELLA: spread of the keep probabilities")
    m.add_argument("--stock", choices=STOCKS, default="tensor",
                   help="model_stock cosine: whole tensor (paper, default) or per row (sd-mecha)")
    m.add_argument("--calcmode", default="normal", choices=calcmode_names() + ["smoothAdd MT"])
    m.add_argument("--alpha", type=float, default=0.5)
    m.add_argument("--beta", type=float, default=0.25)
    m.add_argument("--gamma", type=float, default=1.0, help="extra value of calcmode extract")
    m.add_argument("--mbw-alpha", metavar="V", help="26/20 comma-separated values (BASE first) or a preset name")
    m.add_argument("--mbw-beta", metavar="V")
    m.add_argument("--elemental", metavar="TEXT", default="")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--include", metavar="TEXT", help="only these blocks / key substrings are merged")
    g.add_argument("--exclude", metavar="TEXT", help="these blocks / key substrings keep model A")
    m.add_argument("--adjust", metavar="V", help="8 values: IN,OUT,OUT2,CONT,BRI,COL1,COL2,COL3")
    m.add_argument("--ema", action="store_true",
                   help="merge each model's EMA U-Net (model_ema.*, training checkpoints) instead of its U-Net")
    m.add_argument("--output", required=True, help="file path, or a folder for an automatic name")
    m.add_argument("--save-format", choices=("file", "diffusers"), default="file",
                   help="file: one .safetensors/.ckpt (by --output's extension); diffusers: a diffusers model "
                        "folder (model_index.json, unet/, vae/, text_encoder/ ...)")
    m.add_argument("--fp16", action="store_true")
    m.add_argument("--dtype", choices=sorted(SAVE_DTYPES),
                   help="write the U-Net / Flux transformer in this dtype (default: model A's; fp8 for Flux files)")
    m.add_argument("--prune", action="store_true")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--vae", help="VAE file to bake in")
    m.add_argument("--reset-clip-ids", action="store_true")
    m.add_argument("--no-metadata", action="store_true", help="do not write the recipe into the file")
    m.add_argument("--seed", type=int, default=-1, help="seed of the random methods (dare_*, della); "
                                                          "default: a new one, recorded in the history")
    m.add_argument("--history", help="merge history CSV to append to (default: the app's)")
    m.add_argument("--no-history", action="store_true")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--print-keys", action="store_true",
                   help="list the keys --include/--exclude keeps as model A's and the count merged, then stop "
                        "(nothing is written)")
    from .sweeps.search_cli import add_parser as add_search
    from .sweeps.xyz_cli import add_parsers as add_plots
    add_search(sub)
    add_plots(sub)
    e = sub.add_parser("elements", help="list a checkpoint's tensors with block, shape and dtype")
    e.add_argument("model")
    e.add_argument("--filter", default="")
    return p


def _recipe_from_args(args, arch: str) -> Recipe:
    from .engine.ratios import split_inex
    inex, text = ("include", args.include) if args.include else ("exclude", args.exclude) \
        if args.exclude else ("off", "")
    blocks, elements = split_inex(text or "", arch)
    names = {s: getattr(args, f"model_{s}") for s in "abc"}
    method = {}
    if args.method:
        method = dict(method=args.method, models=[Path(m).name for m in args.models], weights=args.weights,
                      density=args.density, drop=args.drop, sign=args.sign, della_eps=args.della_eps,
                      stock=args.stock)
    return Recipe(**method,
        model_a=Path(names["a"]).name, model_b=Path(names["b"]).name if names["b"] else "",
        model_c=Path(names["c"]).name if names["c"] else "",
        mode=args.mode or "weight_sum", calcmode="smoothAddMT" if args.calcmode == "smoothAdd MT" else args.calcmode,
        alpha=args.alpha, beta=args.beta, gamma=args.gamma, seed=args.seed,
        mbw_alpha=parse_vector(args.mbw_alpha, arch, "MBW alpha") if args.mbw_alpha else None,
        mbw_beta=parse_vector(args.mbw_beta, arch, "MBW beta") if args.mbw_beta else None,
        elemental=args.elemental, ema=args.ema, inex=inex, inex_blocks=blocks, inex_elements=elements,
        adjust=_floats(args.adjust, 8, "--adjust") if args.adjust else None)


def _with_hashes(recipe: Recipe, args, paths: dict[str, str]) -> Recipe:
    """The recipe with its models' A1111 short hashes, once it is known to be valid: files new to
    the app are read whole for them (side by side, one per core), and the command line says so."""
    new = unhashed(paths.values())
    if new and not args.quiet:
        gb = sum(p.stat().st_size for p in new if p.is_file()) / 1e9
        print(f"hashing {len(new)} model file(s) new to this app ({gb:.1f} GB, A1111 short hashes)",
              file=sys.stderr)
    hashes = dict(zip(paths, short_hashes(paths.values())))       # by slot: a, b, c, m1…mn
    return dataclasses.replace(recipe, hash_a=hashes["a"], hash_b=hashes.get("b", ""), hash_c=hashes.get("c", ""),
                               model_hashes=[hashes[f"m{i}"] for i in range(1, len(recipe.models) + 1)])


def _check_args(args) -> None:
    """What argparse cannot say: the options a mode or a method needs."""
    if not args.model_a:
        raise MergeError("--model-a (or --base with --method) is required")
    if args.method:
        if args.model_b or args.model_c or args.mode:
            raise MergeError("--method merges --base with --models; --mode/--model-b/--model-c do not apply")
    else:
        if not args.mode:
            raise MergeError("--mode is required (or --method with --base and --models)")
        extra = [o for o in ("models", "weights", "density", "drop") if getattr(args, o)]
        if extra:
            raise MergeError(f"--{extra[0]} needs --method")


def run_merge(args) -> Path | None:
    from .arch import detect_arch
    from tqdm import tqdm
    _check_args(args)
    paths = {s: getattr(args, f"model_{s}") for s in "abc" if getattr(args, f"model_{s}")}
    paths.update({f"m{i}": m for i, m in enumerate(args.models if args.method else [], 1)})
    loaded = {s: load_checkpoint(p) for s, p in paths.items()}
    arch = detect_arch(loaded["a"].tensors, loaded["a"].name)
    recipe = _recipe_from_args(args, arch)
    recipe.check()
    if args.print_keys:
        from .engine.ratios import inex_selection
        merged, kept = inex_selection(recipe, loaded["a"].tensors, arch)
        print(f"{len(kept)} key(s) kept as model A's, {len(merged)} merged")
        if kept:
            print("\n".join(kept))
        return None
    plan = plan_for(recipe, loaded)
    recipe = _with_hashes(recipe, args, paths)
    plan = dataclasses.replace(plan, recipe=recipe)
    options = SaveOptions(fmt="ckpt" if args.output.lower().endswith((".ckpt", ".pt")) else "safetensors",
                          fp16=args.fp16, prune=args.prune, overwrite=args.overwrite, vae=args.vae,
                          reset_clip_ids=args.reset_clip_ids, save_metadata=not args.no_metadata,
                          dtype=args.dtype or "")
    out = Path(args.output)
    if out.is_dir() and not is_diffusers_folder(out):
        out = out / auto_filename(recipe, options)
        if args.save_format == "diffusers":
            out = out.with_name(out.name.rsplit(".safetensors", 1)[0].rsplit(".ckpt", 1)[0])
    bar = None if args.quiet else tqdm(total=len(plan.jobs), unit="key", desc="merging", file=sys.stderr)

    def progress(done, total, key):
        if bar is not None:
            phase = key if done == 0 and key else "merging"     # a step before the first key, named
            if bar.desc.rstrip(": ") != phase:
                bar.set_description(phase)
            bar.update(done - bar.n)
    t0 = time.perf_counter()
    try:
        if args.save_format == "diffusers":
            saved = save_merge_diffusers(plan, out, options, progress)
        else:
            saved = save_merge(plan, out, options, paths=paths, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if not args.no_history:
        from mergehistory import MergeHistory
        try:
            MergeHistory(args.history).append(recipe, source="cli", saved_to=str(saved),
                                              seconds=time.perf_counter() - t0, notes=plan.notes)
        except (OSError, MergeError) as e:
            print(f"warning: {saved} was saved, but its history row could not be written "
                  f"({getattr(e, 'strerror', None) or e})", file=sys.stderr)
    return saved


def save_merge_diffusers(plan, out: Path, options: SaveOptions, progress) -> Path:
    """The merge as a diffusers folder (the VAE and fp16 options apply as for a file; a
    diffusers folder has no EMA or schedule buffers to prune)."""
    from .engine import iter_merge
    from .files.diffusers_format import save_diffusers
    from .files.saving import load_vae
    if out.exists() and not options.overwrite:
        raise exists_error(out)
    tensors = dict(iter_merge(plan, progress=progress))
    if options.vae:
        tensors.update(load_vae(options.vae))
    if options.fp16:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    return save_diffusers(out, tensors, overwrite=options.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))

    def command():
        if args.command == "search":
            from .sweeps.search_cli import run_search
            run_search(args)
        elif args.command in ("xyz", "dice"):
            from .sweeps.xyz_cli import run_plot
            run_plot(args)
        elif args.command == "merge":
            saved = run_merge(args)
            if saved is not None:
                print(saved)
        else:
            ck = load_checkpoint(args.model)
            for el in list_elements(ck.tensors, contains=args.filter):
                print(f"{el.block:6} {el.dtype:9} {str(list(el.shape)):22} {el.key}")
    return run_cli(command)
