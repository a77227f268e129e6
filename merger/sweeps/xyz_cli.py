"""``python -m merger xyz`` and ``python -m merger dice``: XYZ plots and dice rolls from the shell.

Models are named as in the app (relative to ``--models-dir``'s Stable-diffusion folder); cells
are merged into a resident pipeline, every cell gets a history row, and the cells and grids are
written under the outputs folder (printed at the end). ``--workers N`` runs the cells on Ray.
"""
from __future__ import annotations

import sys

from .dispatch import add_pool_arguments


def _common(s) -> None:
    s.add_argument("--models-dir", default="models", help="A1111 models/ folder (default ./models)")
    s.add_argument("--model-a", required=True)
    s.add_argument("--model-b", default="")
    s.add_argument("--model-c", default="")
    s.add_argument("--mode", default="weight_sum")
    s.add_argument("--calcmode", default="normal")
    s.add_argument("--alpha", type=float, default=0.5)
    s.add_argument("--beta", type=float, default=0.25)
    s.add_argument("--mbw-alpha", metavar="V", help="26/20 comma-separated values or a preset name")
    s.add_argument("--mbw-beta", metavar="V")
    s.add_argument("--prompt", default="a photo of a cat")
    s.add_argument("--negative", default="")
    s.add_argument("--seed", type=int, default=1, help="generation seed")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--size", nargs="+", type=int, default=[512], metavar="W [H]")
    s.add_argument("--cfg", type=float, default=7.0)
    s.add_argument("--sampler", default="Euler a")
    s.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    s.add_argument("--allow-large", action="store_true", help="run plots above the cell limit")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_pool_arguments(s)


def add_parsers(sub) -> None:
    x = sub.add_parser("xyz", help="an XYZ plot: merge and generate every cell, write the grids")
    _common(x)
    for axis in "xyz":
        x.add_argument(f"--{axis}", nargs=2, metavar=("TYPE", "VALUES"), default=None,
                       help=f"{axis.upper()} axis, e.g. alpha '0.2,0.5,0.8' (\\n separates lines of "
                            f"prompt/mbw/elemental values)")
    d = sub.add_parser("dice", help="random (dice) merges: N rolls of per-block weights, one grid")
    _common(d)
    d.add_argument("--rolls", type=int, default=9)
    d.add_argument("--template-alpha", default="ALL_R", help="dice template for α (preset name or comma list)")
    d.add_argument("--template-beta", default="", help="dice template for β (empty: β not rolled)")
    d.add_argument("--lower", default="0")
    d.add_argument("--upper", default="1")
    d.add_argument("--digits", type=int, default=3)
    d.add_argument("--dice-seed", type=int, default=-1, help="the rolls' seed (default: a new one, recorded)")


def run_plot(args) -> None:
    from dataclasses import replace

    from tqdm import tqdm

    from ..files.model_dirs import ModelDirs
    from ..pipeline.generate import GenParams
    from ..presets import parse_vector
    from ..workstation import Workstation
    from .dice import DiceSettings
    from .dispatch import pool_from_args
    from .xyz_run import PlotSpec, prepare, run
    ws = Workstation(ModelDirs.from_models_dir(args.models_dir), device=args.device)
    w, h = (args.size + args.size)[:2]
    gen = GenParams(prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps, width=w,
                    height=h, cfg=args.cfg, sampler=args.sampler)
    recipe = ws.recipe(args.model_a, args.model_b, args.model_c, mode=args.mode, calcmode=args.calcmode,
                       alpha=args.alpha, beta=args.beta)
    from ..arch import detect_arch_of_file
    arch = detect_arch_of_file(ws.dirs.resolve("ckpt", args.model_a))
    if args.mbw_alpha:
        recipe = replace(recipe, mbw_alpha=parse_vector(args.mbw_alpha, arch, "MBW alpha"))
    if args.mbw_beta:
        recipe = replace(recipe, mbw_beta=parse_vector(args.mbw_beta, arch, "MBW beta"))
    dice = None
    if args.command == "dice":
        axes = {"X": ("random", str(args.rolls)), "Y": ("none", ""), "Z": ("none", "")}
        dice = DiceSettings(template_alpha=args.template_alpha, template_beta=args.template_beta,
                            lower=args.lower, upper=args.upper, digits=args.digits, seed=args.dice_seed)
    else:
        axes = {a.upper(): (v[0], v[1].replace("\\n", "\n")) if v else ("none", "")
                for a, v in (("x", args.x), ("y", args.y), ("z", args.z))}
    spec = PlotSpec(recipe, gen, axes, dice, allow_large=args.allow_large)
    prep = prepare(ws, spec)
    pool = pool_from_args(ws, args)
    bar = None if args.quiet else tqdm(total=len(prep.cells), unit="cell", desc=args.command, file=sys.stderr)
    try:
        res = run(ws, prep, progress=(lambda i, n, _t: bar.update(i - bar.n)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
    ids = [i for i in res.history_ids if i is not None]
    span = f"merges #{ids[0]}-#{ids[-1]}" if ids else "no history rows"
    print(f"{res.cells_done}/{res.cells_total} cells ({span}); grids:")
    for g in res.grids:
        print(f"  {g}")
