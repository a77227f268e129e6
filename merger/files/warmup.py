"""Read the models a user has picked before they press Merge, on a background thread.

Picking a model in the Merge tab costs nothing; the merge then hashes it (A1111's short hash, the
sha256 of the whole file, once per file: :class:`.checkpoint_io.HashCache`), loads it and scans it
for NaN/Inf (:meth:`.checkpoint_io.Checkpoint.value_stats`), which reads every byte again. For a file
that is not in the page cache that read runs at the disk's speed (two SD1.5 files from a SATA
SSD: about 8 s; two SDXL files: about 28 s), and it used to start only when Merge was pressed.
A :class:`Warmer` starts it as soon as the models are picked, while the user is still setting
ratios: the merge then finds them hashed, loaded and scanned, or waits only for the rest
(``HashCache``, ``value_stats`` and :class:`.model_cache.ModelCache` let a second caller wait for
the first instead of doing the work twice). A request may add a last step once its files are read (the
workstation's: a method's part of the merge that does not depend on α, TIES's thresholds);
:meth:`Warmer.hand_over` stops that step at its next key when a merge starts, so the two never
compute the same thing.

The warm-up runs on one thread with torch single-threaded there and, on Linux, a lower priority
(nice 10), so a generation running meanwhile keeps the cores; a newer pick replaces a pending one
and stops the current one at the next model; :meth:`Warmer.cancel` (Clear cache) also drops what
a running warm-up loaded after the cache was cleared. A name that does not resolve inside the
models' folder is skipped, and so is a file that fails to load: the merge reports them. Nothing
is written anywhere.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import MergeError
from .checkpoint_io import short_hash
from .model_cache import ModelCache


NICE = 10       # the warm-up thread's niceness (Linux sets it per thread)

# a request's last step: then(should_stop), polling should_stop() between its pieces of work
Then = Callable[[Callable[[], bool]], object]


class Warmer:
    """Hashes, loads and scans the checkpoints named by the UI, then runs the request's last
    step, all on one background thread (see the module)."""

    def __init__(self, cache: ModelCache, resolve: Callable[[str], Path]):
        self._cache, self._resolve = cache, resolve
        self._lock = threading.Lock()
        self._wanted: tuple[tuple[Path, ...], Then | None] | None = None   # the newest request not yet taken up
        self._epoch = 0                                   # moved on by cancel()
        self._handed_over = False                         # a merge started: no last step until the next request
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._then_done = threading.Event()               # clear while a request's last step runs
        self._then_done.set()

    def request(self, names: Iterable[str], then: Then | None = None) -> tuple[Path, ...]:
        """Warm these models (names relative to the models' folder; empty ones and names that do
        not resolve there are skipped), then run ``then(should_stop)`` if given and the request
        is still current. Returns the files it will read."""
        paths: list[Path] = []
        for name in names:
            if not name:
                continue
            try:
                path = self._resolve(name)
            except MergeError:
                continue
            if path not in paths:
                paths.append(path)
        with self._lock:
            self._wanted = (tuple(paths), then)
            self._handed_over = False
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="model-warm-up", daemon=True)
                self._thread.start()
        return tuple(paths)

    def cancel(self) -> None:
        """Drop the pending request and stop the running one at its next model; what it loads
        from now on is taken out of the cache again."""
        with self._lock:
            self._epoch += 1
            self._wanted = None

    def hand_over(self, timeout: float = 30.0) -> None:
        """A merge is starting: a request's last step stops at its next piece of work (this
        waits until it has, at most ``timeout`` s) and none starts until the next request. The
        reading of files goes on: the merge waits for the ones it needs."""
        with self._lock:
            self._handed_over = True
        self._then_done.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Until no warm-up is pending or running (True), or ``timeout`` seconds (False)."""
        return self._idle.wait(timeout)

    def _take(self):
        with self._lock:
            wanted, self._wanted = self._wanted, None
            if wanted is None:            # decided under the lock: a request now starts a new thread
                self._thread = None
                self._idle.set()
            return wanted, self._epoch

    def _stale(self, epoch: int) -> bool:
        with self._lock:
            return self._wanted is not None or self._epoch != epoch

    def _run(self) -> None:
        from ..engine.omp_threads import one_torch_thread
        one_torch_thread()
        try:                    # Linux: this thread alone yields the CPU to merges and generation
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except (AttributeError, OSError):
            pass
        while True:
            wanted, epoch = self._take()
            if wanted is None:
                return
            paths, then = wanted
            for path in paths:
                if self._stale(epoch):
                    break
                self._warm(path, paths, epoch, scan=then is None)
            if then is not None:
                self._then(then, epoch)

    def _warm(self, path: Path, pinned: tuple[Path, ...], epoch: int, scan: bool = True) -> None:
        """Hash, load and (``scan``) NaN/Inf-scan one file. A request with a last step (a
        method's preparation, which checks its inputs itself, on the way where it reads them:
        TIES) leaves the scan to that step."""
        try:
            short_hash(path)          # the hash a merge's recipe records: the whole file read, in order
            ck = self._cache.get(path, pinned=pinned)
            with self._lock:
                cleared = self._epoch != epoch
            if cleared:                           # the cache was cleared meanwhile: leave it cleared
                self._cache.unload(path)
                return
            if scan:
                ck.value_stats()
        except Exception:  # noqa: BLE001 - a bad file: the merge reads it again and says what is wrong
            pass

    def _superseded(self, epoch: int) -> bool:
        """(The lock held.) Whether a request's last step should not start or go on."""
        return self._handed_over or self._wanted is not None or self._epoch != epoch

    def _then(self, then: Then, epoch: int) -> None:
        def should_stop() -> bool:
            with self._lock:
                return self._superseded(epoch)
        with self._lock:
            if self._superseded(epoch):
                return
            self._then_done.clear()
        try:
            then(should_stop)
        except Exception:  # noqa: BLE001 - the merge meets the same problem and reports it
            pass
        finally:
            self._then_done.set()
