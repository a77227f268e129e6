"""XYZ plots: axis parsing (SuperMerger syntax), the cells of a plot, labelled grid images.

Every value is parsed and every cell's recipe is checked before any work starts, so a bad value
is reported (with its axis) at once instead of after half a plot.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from ..blocks import block_ids, expand_blocks
from ..engine.calcmodes import get_calcmode
from ..engine.methods import get_method
from ..errors import MergeError
from ..presets import is_number, parse_vector
from ..recipe import MODES_WITH_BETA, Recipe

AXIS_TYPES = ["none", "alpha", "beta", "alpha and beta", "mbw", "seed", "model_A", "model_B", "model_C",
              "pinpoint blocks", "calcmode", "prompt", "random", "elemental", "adjust", "lora",
              "method", "density", "drop"]


@dataclass
class Axis:
    type: str = "none"
    values: list = field(default_factory=lambda: [None])
    labels: list[str] = field(default_factory=lambda: [""])

    def __len__(self) -> int:
        return len(self.values)


def _floats(text: str, name: str) -> list[float]:
    out = []
    for v in (x.strip() for x in text.split(",")):
        try:
            out.append(float(v))
        except ValueError:
            raise MergeError(f"{name} axis: {v!r} is not a number") from None
    return out


def parse_axis(kind: str, text: str, name: str, arch: str, mode: str, models: list[str] = ()) -> Axis:
    """Parse one axis' text. ``name`` ("X", "Y", "Z") is used in error messages."""
    text = (text or "").strip()
    if kind == "none" or not kind:
        return Axis()
    if kind not in AXIS_TYPES:
        raise MergeError(f"{name} axis: unknown type {kind!r}")
    if not text:
        raise MergeError(f"{name} axis ({kind}) has no values")
    if kind in ("alpha", "beta"):
        vals = _floats(text, name)
        return Axis(kind, vals, [f"{kind} {v:g}" for v in vals])
    if kind in ("density", "drop"):
        vals = _floats(text, name)
        bad = [v for v in vals if not 0 <= v <= 1]
        if bad:
            raise MergeError(f"{name} axis: {kind} must be between 0 and 1, got {bad[0]:g}")
        return Axis(kind, vals, [f"{kind} {v:g}" for v in vals])
    if kind == "method":
        vals = [x.strip() for x in text.split(",") if x.strip()]
        for v in vals:
            get_method(v)
        return Axis(kind, vals, vals)
    if kind == "alpha and beta":
        vals = []
        for item in (x.strip() for x in text.split(",")):
            ab = _floats(item.replace(" ", ",") if " " in item else item, name)
            if len(ab) not in (1, 2):
                raise MergeError(f"{name} axis: {item!r} must be 'alpha beta'")
            vals.append((ab[0], ab[-1]))
        return Axis(kind, vals, [f"α {a:g} β {b:g}" for a, b in vals])
    if kind == "mbw":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        pairs = mode in MODES_WITH_BETA
        if pairs and len(lines) % 2:
            raise MergeError(f"{name} axis: {mode} needs MBW lines in alpha/beta pairs, got {len(lines)} lines")
        step = 2 if pairs else 1
        vals, labels = [], []
        for i in range(0, len(lines), step):
            a = parse_vector(lines[i], arch, f"{name} axis MBW")
            b = parse_vector(lines[i + 1], arch, f"{name} axis MBW") if pairs else None
            vals.append((a, b))
            labels.append(lines[i] if "," not in lines[i] else f"MBW {i // step + 1}")
        return Axis(kind, vals, labels)
    if kind == "seed":
        seeds = [int(v) for v in _floats(text, name)]
        return Axis(kind, seeds, [f"seed {s}" for s in seeds])
    if kind.startswith("model_"):
        names = [x.strip() for x in text.split(",") if x.strip()]
        for n in names:
            if models and n not in models:
                raise MergeError(f"{name} axis: model {n!r} not found")
        return Axis(kind, names, [f"{kind[-1]}: {n}" for n in names])
    if kind == "pinpoint blocks":
        vals = []
        for item in (x.strip() for x in text.split(",") if x.strip()):
            negated, blocks = expand_blocks(item, arch)
            if negated:
                blocks = [b for b in block_ids(arch) if b not in blocks]
            vals.append(blocks)
        return Axis(kind, vals, [x.strip() for x in text.split(",") if x.strip()])
    if kind == "calcmode":
        vals = [x.strip() for x in text.split(",") if x.strip()]
        for v in vals:
            cm = get_calcmode(v)
            if mode not in cm.modes:
                raise MergeError(f"{name} axis: calcmode {v!r} does not work with {mode}")
        return Axis(kind, vals, vals)
    if kind == "prompt":     # labels: the prompt without its --w/--h/--s... options (those are in the PNG info)
        from ..pipeline.prompt import parse_prompt_options
        vals = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return Axis(kind, vals, [parse_prompt_options(v).prompt.strip()[:200] for v in vals])
    if kind == "random":
        try:
            n = int(text)
        except ValueError:
            raise MergeError(f"{name} axis: random needs the number of rolls, got {text!r}") from None
        if not 1 <= n <= 1000:
            raise MergeError(f"{name} axis: number of rolls must be 1 to 1000")
        return Axis(kind, list(range(n)), [f"roll {i + 1}" for i in range(n)])
    if kind == "lora":   # one LoRA list per line: "name:weight[:blocks], ..." ("" = none)
        vals = [ln.strip() for ln in text.splitlines()]
        for v in vals:
            for item in (x.strip() for x in v.split(",") if x.strip()):
                if ":" in item and not is_number(item.split(":")[1]):
                    raise MergeError(f"{name} axis: LoRA weight in {item!r} is not a number")
        return Axis(kind, vals, [v or "no LoRA" for v in vals])
    if kind == "elemental":
        vals = [blk.strip() for blk in re.split(r"\n\s*\n", text) if blk.strip()]
        return Axis(kind, vals, [v.replace("\n", " ")[:60] for v in vals])
    # adjust: one 8-value vector per line
    vals, labels = [], []
    for ln in (x.strip() for x in text.splitlines() if x.strip()):
        v = _floats(ln, name)
        if len(v) != 8:
            raise MergeError(f"{name} axis: adjust {ln!r} needs 8 values")
        vals.append(v)
        labels.append(f"adjust {ln}")
    return Axis(kind, vals, labels)


@dataclass
class Cell:
    x: int
    y: int
    z: int
    recipe: Recipe
    gen: object           # GenParams
    roll: int | None = None


# axis types that set one field of the recipe or of the generation settings
RECIPE_FIELDS = {"alpha": "alpha", "beta": "beta", "calcmode": "calcmode", "elemental": "elemental",
                 "adjust": "adjust", "lora": "loras", "method": "method", "density": "density", "drop": "drop"}
GEN_FIELDS = {"seed": "seed", "prompt": "prompt"}


def apply_value(kind: str, value, recipe: Recipe, gen, pin_value=None):
    """A copy of (recipe, gen) with one axis value applied."""
    r, g = replace(recipe), replace(gen)
    if kind in RECIPE_FIELDS:
        setattr(r, RECIPE_FIELDS[kind], value)
    elif kind in GEN_FIELDS:
        setattr(g, GEN_FIELDS[kind], value)
    elif kind == "alpha and beta":
        r.alpha, r.beta = value
    elif kind == "mbw":
        r.mbw_alpha, r.mbw_beta = value[0], value[1] if value[1] is not None else r.mbw_beta
    elif kind.startswith("model_"):
        setattr(r, f"model_{kind[-1].lower()}", value)
        setattr(r, f"hash_{kind[-1].lower()}", "")
    if kind == "method":
        r.__post_init__()      # the new method's defaults where the recipe has none
    return r, g


def pin(recipe: Recipe, blocks: list[str], which: str, value: float, arch: str) -> Recipe:
    """Pinpoint: the MBW vector (or the flat ratio) with only ``blocks`` set to ``value``."""
    ids = block_ids(arch)
    r = replace(recipe)
    base = getattr(r, f"mbw_{which}") or [getattr(r, which)] * len(ids)
    if len(base) != len(ids):
        raise MergeError(f"pinpoint blocks works on {len(ids)}-block MBW vectors; the {which} vector has "
                         f"{len(base)} (extended)")
    setattr(r, f"mbw_{which}", [value if b in blocks else v for b, v in zip(ids, base)])
    return r


def plan_cells(recipe: Recipe, gen, x: Axis, y: Axis, z: Axis, arch: str) -> list[Cell]:
    """All cells, Z-major then Y then X; pinpoint takes its value from the opposite axis."""
    axes = {"X": x, "Y": y, "Z": z}
    pins = [n for n, a in axes.items() if a.type == "pinpoint blocks"]
    for n in pins:
        partners = [m for m, a in axes.items() if m != n and a.type in ("alpha", "beta")]
        if not partners:
            raise MergeError(f"{n} axis: pinpoint blocks needs an alpha or beta axis opposite it")
    if any(a.type == "method" for a in axes.values()):
        if not recipe.models:
            raise MergeError("a method axis needs the method's models: choose a method and its models first")
        if recipe.seed == -1:   # every cell of a random method uses one seed, so cells compare
            import secrets
            recipe = replace(recipe, seed=secrets.randbelow(2**31))
    seeds = {}
    for n, a in axes.items():   # seed -1: one fixed random seed per value along the opposite axis
        if a.type == "seed" and -1 in a.values:
            import random
            a.values = [random.randrange(2**32) if s == -1 else s for s in a.values]
            a.labels = [f"seed {s}" for s in a.values]
            seeds[n] = a.values
    cells = []
    for zi, zv in enumerate(z.values):
        for yi, yv in enumerate(y.values):
            for xi, xv in enumerate(x.values):
                r, g, roll = recipe, gen, None
                vals = {"X": xv, "Y": yv, "Z": zv}
                for n, a in axes.items():
                    if a.type in ("none", "pinpoint blocks"):
                        continue
                    if a.type == "random":
                        roll = vals[n]
                        continue
                    if a.type in ("alpha", "beta") and pins:
                        blocks = axes[pins[0]].values[{"X": xi, "Y": yi, "Z": zi}[pins[0]]]
                        r = pin(r, blocks, a.type, vals[n], arch)
                        continue
                    r, g = apply_value(a.type, vals[n], r, g)
                cells.append(Cell(xi, yi, zi, r, g, roll))
    return cells


def grid_image(images: list, x: Axis, y: Axis, title: str = "", max_row: int = 10, max_lines: int = 6):
    """Cells (PIL images, None for not done) in a grid with X labels on top and Y labels left.
    Labels wrap to the cell width (X) or to a left margin of up to twice the cell width (Y), at
    most ``max_lines`` lines, in a font sized for the cell. A single axis with more than
    ``max_row`` cells wraps into rows."""
    from PIL import Image, ImageDraw, ImageFont
    cols, rows = len(x), len(y)
    xlabels, ylabels = list(x.labels), list(y.labels)
    if rows == 1 and cols > max_row:
        cols = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / cols)
        xlabels, ylabels = [""] * cols, [""] * rows
    first = next((im for im in images if im is not None), None)
    w, h = (first.size if first else (64, 64))
    size = max(11, min(24, w // 12))
    font = ImageFont.load_default(size=size)
    line_h = size + 4
    xl = [wrap_label(s, font, w - 8, max_lines) for s in xlabels[:cols]]
    left_w = min(2 * w, max((int(font.getlength(s)) for s in ylabels), default=0))
    yl = [wrap_label(s, font, left_w, max_lines) for s in ylabels[:rows]]
    title_h = line_h + 6 if title else 0
    pad_top = title_h + 8 + line_h * max((len(t) for t in xl), default=0)
    pad_left = 12 + max((int(font.getlength(s)) for t in yl for s in t), default=0)
    canvas = Image.new("RGB", (pad_left + cols * w, pad_top + rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill="black", font=font)
    for i, lines in enumerate(xl):
        for k, s in enumerate(lines):
            draw.text((pad_left + i * w + 4, title_h + 4 + k * line_h), s, fill="black", font=font)
    for j, lines in enumerate(yl):
        top = pad_top + j * h + max(0, (h - len(lines) * line_h) // 2)
        for k, s in enumerate(lines):
            draw.text((4, top + k * line_h), s, fill="black", font=font)
    for k, im in enumerate(images):
        if im is not None:
            canvas.paste(im.convert("RGB"), (pad_left + (k % cols) * w, pad_top + (k // cols) * h))
    return canvas


def wrap_label(text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` broken at newlines and spaces (or anywhere, for long words) into lines of at most
    ``width`` pixels; the last kept line ends with "…" when something is left out."""
    lines: list[str] = []
    for para in text.split("\n"):
        start = len(lines)
        for word in para.split():
            cur = f"{lines[-1]} {word}" if len(lines) > start else word
            if len(lines) > start and font.getlength(cur) <= width:
                lines[-1] = cur
                continue
            _add_word(lines, word, font, width)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + "…", font, width)
    return lines


def _add_word(lines: list[str], word: str, font, width: int) -> None:
    """``word`` on new lines, cut where it is wider than ``width``."""
    while font.getlength(word) > width and len(word) > 1:
        cut = len(word)
        while cut > 1 and font.getlength(word[:cut]) > width:
            cut -= 1
        lines.append(word[:cut])
        word = word[cut:]
    lines.append(word)


def _fit(text: str, font, width: int) -> str:
    while text and font.getlength(text) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def effective(recipe: Recipe, gen) -> tuple:
    """What of a cell can change its image: the recipe fields its merge reads (alpha is ignored
    under an MBW alpha vector, beta where neither the mode nor the calcmode uses it, model C
    outside the three-model modes, gamma outside extract) and the generation settings."""
    from dataclasses import asdict
    cm = get_calcmode(recipe.calcmode)
    uses_beta = recipe.uses_beta()
    if recipe.method:
        m = get_method(recipe.method)
        reads = [f for f in m.reads if not (f == m.second and recipe.mbw_beta is not None)]
        return ("method", m.name, recipe.model_a, tuple(recipe.models), tuple(recipe.weights or ()),
                None if recipe.mbw_alpha is not None else recipe.alpha, tuple(recipe.mbw_alpha or ()),
                tuple(recipe.mbw_beta or ()) if uses_beta else (), tuple(getattr(recipe, f) for f in reads),
                recipe.seed if m.random else None, recipe.elemental, recipe.inex, tuple(recipe.inex_blocks),
                tuple(recipe.inex_elements), tuple(recipe.adjust or ()), recipe.loras,
                tuple(sorted(asdict(gen).items())))
    return (recipe.mode, cm.name, recipe.model_a, recipe.model_b if cm.needs_b else "",
            recipe.model_c if recipe.uses_c() else "",
            None if recipe.mbw_alpha is not None else recipe.alpha,
            None if not uses_beta or recipe.mbw_beta is not None else recipe.beta,
            tuple(recipe.mbw_alpha or ()), tuple(recipe.mbw_beta or ()) if uses_beta else (),
            recipe.gamma if cm.name == "extract" else None, recipe.elemental, recipe.inex,
            tuple(recipe.inex_blocks), tuple(recipe.inex_elements), tuple(recipe.adjust or ()), recipe.loras,
            recipe.seed, tuple(sorted(asdict(gen).items())))


def _why_no_effect(kind: str, recipe: Recipe) -> str:
    cm = get_calcmode(recipe.calcmode)
    if kind in ("density", "drop"):
        if not recipe.method:
            return f"{kind} belongs to the merge methods, and no method is chosen"
        m = get_method(recipe.method)
        if kind not in m.reads:
            return f"method {m.name} does not use {kind}"
        return f"an MBW beta vector is set, and it replaces {kind} in every block"
    if kind in ("alpha", "alpha and beta") and recipe.mbw_alpha is not None:
        return "an MBW alpha vector is set, and it replaces alpha in every block"
    if kind == "beta" and not recipe.uses_beta():
        return f"{recipe.mode} with calcmode {cm.name} does not use beta"
    if kind == "beta" and recipe.mbw_beta is not None:
        return "an MBW beta vector is set, and it replaces beta in every block"
    if kind == "model_C" and not recipe.uses_c():
        return f"{recipe.mode} does not use model C"
    if kind == "model_B" and not cm.needs_b:
        return f"calcmode {cm.name} does not use model B"
    return "every value gives the same merge and image"


def check_axes_matter(cells: list[Cell], axes: dict[str, Axis]) -> None:
    """Refuse a plot in which an axis cannot change anything (its cells would be identical)."""
    for n, ax in axes.items():
        if ax.type in ("none", "pinpoint blocks") or len(ax) < 2:
            continue
        groups: dict[tuple, set] = {}
        for c in cells:
            rest = tuple(v for m, v in (("X", c.x), ("Y", c.y), ("Z", c.z)) if m != n)
            groups.setdefault(rest, set()).add(effective(c.recipe, c.gen))
        if all(len(g) == 1 for g in groups.values()):
            raise MergeError(f"{n} axis ({ax.type}) cannot change the result: {_why_no_effect(ax.type, cells[0].recipe)}; "
                             f"its {len(ax)} cells would be identical")
