"""Let the Dice Roll: random MBW ratios (SuperMerger ``randdealer`` / ``eratiodealer``).

A template has one entry per block (BASE first): a number (kept), ``R`` (uniform in [0, 1)),
``U`` (uniform in [-0.5, 1.5)), ``X`` (uniform between that block's lower and upper limit), or
``ER``/``EU``/``EX`` (every element of the block gets its own R/U/X ratio, written as Elemental
lines). Ratios are rounded to ``digits`` and clamped to the optional min/max. The same seed
always gives the same ratios; each roll of a plot uses seed + roll index.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .blocks import block_ids, block_of
from .errors import MergeError
from .presets import presets

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


def _template(text: str, arch: str) -> list[str]:
    text = text.strip()
    table = presets("sd1" if arch != "sdxl" else "sdxl")
    if "," not in text:
        if text not in table:
            raise MergeError(f"dice: {text!r} is neither a preset nor a comma template")
        text = table[text]
    parts = [p.strip() for p in text.split(",")]
    n = len(block_ids(arch))
    if arch == "sdxl" and len(parts) == 26:
        parts = [parts[0]] + parts[1:10] + parts[13:23]
    if len(parts) != n:
        raise MergeError(f"dice template needs {n} entries, got {len(parts)}")
    for p in parts:
        if p.lstrip("E") not in RANDOM_LETTERS:
            try:
                float(p)
            except ValueError:
                raise MergeError(f"dice template entry {p!r} is not a number, R, U, X, ER, EU or EX") from None
    return parts


def _limits(text: str, n: int, what: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise MergeError(f"dice {what} limit must be numbers") from None
    if len(vals) == 1:
        return vals * n
    if len(vals) != n:
        raise MergeError(f"dice {what} limits: 1 or {n} values, got {len(vals)}")
    return vals


def _draw(letter: str, r: float, lo: float, up: float) -> float:
    if letter == "R":
        return r
    if letter == "U":
        return -2 * r + 1.5
    return (lo - up) * r + up


def roll(settings: DiceSettings, arch: str, keys: list[str], seed: int) -> Roll:
    """One set of ratios. ``keys``: model A's keys (for per-element E modes)."""
    ids = block_ids(arch)
    rng = np.random.RandomState(seed % 2**32)
    draws = rng.rand(3000)
    lows, ups = _limits(settings.lower, len(ids), "lower"), _limits(settings.upper, len(ids), "upper")

    def fix(v: float) -> float:
        if settings.clamp_max is not None:
            v = min(v, settings.clamp_max)
        if settings.clamp_min is not None:
            v = max(v, settings.clamp_min)
        return round(float(v), settings.digits)

    def vector(template: str, offset: int) -> tuple[list[float], list[str]]:
        out, lines = [], []
        for i, entry in enumerate(_template(template, arch)):
            if entry in RANDOM_LETTERS:
                out.append(fix(_draw(entry, draws[i + offset], lows[i], ups[i])))
            elif entry.startswith("E"):
                out.append(0.0)
                letter = entry[1:]
                for num, key in enumerate(keys):
                    if block_of(key, arch) == ids[i] and ("weight" in key or "bias" in key):
                        v = fix(_draw(letter, draws[(num + 100) % len(draws)], lows[i], ups[i]))
                        lines.append(f"{ids[i]}:{key}:{v}")
            else:
                out.append(float(entry))
        return out, lines

    alpha, lines = vector(settings.template_alpha, 0)
    beta = vector(settings.template_beta, 50)[0] if settings.template_beta else None
    return Roll(seed, alpha, beta, "\n".join(lines))


def elist_csv(rows: list[tuple[str, float, float]]) -> str:
    """The "E-list": every merged key with the α and β it got, as CSV."""
    return "key,alpha,beta\n" + "".join(f"{k},{a:g},{b:g}\n" for k, a, b in rows)
