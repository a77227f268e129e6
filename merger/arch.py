"""Which Stable Diffusion architecture a checkpoint is, from its key names (and one shape)."""
from __future__ import annotations

from collections.abc import Mapping

from .errors import MergeError

ARCH_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "Flux.1"}
UNET = "model.diffusion_model."
_PROJ_IN = UNET + "input_blocks.1.1.proj_in.weight"


def detect_arch(shapes: Mapping[str, object], name: str = "checkpoint") -> str:
    """Return "sd1", "sd2", "sdxl" or "flux" for a mapping of LDM key -> tensor (or shape).

    Flux.1 is told by its double-stream blocks (``double_blocks.``, bare or under the U-Net prefix).
    Text-encoder prefixes decide (``cond_stage_model.transformer.`` = SD1 CLIP-L,
    ``cond_stage_model.model.`` = SD2 OpenCLIP, ``conditioner.embedders.1.model.`` = SDXL base);
    a U-Net-only file is told apart by ``label_emb`` (SDXL) or its linear ``proj_in`` (SD2; SD1
    uses 1×1 convolutions).
    """
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has(UNET + "double_blocks.") or has("double_blocks."):
        return "flux"
    if not has(UNET):
        hint = " (it looks like a LoRA)" if any("lora_" in k or "hada_" in k for k in keys) else ""
        hint = hint or (" (it looks like a VAE)" if has("encoder.") or has("decoder.") else "")
        raise MergeError(f"{name} is not a Stable Diffusion checkpoint: no U-Net keys{hint}")
    if has("conditioner.embedders.1.model.") or has(UNET + "label_emb."):
        if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
            raise MergeError(f"{name} is an SDXL refiner, which is not supported")
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise MergeError(f"{name} is an SDXL refiner, which is not supported")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    proj = shapes.get(_PROJ_IN)
    if proj is not None and len(tuple(getattr(proj, "shape", proj))) == 2:
        return "sd2"
    return "sd1"


def check_same_arch(named: Mapping[str, str]) -> str:
    """``named`` maps file name -> arch; all must agree, else a clear error naming two of them."""
    items = list(named.items())
    first_name, first = items[0]
    for other_name, other in items[1:]:
        if other != first:
            raise MergeError(
                f"cannot merge different architectures: {first_name} is {ARCH_NAMES[first]}, "
                f"{other_name} is {ARCH_NAMES[other]}")
    return first


def detect_arch_of_file(path) -> str:
    """Architecture from a file's key names only (reads just the safetensors header)."""
    from pathlib import Path

    from .files.checkpoint_io import a1111_key_names, header_entries, load_checkpoint, read_safetensors_header
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        header, _ = read_safetensors_header(path)
        _, entries = header_entries(header, path.name)
        return detect_arch(a1111_key_names({e.key: e.shape for e in entries}), path.name)
    return detect_arch(load_checkpoint(path).tensors, path.name)
