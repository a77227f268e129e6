"""Diffusers-format models: a folder with ``unet/``, ``vae/``, ``text_encoder/`` (…) and
``model_index.json``, or a lone diffusers U-Net file (``diffusion_pytorch_model.safetensors``).

They are read into LDM keys through the pipeline's own key map run backwards
(:mod:`merger.pipeline.keymap`: every LDM key's diffusers targets, with OpenCLIP's q/k/v rows
concatenated back and the VAE's 1×1 attention convs reshaped), so a diffusers model merges with
LDM files; and a merge can be written as such a folder (``--save-format diffusers``). The
architecture and size are those whose key map the U-Net's names and shapes fit.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import MergeError
from .saving import exists_error

COMPONENT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
    "text_encoder_2": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}
TEXT_PREFIX = "text_model."          # transformers' CLIPTextModel(WithProjection) state-dict names
CANDIDATES = [(arch, size) for size in ("full", "tiny") for arch in ("sdxl", "sd2", "sd1")]


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def weight_files(folder: Path) -> dict[str, Path]:
    """component -> its weights file (safetensors preferred to the fp16 variant and to .bin)."""
    out = {}
    for comp, names in COMPONENT_FILES.items():
        for n in names:
            if (folder / comp / n).is_file():
                out[comp] = folder / comp / n
                break
    return out


def folder_stamp(folder: Path) -> tuple[int, int]:
    """(total size, newest mtime) of a folder model's weight files: it changed when this did."""
    stats = [p.stat() for p in weight_files(folder).values()]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def folder_sha256(folder: Path, file_hash) -> str:
    """A folder model's hash: SHA-256 over its components' file hashes (``file_hash(path)``)."""
    h = hashlib.sha256()
    for comp, path in sorted(weight_files(folder).items()):
        h.update(f"{comp}:{file_hash(path)}\n".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _key_map(arch: str, size: str) -> tuple:
    """((LDM key, LDM shape, [Target]), …) of an architecture, from the layout data (built once:
    detection tries up to six candidates per model loaded)."""
    from ..ldm_layout import sized_layout, sized_params
    from ..pipeline.keymap import targets_for
    params = sized_params(arch, size)
    widths = {"text_encoder": params["text"]["width"], "text_encoder_2": params.get("text2", {}).get("width", 0)}
    prefixes = {"text_encoder": TEXT_PREFIX, "text_encoder_2": TEXT_PREFIX}
    return tuple((k, s, targets_for(k, arch, widths, prefixes)) for k, s in sized_layout(arch, size).items())


def _fits(unet: dict[str, torch.Tensor], arch: str, size: str) -> bool:
    """Every U-Net key of the layout is there with its exact shape (diffusers keeps the U-Net's
    shapes; SD 2.x's linear ``proj_in`` tells it from SD 1.x's 1×1 conv at equal sizes)."""
    probes = [(s, t) for k, s, ts in _key_map(arch, size) if k.startswith("model.diffusion_model.") for t in ts]
    return bool(probes) and all(t.param in unet and tuple(unet[t.param].shape) == tuple(s) for s, t in probes)


def detect(unet: dict[str, torch.Tensor], name: str) -> tuple[str, str]:
    for arch, size in CANDIDATES:
        if _fits(unet, arch, size):
            return arch, size
    raise MergeError(f"{name}: a diffusers U-Net of no known architecture (SD 1.x, SD 2.x, SDXL)")


def to_ldm(components: dict[str, dict[str, torch.Tensor]], name: str) -> dict[str, torch.Tensor]:
    """LDM state dict of diffusers component state dicts (U-Net required; the others optional:
    a lone U-Net becomes a U-Net-only checkpoint). Tensors are shared where no reshaping or
    concatenation is needed. Keys the diffusers model does not have (SD 2.x's last text block)
    are left out, as the merge and the pipeline allow."""
    if "unet" not in components:
        raise MergeError(f"{name}: no unet/ weights")
    components = dict(components)
    for comp in ("text_encoder", "text_encoder_2"):   # transformers saves CLIPTextModel with or
        if comp in components:                        # without its "text_model." prefix
            components[comp] = {k if k.startswith((TEXT_PREFIX, "text_projection")) else TEXT_PREFIX + k: v
                                for k, v in components[comp].items()}
    arch, size = detect(components["unet"], name)
    out: dict[str, torch.Tensor] = {}
    for key, shape, targets in _key_map(arch, size):
        if not targets or targets[0].component not in components:
            continue
        comp = components[targets[0].component]
        parts = [comp.get(t.param) for t in targets]
        if any(p is None for p in parts):
            continue
        if targets[0].kind == "rows":
            value = torch.cat(parts)
        elif targets[0].kind == "transpose":
            value = parts[0].T
        else:
            value = parts[0]
        if tuple(value.shape) != tuple(shape):
            value = value.reshape(shape)
        out[key] = value
    return out


def from_ldm(tensors: dict[str, torch.Tensor], arch: str, size: str) -> dict[str, dict[str, torch.Tensor]]:
    """The diffusers component state dicts of an LDM state dict (the inverse of :func:`to_ldm`)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, _, targets in _key_map(arch, size):
        value = tensors.get(key)
        if value is None:
            continue
        for t in targets:
            v = t.view_of(value)
            if t.component == "vae" and t.kind == "reshape" and v.dim() == 4:
                v = v.reshape(v.shape[:2])           # 1x1 attention conv -> linear
            out.setdefault(t.component, {})[t.param] = v.contiguous()
    return out


def load_diffusers(path: Path):
    """A diffusers folder (or lone diffusers U-Net file) as a :class:`Checkpoint` in LDM keys."""
    from .checkpoint_io import Checkpoint, load_pickle_checkpoint, load_safetensors
    if path.is_dir():
        files = weight_files(path)
        if "unet" not in files:
            raise MergeError(f"{path.name}: a diffusers folder needs unet/diffusion_pytorch_model.safetensors")
    else:
        files = {"unet": path}
    comps = {}
    for comp, f in files.items():
        comps[comp] = (load_safetensors(f) if f.suffix == ".safetensors" else load_pickle_checkpoint(f)).tensors
    return Checkpoint(path, to_ldm(comps, path.name), {"format": "diffusers"})


def looks_like_diffusers_unet(tensors) -> bool:
    return "conv_in.weight" in tensors and "time_embedding.linear_1.weight" in tensors


def save_diffusers(path: Path, tensors: dict[str, torch.Tensor], overwrite: bool = False,
                   prediction_type: str = "epsilon") -> Path:
    """Write a merge as a diffusers folder (configs, tokenizers, one safetensors per component),
    built beside the target and moved into place at the end."""
    import safetensors.torch as st

    from ..pipeline.pipeline_config import pipeline_folder
    from ..pipeline.resident import spec_for
    from ..arch import detect_arch
    from ..ldm_layout import sized_params
    if detect_arch(tensors, path.name) == "flux":
        raise MergeError("a Flux.1 merge is saved as one .safetensors file (BFL or ComfyUI layout, as model A); "
                         "the diffusers folder format is not written for Flux yet")
    spec = spec_for(tensors, path.name, prediction_type)
    if path.exists() and not overwrite:
        raise exists_error(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(pipeline_folder(spec.arch, sized_params(spec.arch, spec.size), prediction_type), tmp)
        for comp, sd in from_ldm(tensors, spec.arch, spec.size).items():
            st.save_file(sd, str(tmp / comp / COMPONENT_FILES[comp][0]))
        (tmp / "sdmw.json").write_text(json.dumps({"converted_from": "LDM merge", "arch": spec.arch}))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MergeError(f"could not write {path}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
