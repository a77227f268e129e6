"""Block IDs of MBW merging and the key -> block rule (SuperMerger ``blockfromkey``).

SD 1.x / 2.x have 26 blocks: BASE (text encoder and VAE), IN00-IN11, M00, OUT00-OUT11.
SDXL has 20: BASE, IN00-IN08, M00, OUT00-OUT08. ``time_embed`` (and SDXL ``label_emb``) belong
to IN00 and the final ``out.`` layers to the last OUT block, as in SuperMerger.
"""
from __future__ import annotations

import re

from .errors import MergeError

BLOCKS_SD = ["BASE"] + [f"IN{i:02}" for i in range(12)] + ["M00"] + [f"OUT{i:02}" for i in range(12)]
BLOCKS_XL = ["BASE"] + [f"IN{i:02}" for i in range(9)] + ["M00"] + [f"OUT{i:02}" for i in range(9)]
_IN = re.compile(r"\.input_blocks\.(\d+)\.")
_OUT = re.compile(r"\.output_blocks\.(\d+)\.")


def block_ids(arch: str) -> list[str]:
    return BLOCKS_XL if arch == "sdxl" else BLOCKS_SD


def block_of(key: str, arch: str) -> str | None:
    """The MBW block a key belongs to, or None where SuperMerger never merges it (SDXL
    keys that are neither weight nor bias)."""
    if arch == "sdxl" and not ("weight" in key or "bias" in key):
        return None
    last_out = "OUT08" if arch == "sdxl" else "OUT11"
    if "time_embed" in key or (arch == "sdxl" and "label_emb" in key):
        return "IN00"
    if arch == "sdxl":
        if not key.startswith("model.diffusion_model."):
            return "BASE"
        if key.startswith("model.diffusion_model.out."):
            return last_out
    elif ".out." in key:
        return last_out
    if m := _IN.search(key):
        return f"IN{int(m.group(1)):02}"
    if ".middle_block." in key:
        return "M00"
    if m := _OUT.search(key):
        return f"OUT{int(m.group(1)):02}"
    return "BASE"


def expand_blocks(text: str, arch: str) -> tuple[bool, list[str]]:
    """Parse "IN01 OUT03-OUT06", optionally starting with NOT, into (negated, block list).

    Ranges are inclusive and may be written either way round (SuperMerger ``blocker``)."""
    ids = block_ids(arch)
    words = text.split()
    negated = bool(words) and words[0] == "NOT"
    out: list[str] = []
    for w in words[1:] if negated else words:
        ends = [e.strip() for e in w.split("-")] if "-" in w else [w]
        for e in ends:
            if e not in ids:
                raise MergeError(f"unknown block {e!r} in {text!r}; valid blocks: {', '.join(ids)}")
        i, j = sorted(ids.index(e) for e in (ends[0], ends[-1]))
        out.extend(b for b in ids[i:j + 1] if b not in out)
    return negated, out


def sd_vector_to_xl(values: list[float]) -> list[float]:
    """A 26-value SD vector used on SDXL: keep BASE, IN00-IN08, M00, OUT00-OUT08
    (SuperMerger ``weighttoxl``)."""
    return [values[0]] + values[1:10] + values[13:23]
