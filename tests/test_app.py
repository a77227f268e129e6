"""app.py start-up: model folders, demo models, device choice."""
import torch

import app
from merger.demo import DEMO_CHECKPOINTS
from merger.pipeline.resident import ResidentPipeline, default_device


def test_default_folder_gets_demo_models(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "ROOT", tmp_path)
    ws = app.make_workstation(app.parse_args([]))
    assert ws.dirs.ckpt == tmp_path / "models" / "Stable-diffusion"
    assert set(DEMO_CHECKPOINTS) <= set(ws.dirs.checkpoints()) and ws.dirs.loras() and ws.dirs.vaes()


def test_given_folders_are_used_as_they_are(tmp_path):
    ws = app.make_workstation(app.parse_args(["--models-dir", str(tmp_path / "a1111" / "models")]))
    assert ws.dirs.ckpt == tmp_path / "a1111" / "models" / "Stable-diffusion"
    assert ws.dirs.lora == tmp_path / "a1111" / "models" / "Lora" and ws.dirs.checkpoints() == []
    ws = app.make_workstation(app.parse_args(["--ckpt-dir", str(tmp_path / "c"), "--lora-dir", str(tmp_path / "l"),
                                              "--vae-dir", str(tmp_path / "v"), "--cache-gb", "2"]))
    assert (ws.dirs.ckpt, ws.dirs.lora, ws.dirs.vae) == (tmp_path / "c", tmp_path / "l", tmp_path / "v")
    assert ws.cache.budget == 2 * 2**30 and ws.dirs.checkpoints() == []
    assert ws.pipeline.storage == "model"
    ws = app.make_workstation(app.parse_args(["--models-dir", str(tmp_path / "m"), "--fp32-weights"]))
    assert ws.pipeline.storage == "compute" and ws.unload() and ws.pipeline.storage == "compute"


def test_device_is_cuda_fp16_when_present_else_cpu_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == ("cpu", torch.float32)
    rp = ResidentPipeline()
    assert (rp.device, rp.dtype) == ("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == ("cuda", torch.float16)


def test_scale_out_options_are_parsed_and_off_by_default():
    import app
    args = app.parse_args(["--workers", "2", "--ray-address", "auto", "--ship-models"])
    assert (args.workers, args.ray_address, args.ship_models) == (2, "auto", True)
    plain = app.parse_args([])
    assert (plain.workers, plain.ray_address, plain.ship_models) == (0, None, False)


def test_the_app_imports_the_pipeline_modules_on_a_thread_once_the_page_is_up(tmp_path, monkeypatch):
    """app.main launches the page without blocking, then starts :func:`import_pipeline_modules`
    on its own thread, then serves (the page is replaced here: nothing is served)."""
    import threading

    import merger.pipeline.resident as resident
    import ui.app_ui
    started = threading.Event()
    events: list = []

    def record():
        events.append(("imports", threading.current_thread().name))
        started.set()

    class Page:
        def queue(self, **k):
            return self

        def launch(self, **k):
            events.append(("launch", k["prevent_thread_lock"]))

        def block_thread(self):
            assert started.wait(10)
            events.append(("serving", threading.current_thread().name))

    monkeypatch.setattr(resident, "import_pipeline_modules", record)
    monkeypatch.setattr(ui.app_ui, "build_ui", lambda ws: Page())
    assert app.main(["--models-dir", str(tmp_path / "models")]) == 0
    assert events == [("launch", True), ("imports", "import-pipeline-modules"), ("serving", "MainThread")]


def test_after_import_pipeline_modules_a_build_and_a_generation_import_nothing(tmp_path):
    """In a fresh process (forked from the CLI tests' helper, which has imported ``diffusers``
    but none of its models): SD1 and SDXL pipelines built and generating once import no diffusers
    or transformers module that :func:`import_pipeline_modules` had not."""
    import json

    from merger.files.model_dirs import ModelDirs
    from tests.conftest import demo_models
    from tests.forked_cli import run_module
    demo_models(ModelDirs.from_models_dir(tmp_path / "models"))
    r = run_module("tests.pipeline_imports_probe", str(tmp_path / "models"))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"already_imported": False, "imported_later": []}
