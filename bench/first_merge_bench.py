"""The app's first merge of a session, with and without the pipeline modules imported on a
background thread at start (``merger.pipeline.resident.import_pipeline_modules``, app.py).

    python bench/first_merge_bench.py [--rounds 2] [--pause 6]

Each run is a fresh interpreter that imports what app.py imports before the page is up
(``import diffusers`` included), makes a workstation on the demo models, waits ``--pause``
seconds (the user picking models; with the thread, its imports run then) and times the first
Merge: the demo models' load and scan, the pipeline build and the swap. The second merge of the
same process is printed as the bound (the pipeline built, its modules imported).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, tempfile, threading, time
from pathlib import Path
import torch, gradio, diffusers
from merger.demo import ensure_demo_models
from merger.files.model_dirs import ModelDirs
from merger.pipeline.resident import import_pipeline_modules
from merger.workstation import Workstation
from mergehistory import MergeHistory
import ui.app_ui
folder = Path(sys.argv[1])
dirs = ModelDirs.from_models_dir(folder / "models")
ensure_demo_models(dirs)
ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=folder / "out",
                 history=MergeHistory(folder / "history.csv"))
if sys.argv[2] == "thread":
    threading.Thread(target=import_pipeline_modules, daemon=True).start()
time.sleep(float(sys.argv[3]))
a, b = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors"
times = []
for alpha in (0.3, 0.4):
    t = time.perf_counter()
    ws.merge(ws.recipe(a, b, alpha=alpha))
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pause", type=float, default=6.0)
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    got: dict[str, list] = {"thread": [], "none": []}
    for _ in range(args.rounds):
        for how in got:
            with tempfile.TemporaryDirectory() as d:
                r = subprocess.run([sys.executable, "-c", CHILD, d, how, str(args.pause)], env=env, cwd=ROOT,
                                   capture_output=True, text=True, check=True)
                got[how].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"first Merge of a session (demo models, {args.pause:g} s after start), best / worst of {args.rounds}:")
    for how, label in (("none", "modules imported at the first merge"), ("thread", "imported on a thread at start")):
        first = sorted(t[0] for t in got[how])
        print(f"  {label:38} {first[0]:6.2f} / {first[-1]:6.2f} s")
    second = min(t[1] for ts in got.values() for t in ts)
    print(f"  {'the second merge (the bound)':38} {second:6.2f} s")


if __name__ == "__main__":
    main()
