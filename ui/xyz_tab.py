"""XYZ plot, Let the Dice Roll and the reservation queue (widgets only)."""
from __future__ import annotations

import logging
import threading
import traceback

import gradio as gr
import pandas as pd

from merger.sweeps.dice import DiceSettings
from merger.errors import MergeError
from merger.presets import presets
from merger.sweeps.xyz import AXIS_TYPES
from merger.sweeps.xyz_run import PlotSpec, estimate, iter_run, prepare

from . import forms
from .common import progress_cb, safe, selected_id

log = logging.getLogger("sdmw.ui")
RES_COLS = ["id", "created", "status", "progress", "summary", "message"]


def build_plot_panel(ws, mc, queue):
    """The XYZ accordion of the Merge tab; ``mc`` are the merge tab's components."""
    c = {}
    with gr.Accordion("XYZ plot / Let the Dice Roll", open=False, elem_id="xyz_accordion"):
        for name, kind, values in (("X", "alpha", "0.25,0.5,0.75"), ("Y", "none", ""), ("Z", "none", "")):
            with gr.Row():
                c[f"{name}_type"] = gr.Dropdown(AXIS_TYPES, value=kind, label=f"{name} type", elem_id=f"xyz_{name}_type", scale=1)
                c[f"{name}_values"] = gr.Textbox(value=values, label=f"{name} values (comma-separated, or one per line "
                                                 f"for mbw / prompt / lora / adjust; | splits a reservation)",
                                                 lines=2, max_lines=12, elem_id=f"xyz_{name}_values", scale=4)
        with gr.Accordion("Dice settings (axis type 'random')", open=False):
            randoms = [n for n, v in presets("sd1").items() if any(x in v for x in "RUX")]
            with gr.Row():
                c["dice_a"] = gr.Dropdown(randoms, value="ALL_R", allow_custom_value=True,
                                          label="alpha template (preset or 26 entries: number, R, U, X, ER, EU, EX)")
                c["dice_b"] = gr.Dropdown([""] + randoms, value="", allow_custom_value=True, label="beta template (empty: keep β)")
            with gr.Row():
                c["dice_lower"] = gr.Textbox(value="0", label="X lower limit(s)")
                c["dice_upper"] = gr.Textbox(value="1", label="X upper limit(s)")
                c["dice_min"] = gr.Textbox(value="", label="clamp min")
                c["dice_max"] = gr.Textbox(value="", label="clamp max")
                c["dice_digits"] = gr.Number(value=3, precision=0, label="rounding digits")
                c["dice_seed"] = gr.Number(value=-1, precision=0, label="dice seed (-1 new, recorded)")
                c["elist"] = gr.Checkbox(label="save E-list (CSV of every key's ratios)")
            c["lora_legend"] = gr.Textbox(label="LoRA legend: metadata fields printed under each label of a lora "
                                          "axis (e.g. ss_learning_rate, ss_num_epochs)", elem_id="xyz_lora_legend")
        with gr.Row():
            c["allow_large"] = gr.Checkbox(label=f"allow large plots (more than {ws.max_cells} cells)", value=False,
                                           elem_id="xyz_allow_large")
            c["run"] = gr.Button("Run XYZ plot", variant="primary", elem_id="xyz_run")
            c["reserve"] = gr.Button("Reserve XY plot", elem_id="xyz_reserve")
        c["status"] = gr.Textbox(label="Plot status", interactive=False, elem_id="xyz_status")
        c["grids"] = gr.Gallery(label="Grids (click one to zoom)", columns=1, height=640, object_fit="contain",
                                allow_preview=True, elem_id="xyz_gallery", format="png")
        c["cells"] = gr.Gallery(label="Cells: click one to load its merge settings into the Merge tab", columns=8,
                                height=260, object_fit="contain", allow_preview=False, elem_id="xyz_cells",
                                format="png")
        c["cell_ids"] = gr.State([])
        with gr.Row():
            c["cell_id"] = gr.Textbox(label="Merge ID of the clicked cell", elem_id="xyz_cell_id", scale=3)
            c["cell_save"] = gr.Button("Save this cell's merge", elem_id="xyz_cell_save", scale=1)
    _wire(ws, mc, c, queue)
    return c


KEEP = (gr.update(), gr.update(), gr.update())      # grids, cells, cell IDs left as they are


def _cells(res) -> tuple:
    """The cells gallery (each image captioned with its axis values) and the cells' merge IDs."""
    return [(str(p), f"#{hid} {cap}" if hid is not None else cap) for p, hid, cap in res.cells], \
        [hid for _, hid, _ in res.cells]


def _spec(ws, mc_values, plot_values) -> PlotSpec:
    n_rec = len(forms.RECIPE_KEYS)
    recipe = forms.build_recipe(ws, *mc_values[:n_rec])
    gen = forms.gen_params(*mc_values[n_rec:])
    (xt, xv, yt, yv, zt, zv, da, db, lo, up, mn, mx, digits, seed, elist, allow_large, legend) = plot_values
    dice = DiceSettings(template_alpha=da or "ALL_R", template_beta=db or "", lower=lo or "0", upper=up or "1",
                        clamp_min=forms.number(mn, "clamp min") if str(mn or "").strip() else None,
                        clamp_max=forms.number(mx, "clamp max") if str(mx or "").strip() else None,
                        digits=forms.number(digits, "rounding digits", whole=True),
                        seed=forms.number(seed, "dice seed", whole=True))
    return PlotSpec(recipe, gen, {"X": (xt, xv), "Y": (yt, yv), "Z": (zt, zv)}, dice, bool(elist), bool(allow_large),
                    legend or "")


def _wire(ws, mc, c, queue):
    plot_keys = ["X_type", "X_values", "Y_type", "Y_values", "Z_type", "Z_values", "dice_a", "dice_b", "dice_lower",
                 "dice_upper", "dice_min", "dice_max", "dice_digits", "dice_seed", "elist", "allow_large", "lora_legend"]
    inputs = [mc[k] for k in forms.RECIPE_KEYS + forms.GEN_KEYS] + [c[k] for k in plot_keys]
    n_mc = len(forms.RECIPE_KEYS) + len(forms.GEN_KEYS)

    def run_plot(*values, progress=gr.Progress()):
        try:
            yield from _run_plot(values, progress)
        except MergeError as e:
            gr.Warning(str(e))
            yield f"Error: {e}", *KEEP
        except Exception as e:  # noqa: BLE001 - the page must keep working
            log.error("unexpected error in an XYZ plot\n%s", traceback.format_exc())
            gr.Warning(f"unexpected {type(e).__name__}: {e}")
            yield f"Error: unexpected {type(e).__name__}: {e}", *KEEP

    def _run_plot(values, progress):
        prep = prepare(ws, _spec(ws, values[:n_mc], values[n_mc:]))
        total = len(prep.cells)
        where = f" on {len(ws.pool.actors)} Ray workers" if ws.pool is not None else ""
        yield f"{total} cell(s), {estimate(ws, total)}: running{where}…", *KEEP
        for grids, res in iter_run(ws, prep, progress_cb(progress, "xyz plot")):
            if grids is not None:
                left = f", {estimate(ws, total - res.cells_done)} left" if res.cells_done < total else ""
                yield f"cell {res.cells_done}/{total} done{left}", grids, *_cells(res)
        state = "stopped" if res.stopped else "finished"
        msg = f"plot {state}: {res.cells_done}/{total} cells, grids in {res.folder}"
        yield msg, [str(g) for g in res.grids], *_cells(res)
        if not res.stopped and any(e["status"] == "waiting" for e in queue.rows()):
            yield msg + "; running reservations…", *KEEP
            n = queue.run_waiting(ws, progress_cb(progress, "reservations"))
            yield msg + f"; {n} reservation(s) run", *KEEP

    c["run"].click(run_plot, inputs, [c["status"], c["grids"], c["cells"], c["cell_ids"]])

    def cell_picked(ids, evt: gr.SelectData):
        ref = ids[evt.index] if 0 <= evt.index < len(ids) and ids[evt.index] is not None else ""
        return ref, ref
    # the cell's merge ID goes into the Merge tab's field, then its "Load settings" is pressed
    c["cells"].select(cell_picked, c["cell_ids"], [c["cell_id"], mc["load_id"]]).then(
        None, None, None, js="() => document.querySelector('#load_settings').click()")

    @safe(1)
    def save_cell(ref, flags, progress=gr.Progress()):
        if not str(ref or "").strip():
            raise MergeError("click a cell first")
        return ws.save_recipe(ws.history.recipe(ref), options=forms.save_options(flags),
                              progress=progress_cb(progress, "saving")).message
    c["cell_save"].click(save_cell, [c["cell_id"], mc["save_flags"]], c["status"])

    @safe(1)
    def reserve(*values):
        spec = _spec(ws, values[:n_mc], values[n_mc:])
        prepare(ws, PlotSpec.from_dict(queue.split(spec)[0].to_dict()))   # reject bad values now
        same = queue.duplicates(spec)
        ids = queue.add(spec)
        if same:
            gr.Warning(f"the same plot is already reserved as #{', #'.join(map(str, same))}")
        return f"reserved plot(s) #{', #'.join(map(str, ids))}" + (
            f" (note: the same plot is already reserved as #{', #'.join(map(str, same))})" if same else "")
    c["reserve"].click(reserve, inputs, c["status"])


def reservations_tab(ws, queue):
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="res_start")
        refresh = gr.Button("Refresh", elem_id="res_refresh")
    status = gr.Textbox(label="Status", interactive=False, elem_id="res_status")
    table = gr.Dataframe(headers=RES_COLS, interactive=False, elem_id="res_table", wrap=True)
    with gr.Row():
        picked = gr.Textbox(label="Selected reservation (click a row)", elem_id="res_picked", scale=1)
        buttons = {name: gr.Button(label, elem_id=f"res_{name}", min_width=90, scale=0) for name, label in (
            ("up", "Move up"), ("down", "Move down"), ("retry", "Run again"), ("delete", "Delete"),
            ("clear", "Clear finished"), ("clear_all", "Clear all waiting"))}
    grids = gr.Gallery(label="Finished grids (click one to zoom)", columns=2, height=520, object_fit="contain",
                       allow_preview=True, elem_id="res_gallery", format="png")

    def rows():
        data = queue.rows()
        done = [g for e in data if e["status"] in ("finished", "stopped") for g in e["grids"]]
        return pd.DataFrame([[e.get(k, "") for k in RES_COLS] for e in data], columns=RES_COLS), done

    refresh.click(lambda: ("", *rows()), None, [status, table, grids])
    table.select(selected_id, table, picked)

    def start_queue(progress=gr.Progress()):
        """Run the waiting entries in a worker thread; the table shows each entry's cell n/N live."""
        result: dict = {}

        def work():
            try:
                result["n"] = queue.run_waiting(ws, progress_cb(progress, "reservations"))
            except Exception as e:  # noqa: BLE001 - reported below
                result["error"] = e
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            running = [e for e in queue.rows() if e["status"] == "running"]
            now = f"running #{running[0]['id']}: {running[0].get('progress', '')}" if running else "running…"
            yield (now, *rows())
        if "error" in result:
            yield (f"Error: {result['error']}", *rows())
        else:
            yield (f"{result.get('n', 0)} reservation(s) run", *rows())
    start.click(start_queue, None, [status, table, grids])

    actions = {"up": lambda i: queue.move(i, -1) or f"moved #{i} up",
               "down": lambda i: queue.move(i, 1) or f"moved #{i} down",
               "retry": lambda i: queue.retry(i) or f"#{i} will run again",
               "delete": lambda i: queue.delete(i) or f"deleted #{i}",
               "clear": lambda i: f"cleared {queue.clear('done')} finished reservation(s)",
               "clear_all": lambda i: f"cleared {queue.clear('all')} reservation(s)"}
    for name, fn in actions.items():
        buttons[name].click(safe(3)(lambda i, fn=fn: (fn(i), *rows())), picked, [status, table, grids])
    return table, rows
