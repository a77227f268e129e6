"""LoRA tab: list with dimensions, metadata viewer, merge into checkpoint (and Gen), merge LoRAs,
extract."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from lora_ops.catalog import lora_table
from lora_ops.formats import metadata_table
from merger.errors import MergeError
from merger.pipeline.prompt import extract_lora_tags

from .common import progress_cb, safe

LIST_COLS = ["name", "type", "dim", "conv_dim", "modules", "base"]


def _second(names: list[str]):
    """A default that differs from the first choice (None when there is only one)."""
    return names[1] if len(names) > 1 else None


def build(ws, mc, do_gen_outputs, run_gen):
    loras = ws.dirs.loras()

    def rows():
        data = lora_table(ws.dirs.lora, ws.dirs.loras())
        return pd.DataFrame([[r[c] for c in LIST_COLS] for r in data], columns=LIST_COLS)

    def meta_rows(name):
        return pd.DataFrame(metadata_table(ws.load_lora_file(name)) if name else [], columns=["key", "value"])

    def safe_meta(name):
        try:
            return meta_rows(name)
        except MergeError:
            return meta_rows(None)

    with gr.Row():
        refresh = gr.Button("Refresh list", elem_id="lora_refresh")
        status = gr.Textbox(label="Status", interactive=False, elem_id="lora_status", scale=4)
        overwrite = gr.Checkbox(label="overwrite existing files", value=False, elem_id="lora_overwrite")
    table = gr.Dataframe(rows(), headers=LIST_COLS, interactive=False, elem_id="lora_table")
    with gr.Accordion("Metadata", open=False, elem_id="lora_meta_accordion"):
        pick = gr.Dropdown(loras, value=loras[0] if loras else None, label="LoRA", elem_id="lora_meta_pick")
        meta = gr.Dataframe(safe_meta(loras[0] if loras else None), headers=["key", "value"], interactive=False,
                            wrap=True, elem_id="lora_meta")
    with gr.Accordion("Merge LoRAs into a checkpoint", open=True):
        with gr.Row():
            ck = ws.dirs.checkpoints()
            model = gr.Dropdown(ck, value=ck[0] if ck else None, label="Checkpoint", elem_id="lora_model")
            spec = gr.Textbox(label="LoRAs: name:ratio[:blocks], ... (blocks: preset or 12/17/20/26 values)",
                              elem_id="lora_spec", scale=3)
            from_prompt = gr.Button("Get ratios from prompt", elem_id="lora_from_prompt")
        with gr.Row():
            merge_gen = gr.Button("Merge LoRA and Gen", variant="primary", elem_id="lora_merge_gen")
            merge_save = gr.Button("Merge LoRA and save", elem_id="lora_merge_save")
            out_name = gr.Textbox(label="file name (optional)", elem_id="lora_out_name")
        gallery = gr.Gallery(label="Output", columns=2, height=300, elem_id="lora_gallery", format="png")
    with gr.Accordion("Merge LoRAs into one LoRA / extract a LoRA", open=False, elem_id="lora_more_accordion"):
        with gr.Row():
            m_spec = gr.Textbox(label="LoRAs: name:ratio, ...", elem_id="lora_m_spec")
            method = gr.Radio(["svd", "concat", "same-rank"], value="svd", label="method")
            same = gr.Checkbox(label="same to Strength (same-rank)")
            rank = gr.Number(value=64, precision=0, label="new rank (svd)")
            conv_rank = gr.Number(value=0, precision=0, label="new conv rank (0 = same)")
            m_out = gr.Textbox(label="output name", value="merged-lora", elem_id="lora_m_out")
        with gr.Row():
            m_meta = gr.Radio(["create new", "merge", "save all", "use first LoRA"], value="create new", label="metadata")
            m_prec = gr.Radio(["fp16", "bf16", "fp32"], value="fp16", label="save precision")
            m_clamp = gr.Number(value=0.99, label="clamp quantile (svd; 1 = none)", elem_id="lora_m_clamp")
            m_go = gr.Button("Merge LoRAs", elem_id="lora_m_go")
        with gr.Row():
            ea = gr.Dropdown(ck, value=ck[0] if ck else None, label="Model A (fine-tune)", elem_id="lora_e_a")
            eb = gr.Dropdown(ck, value=_second(ck), label="Model B (base)", elem_id="lora_e_b")
            e_alpha = gr.Number(value=1.0, label="α (A)")
            e_beta = gr.Number(value=1.0, label="β (B)")
            e_dim = gr.Number(value=128, precision=0, label="dim")
            e_conv = gr.Number(value=0, precision=0, label="conv dim (0 = none)")
            e_inout = gr.Checkbox(label="also conv_in/conv_out (kohya: no)", value=False, elem_id="lora_e_inout")
            e_out = gr.Textbox(label="output name", value="extracted-lora")
            e_go = gr.Button("Extract", elem_id="lora_e_go")
        with gr.Row():
            lb = gr.Dropdown(loras, value=loras[0] if loras else None, label="LoRA B", elem_id="lora_l_b")
            lc = gr.Dropdown(loras, value=_second(loras), label="LoRA C", elem_id="lora_l_c")
            l_alpha = gr.Slider(0, 1, value=0.5, label="α (B ↔ C)")
            l_beta = gr.Slider(0, 1, value=0.0, label="β (similar ↔ dissimilar)")
            l_gamma = gr.Number(value=1.0, label="γ (smooth)")
            l_rank = gr.Number(value=64, precision=0, label="rank")
            l_out = gr.Textbox(label="output name", value="extracted-features")
            l_go = gr.Button("Extract from two LoRAs", elem_id="lora_l_go")
        with gr.Row():
            dy_pick = gr.Dropdown(loras, value=loras[0] if loras else None, label="DyLoRA", elem_id="lora_dy_pick")
            dy_rank = gr.Number(value=4, precision=0, label="rank (a multiple of its unit, ≤ its dim)",
                                elem_id="lora_dy_rank")
            dy_out = gr.Textbox(label="output name (empty: <name>-<rank>)", elem_id="lora_dy_out")
            dy_go = gr.Button("Extract a fixed rank from a DyLoRA", elem_id="lora_dy_go")

    refresh.click(lambda: (f"{len(ws.dirs.loras())} LoRAs", rows(), gr.update(choices=ws.dirs.loras())),
                  None, [status, table, pick])
    pick.change(safe(2)(lambda n: ("", meta_rows(n))), pick, [status, meta])
    from_prompt.click(lambda p: ", ".join(extract_lora_tags(p or "")[1]), mc["prompt"], spec)

    def lora_recipe(model_name, text):
        return ws.recipe(model_name, mode="weight_sum", calcmode="self", alpha=1.0, loras=text)

    @safe(4)
    def merge_and_gen(model_name, text, *gen_args, progress=gr.Progress()):
        out = ws.merge(lora_recipe(model_name, text), progress=progress_cb(progress, "merging LoRAs"))
        images, info, tg, n = run_gen(gen_args, progress)
        return f"{out.message} ({out.timings.line()}); generated {n} image(s)", images, info, images
    merge_gen.click(merge_and_gen, [model, spec] + do_gen_outputs["inputs"],
                    [status] + do_gen_outputs["outputs"] + [gallery])

    @safe(1)
    def merge_and_save(model_name, text, name, flags, over, progress=gr.Progress()):
        from . import forms
        options = forms.save_options(flags)
        options.overwrite = options.overwrite or bool(over)
        return ws.save_recipe(lora_recipe(model_name, text), name, options,
                              progress=progress_cb(progress, "saving")).message
    merge_save.click(merge_and_save, [model, spec, out_name, mc["save_flags"], overwrite], status)

    @safe(1)
    def merge_loras(text, meth, same_strength, new_rank, new_conv, name, meta_mode, prec, over, clamp,
                    progress=gr.Progress()):
        return ws.merge_lora_files(text, meth, bool(same_strength), int(new_rank), int(new_conv) or None, name,
                                   meta_mode, prec, bool(over), float(clamp)).message
    m_go.click(merge_loras, [m_spec, method, same, rank, conv_rank, m_out, m_meta, m_prec, overwrite, m_clamp],
               status)
    l_go.click(safe(1)(lambda b, c, a, be, g, r, n, o: ws.extract_from_loras(b, c, a, be, g, int(r), n, bool(o)).message),
               [lb, lc, l_alpha, l_beta, l_gamma, l_rank, l_out, overwrite], status)

    @safe(1)
    def extract(a, b, al, be, dim, conv, name, over, inout, progress=gr.Progress()):
        return ws.extract_lora(a, b, float(al), float(be), int(dim), int(conv) or None, name,
                               progress=progress_cb(progress, "extracting"), overwrite=bool(over),
                               conv_in_out=bool(inout)).message
    e_go.click(extract, [ea, eb, e_alpha, e_beta, e_dim, e_conv, e_out, overwrite, e_inout], status)
    dy_go.click(safe(1)(lambda n, r, out, o: ws.extract_dylora(n, int(r), out or "", bool(o)).message),
                [dy_pick, dy_rank, dy_out, overwrite], status)
    return {"table": table, "rows": rows, "pick": pick, "meta": meta, "meta_rows": safe_meta}
