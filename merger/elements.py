"""The elements (tensors) of a model with their MBW block, shape and dtype (Elements tab)."""
from __future__ import annotations

from dataclasses import dataclass

from .arch import detect_arch
from .blocks import block_of


@dataclass(frozen=True)
class Element:
    key: str
    block: str          # MBW block ID, or "-" for keys never merged by block
    shape: tuple[int, ...]
    dtype: str
    numel: int


def list_elements(tensors, arch: str | None = None, contains: str = "") -> list[Element]:
    """Every key (filtered by case-insensitive substring ``contains``) in file order."""
    arch = arch or detect_arch(tensors)
    needle = contains.lower()
    rows = []
    for key, t in tensors.items():
        if needle and needle not in key.lower():
            continue
        block = block_of(key, arch) if ("weight" in key or "bias" in key) else None
        rows.append(Element(key, block or "-", tuple(t.shape), str(t.dtype).replace("torch.", ""), t.numel()))
    return rows
