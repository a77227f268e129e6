"""Shared fixtures: tiny random checkpoints with real LDM key names, an isolated data folder,
and no network."""
import functools
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


@functools.lru_cache(maxsize=1)
def _demo_template():
    """The app's demo models (``merger.demo.ensure_demo_models``) written once for the session,
    in a temporary folder removed at exit; their ``ModelDirs``."""
    import atexit
    import tempfile

    from merger.demo import ensure_demo_models
    from merger.files.model_dirs import ModelDirs
    root = Path(tempfile.mkdtemp(prefix="sdmw-demo-models-"))
    atexit.register(shutil.rmtree, root, True)
    dirs = ModelDirs.from_models_dir(root / "models")
    ensure_demo_models(dirs)
    return dirs


def demo_models(dirs) -> None:
    """The demo models (tiny SD1 A/B/C, SDXL, a LoRA, a VAE) in the folders of ``dirs``, those
    missing copied from :func:`_demo_template` (writing them took 0.5 s, mostly safetensors'
    per-tensor work on ~5,000 tensors; a copy 0.01 s)."""
    dirs.create()
    for kind in ("ckpt", "lora", "vae"):
        for f in getattr(_demo_template(), kind).iterdir():
            if not (getattr(dirs, kind) / f.name).exists():
                shutil.copyfile(f, getattr(dirs, kind) / f.name)


@pytest.fixture
def demo_ws(tmp_path):
    """A workstation on the demo models (tiny SD1 A/B/C, SDXL, a LoRA, a VAE), CPU fp32."""
    from merger.files.model_dirs import ModelDirs
    from merger.workstation import Workstation
    dirs = ModelDirs.from_models_dir(tmp_path / "models")
    demo_models(dirs)
    return Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")


_early_app: list = []          # the app started for the browser tests at collection (below)


def _launch_app() -> dict:
    """Start the real app (``app.py``) on the demo models in a new temporary folder (its data
    folder, models and log); returns where, without waiting for it."""
    import atexit
    import subprocess
    import tempfile

    from merger.files.model_dirs import ModelDirs
    base = Path(tempfile.mkdtemp(prefix="sdmw-app-"))
    atexit.register(shutil.rmtree, base, True)
    dirs = ModelDirs.from_models_dir(base / "models")
    demo_models(dirs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SDMW_DATA_DIR=str(base / "data"), GRADIO_ANALYTICS_ENABLED="False")
    log = open(base / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--models-dir", str(base / "models"), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return {"url": f"http://127.0.0.1:{port}/", "dirs": dirs, "data": base / "data", "proc": proc, "log": log}


def _uses_the_app(item) -> bool:
    return "browser_app" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """The browser tests (in their order) after all others."""
    items[:] = [it for it in items if not _uses_the_app(it)] + [it for it in items if _uses_the_app(it)]


def pytest_collection_finish(session):
    """Where browser tests were collected and Chromium is here, their app starts now, in the
    background: its ~10 s of imports overlap the other tests instead of delaying the first
    browser test."""
    if any(_uses_the_app(it) for it in session.items) and os.path.exists(CHROMIUM) and not _early_app:
        _early_app.append(_launch_app())


def pytest_sessionfinish(session):
    """An app started early whose tests never ran (a run stopped before them) is stopped too."""
    for app in _early_app:
        app["proc"].terminate()
        app["proc"].wait(timeout=30)
        app["log"].close()


@pytest.fixture(scope="session")
def browser_app():
    """The real app on the demo models, for the browser tests (``test_browser*``), once for the
    session: {url, dirs, data (its data folder, whose parent holds ``app.log``)}."""
    import time
    import urllib.request
    app = _early_app.pop() if _early_app else _launch_app()
    proc = app.pop("proc")
    log = app.pop("log")
    for _ in range(240):
        try:
            urllib.request.urlopen(app["url"], timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((app["data"].parent / "app.log").read_text())
            time.sleep(0.5)
    yield app
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
