"""The whole page."""
from __future__ import annotations

import gradio as gr

from . import merge_tab, other_tabs


def build_ui(ws) -> gr.Blocks:
    with gr.Blocks(title="SD Merge Workstation") as demo:
        gr.Markdown("### SD Merge Workstation — merge in RAM, look, save when you like it")
        with gr.Tab("Merge", elem_id="tab_merge"):
            mc = merge_tab.build(ws)
        with gr.Tab("History", elem_id="tab_history") as th:
            table, rows = other_tabs.history_tab(ws, mc)
        th.select(lambda: rows(""), None, table)
        with gr.Tab("Elements", elem_id="tab_elements"):
            other_tabs.elements_tab(ws)
        with gr.Tab("Analysis", elem_id="tab_analysis"):
            other_tabs.analysis_tab(ws)
    return demo
