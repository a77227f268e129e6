"""The whole page."""
from __future__ import annotations

import gradio as gr

from merger.sweeps.reservations import ReservationQueue

from . import lora_tab, merge_tab, other_tabs, search_tab, xyz_tab


# Grids are shown whole: each thumbnail is as tall as the gallery allows and the image is scaled
# to fit it (Gradio's square thumbnails would crop a wide grid); clicking one opens the zoomed
# preview. Model names are never cut off behind the dropdown arrow.
CSS = """
#xyz_gallery .thumbnail-item, #res_gallery .thumbnail-item { aspect-ratio: auto !important; height: 560px; }
#res_gallery .thumbnail-item { height: 440px; }
#xyz_gallery .thumbnail-item img, #res_gallery .thumbnail-item img { width: 100%; height: 100%; object-fit: contain; }
#model_a input, #model_b input, #model_c input { text-overflow: ellipsis; padding-right: 28px; }
"""


def build_ui(ws, queue: ReservationQueue | None = None) -> gr.Blocks:
    queue = queue or ReservationQueue()
    with gr.Blocks(title="SD Merge Workstation") as demo:
        gr.Markdown("### SD Merge Workstation — merge in RAM, look, save when you like it")
        with gr.Tab("Merge", elem_id="tab_merge"):
            mc = merge_tab.build(ws)
            xyz_tab.build_plot_panel(ws, mc, queue)
        with gr.Tab("Search", elem_id="tab_search"):
            search_tab.build(ws, mc)
        with gr.Tab("LoRA", elem_id="tab_lora") as tl:
            lc = lora_tab.build(ws, mc, {"inputs": mc["gen_inputs"], "outputs": mc["gen_outputs"]}, mc["run_gen"])
        # files may have changed since the page was built: the list and the metadata are read again
        tl.select(lambda name: (lc["rows"](), lc["meta_rows"](name)), lc["pick"], [lc["table"], lc["meta"]])
        with gr.Tab("Reservations", elem_id="tab_reservations") as tr:
            res_table, res_rows = xyz_tab.reservations_tab(ws, queue)
        tr.select(lambda: res_rows()[0], None, [res_table])
        with gr.Tab("History", elem_id="tab_history") as th:
            table, rows = other_tabs.history_tab(ws, mc)
        th.select(lambda: rows(""), None, table)
        with gr.Tab("Elements", elem_id="tab_elements"):
            other_tabs.elements_tab(ws)
        with gr.Tab("Analysis", elem_id="tab_analysis"):
            other_tabs.analysis_tab(ws)
    return demo
