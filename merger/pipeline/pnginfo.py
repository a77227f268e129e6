"""PNG text chunks: A1111's ``parameters`` plus this app's merge recipe and history ID, so a
picture is enough to find (and reload) the merge that made it."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import MergeError


def png_info(infotext: str, recipe_line: str = "", history_id: int | str = "", extra: dict | None = None):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", infotext)
    for k, v in (extra or {}).items():
        info.add_text(k, v)
    if recipe_line:
        info.add_text("sdmw_recipe", recipe_line)
    if history_id != "":
        info.add_text("sdmw_merge_id", str(history_id))
    return info


def save_png(image, path: str | os.PathLike, infotext: str, recipe_line: str = "",
             history_id: int | str = "", extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=png_info(infotext, recipe_line, history_id, extra))
    return path


def draw_merge_id(image, merge_id: int | str):
    """A copy of ``image`` with "ID n" in its top-left corner, white on a dark box (SuperMerger's
    "save merged model ID to: image")."""
    from PIL import ImageDraw, ImageFont
    out = image.convert("RGB").copy()
    size = max(10, min(out.width, out.height) // 16)
    font = ImageFont.load_default(size=size)
    text = f"ID {merge_id}"
    draw = ImageDraw.Draw(out)
    w = int(font.getlength(text))
    draw.rectangle((0, 0, w + 2 * (size // 3), size + size // 2), fill=(0, 0, 0))
    draw.text((size // 3, size // 6), text, fill=(255, 255, 255), font=font)
    return out


def read_png_info(path: str | os.PathLike) -> dict[str, str]:
    """``{"parameters": ..., "sdmw_recipe": ..., "sdmw_merge_id": ...}`` (those present)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return {k: v for k, v in im.info.items() if isinstance(v, str)}
    except (OSError, UnidentifiedImageError) as e:
        raise MergeError(f"cannot read {Path(path).name} as an image: {e}") from None


# ----------------------------------------------------------------------------- reading back
_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """A1111 ``parameters`` -> (prompt, negative prompt, {field: value}). The last line holds the
    ``Steps: ...`` fields; lines from ``Negative prompt:`` on are the negative prompt."""
    lines = (text or "").strip().split("\n")
    fields: dict[str, str] = {}
    if lines and re.search(r"(^|, )Steps: \d", lines[-1]):
        for m in _FIELD.finditer(lines.pop()):
            value = m.group(2).strip()
            fields[m.group(1).strip()] = json.loads(value) if value.startswith('"') else value
    prompt, negative, into_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if into_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), fields


_NUM = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"
_LABELS = [   # SuperMerger's makemodelname (and model_label here), most specific first
    ("sum_twice", rf"^\((?P<a>.+?) x (?:\(1-alpha\)|{_NUM}) \+ (?P<b>.+?) x (?P<al>alpha|{_NUM})\) x "
                  rf"(?:\(1-beta\)|{_NUM}) \+ (?P<c>.+?) x (?P<be>beta|{_NUM})"),
    ("add_difference", rf"^(?P<a>.+?) \+ \((?P<b>.+?) - (?P<c>.+?)\) x (?P<al>alpha|{_NUM})"),
    ("triple_sum", rf"^(?P<a>.+?) x (?:\(1-alpha-beta\)|{_NUM}) \+ (?P<b>.+?) x (?P<al>alpha|{_NUM}) \+ "
                   rf"(?P<c>.+?) x (?P<be>beta|{_NUM})"),
    ("weight_sum", rf"^(?P<a>.+?) x (?:\(1-alpha\)|{_NUM}) \+ (?P<b>.+?) x (?P<al>alpha|{_NUM})"),
    ("self", rf"^(?P<a>.+?) x (?P<al>alpha|{_NUM})"),
]


def recipe_from_label(label: str, checkpoints: list[str]):
    """A recipe from a merge description as SuperMerger writes it into A1111's ``Model:`` field
    (``A x 0.7 + B x 0.3``, ``A + (B - C) x alpha (1 0.5 ...)_cosineA ID 12``...), with model
    names matched to ``checkpoints`` by their stem. Returns (Recipe or None, notes)."""
    from ..engine.calcmodes import calcmode_names
    from ..recipe import Recipe
    text = re.sub(r"\s+ID \d+\s*$", "", label.strip())
    calcmode = "normal"
    m = re.search(r"_([A-Za-z][\w]*)$", text)
    if m and m.group(1) in calcmode_names():
        calcmode, text = m.group(1), text[: m.start()]
    vectors = re.findall(r"\(((?:\s*" + _NUM + r"\s*[, ]\s*)+" + _NUM + r")\s*\)", text)
    text = re.sub(r"\s*_?\(((?:\s*" + _NUM + r"\s*[, ]\s*)+" + _NUM + r")\s*\)", "", text).strip()
    for mode, pattern in _LABELS:
        hit = re.match(pattern + r"$", text)
        if hit:
            break
    else:
        return None, [f"the model field {label!r} is not a merge description"]
    stems = {Path(n).stem: n for n in checkpoints}
    names, notes = {}, []
    for slot in "abc":
        stem = hit.groupdict().get(slot)
        if stem is not None:
            names[slot] = stems.get(stem.strip(), "")
            if not names[slot]:
                notes.append(f"model {slot.upper()} {stem.strip()!r} is not in the checkpoint folder")
    vec = [[float(v) for v in re.split(r"[,\s]+", s.strip())] for s in vectors]
    alpha = hit.group("al")
    beta = hit.groupdict().get("be")
    recipe = Recipe(names.get("a", ""), names.get("b", ""), names.get("c", ""),
                    mode="weight_sum" if mode == "self" else mode, calcmode="self" if mode == "self" else calcmode,
                    alpha=float(alpha) if alpha not in (None, "alpha") else 0.5,
                    beta=float(beta) if beta not in (None, "beta") else 0.25,
                    mbw_alpha=vec[0] if vec else None, mbw_beta=vec[1] if len(vec) > 1 else None)
    return recipe, notes


_GEN_FIELDS = {"Steps": ("steps", int), "Sampler": ("sampler", str), "CFG scale": ("cfg", float),
               "Seed": ("seed", int), "Clip skip": ("clip_skip", int), "Denoising strength": ("denoise", float),
               "Hires upscale": ("hires_scale", float), "Hires steps": ("hires_steps", int),
               "Hires upscaler": ("hires_upscaler", str)}


def settings_from_png(info: dict[str, str], checkpoints: list[str]) -> tuple[object, dict, list[str]]:
    """(Recipe or None, generation settings, notes) from a PNG's text chunks: this app's exact
    ``sdmw_recipe``, else a SuperMerger merge description in A1111's ``Model:`` field; the
    generation settings from A1111's ``parameters``."""
    from ..recipe import Recipe
    notes: list[str] = []
    if "parameters" not in info and "sdmw_recipe" not in info:
        raise MergeError("this image has no generation settings (no A1111 'parameters' in its PNG info)")
    prompt, negative, fields = parse_infotext(info.get("parameters", ""))
    gen: dict = {"prompt": prompt, "negative": negative}
    for name, (key, kind) in _GEN_FIELDS.items():
        if name in fields:
            try:
                gen[key] = kind(fields[name])
            except ValueError:
                notes.append(f"{name} {fields[name]!r} is not a {kind.__name__}")
    size = re.fullmatch(r"(\d+)x(\d+)", fields.get("Size", ""))
    if size:
        gen["width"], gen["height"] = int(size.group(1)), int(size.group(2))
    recipe = None
    if info.get("sdmw_recipe"):
        recipe = Recipe.from_line(info["sdmw_recipe"])
        for slot in "abc":
            name = getattr(recipe, f"model_{slot}")
            if name and name not in checkpoints:
                notes.append(f"model {slot.upper()} {name!r} is not in the checkpoint folder")
    elif fields.get("Model"):
        recipe, more = recipe_from_label(fields["Model"], checkpoints)
        if recipe is None and fields["Model"] in checkpoints + [Path(n).stem for n in checkpoints]:
            more = []          # a plain model, not a merge: nothing to note
        notes += more
    return recipe, gen, notes
