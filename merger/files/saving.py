"""Writing checkpoints: atomic, streamed, never overwriting unless asked.

A merge can be written straight from the merge stream: the safetensors header is computed from
the plan (shapes and dtypes are known before any arithmetic), then each tensor is written as
it is produced, so saving never holds a second full copy of the model in memory.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_io import ST_NAMES, load_checkpoint, short_hash
from ..errors import MergeError, MergeStopped
from ..recipe import MODES_WITH_C, Recipe

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
CLIP_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
UNET_PREFIX = "model.diffusion_model."
# what pruning keeps: the U-Net / Flux transformer, VAE and text encoders (SD and Flux layouts)
KEEP_PREFIXES = (UNET_PREFIX, "first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "vae.")


@dataclass
class SaveOptions:
    fmt: str = "safetensors"          # or "ckpt"
    fp16: bool = False
    prune: bool = False
    save_metadata: bool = True
    reset_clip_ids: bool = False
    vae: str | None = None            # path of a VAE file to bake in
    overwrite: bool = False
    dtype: str = ""                   # "" keeps the merge's dtypes (model A's); else see SAVE_DTYPES
    bare: bool = False                # Flux: transformer keys without "model.diffusion_model." (BFL files)


# --dtype / the Save dtype menu: what the U-Net / Flux transformer tensors are written as
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
               "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


# ----------------------------------------------------------------------------- atomic files
def exists_error(name: object, where: str = "") -> MergeError:
    """The refusal to replace an existing file, worded for the app and the command line alike."""
    return MergeError(f"{name} already exists{where} (overwrite is off: tick Overwrite in the app or pass "
                      f"--overwrite to replace it, or choose another name)")


def atomic_write(path: Path, write: Callable[[object], None], overwrite: bool) -> Path:
    """Write via a temp file in the same folder, fsync, then move into place.

    Without ``overwrite`` an existing file is an error before anything is written, and the final
    move is a hard link, which fails rather than replace a file created meanwhile."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise exists_error(path)
    if not path.parent.is_dir():
        raise MergeError(f"folder does not exist: {path.parent}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")   # see TEMP_NAME
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise exists_error(path) from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise exists_error(path) from None
                os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MergeError(f"not enough disk space to save {path.name}; nothing was written") from None
        raise MergeError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")    # what atomic_write names its temp files


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # exists, owned by someone else
        return True
    return True


def clean_stale_temps(folders, started: float) -> list[Path]:
    """Remove temp files a killed save left behind (``.name.tmp-PID-xxxxxxxx``) in ``folders``:
    only files of this app's own pattern, last written before ``started`` (this process's start,
    a time.time()) by a process that no longer runs. Returns what was removed."""
    removed = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            m = TEMP_NAME.match(e.name)
            try:
                if m and e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < started \
                        and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
            except OSError:
                continue
    return removed


# ----------------------------------------------------------------------------- formats
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def safetensors_header(spec: Spec, metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, (shape, dtype) in spec.items():
        if dtype not in ST_NAMES:
            raise MergeError(f"cannot save {key}: dtype {dtype} is not supported by safetensors")
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors_stream(f, spec: Spec, items: Iterable[tuple[str, torch.Tensor]],
                             metadata: Mapping[str, str] | None = None) -> None:
    """Header from ``spec``, then each tensor of ``items`` (same keys, same order)."""
    f.write(safetensors_header(spec, metadata))
    keys = iter(spec.items())
    for key, t in items:
        want_key, (shape, dtype) = next(keys)
        if key != want_key or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise MergeError(f"internal error: stream gave {key} {tuple(t.shape)} {t.dtype}, "
                             f"header expects {want_key} {shape} {dtype}")
        f.write(_tensor_bytes(t))
    if next(keys, None) is not None:
        raise MergeError("internal error: stream ended before every tensor was written")


# ----------------------------------------------------------------------------- transforms
def _to_half(key: str, dtype: torch.dtype) -> bool:
    """SuperMerger ``to_half``: keys containing "model" in fp32/fp64/bf16 become fp16."""
    return "model" in key and dtype in (torch.float32, torch.float64, torch.bfloat16)


def load_vae(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A VAE file's tensors keyed as in a checkpoint (``first_stage_model.``-prefixed)."""
    ck = load_checkpoint(path)
    out = {}
    for k, v in ck.tensors.items():
        k = k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k
        if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            out["first_stage_model." + k] = v
    if not out:
        raise MergeError(f"{Path(path).name} is not a VAE: it has no encoder/decoder keys")
    return out


class SaveTransform:
    """Prune, fp16 / another dtype, VAE bake-in, CLIP position-id reset and Flux's bare key
    names, applied to a spec and a stream."""

    def __init__(self, options: SaveOptions):
        self.o = options
        self.vae = load_vae(options.vae) if options.vae else {}
        if options.dtype and options.dtype not in SAVE_DTYPES:
            raise MergeError(f"unknown save dtype {options.dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
        self.dtype = SAVE_DTYPES.get(options.dtype)

    def _dtype(self, key: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype ``key`` is written in: ``dtype`` converts the U-Net / transformer's float
        tensors (text encoders and VAE keep theirs); ``fp16`` is SuperMerger's ``to_half``."""
        if self.dtype is not None and dtype.is_floating_point and key.startswith(UNET_PREFIX):
            return self.dtype
        return torch.float16 if self.o.fp16 and _to_half(key, dtype) else dtype

    def name(self, key: str) -> str:
        return key[len(UNET_PREFIX):] if self.o.bare and key.startswith(UNET_PREFIX) else key

    def keep(self, key: str) -> bool:
        return not self.o.prune or key.startswith(KEEP_PREFIXES)

    def spec(self, spec: Spec) -> Spec:
        out: Spec = {}
        for key, (shape, dtype) in spec.items():
            if not self.keep(key):
                continue
            if key in self.vae:
                if tuple(self.vae[key].shape) != tuple(shape):
                    raise MergeError(f"the VAE does not fit this model: {key} is "
                                     f"{list(self.vae[key].shape)}, the model has {list(shape)}")
                dtype = dtype if dtype.is_floating_point else self.vae[key].dtype
            if self.o.reset_clip_ids and key == CLIP_IDS:
                shape, dtype = (1, 77), torch.int64
            out[self.name(key)] = (shape, self._dtype(key, dtype))
        return out

    def stream(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        from ..engine.kernels.fp8 import to_dtype
        for key, t in items:
            if not self.keep(key):
                continue
            if key in self.vae:
                t = self.vae[key].to(t.dtype)
            if self.o.reset_clip_ids and key == CLIP_IDS:
                t = torch.arange(77, dtype=torch.int64)[None]
            want = self._dtype(key, t.dtype)
            yield self.name(key), to_dtype(t, want)             # float8 by table


# ----------------------------------------------------------------------------- public API
def recipe_metadata(recipe: Recipe, paths: Mapping[str, str | os.PathLike] | None = None) -> dict[str, str]:
    """safetensors metadata: this app's recipe line plus SuperMerger-compatible fields."""
    sm_mode = {"weight_sum": "Weight sum", "add_difference": "Add", "triple_sum": "Triple sum",
               "sum_twice": "Sum Twice"}[recipe.mode]
    meta = {"format": "pt", "sdmw_recipe": recipe.to_line()}
    meta["sd_merge_recipe"] = json.dumps({
        "type": "sd-merge-workstation", "model_a": recipe.hash_a, "model_b": recipe.hash_b,
        "model_c": recipe.hash_c, "base_alpha": recipe.alpha, "base_beta": recipe.beta,
        "mode": sm_mode, "mbw": recipe.mbw_alpha is not None, "weights_alpha": recipe.mbw_alpha,
        "weights_beta": recipe.mbw_beta, "calcmode": recipe.calcmode,
        "elemental_merge": recipe.elemental})
    models = {}
    for tag, p in (paths or {}).items():
        if p:
            models[short_hash(p)] = {"name": Path(p).name, "slot": tag}
    meta["sd_merge_models"] = json.dumps(models)
    return meta


def save_stream(path: str | os.PathLike, spec: Spec, items: Iterable[tuple[str, torch.Tensor]],
                options: SaveOptions, metadata: Mapping[str, str] | None = None, progress=None) -> Path:
    """Save a (key, tensor) stream whose shapes/dtypes ``spec`` gives in advance;
    ``progress(done, total, key)`` is called per tensor."""
    path = Path(path)
    if progress is not None:
        items = _counted(items, len(spec), progress)
    tf = SaveTransform(options)
    meta = dict(metadata or {}) if options.save_metadata else {"format": "pt"}
    if options.fmt == "safetensors":
        out_spec = tf.spec(spec)
        return atomic_write(path, lambda f: write_safetensors_stream(
            f, out_spec, tf.stream(items), meta), options.overwrite)
    if options.fmt != "ckpt":
        raise MergeError(f"unknown save format {options.fmt!r}")
    if path.exists() and not options.overwrite:
        raise exists_error(path)
    state = {k: v.contiguous() for k, v in tf.stream(items)}
    return atomic_write(path, lambda f: torch.save({"state_dict": state}, f), options.overwrite)


def _counted(items, total: int, progress):
    for i, (k, v) in enumerate(items):
        progress(i + 1, total, k)
        yield k, v


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 options: SaveOptions, metadata: Mapping[str, str] | None = None, progress=None) -> Path:
    spec = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return save_stream(path, spec, tensors.items(), options, metadata, progress)


def physical_ram() -> int | None:
    """Bytes of RAM in this machine, or None where the OS does not say (then saves stream)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def reads_inputs_once(plan) -> bool:
    """Whether a save merges with its inputs checked key by key as they are read, rather than
    all checked first: where they exceed half the RAM (full Flux models), so that each is read
    from disk once; a NaN found midway then drops the temp file. Below that, the inputs are
    checked before anything is written (and the check is kept with the loaded models), and a
    method prepares every key first (TIES: all thresholds on the workers; saving SD1.5 + 4
    models took 6.1 s against 7.3 s key by key, 2 cores, in one process)."""
    ram = physical_ram()
    inputs = [ck for ck in (plan.a, plan.b, plan.c, *plan.models) if ck is not None]
    return ram is None or sum(ck.nbytes for ck in inputs) > ram // 2


def save_merge(plan, path: str | os.PathLike, options: SaveOptions,
               paths: Mapping[str, str | os.PathLike] | None = None,
               progress=None, should_stop=None, post=None) -> Path:
    """Merge ``plan`` (see :mod:`merger.engine`) straight into a file. ``post(key, tensor)``
    may change tensors on the way (LoRAs merged on top)."""
    from ..engine import iter_merge
    from ..engine.tensor_ops import ReusableBuffer
    # a streamed safetensors write consumes each tensor at once: compute into one reused buffer
    alloc = ReusableBuffer() if options.fmt == "safetensors" else None
    if getattr(plan.a, "bare_flux", False) and not options.bare:   # saved in model A's layout
        from dataclasses import replace
        options = replace(options, bare=True)
    items = iter_merge(plan, progress=progress, should_stop=should_stop, alloc=alloc,
                       per_key_checks=reads_inputs_once(plan))
    if post is not None:
        items = ((k, post(k, v)) for k, v in items)
    try:
        return save_stream(path, plan.output_spec(), items, options, recipe_metadata(plan.recipe, paths))
    except MergeStopped:
        raise MergeStopped("merge stopped by user; no file was written") from None


def model_label(recipe: Recipe) -> str:
    """SuperMerger-style description, e.g. ``a x 0.7 + b x 0.3`` (``makemodelname``)."""
    a, b, c = (Path(n).stem if n else "" for n in (recipe.model_a, recipe.model_b, recipe.model_c))
    al, be, r = recipe.alpha, recipe.beta, lambda x: str(round(x, 3))
    mbw = recipe.mbw_alpha is not None
    if recipe.method:
        s = f"{a} + {recipe.method}({', '.join(Path(n).stem for n in recipe.models)}) x " + ("alpha" if mbw else r(al))
        s += "".join(f"_{tag}{r(v)}" for tag, v in (("k", recipe.density), ("p", recipe.drop)) if v is not None)
    elif recipe.mode == "add_difference":
        s = f"{a} + ({b} - {c}) x " + ("alpha" if mbw else r(al))
    elif recipe.mode == "triple_sum":
        s = (f"{a} x (1-alpha-beta) + {b} x alpha + {c} x beta" if mbw
             else f"{a} x {r(1 - al - be)} + {b} x {r(al)} + {c} x {r(be)}")
    elif recipe.mode == "sum_twice":
        s = (f"({a} x (1-alpha) + {b} x alpha) x (1-beta) + {c} x beta" if mbw
             else f"({a} x {r(1 - al)} + {b} x {r(al)}) x {r(1 - be)} + {c} x {r(be)}")
    elif recipe.calcmode == "self":
        s = f"{a} x " + ("alpha" if mbw else r(al))
    else:
        s = f"{a} x (1-alpha) + {b} x alpha" if mbw else f"{a} x {r(1 - al)} + {b} x {r(al)}"
    if mbw:
        s += " (" + ",".join(r(v) for v in recipe.mbw_alpha) + ")"
        if recipe.mbw_beta is not None and (recipe.mode in MODES_WITH_C or recipe.method):
            s += "_(" + ",".join(r(v) for v in recipe.mbw_beta) + ")"
    if recipe.calcmode != "normal":
        s += "_" + recipe.calcmode
    if recipe.loras:
        s += " + " + ", ".join(x.split(":")[0].strip() for x in recipe.loras.split(",") if ":" in x)
    return s


def auto_filename(recipe: Recipe, options: SaveOptions, inpaint_channels: int = 4) -> str:
    """File name from the recipe, sanitised as SuperMerger does (spaces dropped, ``,()`` → ``_``)."""
    name = re.sub(r"[,()]", "_", model_label(recipe).replace(" ", ""))
    name = re.sub(r"[^\w.+\-=_]", "_", name).strip("_.") or "merge"
    suffix = (f".{options.dtype}" if options.dtype else ".fp16" if options.fp16 else "") + {9: "-inpainting", 8: "-instruct-pix2pix"}.get(inpaint_channels, "")
    ext = ".safetensors" if options.fmt == "safetensors" else ".ckpt"
    room = 240 - len(suffix) - len(ext)          # bytes: file systems limit names to 255 bytes
    name = name.encode("utf-8")[:room].decode("utf-8", "ignore")
    return name + suffix + ext
