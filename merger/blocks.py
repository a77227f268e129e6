"""Block IDs of MBW merging and the key -> block rule (SuperMerger ``blockfromkey``).

SD 1.x / 2.x have 26 blocks: BASE (text encoder and VAE), IN00-IN11, M00, OUT00-OUT11.
SDXL has 20: BASE, IN00-IN08, M00, OUT00-OUT08. ``time_embed`` (and SDXL ``label_emb``) belong
to IN00 and the final ``out.`` layers to the last OUT block, as in SuperMerger.
Flux.1 has 61 (SuperMerger ``BLOCKIDFLUX``): CLIP (CLIP-L; the first value, like BASE), T5, IN
(the input embedders), D00-D18 (double-stream blocks), S00-S37 (single-stream blocks), OUT (the
last layer). Its VAE is never merged (model A's is kept), as in SuperMerger.
"""
from __future__ import annotations

import functools
import re

from .errors import MergeError

BLOCKS_SD = ["BASE"] + [f"IN{i:02}" for i in range(12)] + ["M00"] + [f"OUT{i:02}" for i in range(12)]
BLOCKS_XL = ["BASE"] + [f"IN{i:02}" for i in range(9)] + ["M00"] + [f"OUT{i:02}" for i in range(9)]
BLOCKS_FLUX = ["CLIP", "T5", "IN"] + [f"D{i:02}" for i in range(19)] + [f"S{i:02}" for i in range(38)] + ["OUT"]
_FLUX_INDEX = re.compile(r"\.(\d+)\.")
_IN = re.compile(r"\.input_blocks\.(\d+)\.")
_OUT = re.compile(r"\.output_blocks\.(\d+)\.")


# SuperMerger's extended SDXL list (BLOCKIDXLLL): the text encoders, each ResNet / transformer
# sub-block (IN41 = input_blocks.4.1, IN410 = its transformer block 0), TIME, LABEL, VAE.
BLOCKS_XL_EXT = (
    ["CLIPL", "CLIPG", "IN0", "IN00", "IN10", "IN20", "IN30", "IN40", "IN41", "IN410", "IN411", "IN50", "IN51",
     "IN510", "IN511", "IN60", "IN70", "IN71"] + [f"IN71{i}" for i in range(10)] + ["IN80", "IN81"]
    + [f"IN81{i}" for i in range(10)] + ["MID00", "MID10"] + [f"MID10{i}" for i in range(10)]
    + ["MID20", "OUT00", "OUT01"] + [f"OUT01{i}" for i in range(10)] + ["OUT10", "OUT11"]
    + [f"OUT11{i}" for i in range(10)] + ["OUT20", "OUT21"] + [f"OUT21{i}" for i in range(10)]
    + ["OUT22", "OUT30", "OUT31", "OUT310", "OUT311", "OUT40", "OUT41", "OUT410", "OUT411", "OUT50", "OUT51",
       "OUT510", "OUT511", "OUT52", "OUT60", "OUT70", "OUT80", "OUT9", "TIME", "LABEL", "VAE"])
_FINE_PART = re.compile(r"input|mid|output")
_TRANSFORMER = re.compile(r"transformer_blocks\.(\d+)\.")


def xl_fine_block(key: str) -> str | None:
    """SuperMerger's fine SDXL block name of a key (``blockfromkey`` for XL): CLIPL / CLIPG / VAE /
    TIME / LABEL, ``OUT9`` for the final layers, else IN/MID/OUT + the key's first digits (one for
    MID, plus 0) + the transformer block's index. None for keys that are neither weight nor bias."""
    if not ("weight" in key or "bias" in key):
        return None
    for part, name in (("label_emb", "LABEL"), ("time_embed", "TIME"), ("conditioner.embedders.0.", "CLIPL"),
                       ("conditioner.embedders.1.", "CLIPG"), ("first_stage_model", "VAE")):
        if part in key:
            return name
    if "model.diffusion_model" not in key:
        return None
    if "model.diffusion_model.out." in key:
        return "OUT9"
    found = _FINE_PART.findall(key)
    block = found[0].upper().replace("PUT", "") if found else ""
    digits = re.sub(r"\D", "", key)
    nums = digits[:1] + "0" if block == "MID" else digits[:2]
    if not nums:
        return "MID00"
    add = _TRANSFORMER.findall(key)
    return block + nums + (add[0] if add else "")


def xl_extended_index(key: str) -> int | None:
    """Which entry of a 110-value extended SDXL vector a key takes, as SuperMerger: keys of the
    BASE block take the first (CLIPL; the VAE too), CLIP-G the second, the rest their fine block's."""
    fine = xl_fine_block(key)
    if fine is None:
        return None
    if block_of(key, "sdxl") == "BASE" and fine != "CLIPG":
        return 0
    return BLOCKS_XL_EXT.index(fine) if fine in BLOCKS_XL_EXT else None


def block_ids(arch: str) -> list[str]:
    return BLOCKS_XL if arch == "sdxl" else BLOCKS_FLUX if arch == "flux" else BLOCKS_SD


def flux_block(key: str) -> str | None:
    """SuperMerger ``blockfromkey`` for Flux, in its order of tests: the VAE (None: not merged),
    T5, CLIP, ``double_blocks.N`` / ``single_blocks.N`` (N: the key's first ``.digits.``), any
    other key with ``_in`` (the embedders), ``final_layer``; anything else is not merged."""
    if "vae" in key:
        return None
    if "t5xxl" in key:
        return "T5"
    if "text_encoders.clip" in key:
        return "CLIP"
    m = _FLUX_INDEX.search(key)
    if "double_blocks" in key:
        return f"D{int(m.group(1)):02}"
    if "single_blocks" in key:
        return f"S{int(m.group(1)):02}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    return None


@functools.lru_cache(maxsize=1 << 16)     # every plan asks for every key: XYZ cells, search trials
def block_of(key: str, arch: str) -> str | None:
    """The MBW block a key belongs to, or None where SuperMerger never merges it (SDXL
    keys that are neither weight nor bias; the Flux VAE)."""
    if arch == "flux":
        return flux_block(key)
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
