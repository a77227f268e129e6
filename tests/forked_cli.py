"""``python -m merger ...`` for the tests, without paying for a fresh interpreter each time.

Every command-line test used to start its own interpreter, and each start imported torch, numba,
diffusers and the app again: 3.2-3.5 s of a 2-core CI machine per call, about 50 calls. Here one
helper process imports all of that once (it runs no torch op, so it has no OpenMP threads), and
each call is a child forked from it that runs the module exactly as ``python -m`` does
(``runpy.run_module(..., run_name="__main__", alter_sys=True)``), with the caller's working folder,
environment and argv, its stdout and stderr in files, stdin from /dev/null, the exit code from
``SystemExit`` (an uncaught exception prints its traceback and exits 1, as the interpreter does),
and the ``atexit`` handlers and non-daemon threads finished before it exits. The result is a
``subprocess.CompletedProcess`` decoded as ``subprocess.run(..., text=True)`` decodes.

A call falls back to a real interpreter when the helper cannot be used: an environment that
differs in a variable read while those modules load (``NUMBA_*``, ``OMP_*``, ``PYTORCH_*``, ...),
a helper that has a Python thread (a fork would copy a lock held by one), or no ``fork`` on the platform.
A few tests still start the real interpreter on purpose (``SDMW_FORKED_CLI=0`` forces it everywhere).
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what the helper imports once: the two command lines and the libraries they load lazily
PRELOAD = ("merger.cli", "lora_ops.cli", "torch", "numba", "safetensors.torch", "diffusers", "transformers",
           "optuna", "PIL.Image")
# variables read while the interpreter starts or a module loads: a call that changes one needs a
# fresh interpreter
IMPORT_TIME_ENV = ("NUMBA_", "OMP_", "MKL_", "KMP_", "GOMP_", "PYTORCH_", "TORCH", "CUDA", "HF_", "TRANSFORMERS_",
                   "DIFFUSERS_", "PYTHON", "LD_", "GRADIO_", "OPENBLAS", "SDMW_COMPILE", "SDMW_DEBUG")
# ... except these, which the suite's own process sets on the way and a fresh interpreter would
# either read only when used or set the same itself: Ray's driver sets PYTHONBREAKPOINT,
# Inductor's first compile its cache folder, joblib's import (setdefault) two Intel OpenMP flags
READ_WHEN_USED = {"PYTHONBREAKPOINT", "TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK"}


# ------------------------------------------------------------------------------------------ helper
def _child(req: dict) -> None:
    """In the forked child: become ``python -m <module> <argv>`` and exit with its code. The
    helper's own ``sys.stdout``/``sys.stderr`` objects stay: they write to fds 1 and 2, now the
    files, and were made for pipes as an interpreter started with ``capture_output`` makes them
    (stdout block-buffered, stderr line-buffered)."""
    import runpy
    import traceback
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_TRUNC)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_TRUNC)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.close(req["answer_fd"])              # the helper's answer pipe (its requests were fd 0)
    sys.argv = [req["module"], *req["argv"]]
    sys.path[0] = req["cwd"]                # what -m puts first
    code = 0
    try:
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:                   # noqa: BLE001 (the interpreter prints it and exits 1)
        traceback.print_exc()
        code = 1
    threading._shutdown()       # as the interpreter's exit: threading's exit hooks (a thread pool's
    atexit._run_exitfuncs()     # "shut down"), then every non-daemon thread joined, then atexit's
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code & 0xFF)


def serve() -> None:
    """The helper: import once, then one forked child per request line (JSON) on stdin."""
    import importlib
    import signal
    import time
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                           # anything printed by accident goes to stderr
    # no Python thread may run beside the fork (it could hold a lock the child then needs); the one
    # native thread numpy's import starts is OpenBLAS's pool, which pthread_atfork handlers keep safe
    answer.write(json.dumps({"ready": threading.active_count() == 1}) + "\n")
    answer.flush()
    for line in sys.stdin:
        req = dict(json.loads(line), answer_fd=answer.fileno())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _child(req)
            finally:
                os._exit(70)
        deadline, status = time.monotonic() + req["timeout"], None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "timeout"
            else:
                time.sleep(0.01)
        rc = "timeout" if status == "timeout" else os.waitstatus_to_exitcode(status)
        answer.write(json.dumps({"rc": rc}) + "\n")
        answer.flush()


# ------------------------------------------------------------------------------------------ client
class _Helper:
    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.env = None
        self.ready = False

    def start(self) -> bool:
        if self.proc is None:
            self.env = dict(os.environ)
            self.proc = subprocess.Popen([sys.executable, "-c", "from tests.forked_cli import serve; serve()"],
                                         cwd=ROOT, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, bufsize=1)
            line = self.proc.stdout.readline()
            self.ready = bool(line) and json.loads(line).get("ready", False)
        return self.ready and self.proc.poll() is None

    def usable(self, env: dict) -> bool:
        if os.environ.get("SDMW_FORKED_CLI") == "0" or not hasattr(os, "fork"):
            return False
        if not self.start():
            warnings.warn("forked CLI: a fresh interpreter, as the helper is not running", stacklevel=3)
            return False
        changed = sorted(k for k in set(env) | set(self.env)
                         if k.startswith(IMPORT_TIME_ENV) and k not in READ_WHEN_USED and env.get(k) != self.env.get(k))
        if changed:           # correct, only slower: said, so that a variable set on the way is noticed
            warnings.warn(f"forked CLI: a fresh interpreter, as {', '.join(changed)} changed", stacklevel=3)
        return not changed

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_HELPER = _Helper()


def _decode(data: bytes) -> str:
    """As ``subprocess.run(text=True)``: the locale's encoding, universal newlines."""
    import locale
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


def run_module(module: str, *args, cwd=ROOT, env: dict | None = None, timeout: float = 300,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", module, *args], capture_output=True, text=True)``, forked
    from the helper unless ``fresh`` or the helper cannot be used (module docstring)."""
    argv = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    cmd = [sys.executable, "-m", module, *argv]
    with _HELPER.lock:
        if fresh or not _HELPER.usable(env):
            return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        with tempfile.TemporaryDirectory(prefix="forked-cli-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            req = {"module": module, "argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out),
                   "stderr": str(err), "timeout": timeout}
            _HELPER.proc.stdin.write(json.dumps(req) + "\n")
            _HELPER.proc.stdin.flush()
            line = _HELPER.proc.stdout.readline()
            if not line:
                raise RuntimeError("the forked-CLI helper died")
            rc = json.loads(line)["rc"]
            stdout, stderr = _decode(out.read_bytes()), _decode(err.read_bytes())
    if rc == "timeout":
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    return subprocess.CompletedProcess(cmd, rc, stdout, stderr)


def stop_helper() -> None:
    _HELPER.stop()


atexit.register(stop_helper)
