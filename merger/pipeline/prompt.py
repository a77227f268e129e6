"""Prompt syntax: A1111 attention weights and sd-scripts per-line options (pure text functions).

Attention (A1111): ``(text)`` ×1.1, ``[text]`` ÷1.1, ``(text:1.5)`` ×1.5, nesting multiplies,
``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets, and ``BREAK`` starts a new 75-token chunk.
Options (kohya sd-scripts sample prompts): ``prompt --n negative --w 512 --h 768 --d 42
--l 7.5 --s 28`` (negative prompt, width, height, seed, CFG scale, steps) and ``--ss sampler``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MergeError

BREAK = "BREAK"
_TOKEN = re.compile(r"""
    \\[()\[\]\\]          # escaped bracket or backslash
  | \(|\[                 # openers
  | :\s*([+-]?[\d.]+)\s*\)  # explicit weight closing a round bracket
  | \)|\]                 # closers
  | \bBREAK\b             # chunk break
  | [^\\()\[\]:B]+        # plain text (stops at anything special)
  | .                     # any other single character (a lone ':' or 'B')
""", re.X)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (fragment, weight) pairs; adjacent equal weights are joined.
    ``(BREAK, -1.0)`` marks a chunk break. Unbalanced brackets apply to the end of the text."""
    out: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            if item[0] != BREAK:
                item[1] *= factor

    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok.startswith("\\"):
            out.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(out))
        elif tok == "[":
            square_open.append(len(out))
        elif m.group(1) is not None and round_open:
            try:
                scale(round_open.pop(), float(m.group(1)))
            except ValueError:
                raise MergeError(f"bad attention weight {m.group(1)!r} in prompt") from None
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        elif tok == BREAK:
            out.append([BREAK, -1.0])
        elif m.group(1) is not None:
            out.append([tok, 1.0])   # ":1.2)" with no open bracket: literal text
        else:
            out.append([tok, 1.0])
    for start in reversed(round_open):
        scale(start, 1.1)
    for start in reversed(square_open):
        scale(start, 1 / 1.1)
    merged: list[tuple[str, float]] = []
    for frag, w in out:
        if merged and merged[-1][1] == w and frag != BREAK and merged[-1][0] != BREAK:
            merged[-1] = (merged[-1][0] + frag, w)
        elif frag:
            merged.append((frag, w))
    return merged or [("", 1.0)]


@dataclass
class PromptOptions:
    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg: float | None = None
    steps: int | None = None
    sampler: str | None = None


_OPTS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
         "l": ("cfg", float), "s": ("steps", int), "ss": ("sampler", str)}


def parse_prompt_options(line: str) -> PromptOptions:
    """``a cat --n blurry --w 768 --d 1`` -> prompt and the options given (others None)."""
    parts = re.split(r"\s--(?=[a-z]+\s)", " " + line.strip())
    opts = PromptOptions(parts[0].strip())
    for part in parts[1:]:
        name, _, value = part.partition(" ")
        if name not in _OPTS:
            raise MergeError(f"unknown prompt option --{name} (known: {', '.join('--' + k for k in _OPTS)})")
        field, kind = _OPTS[name]
        try:
            setattr(opts, field, kind(value.strip()))
        except ValueError:
            raise MergeError(f"prompt option --{name} needs a {kind.__name__}, got {value.strip()!r}") from None
    return opts


_LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]+)(?::([^>]+))?>")


def extract_lora_tags(text: str) -> tuple[str, list[str]]:
    """``<lora:name:weight>`` / ``<lora:name:weight:blocks>`` (A1111 / LoRA Block Weight syntax,
    ``lbw=`` accepted) -> (prompt without the tags, ["name:weight[:blocks]", ...])."""
    specs = []
    for m in _LORA_TAG.finditer(text):
        name, weight, blocks = m.group(1).strip(), m.group(2).strip(), (m.group(3) or "").strip()
        try:
            float(weight)
        except ValueError:
            raise MergeError(f"<lora:{name}:{weight}>: the weight must be a number") from None
        blocks = blocks[4:] if blocks.startswith("lbw=") else blocks
        specs.append(f"{name}:{weight}" + (f":{blocks}" if blocks else ""))
    return re.sub(r"\s*,?\s*" + _LORA_TAG.pattern, "", text).strip(" ,"), specs
