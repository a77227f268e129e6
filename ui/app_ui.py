"""The whole page."""
from __future__ import annotations

import gradio as gr

from merger.reservations import ReservationQueue

from . import lora_tab, merge_tab, other_tabs, xyz_tab


def build_ui(ws, queue: ReservationQueue | None = None) -> gr.Blocks:
    queue = queue or ReservationQueue()
    with gr.Blocks(title="SD Merge Workstation") as demo:
        gr.Markdown("### SD Merge Workstation — merge in RAM, look, save when you like it")
        with gr.Tab("Merge", elem_id="tab_merge"):
            mc = merge_tab.build(ws)
            xyz_tab.build_plot_panel(ws, mc, queue)
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
