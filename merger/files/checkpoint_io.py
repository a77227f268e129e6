"""Reading checkpoints: zero-copy ``.safetensors``, safe ``.ckpt``/``.pt``, short hashes.

``.safetensors`` files are memory-mapped privately (copy-on-write) and every tensor is a view
of the mapping: loading costs no copy, and page-cache pages are shared between processes.
``.ckpt``/``.pt`` files go through ``torch.load(weights_only=True)``: a pickle that needs code to
load is refused with a clear message instead of being executed.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import pickle
import re
import struct
import threading
import warnings
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MergeError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in ST_DTYPES.values()}
CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")


@dataclass
class Checkpoint:
    """A loaded state dict plus where it came from."""
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    bare_flux: bool = False     # a BFL transformer-only file: its keys were given the U-Net prefix on load

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def ema_view(self) -> "Checkpoint":
        """The same model with its EMA U-Net (``model_ema.*``, training checkpoints) as its U-Net.

        An EMA key is the U-Net key without ``model.`` and without dots
        (``model.diffusion_model.out.2.bias`` -> ``model_ema.diffusion_modelout2bias``, as
        ``LitEma`` names its buffers). Tensors are shared, not copied; the EMA keys themselves are
        dropped from the view. A model without EMA weights for its whole U-Net is refused."""
        cached = getattr(self, "_ema", None)
        if cached is not None:
            return cached
        unet = [k for k in self.tensors if k.startswith("model.diffusion_model.")]
        ema = {k: "model_ema." + k[len("model."):].replace(".", "") for k in unet}
        lacking = [k for k, e in ema.items() if e not in self.tensors]
        if lacking:
            has = any(k.startswith("model_ema.") and k not in EMA_COUNTERS for k in self.tensors)
            raise MergeError(f"{self.name} has no EMA weights" if not has else
                             f"{self.name} has EMA weights for only part of its U-Net (none for {lacking[0]})")
        tensors = {k: v for k, v in self.tensors.items() if not k.startswith("model_ema.")}
        tensors.update({k: self.tensors[e] for k, e in ema.items()})
        view = Checkpoint(self.path, tensors, self.metadata)
        self._ema = view
        return view

    def stamp(self) -> tuple[int, int]:
        """Changes when a tensor is added, removed or replaced (results cached on the checkpoint
        are made again then)."""
        return len(self.tensors), sum(id(t) for t in self.tensors.values())

    def cached(self, what, compute):
        """``compute()``, made once per ``what`` while the tensors stay the same."""
        memo = self.__dict__.setdefault("_memo", {})
        stamp = self.stamp()
        hit = memo.get(what)
        if hit is None or hit[0] != stamp:
            if len(memo) > 16:
                memo.clear()
            hit = memo[what] = (stamp, compute())
        return hit[1]

    def note_stats(self, key: str, tensor: torch.Tensor, finite: bool, top: float) -> None:
        """Record what :func:`..engine.tensor_ops.finite_top` would find in ``tensor`` (this
        checkpoint's ``key``), found by a pass that read it anyway (TIES's thresholds), so that
        :meth:`value_stats` does not read it again. Ignored unless ``tensor`` is still that key's."""
        if self.tensors.get(key) is tensor:
            self.__dict__.setdefault("_key_stats", {})[key] = (tensor, finite, top)

    def value_stats(self) -> tuple[frozenset[str], float]:
        """(keys holding NaN/Inf, largest finite |value|) over the float tensors; computed once
        per loaded file (one pass, about memory speed: :func:`..engine.tensor_ops.finite_top`,
        skipping the tensors :meth:`note_stats` recorded) and cached. A second thread asking
        while the first scans (a merge while the background warm-up of :mod:`.warmup` reads the
        file) waits for its result."""
        from ..engine.tensor_ops import finite_top
        noted = self.__dict__.get("_key_stats", {})

        def scan():
            bad, top = set(), 0.0
            for k, t in self.tensors.items():
                if t.is_floating_point() and t.numel():
                    hit = noted.get(k)
                    finite, most = hit[1:] if hit is not None and hit[0] is t else finite_top(t)
                    if finite:
                        top = max(top, most)
                    else:
                        bad.add(k)
            return frozenset(bad), top
        with self.__dict__.setdefault("_scan_lock", threading.Lock()):
            return self.cached("value_stats", scan)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse the JSON header; returns (header, offset of the data section). The header is a
    JSON object; its entries are checked by :func:`header_entries`."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MergeError(f"{path.name} is not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        if n <= 1 or n > min(size - 8, 100 << 20):
            raise MergeError(f"{path.name} is not a valid safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise MergeError(f"{path.name} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path.name} is corrupt: bad safetensors header")
    return header, 8 + n


@dataclass(frozen=True)
class HeaderEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _ints(value, n: int | None) -> tuple[int, ...] | None:
    """A list of non-negative ints (of length ``n`` when given), else None."""
    if not isinstance(value, list) or (n is not None and len(value) != n):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return tuple(value)


def header_entries(header: dict, name: str, data_size: int | None = None) -> tuple[dict[str, str], list[HeaderEntry]]:
    """Validate a safetensors header: (metadata, entries in file order). Every entry must be an
    object with a known dtype, a shape of non-negative ints and two offsets whose distance is
    the shape's byte size; the tensors must tile the data section without gaps or overlaps (as
    the format requires) and, when ``data_size`` is given, fit inside it."""
    header = dict(header)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise MergeError(f"{name} is corrupt: its __metadata__ is not a table of strings")
    entries = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise MergeError(f"{name} is corrupt: header entry {key!r} is not an object")
        dtype = ST_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        shape, offsets = _ints(info.get("shape"), None), _ints(info.get("data_offsets"), 2)
        if dtype is None or shape is None or offsets is None or offsets[0] > offsets[1]:
            what = "dtype" if dtype is None else "shape" if shape is None else "data_offsets"
            raise MergeError(f"{name} is corrupt: bad {what} in the header entry for {key!r}")
        count = math.prod(shape)
        if offsets[1] - offsets[0] != count * _ITEMSIZE[dtype]:
            raise MergeError(f"{name} is corrupt: size of {key!r} does not match its shape and dtype")
        entries.append(HeaderEntry(key, dtype, shape, *offsets))
    pos = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            raise MergeError(f"{name} is corrupt: the data of {e.key!r} "
                             + ("overlaps another tensor" if e.begin < pos else "does not follow the previous tensor"))
        pos = e.end
    if data_size is not None and pos > data_size:
        raise MergeError(f"{name} is truncated: {data_size} bytes of tensor data on disk, the header describes "
                         f"{pos} (an unfinished download?)")
    return {str(k): str(v) for k, v in metadata.items()}, entries


def load_safetensors(path: Path) -> Checkpoint:
    header, start = read_safetensors_header(path)
    size = path.stat().st_size
    metadata, entries = header_entries(header, path.name, size - start)
    tensors: dict[str, torch.Tensor] = {}
    if not entries or size == start:
        return Checkpoint(path, {e.key: torch.empty(e.shape, dtype=e.dtype) for e in entries}, metadata)
    # private + writable: tensors may be modified in memory without touching the file (pages
    # are copied only when written). No MAP_POPULATE: on a writable private mapping it would
    # copy every page up front (measured: 1.9 s and twice the RSS for two SD1.5 files).
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    for e in entries:
        count, itemsize = math.prod(e.shape), _ITEMSIZE[e.dtype]
        if count == 0:
            tensors[e.key] = torch.empty(e.shape, dtype=e.dtype)
        elif (start + e.begin) % itemsize:
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=e.end - e.begin, offset=start + e.begin)
            tensors[e.key] = raw.clone().view(e.dtype).reshape(e.shape)
        else:
            tensors[e.key] = torch.frombuffer(mm, dtype=e.dtype, count=count,
                                              offset=start + e.begin).reshape(e.shape)
    return Checkpoint(path, tensors, metadata)


def _unwrap(obj, name: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MergeError(f"{name} does not contain a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def load_pickle_checkpoint(path: Path) -> Checkpoint:
    """``torch.load(weights_only=True)``: a pickle that needs code is refused, never run. Any
    failure of the loader (corrupt, truncated, not a pickle) becomes one clear line."""
    if path.stat().st_size == 0:
        raise MergeError(f"{path.name} is empty (0 bytes)")
    use_mmap = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():   # e.g. "Detected pickle protocol 4": the error says enough
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))
        if code:
            raise MergeError(f"refused to load {path.name}: it is a pickle that would run code "
                             f"({code.group(1)}); only plain tensors are allowed (convert it to "
                             f".safetensors with a tool you trust)") from None
        raise MergeError(f"{path.name} is not a checkpoint this app can read safely (corrupt, truncated, "
                         f"or a pickle format the safe loader does not support)") from None
    except Exception as e:  # noqa: BLE001 - the loader's own errors on bad bytes, all of them
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise MergeError(f"{path.name} is corrupt or truncated ({type(e).__name__}: {first})") from None
    return Checkpoint(path, _unwrap(obj, path.name))


# A1111 sd_models.checkpoint_dict_replacements_sd1 / _sd2_turbo: names that files in the wild use
A1111_RENAMES_SD1 = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}
A1111_RENAMES_SD2_TURBO = {"conditioner.embedders.0.": "cond_stage_model."}
_TURBO_PROBE = "conditioner.embedders.0.model.ln_final.weight"


def a1111_key_names(tensors: dict) -> dict:
    """Keys renamed as A1111's ``get_state_dict_from_checkpoint`` does on load (and a bare BFL Flux
    transformer's keys put under ``model.diffusion_model.``, as SuperMerger does): old SD1 files' text
    encoder without ``text_model.`` gets it; SD 2.1 Turbo's SGM names (its OpenCLIP under
    ``conditioner.embedders.0.``, ``ln_final`` 1024 wide) become LDM's ``cond_stage_model.``. Values
    (tensors or shapes) are kept as they are; the dict is returned unchanged when nothing matches."""
    probe = tensors.get(_TURBO_PROBE)
    turbo = probe is not None and tuple(getattr(probe, "shape", probe))[:1] == (1024,)
    from ..flux_layout import add_prefix, is_bare_flux
    if is_bare_flux(tensors):       # BFL's bare transformer keys, under the prefix (SuperMerger prefixer)
        return add_prefix(tensors)
    table = A1111_RENAMES_SD2_TURBO if turbo else A1111_RENAMES_SD1
    if not any(k.startswith(tuple(table)) for k in tensors):
        return tensors
    out = {}
    for key, value in tensors.items():
        for old, new in table.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load any supported checkpoint file (keys named as A1111 names them, see
    :func:`a1111_key_names`); every failure is a :class:`MergeError`."""
    from .diffusers_format import is_diffusers_folder, load_diffusers, looks_like_diffusers_unet
    path = Path(path)
    if path.is_dir():
        if is_diffusers_folder(path):
            return load_diffusers(path)
        raise MergeError(f"{path.name} is a folder, not a model file (a diffusers model folder has "
                         f"model_index.json and unet/)")
    if not path.is_file():
        raise MergeError(f"file not found: {path}")
    if path.suffix.lower() not in CHECKPOINT_EXTS:
        raise MergeError(f"{path.name}: unsupported file type (use .safetensors or .ckpt)")
    try:
        ck = load_safetensors(path) if path.suffix.lower() == ".safetensors" else load_pickle_checkpoint(path)
        if looks_like_diffusers_unet(ck.tensors):        # a lone diffusers U-Net file
            return load_diffusers(path)
        from ..flux_layout import is_bare_flux
        ck.bare_flux = is_bare_flux(ck.tensors)
        ck.tensors = a1111_key_names(ck.tensors)
        return ck
    except OSError as e:
        raise MergeError(f"could not read {path.name}: {e.strerror or e}") from None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """The sha256 of a file's bytes, hashed straight from a read-only mapping (no copy into
    Python's buffers: 1.34-1.42 GB/s here against 1.20-1.26 for ``read()`` in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for start in range(0, size, chunk):
                    h.update(view[start:start + chunk])
            finally:
                view.release()
    return h.hexdigest()


class KeyedLocks:
    """One lock per key (a file), made on first use: two threads asking for the same file's hash
    or load compute it once, the second waiting for the first (:class:`HashCache`,
    :class:`.model_cache.ModelCache`)."""

    def __init__(self):
        self._locks: dict = {}
        self._guard = threading.Lock()

    def __call__(self, key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


_HASHING = KeyedLocks()                       # per file, held while its sha256 is computed
_HASH_DATA_LOCK = threading.Lock()            # the cache's dict and its JSON file


class HashCache:
    """sha256 of model files, computed once per (path, size, mtime) and kept in a JSON file.

    The short hash is A1111's: the first 10 hex digits of the file's sha256. Thread-safe: a file
    asked for by two threads at once (the background warm-up and a merge) is read once, the
    second waiting for the first's result."""

    def __init__(self, cache_file: str | os.PathLike | None = None):
        from .paths import data_dir
        self.file = Path(cache_file) if cache_file else data_dir() / "cache" / "hashes.json"
        self._data: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._data is None:
            try:
                self._data = json.loads(self.file.read_text())
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def known(self, path: str | os.PathLike) -> str | None:
        """The file's sha256 if this cache holds it for the file as it is now (same size and
        modification time), else None (also for a folder or a file that cannot be read)."""
        p = Path(path).resolve()
        try:
            st = p.stat()
        except OSError:
            return None
        with _HASH_DATA_LOCK:
            entry = self._load().get(str(p))
        if entry and entry.get("size") == st.st_size and entry.get("mtime") == st.st_mtime_ns:
            return entry["sha256"]
        return None

    def sha256(self, path: str | os.PathLike) -> str:
        p = Path(path).resolve()
        if p.is_dir():                 # a diffusers folder: over its components' files
            from .diffusers_format import folder_sha256
            return folder_sha256(p, self.sha256)
        with _HASHING(p):
            st = p.stat()
            if (digest := self.known(p)) is not None:
                return digest
            digest = file_sha256(p)
            with _HASH_DATA_LOCK:
                self._data[str(p)] = {"size": st.st_size, "mtime": st.st_mtime_ns, "sha256": digest}
                self._save()
            return digest

    def short_hash(self, path: str | os.PathLike) -> str:
        return self.sha256(path)[:10]

    def _save(self) -> None:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f"{self.file.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self._data, indent=0))
            os.replace(tmp, self.file)
        except OSError:
            pass  # the cache is an optimisation; a read-only home must not break merging


_default_hashes: HashCache | None = None


def _hashes() -> HashCache:
    """The hash cache of the data folder in use (made again when ``SDMW_DATA_DIR`` changes)."""
    global _default_hashes
    with _HASH_DATA_LOCK:      # one cache object, also when two threads ask first at once
        if _default_hashes is None or _default_hashes.file != HashCache().file:
            _default_hashes = HashCache()
        return _default_hashes


def short_hash(path: str | os.PathLike) -> str:
    """A1111 short hash of a file (cached on disk, see :class:`HashCache`)."""
    return _hashes().short_hash(path)


def unhashed(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The distinct files among ``paths`` whose hash the cache does not hold yet (their first use
    here reads them whole)."""
    cache = _hashes()
    return [p for p in dict.fromkeys(Path(p) for p in paths) if cache.known(p) is None]


def short_hashes(paths: Iterable[str | os.PathLike]) -> list[str]:
    """:func:`short_hash` of each path, the distinct files hashed side by side, one per core
    (sha256 runs at about 1.4 GB/s on one core here, so the five files of a first TIES merge from
    the command line took 8 s one after the other). Errors are raised as :func:`short_hash`
    raises them."""
    paths = list(paths)
    todo = unhashed(paths)
    workers = min(len(todo), os.cpu_count() or 1, 8)
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="hashing") as pool:
            for f in [pool.submit(short_hash, p) for p in todo]:
                f.exception()               # all finished; the first error is raised below
    return [short_hash(p) for p in paths]
