"""``python -m merger search``: a guided search from the shell (see README, "Search").

Models are named as in the app (relative to ``--models-dir``'s Stable-diffusion folder) because
each trial is merged into, and rendered by, a resident pipeline. With ``--objective eye`` each
round's candidates are written as PNG files and the best is read from standard input.
"""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    s = sub.add_parser("search", help="let an optimizer propose merges (block weights ...) and judge them")
    s.add_argument("--models-dir", default="models", help="A1111 models/ folder (default ./models)")
    s.add_argument("--model-a", "--base", dest="model_a", required=True)
    s.add_argument("--model-b", default="")
    s.add_argument("--model-c", default="")
    s.add_argument("--mode", default="weight_sum")
    s.add_argument("--calcmode", default="normal")
    s.add_argument("--method", default="")
    s.add_argument("--models", nargs="+", default=[])
    s.add_argument("--alpha", type=float, default=0.5, help="α of the blocks not searched")
    s.add_argument("--beta", type=float, default=0.25)
    s.add_argument("--blocks", default="", help="blocks whose weights are searched, e.g. 'IN00-IN11 M00'")
    s.add_argument("--search", choices=("alpha", "beta", "both"), default="alpha", help="which per-block weights")
    s.add_argument("--global", dest="global_", choices=("none", "alpha", "beta", "both"), default="none",
                   help="search one α and/or β for all blocks")
    s.add_argument("--alpha-range", nargs=2, type=float, default=(0.0, 1.0), metavar=("LO", "HI"))
    s.add_argument("--beta-range", nargs=2, type=float, default=(0.0, 1.0), metavar=("LO", "HI"))
    s.add_argument("--calcmodes", default="", help="comma-separated calcmodes to choose among")
    s.add_argument("--density-range", nargs=2, type=float, metavar=("LO", "HI"))
    s.add_argument("--drop-range", nargs=2, type=float, metavar=("LO", "HI"))
    s.add_argument("--objective", choices=("eye", "like", "scorer"), default="like")
    s.add_argument("--reference", nargs="+", default=[], help="images to look like (objective like)")
    s.add_argument("--clip-dir", help="a local CLIP model folder (transformers layout)")
    s.add_argument("--aesthetic-head", help="the LAION aesthetic predictor's MLP weights (.pth/.safetensors)")
    s.add_argument("--imagereward", metavar="DIR", help="a folder with THUDM's ImageReward.pt and bert-base-uncased's "
                                                        "vocab.txt: the scorer adds its reward")
    s.add_argument("--prompt", action="append", help="prompt of every trial (repeatable)")
    s.add_argument("--seeds", nargs="+", type=int, default=[1])
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--size", nargs="+", type=int, default=[512], metavar="W [H]")
    s.add_argument("--cfg", type=float, default=7.0)
    s.add_argument("--trials", type=int, default=30)
    s.add_argument("--batch", type=int, default=4, help="candidates per round (objective eye)")
    s.add_argument("--optimizer", choices=("tpe", "gp", "cmaes", "random"), default="tpe")
    s.add_argument("--study", default="", help="study name (same name = resume)")
    s.add_argument("--seed", type=int, default=0, help="the optimizer's seed")
    s.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    s.add_argument("--quiet", action="store_true")
    from .dispatch import add_pool_arguments
    add_pool_arguments(s)


def spec_from_args(ws, args):
    from PIL import Image

    from ..errors import MergeError
    from ..pipeline.generate import GenParams
    from .search import SearchSpace, SearchSpec
    w, h = (args.size + args.size)[:2]
    refs = []
    for p in args.reference:
        try:
            refs.append(Image.open(p).convert("RGB"))
        except OSError as e:
            raise MergeError(f"cannot read reference image {p}: {e.strerror or e}") from None
    space = SearchSpace(blocks=args.blocks.split() if args.blocks else [], block_alpha=args.search in ("alpha", "both"),
                        block_beta=args.search in ("beta", "both"), global_alpha=args.global_ in ("alpha", "both"),
                        global_beta=args.global_ in ("beta", "both"), alpha=tuple(args.alpha_range),
                        beta=tuple(args.beta_range), calcmodes=[c.strip() for c in args.calcmodes.split(",") if c.strip()],
                        density=tuple(args.density_range) if args.density_range else None,
                        drop=tuple(args.drop_range) if args.drop_range else None)
    method = dict(method=args.method, models=args.models) if args.method else {}
    recipe = ws.recipe(args.model_a, "" if args.method else args.model_b, "" if args.method else args.model_c,
                       mode=args.mode, calcmode=args.calcmode, alpha=args.alpha, beta=args.beta, **method)
    gen = GenParams(prompt="", steps=args.steps, width=w, height=h, cfg=args.cfg)
    return SearchSpec(recipe, space, gen, prompts=args.prompt or ["a photo of a cat"], seeds=args.seeds,
                      objective=args.objective, sampler=args.optimizer, trials=args.trials, batch=args.batch,
                      study=args.study, seed=args.seed, references=refs, clip_dir=args.clip_dir,
                      aesthetic=args.aesthetic_head, imagereward=args.imagereward)


def run_search(args) -> None:
    from tqdm import tqdm

    from ..files.model_dirs import ModelDirs
    from ..workstation import Workstation
    from .search import Search
    ws = Workstation(ModelDirs.from_models_dir(args.models_dir), device=args.device)
    spec = spec_from_args(ws, args)
    search = Search(ws, spec)
    from .dispatch import pool_from_args
    pool = pool_from_args(ws, args)
    try:
        _run(ws, search, spec, args)
    finally:
        if pool is not None:
            pool.close()


def _run(ws, search, spec, args) -> None:
    from tqdm import tqdm
    print(f"study {spec.study_name()}: {len(search.finished())} trial(s) already done", file=sys.stderr)
    if spec.objective == "eye":
        _eye_rounds(ws, search, spec)
    else:
        todo = spec.trials - len(search.finished())
        bar = None if args.quiet else tqdm(total=max(todo, 0), unit="trial", desc="searching", file=sys.stderr)

        def progress(i, n, t):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(score=f"{t.score:.4f}", merge=t.merge_id)
        search.run(progress=progress)
        if bar is not None:
            bar.close()
    best = search.best()
    if best is None:
        print("no finished trial")
        return
    score = f" score {best.score:.4f}" if best.score is not None else ""
    print(f"best: trial {best.number}{score}, merge ID {best.merge_id}")
    for k, v in best.params.items():
        print(f"  {k} = {v if isinstance(v, str) else round(v, 4)}")


def _eye_rounds(ws, search, spec) -> None:
    """Rounds until the trial budget is spent or the user types q: each candidate's images are
    written side by side to a PNG and the user types the best trial's number."""
    from PIL import Image
    folder = ws.outputs / "search" / spec.study_name()
    folder.mkdir(parents=True, exist_ok=True)
    while len(search.study.trials) <= spec.trials:
        batch = search.candidates()
        for t in batch:
            w, h = t.images[0].size
            sheet = Image.new("RGB", (w * len(t.images), h))
            for i, im in enumerate(t.images):
                sheet.paste(im, (i * w, 0))
            sheet.save(folder / f"trial-{t.number:04d}.png")
            print(f"trial {t.number}: {folder / f'trial-{t.number:04d}.png'} (merge #{t.merge_id})")
        answer = input("best trial number (q to stop): ").strip()
        if answer.lower() in ("q", "quit", ""):
            return
        if not answer.isdigit():
            from ..errors import MergeError
            raise MergeError(f"{answer!r} is not a trial number")
        search.prefer(int(answer))
