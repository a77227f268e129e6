"""XYZ cells, dice rolls and search trials on Ray workers, each with its own resident pipeline.

The single-process path stays the default: nothing here is imported unless ``--workers`` or
``--ray-address`` is given. A :class:`Pool` starts (or joins) Ray and holds N actors, each a
:class:`CellWorker` with a :class:`~merger.workstation.Workstation` of its own (one GPU each
when there are GPUs, else a share of the CPU threads). A *task* is one merge followed by one or
more generations: an XYZ cell or dice roll is one, a search trial renders its prompts × seeds.

Scheduling keeps each worker's incremental re-merge cheap: the tasks (in grid order, X fastest)
are cut into one contiguous run per worker, and a worker that finishes its run takes the far end
of the longest run left. One task is in flight per worker: Stop dispatches nothing more (the
outstanding tasks are never run) and keeps what finishes, and a dead worker loses one task. A
running task is never interrupted, so no worker is left with a half-swapped pipeline.

The workers write no history: the app is the one writer. :meth:`Pool.ordered` yields results in
task order as they finish, so the caller records each row, writes each PNG (with the merge ID in
its infotext, see :meth:`GenImage.infotext_with_id`) and moves the progress in grid order.

Faults: a worker that dies mid-task (kill -9, out of memory) is replaced and its task re-run
(at most :data:`MAX_ATTEMPTS` times per task); a worker that cannot start is reported with its
error (:class:`~merger.errors.MergeError`), never waited on forever.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MergeError, MergeStopped

MAX_ATTEMPTS = 3          # a task that killed this many workers is reported, not retried again
START_TIMEOUT = 300.0     # seconds a worker may take to start before it is reported
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Task:
    """One merge (a recipe line) and the generations after it (``GenParams`` as dicts)."""
    recipe: str
    gens: list[dict]
    files: dict = field(default_factory=dict)    # shipped model files: (kind, name) -> (size, mtime, ref)


@dataclass
class TaskResult:
    images: list                 # GenImage, in the order of the task's gens
    notes: list[str]
    merge_seconds: float
    gen_seconds: float
    worker: int


class NoHistory:
    """A worker's history: rows are written by the app, in grid order."""

    def append(self, *a, **k):
        return None


class CellWorker:
    """The body of one Ray actor: a workstation that merges and generates tasks."""

    def __init__(self, index: int, dirs: tuple[str, str, str], settings: dict):
        import torch

        from ..files.model_dirs import ModelDirs
        from ..workstation import Workstation
        self.index = index
        device = settings.get("device")
        if device == "cuda" and not torch.cuda.is_available():
            raise MergeError(f"worker {index}: no CUDA device on its node ({os.uname().nodename})")
        if settings.get("threads"):
            torch.set_num_threads(settings["threads"])
        self.mirror = Path(tempfile.gettempdir()) / "sdmw-shipped" if settings.get("ship_models") else None
        dirs = (ModelDirs(*(self.mirror / k for k in ("ckpt", "lora", "vae"))) if self.mirror
                else ModelDirs(*(Path(d) for d in dirs)))
        for d in (dirs.ckpt,) if not self.mirror else ():
            if not d.is_dir():
                raise MergeError(f"worker {index}: the model folder {d} is not visible on node "
                                 f"{os.uname().nodename} (mount it at the same path, or use --ship-models)")
        self.ws = Workstation(dirs, cache_bytes=int(settings.get("cache_bytes", 4 << 30)), device=device,
                              dtype=settings.get("dtype"), outputs=Path(tempfile.mkdtemp(prefix="sdmw-worker-")),
                              history=NoHistory(), storage=settings.get("storage", "model"))
        self.ws.pipeline.t5_tokenizer = settings.get("t5_tokenizer")   # Flux: the same path on every node
        self.vae = None

    def ready(self) -> tuple[int, int, str]:
        return self.index, os.getpid(), os.uname().nodename

    def _receive(self, files: dict) -> None:
        """Write shipped files into this node's mirror (once per node: atomic, skipped when present)."""
        import ray
        for (kind, name), (size, mtime, ref) in files.items():
            dest = self.mirror / kind / name
            if dest.is_file() and dest.stat().st_size == size and dest.stat().st_mtime_ns == mtime:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
            tmp.write_bytes(ray.get(ref))
            os.utime(tmp, ns=(mtime, mtime))
            os.replace(tmp, dest)

    def run(self, task: Task, vae: str | None) -> TaskResult:
        from ..pipeline.generate import GenParams
        from ..recipe import Recipe
        if self.mirror is not None:
            self._receive(task.files)
        t0 = time.perf_counter()
        out = self.ws.merge(Recipe.from_line(task.recipe), source="worker", interruptible=False)
        if vae != self.vae:
            self.ws.set_vae(vae)
            self.vae = vae
        t1 = time.perf_counter()
        images = []
        for g in task.gens:
            res = self.ws.generate(GenParams(**g), save=False, interruptible=False)
            images += res.result.images
        return TaskResult(images, out.notes, t1 - t0, time.perf_counter() - t1, self.index)

    def noop(self, x=None):
        return x


@dataclass
class PoolSettings:
    workers: int = 2
    address: str | None = None        # None: a local Ray instance; "auto" or "ray://host:port": join
    device: str | None = None         # None: "cuda" when the cluster has GPUs, else "cpu"
    ship_models: bool = False
    cache_gb: float = 4.0
    storage: str = "model"
    t5_tokenizer: str | None = None   # Flux generation (--t5-tokenizer), passed to every worker


class Pool:
    """N Ray actors with resident pipelines. ``Pool.start(settings, dirs)``; ``close()`` ends them
    (and the local Ray instance this pool started)."""

    def __init__(self, settings: PoolSettings, dirs, ray_module, started_ray: bool):
        self.settings, self.dirs, self.ray, self.started_ray = settings, dirs, ray_module, started_ray
        self.actors: list = []
        self.replaced = 0
        self.busy = 0.0                 # seconds the workers spent merging and generating (all tasks)
        self.on_dispatch: Callable[[int, int], None] | None = None    # (worker slot, task index): a test hook
        self._shipped: dict = {}
        gpus = int(ray_module.cluster_resources().get("GPU", 0))
        cpus = int(ray_module.cluster_resources().get("CPU", 1))
        device = settings.device or ("cuda" if gpus else "cpu")
        self.per_actor = ({"num_gpus": 1, "num_cpus": 1} if device == "cuda"
                          else {"num_cpus": max(1, cpus // settings.workers)})
        import torch
        self.worker_settings = {"device": device, "ship_models": settings.ship_models,
                                "cache_bytes": int(settings.cache_gb * 2**30), "storage": settings.storage,
                                "t5_tokenizer": str(settings.t5_tokenizer) if settings.t5_tokenizer else None,
                                "dtype": torch.float16 if device == "cuda" else torch.float32,
                                "threads": None if device == "cuda" else self.per_actor["num_cpus"]}
        if device == "cuda" and gpus < settings.workers:
            raise MergeError(f"{settings.workers} GPU workers asked for, the Ray cluster has {gpus} GPU(s)")
        free = ray_module.available_resources()
        for res, per in (("CPU", self.per_actor.get("num_cpus", 0)), ("GPU", self.per_actor.get("num_gpus", 0))):
            if per and free.get(res, 0) + 1e-9 < per * settings.workers:
                raise MergeError(f"the Ray cluster has {free.get(res, 0):g} free {res}(s); {settings.workers} "
                                 f"workers need {per * settings.workers:g} (other Ray work holds the rest)")
        self._remote = ray_module.remote(max_restarts=0, max_task_retries=0, **self.per_actor)(CellWorker)

    @classmethod
    def start(cls, settings: PoolSettings, dirs) -> "Pool":
        if settings.workers < 1:
            raise MergeError("--workers must be 1 or more")
        try:
            import ray
        except ImportError:
            raise MergeError("scaling out needs Ray: pip install -r requirements.txt") from None
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(**ray_init_options(settings))
            except Exception as e:  # noqa: BLE001 - connection and start errors as one line
                raise MergeError(f"could not start or join Ray ({settings.address or 'local'}): "
                                 f"{str(e).splitlines()[0][:200]}") from None
        try:
            pool = cls(settings, dirs, ray, started)
        except BaseException:
            if started:
                ray.shutdown()
            raise
        try:
            for i in range(settings.workers):
                pool.actors.append(pool._spawn(i))
            pool._wait_ready(range(settings.workers))
        except BaseException:
            pool.close()
            raise
        return pool

    # ------------------------------------------------------------------ actors
    def _spawn(self, slot: int):
        d = self.dirs
        return self._remote.remote(slot, (str(d.ckpt), str(d.lora), str(d.vae)), self.worker_settings)

    def _wait_ready(self, slots) -> None:
        refs = {self.actors[s].ready.remote(): s for s in slots}
        try:
            self.ray.get(list(refs), timeout=START_TIMEOUT)
        except self.ray.exceptions.GetTimeoutError:
            raise MergeError(f"a worker did not start within {START_TIMEOUT:.0f} s") from None
        except Exception as e:  # noqa: BLE001 - the worker's own error, as one line
            raise MergeError(f"a worker could not start: {_cause(e)}") from None

    def pids(self) -> list[int]:
        return [p for _, p, _ in self.ray.get([a.ready.remote() for a in self.actors])]

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()

    # ------------------------------------------------------------------ shipping
    def files_for(self, recipe, gens, vae: str | None = None) -> dict:
        """With ``ship_models``: the model files a task reads (its checkpoints, LoRAs in its recipe
        and prompts, the VAE), each put in the object store once."""
        if not self.settings.ship_models:
            return {}
        from ..pipeline.prompt import extract_lora_tags
        wanted = [("ckpt", n) for _, n, _ in recipe.slots()] + ([("vae", vae)] if vae else [])
        loras = [recipe.loras] + [extract_lora_tags(g["prompt"])[1] for g in gens]
        for text in loras:
            items = text if isinstance(text, list) else (text or "").split(",")
            wanted += [("lora", x.split(":")[0].strip()) for x in items if x.split(":")[0].strip()]
        out = {}
        for kind, name in wanted:
            path = self.dirs.resolve(kind, name)
            if path.is_dir():
                raise MergeError(f"{name} is a diffusers folder: --ship-models ships single files; make the "
                                 f"folder visible at the same path on every node instead")
            st = path.stat()
            key = (kind, name, st.st_size, st.st_mtime_ns)
            if key not in self._shipped:
                self._shipped[key] = self.ray.put(path.read_bytes())
            out[(kind, name)] = (st.st_size, st.st_mtime_ns, self._shipped[key])
        return out

    # ------------------------------------------------------------------ running
    def ordered(self, tasks: list[Task], should_stop: Callable[[], bool] | None = None,
                vae: str | None = None) -> Iterator[tuple[int, TaskResult | None]]:
        """Run ``tasks``; yield ``(index, result)`` in task order as results arrive. Stop (as in
        the single-process path, which ends after the current cell) dispatches nothing more and
        lets each worker finish the task it has; the finished tasks are yielded in order
        (``None`` for each one never run), then :class:`MergeStopped` is raised."""
        done: dict[int, TaskResult] = {}
        nxt = 0
        for i, res in self._completed(tasks, should_stop, vae):
            if res is None:            # stopped: drain what finished, in order
                for k in range(nxt, len(tasks)):
                    yield k, done.pop(k, None)
                raise MergeStopped("stopped: the finished cells are kept")
            done[i] = res
            while nxt in done:
                yield nxt, done.pop(nxt)
                nxt += 1

    def _completed(self, tasks: list[Task], should_stop, vae):
        """``(index, result)`` in completion order; ``(-1, None)`` at the end once Stop was pressed."""
        ray = self.ray
        n = len(self.actors)
        runs = [deque(r) for r in _contiguous_runs(len(tasks), n)]
        attempts = [0] * len(tasks)
        flight: dict = {}                        # ref -> (slot, task index)
        stopping = False

        def dispatch(slot: int) -> None:
            if stopping:
                return
            if not runs[slot]:
                longest = max(range(n), key=lambda s: len(runs[s]))
                if not runs[longest]:
                    return
                runs[slot].append(runs[longest].pop())    # the far end of the longest run
            i = runs[slot].popleft()
            attempts[i] += 1
            ref = self.actors[slot].run.remote(tasks[i], vae)
            flight[ref] = (slot, i)
            if self.on_dispatch is not None:
                self.on_dispatch(slot, i)

        for s in range(n):
            dispatch(s)
        while flight:
            if not stopping and should_stop is not None and should_stop():
                stopping = True
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=0.1)
            if not ready:
                continue
            slot, i = flight.pop(ready[0])
            try:
                res = ray.get(ready[0])
            except ray.exceptions.RayActorError:
                self.actors[slot] = self._spawn(slot)     # a replacement, for this plot and the next
                self.replaced += 1
                self._wait_ready([slot])
                if attempts[i] >= MAX_ATTEMPTS:
                    raise MergeError(f"cell {i + 1} ended its worker {attempts[i]} times (out of memory?)") from None
                runs[slot].appendleft(i)                 # re-run on the replacement
                dispatch(slot)
                continue
            except ray.exceptions.RayTaskError as e:     # the others finish in the background
                cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
                if isinstance(cause, MergeError):
                    raise cause from None
                raise MergeError(f"cell {i + 1} failed on worker {slot}: {_cause(e)}") from None
            self.busy += res.merge_seconds + res.gen_seconds
            dispatch(slot)
            yield i, res
        if stopping:
            yield -1, None

    def overhead(self, n: int = 200) -> float:
        """Seconds per round trip of an empty task through one worker (the dispatch overhead)."""
        a = self.actors[0]
        self.ray.get(a.noop.remote())
        t = time.perf_counter()
        for _ in range(n):
            self.ray.get(a.noop.remote(Task("", [])))
        return (time.perf_counter() - t) / n


def _contiguous_runs(n_tasks: int, n_workers: int) -> list[range]:
    """[0, n) cut into ``n_workers`` contiguous runs of near-equal length."""
    bounds = [round(k * n_tasks / n_workers) for k in range(n_workers + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(n_workers)]


def _cause(e: BaseException) -> str:
    """The worker's own error message, one line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        return _cause(cause)
    text = str(e).strip().splitlines()
    last = [ln for ln in text if ln.strip()][-1] if text else type(e).__name__
    return last[:300]


def ray_init_options(settings: PoolSettings) -> dict:
    """``ray.init``'s arguments for a pool that starts (or joins) Ray itself: the workers import
    this checkout (PYTHONPATH), offline; a local instance counts at least one CPU per worker."""
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}}
    kw = {"address": settings.address} if settings.address else {
        "num_cpus": max(settings.workers, os.cpu_count() or 1), "include_dashboard": False}
    return {"runtime_env": env, "log_to_driver": False, "configure_logging": False, **kw}


def start_pool(ws, workers: int | None, address: str | None = None, ship_models: bool = False,
               device: str | None = None) -> Pool | None:
    """Attach a pool to ``ws`` (``ws.pool``) when workers or an address are given; else None."""
    if not workers and not address:
        return None
    pool = Pool.start(PoolSettings(workers=workers or 1, address=address, ship_models=ship_models,
                                   device=device, cache_gb=min(4.0, ws.cache.budget / 2**30),
                                   t5_tokenizer=ws.pipeline.t5_tokenizer), ws.dirs)
    ws.pool = pool
    return pool


def clean_mirror() -> None:
    """Remove this node's shipped-model mirror (tests; users may delete it any time)."""
    shutil.rmtree(Path(tempfile.gettempdir()) / "sdmw-shipped", ignore_errors=True)


def add_pool_arguments(p) -> None:
    """``--workers``, ``--ray-address``, ``--ship-models`` (the app and the CLI runners)."""
    p.add_argument("--workers", type=int, default=0,
                   help="run plot cells, dice rolls and search trials on N Ray workers, each with its own "
                        "pipeline (one per GPU when there are GPUs); default: in this process")
    p.add_argument("--ray-address", help="join a Ray cluster instead of starting one: 'auto' or ray://host:port "
                                         "(the model folders must be visible at the same path on every node, "
                                         "or add --ship-models)")
    p.add_argument("--ship-models", action="store_true",
                   help="send each model file to every node once through Ray's object store")


def pool_from_args(ws, args) -> Pool | None:
    return start_pool(ws, args.workers, args.ray_address, args.ship_models, getattr(args, "device", None))
