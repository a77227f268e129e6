"""Run as ``python -m tests.pipeline_imports_probe MODELS_DIR`` (by tests/test_app.py, in a fresh
process): prints, as JSON, whether the pipeline modules were already imported, and which diffusers
and transformers modules a build and a generation imported after
:func:`merger.pipeline.resident.import_pipeline_modules` (none, if it imports all they need)."""
import json
import sys

import torch

from merger.demo import DEMO_CHECKPOINTS
from merger.files.model_dirs import ModelDirs
from merger.pipeline.generate import GenParams
from merger.pipeline.resident import import_pipeline_modules
from merger.workstation import Workstation


def loaded() -> set[str]:
    return {m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers")}


def main() -> None:
    dirs = ModelDirs.from_models_dir(sys.argv[1])
    ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=dirs.ckpt.parent / "probe-out")
    had = "diffusers.models.unets.unet_2d_condition" in sys.modules
    import_pipeline_modules()
    before = loaded()
    one_per_arch = {arch: name for name, (arch, _) in reversed(DEMO_CHECKPOINTS.items())}
    for name in one_per_arch.values():              # an SD1 and an SDXL build, each generating once
        ws.load_model(name)
        ws.generate(GenParams(prompt="a cat", steps=1, width=64, height=64, seed=1), save=False)
    print(json.dumps({"already_imported": had, "imported_later": sorted(loaded() - before)}))


if __name__ == "__main__":
    main()
