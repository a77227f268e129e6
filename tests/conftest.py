"""Shared fixtures: tiny random checkpoints with real LDM key names, an isolated data folder,
and no network."""
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"      # Debian's, for the browser tests
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from merger.files.checkpoint_io import Checkpoint  # noqa: E402
from merger.synthetic import random_checkpoint  # noqa: E402


class _NoNetwork(socket.socket):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to open a network connection to {address}")
        return super().connect(address)


@pytest.fixture(scope="session", autouse=True)
def _data_dir_for_the_session(tmp_path_factory):
    """The app's data folder (history, reservations, outputs) for fixtures wider than a test,
    which are made before ``_isolated``: without it they wrote into the checkout's ``data/``,
    the user's own merge history."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDMW_DATA_DIR", str(tmp_path_factory.mktemp("session-data")))
        yield


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SDMW_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setattr(socket, "socket", _NoNetwork)


def tiny(arch="sd1", seed=0, dtype=torch.float32, name=None, **kw) -> Checkpoint:
    return Checkpoint(Path(name or f"{arch}_{seed}.safetensors"),
                      random_checkpoint(arch, seed=seed, dtype=dtype, **kw))


def write(tmp_path, name, tensors, metadata=None) -> Path:
    import safetensors.torch as st
    path = tmp_path / name
    if name.endswith(".safetensors"):
        st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": tensors}, path)
    return path


@pytest.fixture
def models(tmp_path):
    """Three tiny SD1 checkpoint files A, B, C (fp16) on disk."""
    return {s: write(tmp_path, f"model_{s}.safetensors", random_checkpoint("sd1", seed=i + 1, dtype=torch.float16))
            for i, s in enumerate("abc")}


@pytest.fixture
def demo_ws(tmp_path):
    """A workstation on the demo models (tiny SD1 A/B/C, SDXL, a LoRA, a VAE), CPU fp32."""
    from merger.demo import ensure_demo_models
    from merger.files.model_dirs import ModelDirs
    from merger.workstation import Workstation
    dirs = ModelDirs.from_models_dir(tmp_path / "models")
    ensure_demo_models(dirs)
    return Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")


@pytest.fixture(scope="session")
def browser_app(tmp_path_factory):
    """The real app (``app.py``) on the demo models, for the browser tests (``test_browser*``),
    started once for the session; its data folder and log under one temporary folder."""
    import subprocess
    import time
    import urllib.request

    from merger.demo import ensure_demo_models
    from merger.files.model_dirs import ModelDirs
    base = tmp_path_factory.mktemp("app")
    dirs = ModelDirs.from_models_dir(base / "models")
    ensure_demo_models(dirs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SDMW_DATA_DIR=str(base / "data"), GRADIO_ANALYTICS_ENABLED="False")
    log = open(base / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--models-dir", str(base / "models"), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((base / "app.log").read_text())
            time.sleep(0.5)
    yield {"url": url, "dirs": dirs, "data": base / "data"}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def chromium(browser_app):
    """Debian's headless Chromium under Playwright, once for the session (each module opens its
    own page)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        yield browser
        browser.close()
