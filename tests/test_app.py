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
