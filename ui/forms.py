"""Widget values <-> engine objects (Recipe, GenParams, SaveOptions). Glue only, no math."""
from __future__ import annotations

from merger.blocks import BLOCKS_FLUX, BLOCKS_SD, BLOCKS_XL, BLOCKS_XL_EXT
from merger.errors import MergeError
from merger.pipeline.generate import GenParams
from merger.presets import parse_vector
from merger.engine.ratios import split_inex
from merger.recipe import MODE_LABELS, Recipe
from merger.files.saving import SaveOptions

MODE_CHOICES = [(label, mode) for mode, label in MODE_LABELS.items()]
SAVE_CHOICES = ["save model", "overwrite", "safetensors", "fp16", "save metadata", "prune", "Reset CLIP ids"]
SAVE_DEFAULT = ["safetensors", "save metadata"]
INEX_CHOICES = [("Off", "off"), ("Include", "include"), ("Exclude", "exclude")]
ADJUST_LABELS = ["IN", "OUT", "OUT2", "CONT", "BRI", "COL1", "COL2", "COL3"]
# merge-tab widgets, in the order of build_recipe's / gen_params' arguments
RECIPE_KEYS = ["arch", "a", "b", "c", "mode", "calcmode", "alpha", "beta", "gamma", "use_mbw", "mbw_a", "mbw_b",
               "elemental", "inex", "inex_text", "adjust", "loras", "method", "models", "weights", "density", "drop",
               "method_seed", "sign", "della_eps", "stock", "ema"]
NO_METHOD = "(none: merge mode)"
GEN_KEYS = ["prompt", "negative", "steps", "cfg", "seed", "width", "height", "batch_count", "batch_size",
            "clip_skip", "sampler", "hires", "hires_scale", "hires_upscaler", "hires_steps", "denoise"]


NONE = "(none)"


def optional(names: list[str]) -> list:
    """Dropdown choices with a "(none)" entry (value "") to clear an optional model."""
    return [(NONE, "")] + list(names)


def models_line(a, b, c) -> str:
    """The chosen models' full names, one line (shown under the dropdowns)."""
    return " · ".join(f"**{slot}** {name}" for slot, name in (("A", a), ("B", b), ("C", c)) if name)


# the MBW sliders: SD's 26 (SDXL shows 20 of them), then Flux's 61 (grouped, shown for Flux only)
SLIDER_BLOCKS = BLOCKS_SD + BLOCKS_FLUX


def visible_blocks(arch: str) -> list[bool]:
    """Which sliders apply to the architecture (SD 26, SDXL 20 of those, Flux its own 61)."""
    if arch == "flux":
        return [False] * len(BLOCKS_SD) + [True] * len(BLOCKS_FLUX)
    sd = [b in BLOCKS_XL for b in BLOCKS_SD] if arch == "sdxl" else [True] * len(BLOCKS_SD)
    return sd + [False] * len(BLOCKS_FLUX)


def sliders_to_text(values: list[float], arch: str) -> str:
    return ",".join(f"{v:g}" for v, show in zip(values, visible_blocks(arch)) if show)


def text_to_sliders(text: str, arch: str) -> list[float]:
    """Every slider's value from a preset name or 26/20/61 values (hidden sliders keep 0). An
    extended 110-value SDXL vector is edited as text: the sliders show its 20-block view (each
    block's first entry)."""
    values = parse_vector(text, arch)
    if len(values) == len(BLOCKS_XL_EXT):
        from merger.blocks import BLOCKS_XL
        firsts = {"BASE": values[0], "M00": values[BLOCKS_XL_EXT.index("MID00")]}
        for b in BLOCKS_XL[1:]:
            if b != "M00":                       # IN03 -> IN30, OUT05 -> OUT50
                name = b[:-2] + b[-1] + "0"
                firsts[b] = values[BLOCKS_XL_EXT.index(name)] if name in BLOCKS_XL_EXT else 0.0
        values = [firsts[b] for b in BLOCKS_XL]
    values = iter(values)
    return [next(values) if show else 0.0 for show in visible_blocks(arch)]


def adjust_text(values) -> str:
    return ",".join(f"{float(v):g}" for v in values)


def number(value, name: str, whole: bool = False):
    """A widget's value as a finite float (or int): an empty box or a word is a clear error."""
    import math
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (whole and v != int(v)):
        raise MergeError(f"{name} must be a finite {'whole ' if whole else ''}number, got {value!r}")
    return int(v) if whole else v


def adjust_values(text: str) -> list[float]:
    """8 comma-separated numbers (missing trailing values are 0)."""
    parts = [p.strip() for p in (text or "").split(",")]
    if len(parts) > 8:
        raise MergeError(f"adjust takes 8 values ({', '.join(ADJUST_LABELS)}), got {len(parts)}")
    out = [number(p, f"adjust {label}") if p else 0.0 for p, label in zip(parts, ADJUST_LABELS)]
    return out + [0.0] * (8 - len(out))


METHOD_FIELDS = ("weights", "density", "drop", "method_seed", "sign", "della_eps", "stock")


def method_fields(method: str) -> dict[str, bool]:
    """Which Method-panel fields the method reads (the others are hidden)."""
    if not method:
        return dict.fromkeys(METHOD_FIELDS, False)
    from merger.engine.methods import get_method
    m = get_method(method)
    return {"weights": m.uses_weights, "density": "density" in m.reads, "drop": "drop" in m.reads,
            "method_seed": m.random, "sign": "sign" in m.reads, "della_eps": "della_eps" in m.reads,
            "stock": "stock" in m.reads}


def method_help(method: str) -> str:
    """One line on a method: its formula, what β sets per block, its reference."""
    if not method:
        return ""
    from merger.engine.methods import get_method
    m = get_method(method)
    second = f"; an MBW β vector sets {m.second} per block" if m.second else ""
    defaults = ", ".join(f"{k} {v:g}" for k, v in m.defaults.items())
    return (f"**{m.name}**: {m.formula} (τᵢ = Mᵢ − A; α is λ{second})"
            + (f". Defaults: {defaults}" if defaults else "") + f". _{m.reference}_")


def method_settings(method, models, weights, density, drop, seed, sign, della_eps, stock) -> dict:
    """Recipe fields of the Method panel ({} without a method): blank density/drop mean the
    method's default, blank weights all 1, seed -1 a new seed (recorded in the history)."""
    if not method:
        return {}
    w = [number(x, "weight") for x in str(weights or "").replace(",", " ").split()] or None
    return dict(method=method, models=list(models or []), weights=w,
                density=None if density in (None, "") else number(density, "density"),
                drop=None if drop in (None, "") else number(drop, "drop"),
                seed=number(-1 if seed in (None, "") else seed, "seed", whole=True), sign=sign or "sum",
                della_eps=number(della_eps, "della ε"), stock=stock or "tensor")


def build_recipe(ws, arch: str, a, b, c, mode, calcmode, alpha, beta, gamma, use_mbw, mbw_a, mbw_b,
                 elemental, inex, inex_text, adjust, loras="", method="", models=(), weights="", density=None,
                 drop=None, method_seed=-1, sign="sum", della_eps=0.1, stock="tensor", ema=False,
                 hashed: bool = True) -> Recipe:
    blocks, elements = split_inex(inex_text or "", arch)
    adj = adjust_values(adjust) if adjust else None
    extra = method_settings(method, models, weights, density, drop, method_seed, sign, della_eps, stock)
    if extra:
        b = c = ""                     # a method merges A (its base) with its own list of models
    return ws.recipe(a or "", b or "", c or "", hashed=hashed, **extra, mode=mode, calcmode=calcmode, alpha=number(alpha, "alpha"),
                     beta=number(beta, "beta"), gamma=number(gamma, "gamma"), mbw_alpha=parse_vector(mbw_a, arch, "MBW alpha") if use_mbw else None,
                     mbw_beta=parse_vector(mbw_b, arch, "MBW beta") if use_mbw and mbw_b else None,
                     elemental=elemental or "", inex=inex, inex_blocks=blocks if inex != "off" else [],
                     inex_elements=elements if inex != "off" else [], adjust=adj if adj and any(adj) else None,
                     loras=(loras or "").strip(), ema=bool(ema))


def recipe_to_widgets(r: Recipe) -> dict:
    """Values for the merge widgets from a recipe (Load settings from history)."""
    return {
        "a": r.model_a, "b": r.model_b or "", "c": r.model_c or "", "mode": r.mode,
        "calcmode": r.calcmode, "alpha": r.alpha, "beta": r.beta, "gamma": r.gamma,
        "use_mbw": r.mbw_alpha is not None,
        "mbw_a": ",".join(f"{v:g}" for v in r.mbw_alpha) if r.mbw_alpha else "",
        "mbw_b": ",".join(f"{v:g}" for v in r.mbw_beta) if r.mbw_beta else "",
        "elemental": r.elemental, "inex": r.inex, "inex_text": " ".join(r.inex_blocks + r.inex_elements),
        "adjust": adjust_text(r.adjust) if r.adjust else "0,0,0,0,0,0,0,0", "loras": r.loras,
        "method": r.method, "models": list(r.models), "weights": " ".join(f"{w:g}" for w in r.weights or []),
        "density": r.density, "drop": r.drop, "method_seed": r.seed if r.method else -1, "sign": r.sign,
        "della_eps": r.della_eps, "stock": r.stock, "ema": r.ema,
    }


def recipe_arch(recipe: Recipe, detected: str | None) -> str:
    """The architecture for a recipe's widgets: model A's, else what its MBW vector's length says."""
    if detected:
        return detected
    return "sdxl" if recipe.mbw_alpha is not None and len(recipe.mbw_alpha) == len(BLOCKS_XL) else "sd1"


def gen_to_widgets(gen: dict) -> dict:
    """Generation widget values from PNG info settings (only the fields it had)."""
    out = {k: v for k, v in gen.items() if k in GEN_KEYS}
    if "hires_scale" in gen:
        out["hires"] = gen["hires_scale"] != 1.0
    return out


def save_options(flags: list[str], vae_path: str | None = None, dtype: str = "") -> SaveOptions:
    return SaveOptions(fmt="safetensors" if "safetensors" in flags else "ckpt", fp16="fp16" in flags,
                       prune="prune" in flags, save_metadata="save metadata" in flags,
                       reset_clip_ids="Reset CLIP ids" in flags, overwrite="overwrite" in flags, vae=vae_path,
                       dtype=dtype)


def gen_params(prompt, negative, steps, cfg, seed, width, height, batch_count, batch_size, clip_skip,
               sampler, hires=False, hires_scale=2.0, hires_upscaler="Latent", hires_steps=0, denoise=0.7) -> GenParams:
    w = {name: number(v, name, whole=True) for name, v in (
        ("steps", steps), ("seed", seed), ("width", width), ("height", height), ("batch count", batch_count),
        ("batch size", batch_size), ("clip skip", clip_skip))}
    p = GenParams(prompt=prompt or "", negative=negative or "", steps=w["steps"], cfg=number(cfg, "CFG scale"),
                  seed=w["seed"], width=w["width"], height=w["height"], batch_count=w["batch count"],
                  batch_size=w["batch size"], clip_skip=w["clip skip"], sampler=sampler,
                  hires_scale=number(hires_scale, "hires upscale") if hires else 1.0, hires_upscaler=hires_upscaler,
                  hires_steps=number(hires_steps, "hires steps", whole=True), denoise=number(denoise, "denoising strength"))
    p.with_prompt_options().check()        # before anything is merged: a bad seed must not cost a merge
    return p
