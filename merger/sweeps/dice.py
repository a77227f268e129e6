"""Let the Dice Roll: random MBW ratios (SuperMerger ``randdealer`` / ``eratiodealer``).

A template has one entry per block (BASE first): a number (kept), ``R`` (uniform in [0, 1)),
``U`` (−2r + 1.5, in (−0.5, 1.5]), ``X`` (``(lower − upper)·r + upper``: between that block's
limits), ``D`` (``upper + lower·(r − 0.5)``: around the upper limit, spread by the lower), or
``ER``/``EU``/``EX`` (every element of the block gets its own ratio, written as Elemental lines:
``r``, ``−2r + 1`` and the X formula, rounded but never clamped, as ``eratiodealer``). A lower limit
written ``aRp`` (e.g. ``0.2R0.3``) makes an X or D block random only with probability p: otherwise
X gives 0 and D gives the upper limit. Block ratios are rounded to ``digits`` and clamped to the
optional min/max.

Draws follow SuperMerger: ``np.random.seed(seed); rand(3000)``, alpha entry i uses draw i, beta
draw 50 + i, the element with key index n draw 100 + n. On SDXL a 26-entry template is drawn at
its SD positions and then reduced to SDXL's 20 blocks as SuperMerger does, so a seed gives
SuperMerger's rolls; limits may have 1, 20 or 26 values. The same seed always gives the same
ratios (the ``aRp`` coin flips too: SuperMerger draws them from an unseeded generator); each
roll of a plot uses seed + roll index.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ..blocks import BLOCKS_SD, BLOCKS_XL, block_ids, block_of, sd_vector_to_xl
from ..errors import MergeError
from ..presets import presets

RANDOM_LETTERS = ("R", "U", "X")


@dataclass
class DiceSettings:
    template_alpha: str = "ALL_R"     # preset name or comma template
    template_beta: str = ""           # "" = do not randomise beta
    lower: str = "0"                  # X limits: one value or one per block
    upper: str = "1"
    clamp_min: float | None = None
    clamp_max: float | None = None
    digits: int = 3
    seed: int = -1


@dataclass
class Roll:
    seed: int
    mbw_alpha: list[float]
    mbw_beta: list[float] | None
    elemental: str


def new_seed() -> int:
    return random.randrange(2**31)


LETTERS = ("R", "U", "X", "D")
OFFSETS = {"alpha": 0, "beta": 50, "elements": 100}      # SuperMerger's RANDMAP (Flux: 0, 61, 122)


def _template(text: str, arch: str) -> list[str]:
    """The entries of a template (preset name or comma list): one per block, or 26 on SDXL."""
    text = text.strip()
    table = presets(arch if arch in ("sdxl", "flux") else "sd1")
    if "," not in text:
        if text not in table:
            raise MergeError(f"dice: {text!r} is neither a preset nor a comma template")
        text = table[text]
    parts = [p.strip() for p in text.split(",")]
    n = len(block_ids(arch))
    if len(parts) != n and not (arch == "sdxl" and len(parts) == len(BLOCKS_SD)):
        raise MergeError(f"dice template needs {n} entries" + (" (or 26)" if arch == "sdxl" else "")
                         + f", got {len(parts)}")
    for p in parts:
        if p not in LETTERS and not (p.startswith("E") and p[1:] in RANDOM_LETTERS):
            try:
                float(p)
            except ValueError:
                raise MergeError(f"dice template entry {p!r} is not a number, R, U, X, D, ER, EU or EX") from None
    return parts


def _limits(text: str, n: int, arch: str, what: str) -> list[str]:
    """One limit per template position, as text (a lower limit may be ``aRp``)."""
    vals = [v.strip() for v in str(text).split(",")]
    for v in vals:
        parts = v.split("R") if what == "lower" and v.count("R") == 1 else [v]   # "aRp": a value, a probability
        try:
            for part in parts:
                float(part)
        except ValueError:
            raise MergeError(f"dice {what} limit {v!r} is not a number" + (" or aRp" if what == "lower" else "")) from None
    if len(vals) == 1:
        return vals * n
    if len(vals) == n:
        return vals
    if arch == "sdxl" and n == len(BLOCKS_XL) and len(vals) == len(BLOCKS_SD):
        return sd_vector_to_xl(vals)
    raise MergeError(f"dice {what} limits: 1 or {n} values, got {len(vals)}")


def _draw(letter: str, r: float, lo: str, up: str, coin: random.Random, element: bool = False) -> float:
    """One ratio from draw ``r`` (SuperMerger's formulas; ``element``: eratiodealer's)."""
    if letter == "R":
        return r
    if letter == "U":
        return -2 * r + (1.0 if element else 1.5)
    low, upper = lo, float(up)
    if "R" in lo:                          # random only with probability p
        low, p = lo.split("R")
        if coin.random() > float(p):
            return 0.0 if letter == "X" else upper
    low = float(low)
    return (low - upper) * r + upper if letter == "X" else upper + low * (r - 0.5)


def roll(settings: DiceSettings, arch: str, keys: list[str], seed: int) -> Roll:
    """One set of ratios. ``keys``: model A's keys (for per-element E modes)."""
    rng = np.random.RandomState(seed % 2**32)
    draws = rng.rand(3000)
    coin = random.Random(seed)

    def fix(v: float) -> float:
        if settings.clamp_max is not None:
            v = min(v, settings.clamp_max)
        if settings.clamp_min is not None:
            v = max(v, settings.clamp_min)
        return round(float(v), settings.digits)

    def vector(template: str, offset: int) -> tuple[list[float], list[str]]:
        parts = _template(template, arch)
        ids = BLOCKS_SD if len(parts) == len(BLOCKS_SD) else block_ids(arch)     # the template's positions
        if len(parts) > OFFSETS["beta"]:      # Flux's 61 entries: α, β and element draws must not overlap
            offset = {OFFSETS["alpha"]: 0, OFFSETS["beta"]: len(parts)}.get(offset, offset)
        lows = _limits(settings.lower, len(parts), arch, "lower")
        ups = _limits(settings.upper, len(parts), arch, "upper")
        out, lines = [], []
        for i, entry in enumerate(parts):
            if entry in LETTERS:
                out.append(fix(_draw(entry, draws[i + offset], lows[i], ups[i], coin)))
            elif entry.startswith("E"):
                out.append(0.0)
                for num, key in enumerate(keys):
                    if block_of(key, arch) == ids[i] and ("weight" in key or "bias" in key):
                        r = draws[(num + max(OFFSETS["elements"], 2 * len(parts))) % len(draws)]
                        v = round(_draw(entry[1:], r, lows[i], ups[i], coin, element=True), settings.digits)
                        lines.append(f"{ids[i]}:{key}:{v:g}")
            else:
                out.append(float(entry))
        if len(out) != len(block_ids(arch)):
            out = sd_vector_to_xl(out)                       # SuperMerger's weighttoxl, after drawing
        return out, lines

    alpha, lines = vector(settings.template_alpha, OFFSETS["alpha"])
    beta = vector(settings.template_beta, OFFSETS["beta"])[0] if settings.template_beta else None
    return Roll(seed, alpha, beta, "\n".join(lines))


def elist_csv(rows: list[tuple[str, float, float]]) -> str:
    """The "E-list": every merged key with the α and β it got, as CSV."""
    return "key,alpha,beta\n" + "".join(f"{k},{a:g},{b:g}\n" for k, a, b in rows)
