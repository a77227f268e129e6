"""Launch the workstation: ``python app.py [--models-dir DIR] [--host H] [--port P] [--share]``.

With no model folder given, small demo checkpoints, a demo LoRA and a demo VAE are written to
``./models`` first, so every feature works at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parent
STARTED = time.time()
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SD Merge Workstation")
    p.add_argument("--models-dir", help="an A1111 models/ folder (Stable-diffusion, Lora, VAE inside)")
    p.add_argument("--ckpt-dir", help="checkpoint folder (overrides models-dir/Stable-diffusion)")
    p.add_argument("--lora-dir", help="LoRA folder (overrides models-dir/Lora)")
    p.add_argument("--vae-dir", help="VAE folder (overrides models-dir/VAE)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="create a public Gradio link")
    p.add_argument("--auth", metavar="USER:PASS",
                   help="require this login (use it with --share or a --host other than 127.0.0.1)")
    p.add_argument("--clip-dir", help="a local CLIP model folder for the Search tab's scorer (e.g. a copy of "
                                      "openai/clip-vit-large-patch14); nothing is downloaded")
    p.add_argument("--aesthetic-head", help="the LAION aesthetic predictor's MLP weights for the scorer")
    p.add_argument("--imagereward", metavar="DIR", help="a folder with THUDM's ImageReward.pt and bert-base-uncased's "
                                                        "vocab.txt for the scorer; nothing is downloaded")
    p.add_argument("--max-cells", type=int, default=500,
                   help="XYZ plots with more cells need 'allow large plots' ticked (default 500)")
    p.add_argument("--cache-gb", type=float, default=12.0, help="RAM budget of the model cache")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--fp32-weights", action="store_true",
                   help="computing in fp32 (CPU), hold fp16 models' weights in fp32 too (default: keep them "
                        "in fp16 and upcast layer by layer: same images, half the RAM, faster merges)")
    p.add_argument("--no-demo", action="store_true", help="do not write demo models")
    p.add_argument("--t5-tokenizer", help="Flux.1 generation: a T5 tokenizer folder (tokenizer.json or spiece.model), "
                                          "e.g. the tokenizer_2 folder of a diffusers FLUX.1 download")
    from merger.sweeps.dispatch import add_pool_arguments
    add_pool_arguments(p)
    return p.parse_args(argv)


def make_workstation(args):
    from merger.demo import ensure_demo_models
    from merger.files.model_dirs import ModelDirs
    from merger.workstation import Workstation
    given = args.models_dir or args.ckpt_dir
    dirs = ModelDirs.from_models_dir(args.models_dir or ROOT / "models", args.ckpt_dir, args.lora_dir, args.vae_dir)
    if not given and not args.no_demo:
        written = ensure_demo_models(dirs)
        if written:
            print(f"wrote {len(written)} demo models under {dirs.ckpt.parent}")
    dirs.create()
    ws = Workstation(dirs, cache_bytes=int(args.cache_gb * 2**30), device=args.device,
                     storage="compute" if args.fp32_weights else "model", max_cells=args.max_cells)
    ws.scorer_files = {k: v for k, v in (("clip", args.clip_dir), ("aesthetic", args.aesthetic_head),
                                                 ("imagereward", args.imagereward)) if v}
    ws.pipeline.t5_tokenizer = args.t5_tokenizer
    from merger.files.paths import data_dir
    from merger.files.saving import clean_stale_temps
    removed = clean_stale_temps([dirs.ckpt, dirs.lora, dirs.vae, data_dir()], STARTED)
    if removed:
        print(f"removed {len(removed)} temp file(s) left by an interrupted save: {', '.join(p.name for p in removed)}")
    return ws


def auth_of(args) -> list[tuple[str, str]] | None:
    """``--auth user:pass`` for Gradio; warns when the app can be reached by others without it."""
    exposed = args.share or args.host not in LOOPBACK
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise SystemExit("error: --auth must be USER:PASS")
        return [(user, password)]
    if exposed:
        where = "a public link (--share)" if args.share else f"--host {args.host}"
        print(f"WARNING: with {where} anyone who can reach this port can merge, generate and write files in "
              f"your model folders. Add --auth USER:PASS to require a login.", file=sys.stderr)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    auth = auth_of(args)
    ws = make_workstation(args)

    from merger.errors import MergeError
    from merger.sweeps.dispatch import pool_from_args
    try:
        pool = pool_from_args(ws, args)
    except MergeError as e:
        raise SystemExit(f"error: {e}") from None
    from ui.app_ui import CSS, build_ui
    demo = build_ui(ws)
    demo.queue(default_concurrency_limit=1)
    workers = f"  |  {len(pool.actors)} Ray workers for plots, dice and searches" if pool else ""
    print(f"models: {ws.dirs.ckpt}  |  device: {ws.pipeline.device} ({ws.pipeline.dtype}){workers}")
    try:
        # run_history off: the merge history is the app's own CSV; Gradio's would keep every event's
        # inputs and outputs in the browser and rewrite them on each click (slower as the page ages)
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                    allowed_paths=[str(ws.outputs)], auth=auth, css=CSS, run_history=False, prevent_thread_lock=True)
        # the page is up: the pipeline's modules are imported now, while the user picks models
        # (`import diffusers` defers them, and the first merge took 3.2-3.4 s longer; started
        # before the launch, they delayed the page by 1.4 s)
        from merger.pipeline.resident import import_pipeline_modules
        threading.Thread(target=import_pipeline_modules, name="import-pipeline-modules", daemon=True).start()
        demo.block_thread()
    finally:
        if pool is not None:
            pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
