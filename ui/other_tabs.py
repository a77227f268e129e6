"""History, Elements and Analysis tabs."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from merger.analysis import asimilarity, block_cosines, tensor_cosines
from merger.arch import check_same_arch, detect_arch
from merger.elements import list_elements

from . import forms
from .common import safe, selected_id

HISTORY_SHOWN = 500      # rows sent to the table; the search itself covers the whole history
HISTORY_COLS = ["id", "time", "model_a", "model_b", "model_c", "mode", "calcmode", "alpha", "beta", "label", "source"]


def history_tab(ws, merge_c):
    with gr.Row():
        query = gr.Textbox(label="Search (words; and / or)", elem_id="history_search", scale=4)
        search = gr.Button("Search / refresh", elem_id="history_refresh", scale=1)
    status = gr.Textbox(label="Status", interactive=False, elem_id="history_status")
    table = gr.Dataframe(headers=HISTORY_COLS, interactive=False, elem_id="history_table", wrap=True)
    with gr.Row():
        picked = gr.Textbox(label="Selected merge ID", elem_id="history_id")
        load = gr.Button("Load settings into Merge tab", elem_id="history_load")
        save = gr.Button("Save this merge to a file", elem_id="history_save")

    def table_of(q) -> tuple[pd.DataFrame, int, int]:
        """(newest matches first, shown, total matches)."""
        data, total = ws.history.find(q or "", newest=HISTORY_SHOWN)
        df = pd.DataFrame([[r[k] for k in HISTORY_COLS] for r in reversed(data)], columns=HISTORY_COLS)
        return df, len(data), total

    def rows(q):
        return table_of(q)[0]

    def searched(q):
        df, shown, total = table_of(q)
        head = f"the newest {shown} of " if total > shown else ""
        return df, f"{head}{total} merge(s)" + (f" matching {q!r}" if (q or "").strip() else "")

    search.click(searched, query, [table, status])
    query.submit(searched, query, [table, status])

    table.select(selected_id, table, picked)

    @safe(1)
    def save_row(ref, flags, progress=gr.Progress()):
        return ws.save_recipe(ws.history.recipe(ref), options=forms.save_options(flags)).message
    save.click(save_row, [picked, merge_c["save_flags"]], status)
    # put the ID into the Merge tab's field, then press its "Load settings" button
    load.click(lambda ref: ref, picked, merge_c["load_id"]).then(
        None, None, None, js="() => document.querySelector('#load_settings').click()")
    return table, rows


def elements_tab(ws):
    with gr.Row():
        model = gr.Dropdown(ws.dirs.checkpoints(), label="Model", elem_id="elements_model")
        filt = gr.Textbox(label="Filter (substring of the key)", elem_id="elements_filter")
        show = gr.Button("List elements", elem_id="elements_show")
    status = gr.Textbox(label="Status", interactive=False)
    table = gr.Dataframe(headers=["block", "key", "shape", "dtype", "params"], interactive=False, elem_id="elements_table")

    @safe(2)
    def run(name, f):
        ck = ws.cache.get(ws.dirs.resolve("ckpt", name))
        els = list_elements(ck.tensors, contains=f or "")
        df = pd.DataFrame([[e.block, e.key, str(list(e.shape)), e.dtype, e.numel] for e in els],
                          columns=["block", "key", "shape", "dtype", "params"])
        return f"{len(els)} elements", df
    show.click(run, [model, filt], [status, table])
    filt.submit(run, [model, filt], [status, table])


def analysis_tab(ws):
    with gr.Row():
        ck = ws.dirs.checkpoints()
        a = gr.Dropdown(ck, value=ck[0] if ck else None, label="Model A", elem_id="analysis_a")
        b = gr.Dropdown(ck, value=ck[1] if len(ck) > 1 else None, label="Model B", elem_id="analysis_b")
        how = gr.Radio(["cosine (mean per block)", "cosine (min per block)", "cosine (attn2 per block)", "ASimilarity"],
                       value="cosine (mean per block)", label="Measure")
        parts = gr.CheckboxGroup(["U-Net", "text encoder", "VAE"], value=["U-Net", "text encoder"], label="Parts")
        go = gr.Button("Compare", elem_id="analysis_go")
    status = gr.Textbox(label="Status", interactive=False, elem_id="analysis_status")
    plot = gr.BarPlot(x="block", y="similarity", title="Similarity of A and B per block (100 = identical)",
                      elem_id="analysis_plot", sort=None, height=320)
    table = gr.Dataframe(headers=["block", "key", "similarity"], interactive=False, elem_id="analysis_table")

    @safe(3)
    def run(na, nb, measure, parts, progress=gr.Progress()):
        A = ws.cache.get(ws.dirs.resolve("ckpt", na))
        B = ws.cache.get(ws.dirs.resolve("ckpt", nb), pinned=(ws.dirs.resolve("ckpt", na),))
        arch = check_same_arch({A.name: detect_arch(A.tensors, A.name), B.name: detect_arch(B.tensors, B.name)})
        if measure == "ASimilarity":
            blocks = asimilarity(A.tensors, B.tensors, arch)
            rows = [(blk, "", v) for blk, v in blocks]
        else:
            how_blocks = next(h for h in ("min", "attn2", "mean") if h in measure)
            blocks = block_cosines(A.tensors, B.tensors, arch, tuple(parts), how_blocks)
            rows = [(blk, "", v) for blk, v in blocks] + list(tensor_cosines(A.tensors, B.tensors, arch, tuple(parts)))
        bars = pd.DataFrame(blocks, columns=["block", "similarity"])
        return f"{measure}: {len(blocks)} blocks", bars, pd.DataFrame(rows, columns=["block", "key", "similarity"])
    go.click(run, [a, b, how, parts], [status, plot, table])
