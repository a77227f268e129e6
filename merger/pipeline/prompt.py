r"""Prompt syntax: A1111 attention weights and sd-scripts per-line options (pure text functions).

Attention (A1111): ``(text)`` ×1.1, ``[text]`` ÷1.1, ``(text:1.5)`` ×1.5, nesting multiplies,
``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets, and ``BREAK`` starts a new 75-token chunk.
Options (kohya sd-scripts sample prompts): ``prompt --n negative --w 512 --h 768 --d 42
--l 7.5 --s 28`` (negative prompt, width, height, seed, CFG scale, steps) and ``--ss sampler``.
Variants (sd-scripts' dynamic prompts): ``{a|b|c}`` one at random, ``{2$$a|b|c}`` two joined by
", ", ``{1-2$$ and $$a|b|c}`` one or two joined by " and ", ``{e$$a|b|c}`` every choice (the
prompt is repeated per combination); ``\{`` ``\}`` are literal braces.
"""
from __future__ import annotations

import itertools
import random
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


# ----------------------------------------------------------------------------- variants
# sd-scripts' dynamic prompts: {a|b|c}, {2$$a|b|c}, {1-2$$ and $$a|b|c}, {e$$a|b|c} (E too)
_VARIANT = re.compile(r"\{((e|E)\$\$)?(([\d\-]+)\$\$)?(([^\|\}]+?)\$\$)?(.+?((\|).+?)*?)\}")


@dataclass
class _Group:
    text: str               # the whole "{...}"
    enumerate: bool
    low: int
    high: int
    separator: str
    choices: list[str]


_ESCAPES = (("\\{", "\x01"), ("\\}", "\x02"))


def _protect(prompt: str) -> str:
    for esc, mark in _ESCAPES:
        prompt = prompt.replace(esc, mark)
    return prompt


def _unprotect(prompt: str, literal: bool) -> str:
    for esc, mark in _ESCAPES:
        prompt = prompt.replace(mark, esc[1] if literal else esc)
    return prompt


def _groups(prompt: str) -> list[_Group]:
    """The variant groups of a (protected) prompt, checked: balanced braces, counts within the
    choices. Positions in messages count from 1."""
    depth = 0
    for i, ch in enumerate(prompt):
        if ch == "{":
            depth += 1
            if depth > 1:
                raise MergeError(f"prompt: nested '{{' at position {i + 1} (variants cannot be nested)")
        elif ch == "}":
            if depth == 0:
                raise MergeError(f"prompt: '}}' at position {i + 1} has no opening '{{'")
            depth -= 1
    if depth:
        raise MergeError(f"prompt: '{{' at position {prompt.rfind('{') + 1} is never closed")
    groups = []
    for m in _VARIANT.finditer(prompt):
        choices = m.group(7).split("|")
        low = high = 1
        if m.group(4) is not None:
            parts = m.group(4).split("-")
            try:
                low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
            except ValueError:
                low, high = 0, -1
            if len(parts) > 2 or low > high or low < 0:
                raise MergeError(f"prompt: bad count {m.group(4)!r} at position {m.start() + 1} (n or a-b)")
        if high > len(choices):
            raise MergeError(f"prompt: {m.group(0)!r} at position {m.start() + 1} asks for {high} of "
                             f"{len(choices)} choices")
        groups.append(_Group(m.group(0), m.group(2) is not None, low, high,
                             ", " if m.group(6) is None else m.group(6), choices))
    return groups


def check_variants(prompt: str) -> None:
    _groups(_protect(prompt))


def enumerate_variants(prompt: str) -> list[str]:
    """The prompts of every ``{e$$...}`` combination (several e-groups give their product: 5 × 3 =
    15 prompts); random groups are left for :func:`choose_variants`. sd-scripts' order."""
    prompt = _protect(prompt)
    prompts = [prompt]
    for g in _groups(prompt):
        if g.enumerate:
            values = [g.separator.join(c) for n in range(g.low, g.high + 1)
                      for c in itertools.combinations(g.choices, n)]
            prompts = [p.replace(g.text, v, 1) for p in prompts for v in values]
    return [_unprotect(p, literal=False) for p in prompts]


def choose_variants(prompt: str, seed: int) -> str:
    """Random groups filled as sd-scripts does (a count in the range, then that many distinct
    choices joined by the separator), drawn from ``seed`` so a prompt and a seed always give the
    same text."""
    rng = random.Random(seed)
    prompt = _protect(prompt)
    for g in _groups(prompt):
        if not g.enumerate:
            n = rng.randint(g.low, g.high)
            prompt = prompt.replace(g.text, g.separator.join(rng.sample(g.choices, n)), 1)
    return _unprotect(prompt, literal=True)
