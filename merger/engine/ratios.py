"""Per-key merge ratios: MBW vectors, Elemental lines and Include/Exclude (SuperMerger rules)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .adjust import ADJUST_KEYS
from ..blocks import BLOCKS_XL_EXT, block_ids, block_of, expand_blocks, xl_extended_index, xl_fine_block
from ..errors import MergeError
from ..presets import parse_vector
from ..recipe import Recipe

INEX_SPECIAL = ("VAE", "Adjust")


@dataclass(frozen=True)
class ElementalRule:
    """``blocks:elements:ratio``; either part may start with NOT (SuperMerger ``elementals``)."""
    not_blocks: bool
    blocks: tuple[str, ...]
    not_elements: bool
    elements: tuple[str, ...]
    ratio: float

    def matches(self, block: str, key: str) -> bool:
        flag = self.not_blocks
        if block in self.blocks:
            flag = not self.not_blocks
        if not (flag or not self.blocks and not self.not_blocks):
            return False
        flag = self.not_elements
        for e in self.elements if (self.elements or self.not_elements) else ("",):
            if e in key:
                flag = not self.not_elements
        return flag


def parse_elemental(text: str, arch: str) -> list[ElementalRule]:
    """Lines (newline- or comma-separated) of ``blocks:elements:ratio``; later lines win."""
    rules = []
    for raw in re.split(r"[,\n]", text or ""):
        line = raw.strip()
        if not line:
            continue
        if line.count(":") != 2:
            raise MergeError(f"elemental line {line!r} must be blocks:elements:ratio")
        blocks, elements, ratio = (p.strip() for p in line.split(":"))
        not_b, block_list = expand_blocks(blocks, arch)
        words = elements.split()
        not_e = bool(words) and words[0] == "NOT"
        try:
            value = float(ratio)
        except ValueError:
            raise MergeError(f"elemental line {line!r}: ratio {ratio!r} is not a number") from None
        rules.append(ElementalRule(not_b, tuple(block_list), not_e,
                                   tuple(words[1:] if not_e else words), value))
    return rules


def split_inex(text: str, arch: str) -> tuple[list[str], list[str]]:
    """"IN01 OUT03-OUT05, attn2, VAE" -> (blocks incl. VAE/Adjust, element substrings). On SDXL,
    SuperMerger's fine names (CLIPL, CLIPG, TIME, LABEL, IN41, IN410, MID103, OUT9...) are blocks."""
    ids = block_ids(arch)
    blocks: list[str] = []
    elements: list[str] = []
    for tok in re.split(r"[,\s]+", text.strip()):
        if not tok:
            continue
        ends = tok.split("-")
        if tok in INEX_SPECIAL or (arch == "sdxl" and tok in BLOCKS_XL_EXT and tok not in ids):
            blocks.append(tok)
        elif all(e in ids for e in ends) and len(ends) <= 2:
            blocks.extend(expand_blocks(tok, arch)[1])
        else:
            elements.append(tok)
    return blocks, elements


class RatioPlan:
    """Resolves (alpha, beta) for each key of a merge, or None to keep model A's tensor."""

    def __init__(self, recipe: Recipe, arch: str):
        self.recipe, self.arch = recipe, arch
        self.ids = block_ids(arch)
        self.alphas = self._vector(recipe.mbw_alpha, "MBW alpha")
        self.betas = self._vector(recipe.mbw_beta, "MBW beta") if recipe.uses_beta() else None
        self.rules = parse_elemental(recipe.elemental, arch)
        for b in recipe.inex_blocks:
            if b not in self.ids and b not in INEX_SPECIAL and not (arch == "sdxl" and b in BLOCKS_XL_EXT):
                raise MergeError(f"include/exclude: unknown block {b!r}")

    def _vector(self, values, what):
        if values is None:
            return None
        return parse_vector(",".join(repr(float(v)) for v in values), self.arch, what)

    def excluded(self, block: str, key: str) -> bool:
        """SuperMerger ``excluder``: True when the key keeps model A."""
        r = self.recipe
        elems = [e for e in r.inex_elements if e]
        if r.inex == "off" or not (r.inex_blocks or elems):
            return False
        include = r.inex == "include"
        fine = xl_fine_block(key) if self.arch == "sdxl" else None
        hit = (block in r.inex_blocks or block in elems or (fine is not None and fine in r.inex_blocks)
               or ("Adjust" in r.inex_blocks and key in ADJUST_KEYS)
               or any(e in key for e in elems)
               or ("VAE" in r.inex_blocks and "first_stage_model" in key))
        return (not include) if hit else include

    def _pick(self, vector: list[float], i: int, key: str) -> float:
        """Block ``i``'s value, or for a 110-value extended SDXL vector the key's fine block's."""
        if len(vector) == len(self.ids):
            return vector[i]
        j = xl_extended_index(key)
        return vector[j] if j is not None else vector[0]

    def block(self, key: str) -> str | None:
        return block_of(key, self.arch)

    def ratios(self, key: str) -> tuple[float, float] | None:
        block = block_of(key, self.arch)
        if block is None or self.excluded(block, key):
            return None
        i = self.ids.index(block)
        alpha = self._pick(self.alphas, i, key) if self.alphas else self.recipe.alpha
        beta = self._pick(self.betas, i, key) if self.betas else self.recipe.second_value()
        for rule in self.rules:
            if rule.matches(block, key):
                alpha = rule.ratio
        return alpha, beta


def inex_selection(recipe: Recipe, keys, arch: str) -> tuple[list[str], list[str]]:
    """SuperMerger's include/exclude "print": of the merge-block keys among ``keys``, those the
    include/exclude setting merges and those it keeps as model A's."""
    plan = RatioPlan(recipe, arch)
    merged, kept = [], []
    for key in keys:
        block = block_of(key, arch)
        if block is not None:
            (kept if plan.excluded(block, key) else merged).append(key)
    return merged, kept
