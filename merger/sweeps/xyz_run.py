"""Running XYZ plots and dice rolls on the workstation (merge → generate per cell → grids)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..arch import detect_arch_of_file
from ..files.checkpoint_io import short_hashes
from .dice import DiceSettings, elist_csv, new_seed, roll
from ..errors import MergeError, MergeStopped
from ..presets import is_number
from ..pipeline.generate import GenParams
from ..pipeline.pnginfo import save_png
from ..engine.ratios import RatioPlan, parse_elemental
from ..recipe import Recipe
from .xyz import Axis, Cell, check_axes_matter, grid_image, parse_axis, plan_cells


@dataclass
class PlotSpec:
    """Everything a plot needs, serialisable (reservations are stored as these)."""
    recipe: Recipe
    gen: GenParams
    axes: dict = field(default_factory=lambda: {"X": ("alpha", "0.25,0.5,0.75"), "Y": ("none", ""), "Z": ("none", "")})
    dice: DiceSettings | None = None
    save_elist: bool = False
    allow_large: bool = False       # run even above the workstation's cell limit (the user confirmed)
    lora_legend: str = ""           # LoRA metadata fields printed under each lora-axis label

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_line(), "gen": asdict(self.gen), "axes": self.axes,
                "dice": asdict(self.dice) if self.dice else None, "save_elist": self.save_elist,
                "allow_large": self.allow_large, "lora_legend": self.lora_legend}

    @classmethod
    def from_dict(cls, d: dict) -> "PlotSpec":
        return cls(Recipe.from_line(d["recipe"]), GenParams(**d["gen"]), {k: tuple(v) for k, v in d["axes"].items()},
                   DiceSettings(**d["dice"]) if d.get("dice") else None, d.get("save_elist", False),
                   d.get("allow_large", False), d.get("lora_legend", ""))


@dataclass
class Prepared:
    spec: PlotSpec
    arch: str
    axes: dict[str, Axis]
    cells: list[Cell]
    dice_seed: int | None = None


@dataclass
class PlotResult:
    folder: Path
    grids: list[Path] = field(default_factory=list)
    cells_done: int = 0
    cells_total: int = 0
    history_ids: list[int] = field(default_factory=list)
    cells: list[tuple[Path, int | None, str]] = field(default_factory=list)   # (PNG, merge ID, caption)
    stopped: bool = False


def prepare(ws, spec: PlotSpec) -> Prepared:
    """Parse every axis and check every cell before any work starts."""
    r = spec.recipe
    r.check()
    spec.gen.with_prompt_options().check()
    arch = detect_arch_of_file(ws.dirs.resolve("ckpt", r.model_a))
    models = ws.dirs.checkpoints()
    axes = {n: parse_axis(t, v, n, arch, r.mode, models) for n, (t, v) in spec.axes.items()}
    fields = [f.strip() for f in spec.lora_legend.split(",") if f.strip()]
    for ax in axes.values():
        if ax.type.startswith("model_"):   # grid labels name each model with its short hash
            hashes = short_hashes(ws.dirs.resolve("ckpt", m) for m in ax.values)
            ax.labels = [f"{ax.type[-1]}: {m} [{h}]" for m, h in zip(ax.values, hashes)]
        if ax.type == "lora" and fields:   # Additional Networks' metadata legends
            ax.labels = [label + lora_legend(ws, value, fields) for label, value in zip(ax.labels, ax.values)]
    cells = plan_cells(r, spec.gen, axes["X"], axes["Y"], axes["Z"], arch)
    limit = ws.max_cells
    if len(cells) > limit and not spec.allow_large:
        raise MergeError(f"this plot has {len(cells):,} cells ({estimate(ws, len(cells))}), more than the limit of "
                         f"{limit:,}: tick 'allow large plots' to run it anyway, or use fewer values")
    for c in cells:
        c.gen.with_prompt_options().check()
    dice_seed = None
    if any(c.roll is not None for c in cells):
        dice = spec.dice or DiceSettings()
        dice_seed = dice.seed if dice.seed != -1 else new_seed()
        keys = list(ws.cache.get(ws.dirs.resolve("ckpt", r.model_a)).tensors)
        labels = {}
        for c in cells:
            if c.roll is not None:
                rolled = roll(dice, arch, keys, dice_seed + c.roll)
                labels[c.roll] = roll_label(c.roll, rolled)
                # a method's seed (dropout masks) stays: the rolls then differ only in their ratios
                c.recipe = replace(c.recipe, mbw_alpha=rolled.mbw_alpha,
                                   seed=c.recipe.seed if c.recipe.method else rolled.seed,
                                   mbw_beta=rolled.mbw_beta if rolled.mbw_beta is not None else c.recipe.mbw_beta,
                                   elemental="\n".join(x for x in (c.recipe.elemental, rolled.elemental) if x))
        for ax in axes.values():          # each roll labelled with what was rolled
            if ax.type == "random":
                ax.labels = [labels.get(v, ax.labels[i]) for i, v in enumerate(ax.values)]
    for c in cells:
        names = {s: getattr(c.recipe, f"model_{s}") for s in "abc"}
        c.recipe = replace(c.recipe, **{f"hash_{s}": "" for s in "abc"})
        c.recipe = ws.recipe(names["a"], names["b"], names["c"], **{
            k: v for k, v in vars(c.recipe).items() if not k.startswith(("model_", "hash_"))})
        c.recipe.check()
        parse_elemental(c.recipe.elemental, arch)
        RatioPlan(c.recipe, arch)
    check_axes_matter(cells, axes)
    return Prepared(spec, arch, axes, cells, dice_seed)


def lora_legend(ws, value: str, fields: list[str]) -> str:
    """Lines "name: field=value, ..." for each LoRA of a lora-axis value (metadata read from the
    LoRA files; a field the file lacks shows "-")."""
    lines = []
    for item in value.split(","):       # "name:weight[:blocks], ..." (block values are bare numbers)
        name = item.split(":")[0].strip()
        if not name or is_number(name):
            continue
        meta = ws.load_lora_file(name).metadata
        lines.append(f"{name}: " + ", ".join(f"{f}={meta.get(f, '-')}" for f in fields))
    return "".join("\n" + ln for ln in lines)


def cell_caption(axes: dict[str, Axis], cell) -> str:
    """The cell's axis values, e.g. "alpha 0.2 · seed 3"."""
    pos = {"X": cell.x, "Y": cell.y, "Z": cell.z}
    return " · ".join(ax.labels[pos[n]] for n, ax in axes.items() if ax.type != "none") or "cell"


def roll_label(index: int, rolled) -> str:
    """"roll 3 α 0.12 0.5 … β …": the rolled block values (the cell's PNG info has the full recipe)."""
    def vec(v):
        return " ".join(f"{x:g}" for x in v)       # already rounded to the dice's digits
    text = f"roll {index + 1}"
    if rolled.mbw_alpha is not None:
        text += f" α {vec(rolled.mbw_alpha)}"
    if rolled.mbw_beta is not None:
        text += f" β {vec(rolled.mbw_beta)}"
    if rolled.elemental:
        text += " E " + rolled.elemental.replace("\n", "; ")
    return text


def estimate(ws, n_cells: int) -> str:
    """"about 3 min", from the average time of the last cells run on this workstation."""
    per = ws.cell_seconds
    if not per:
        return "time unknown until a cell has run"
    s = per * n_cells
    return f"about {s:.0f} s" if s < 120 else f"about {s / 60:.0f} min" if s < 7200 else f"about {s / 3600:.1f} h"


def run(ws, prep: Prepared, progress=None, on_cell=None) -> PlotResult:
    """Merge and generate every cell; Stop ends the plot after the current cell (what is done
    is kept and gridded). ``on_cell(grid_images)`` gets the grids so far after each cell."""
    for grids, res in iter_run(ws, prep, progress):
        if on_cell and grids is not None:
            on_cell(grids)
    return res


def iter_run(ws, prep: Prepared, progress=None):
    """Like :func:`run`, yielding ``(grid images so far, result)`` after each cell and
    ``(None, final result)`` at the end (for a UI that shows cells as they finish). With a
    worker pool (``ws.pool``, see :mod:`.dispatch`) the cells run on the workers and are
    recorded, saved and shown here in grid order as they finish."""
    ws.stop_event.clear()
    folder = ws.outputs / "xyz" / time.strftime("%Y%m%d-%H%M%S")   # created by the first PNG saved
    x, y, z = prep.axes["X"], prep.axes["Y"], prep.axes["Z"]
    per_z = len(x) * len(y)
    images: list = [None] * len(prep.cells)
    res = PlotResult(folder, cells_total=len(prep.cells))
    source = "dice" if prep.dice_seed is not None else "xyz"
    elist = []
    t_start = time.perf_counter()
    for i, cell, image, path, hid in _cells(ws, prep, folder, source, res):
        images[i] = image
        res.history_ids.append(hid)
        res.cells.append((path, hid, cell_caption(prep.axes, cell)))
        res.cells_done += 1
        took = (time.perf_counter() - t_start) / res.cells_done
        ws.cell_seconds = took if not ws.cell_seconds else 0.7 * ws.cell_seconds + 0.3 * took
        if prep.spec.save_elist and cell.roll is not None:
            plan = RatioPlan(cell.recipe, prep.arch)
            keys = ws.cache.get(ws.dirs.resolve("ckpt", cell.recipe.model_a)).tensors
            elist += [(f"roll{cell.roll + 1}:{k}", *rt) for k in keys if (rt := plan.ratios(k)) is not None]
        if progress:
            progress(res.cells_done, len(prep.cells), "xyz plot")
        yield [grid_image(images[k * per_z:(k + 1) * per_z], x, y, _ztitle(z, k)) for k in range(len(z))], res
    for k in range(len(z)):
        grid = grid_image(images[k * per_z:(k + 1) * per_z], x, y, _ztitle(z, k))
        res.grids.append(save_png(grid, folder / f"grid-{k:02}.png", _describe(prep, k)))
    if elist:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "e-list.csv").write_text(elist_csv(elist))
    yield None, res


def _stem(cell) -> str:
    return f"cell-z{cell.z:02}-y{cell.y:02}-x{cell.x:02}"


def _cells(ws, prep: Prepared, folder: Path, source: str, res: PlotResult):
    """``(index, cell, image, PNG path, merge ID)`` of each finished cell, in grid order."""
    pool = getattr(ws, "pool", None)
    if pool is None:
        for i, cell in enumerate(prep.cells):
            if ws.should_stop():
                res.stopped = True
                return
            out = ws.merge(cell.recipe, source=source, interruptible=False)
            gen = ws.generate(cell.gen, interruptible=False, folder=folder, stem=_stem(cell))
            yield i, cell, gen.result.images[0].image, gen.files[0], out.history_id
        return
    from .dispatch import Task
    vae = getattr(ws.pipeline, "vae_name", "") or None
    tasks = []
    for cell in prep.cells:
        gens = [asdict(cell.gen)]
        tasks.append(Task(cell.recipe.to_line(), gens, pool.files_for(cell.recipe, gens, vae)))
    try:
        for i, out in pool.ordered(tasks, ws.should_stop, vae):
            if out is None:                     # cancelled by Stop
                continue
            cell = prep.cells[i]
            hid = ws.record(cell.recipe, out.notes, source=source, seconds=out.merge_seconds)
            img = out.images[0]
            text = img.infotext_with_id(hid)
            img.image.info["parameters"] = text
            path = save_png(img.image, folder / f"{_stem(cell)}-000-{img.seed}.png", text, cell.recipe.to_line(),
                            hid if hid is not None else "")
            yield i, cell, img.image, path, hid
    except MergeStopped:
        res.stopped = True


def _ztitle(z: Axis, k: int) -> str:
    return z.labels[k] if z.type != "none" else ""


def _describe(prep: Prepared, k: int) -> str:
    axes = "; ".join(f"{n}: {t} = {v}" for n, (t, v) in prep.spec.axes.items() if t != "none")
    extra = f"; dice seed {prep.dice_seed}" if prep.dice_seed is not None else ""
    return f"XYZ plot, grid {k + 1}: {axes}{extra}\nbase recipe: {prep.spec.recipe.to_line()}"
