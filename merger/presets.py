"""MBW presets (data files in ``presets/``) and parsing of MBW vectors written as text."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .blocks import BLOCKS_XL_EXT, block_ids, sd_vector_to_xl
from .errors import MergeError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
_FILES = {"sd1": "mbw_sd.tsv", "sd2": "mbw_sd.tsv", "sdxl": "mbw_xl.tsv", "flux": "mbw_flux.tsv"}


def parse_preset_text(text: str) -> dict[str, str]:
    """``name<TAB>values`` or ``name: values`` lines (SuperMerger's preset format); # comments."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        sep = "\t" if "\t" in line else ":" if ":" in line else None
        if sep:
            name, values = line.split(sep, 1)
            out[name.strip()] = values.strip()
    return out


@lru_cache(maxsize=None)
def _presets(arch: str) -> dict[str, str]:
    return parse_preset_text((PRESET_DIR / _FILES[arch]).read_text())


def presets(arch: str) -> dict[str, str]:
    """Preset name -> comma-separated values (26 for SD1/SD2, 20 for SDXL, 61 for Flux)."""
    return dict(_presets(arch))


def parse_vector(text: str, arch: str, what: str = "MBW") -> list[float]:
    """A preset name or 26/20/61 comma-separated numbers (BASE / CLIP first) -> floats for ``arch``.

    A 26-value SD vector given for SDXL is reduced to 20 as SuperMerger does."""
    text = text.strip()
    if "," not in text:
        table = _presets(arch)
        if text not in table:
            raise MergeError(f"{what}: {text!r} is neither a preset name nor comma-separated values")
        text = table[text]
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not is_number(p))
        raise MergeError(f"{what}: {bad!r} is not a number (random R/U/X values need a dice roll)") from None
    n = len(block_ids(arch))
    if arch == "sdxl" and len(values) == 26:
        values = sd_vector_to_xl(values)
    if arch == "sdxl" and len(values) == len(BLOCKS_XL_EXT):
        return values                       # SuperMerger's extended 110-block SDXL vector
    if len(values) != n:
        raise MergeError(f"{what}: {len(values)} values given, {n} needed for this model "
                         f"({', '.join(block_ids(arch))})" + (" or 110 (extended)" if arch == "sdxl" else ""))
    return values


def is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
