"""Merge tab: models, mode, calcmode, ratios, MBW, elemental, include/exclude, adjust, save
options, the action buttons and the generation panel."""
from __future__ import annotations

import gradio as gr

from merger.arch import detect_arch_of_file
from merger.blocks import BLOCKS_FLUX, BLOCKS_SD, BLOCKS_XL_EXT
from merger.engine.calcmodes import calcmode_names, get_calcmode
from merger.engine.methods import MAX_MODELS, get_method, method_names
from merger.errors import MergeError
from merger.files.saving import SAVE_DTYPES, model_label
from merger.pipeline.generate import HIRES_UPSCALERS, SAMPLERS
from merger.pipeline.pnginfo import settings_from_png
from merger.pipeline.regional import mask_overlay
from merger.presets import presets
from merger.recipe import MODES_WITH_BETA

from . import forms
from .common import progress_cb, safe

BAKED = "(model's own)"
MODELS_LINE_JS = ("(a, b, c) => [['A', a], ['B', b], ['C', c]].filter(([s, n]) => n)"
                  ".map(([s, n]) => `**${s}** ${n}`).join(' · ')")     # as forms.models_line


def build(ws):
    c: dict = {}
    with gr.Row():
        c["status"] = gr.Textbox(label="Status", value="ready", interactive=False, elem_id="status", scale=5)
        c["load_id"] = gr.Textbox(label="Load settings from merge ID (-1 = last)", value="-1", elem_id="load_id", scale=1)
        c["load_btn"] = gr.Button("Load settings", elem_id="load_settings", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                ckpts = ws.dirs.checkpoints()
                # type to search; B and C can be set back to "(none)"
                c["a"] = gr.Dropdown(ckpts, value=ckpts[0] if ckpts else None, label="Model A", elem_id="model_a",
                                     filterable=True, min_width=260)
                c["b"] = gr.Dropdown(forms.optional(ckpts), value=ckpts[1] if len(ckpts) > 1 else "", label="Model B",
                                     elem_id="model_b", filterable=True, min_width=260)
                c["c"] = gr.Dropdown(forms.optional(ckpts), value="", label="Model C", elem_id="model_c",
                                     filterable=True, min_width=260)
            with gr.Row():
                c["model_names"] = gr.Markdown(forms.models_line(c["a"].value, c["b"].value, ""), elem_id="model_names")
                c["refresh"] = gr.Button("Refresh", elem_id="refresh_models", scale=0, min_width=80)
            with gr.Row():
                c["mode"] = gr.Radio(forms.MODE_CHOICES, value="weight_sum", label="Merge mode", elem_id="mode")
                c["calcmode"] = gr.Dropdown(calcmode_names("weight_sum"), value="normal", label="Calcmode", elem_id="calcmode")
                c["method"] = gr.Dropdown([(forms.NO_METHOD, "")] + method_names(), value="", label="Method",
                                          elem_id="method", info="N-model methods: model A is the base")
            with gr.Group(visible=False, elem_id="method_box") as c["method_box"]:
                c["method_help"] = gr.Markdown("", elem_id="method_help")
                with gr.Row():
                    c["models"] = gr.Dropdown(ckpts, value=[], multiselect=True, filterable=True, elem_id="method_models",
                                              label=f"Models M1…Mn (1 to {MAX_MODELS}; their differences from model A "
                                                    f"are merged)", scale=3)
                    c["weights"] = gr.Textbox(label="weights (one per model; blank = all 1)", elem_id="method_weights",
                                              scale=1)
                with gr.Row():
                    c["density"] = gr.Number(None, label="density k (blank: default)", elem_id="method_density")
                    c["drop"] = gr.Number(None, label="drop p (blank: default)", elem_id="method_drop")
                    c["method_seed"] = gr.Number(-1, precision=0, label="seed (-1: new)", elem_id="method_seed")
                    c["sign"] = gr.Radio([("sum (paper)", "sum"), ("count (sd-mecha)", "count")], value="sum",
                                         label="TIES sign election", elem_id="method_sign")
                    c["della_eps"] = gr.Number(0.1, label="DELLA ε", elem_id="method_della_eps")
                    c["stock"] = gr.Radio([("tensor (paper)", "tensor"), ("row (sd-mecha)", "row")], value="tensor",
                                          label="Model Stock cosine", elem_id="method_stock")
            with gr.Row():
                # the number box is what is merged (any finite value, never clamped); the slider drags it
                for key, value, label, shown in (("alpha", 0.5, "alpha (α)", True), ("beta", 0.25, "beta (β)", False)):
                    with gr.Row(visible=shown) as c[f"{key}_box"]:
                        c[key] = gr.Number(value=value, label=label, elem_id=key, min_width=110, scale=1)
                        c[f"{key}_slider"] = gr.Slider(-1, 2, value=value, step=0.001, label="drag", scale=3,
                                                      elem_id=f"{key}_slider")
                c["gamma"] = gr.Number(value=1.0, label="gamma (extract)", visible=False, elem_id="gamma")
            c["arch"] = gr.Textbox(value="sd1", visible=False)
            with gr.Accordion("Merge Block Weight (MBW)", open=False, elem_id="mbw_accordion"):
                c["use_mbw"] = gr.Checkbox(label="use MBW", value=False, elem_id="use_mbw")
                with gr.Row():
                    sd_presets = [n for n, v in presets("sd1").items() if not any(x in v for x in "RUX")]
                    c["preset"] = gr.Dropdown(sd_presets, label="Preset", elem_id="mbw_preset")
                    c["target"] = gr.Radio(["alpha", "beta"], value="alpha", label="sliders edit")
                c["mbw_a"] = gr.Textbox(label="MBW alpha (26 values for SD1/SD2, 20 for SDXL or 110 extended, 61 for Flux; "
                                              "BASE / CLIP first)",
                                        value=",".join(["0.5"] * 26), elem_id="mbw_alpha")
                c["mbw_b"] = gr.Textbox(label="MBW beta", value="", elem_id="mbw_beta")
                with gr.Accordion("Extended SDXL MBW (110 blocks, SuperMerger's list)", open=False,
                                  elem_id="mbw_extended"):
                    gr.Markdown("Paste 110 comma-separated values into MBW alpha / beta, in this order (the "
                                "sliders then show each block's first sub-block): "
                                + ", ".join(f"`{b}`" for b in BLOCKS_XL_EXT)
                                + ". `CLIPL` also covers the VAE, as in SuperMerger.")
                c["sliders"] = []

                def slider_row(blocks):
                    with gr.Row():
                        for blk in blocks:
                            c["sliders"].append(gr.Slider(-1, 2, value=0.5, step=0.01, label=blk, min_width=80,
                                                          elem_id=f"mbw_{blk}"))
                slider_row(BLOCKS_SD[:13])
                slider_row(BLOCKS_SD[13:])
                with gr.Column(visible=False, elem_id="mbw_flux") as c["flux_sliders"]:   # Flux: 61 blocks
                    slider_row(BLOCKS_FLUX[:3] + BLOCKS_FLUX[-1:])
                    double, single = BLOCKS_FLUX[3:22], BLOCKS_FLUX[22:60]
                    with gr.Accordion("double-stream blocks D00-D18", open=False, elem_id="mbw_flux_double"):
                        slider_row(double[:10])
                        slider_row(double[10:])
                    with gr.Accordion("single-stream blocks S00-S37", open=False, elem_id="mbw_flux_single"):
                        for i in range(0, 38, 10):
                            slider_row(single[i:i + 10])
                # the sliders in forms.SLIDER_BLOCKS order (CLIP, T5, IN, OUT were made first for Flux)
                order = {b: i for i, b in enumerate(BLOCKS_SD + BLOCKS_FLUX[:3] + BLOCKS_FLUX[-1:]
                                                    + BLOCKS_FLUX[3:60])}
                c["sliders"] = [c["sliders"][order[b]] for b in forms.SLIDER_BLOCKS]
            with gr.Accordion("Elemental, include / exclude, adjust", open=False):
                c["elemental"] = gr.Textbox(label="Elemental (blocks:elements:ratio, one per line)", lines=2,
                                            elem_id="elemental")
                with gr.Row():
                    c["inex"] = gr.Radio(forms.INEX_CHOICES, value="off", label="Include / Exclude", elem_id="inex")
                    c["inex_text"] = gr.Textbox(label="blocks (IN01 OUT03-OUT05 VAE Adjust) and key substrings",
                                                elem_id="inex_text")
                with gr.Row():
                    c["inex_print"] = gr.Button("List the keys this include/exclude keeps (print)", elem_id="inex_print")
                c["inex_keys"] = gr.Textbox(label="Include / exclude: keys kept as model A's", lines=6, max_lines=20,
                                            interactive=False, elem_id="inex_keys")
                c["loras"] = gr.Textbox(label="LoRAs merged on top: name:ratio[:blocks], ...", elem_id="merge_loras")
                c["ema"] = gr.Checkbox(label="merge each model's EMA U-Net (model_ema.*, training checkpoints) "
                                             "instead of its U-Net", value=False, elem_id="merge_ema")
                c["adjust"] = gr.Textbox(label="Adjust: IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3",
                                         value="0,0,0,0,0,0,0,0", elem_id="adjust")
                with gr.Row():
                    c["adjust_sliders"] = [gr.Slider(-10, 10, value=0, step=0.1, label=n, min_width=80)
                                           for n in forms.ADJUST_LABELS]
            with gr.Accordion("Save options", open=False, elem_id="save_accordion"):
                c["save_flags"] = gr.CheckboxGroup(forms.SAVE_CHOICES, value=forms.SAVE_DEFAULT, label="", elem_id="save_flags")
                with gr.Row():
                    c["bake_vae"] = gr.Dropdown([None] + ws.dirs.vaes(), value=None, label="Bake in VAE")
                    c["custom_name"] = gr.Textbox(label="Custom name (optional)", elem_id="custom_name")
                    c["save_dtype"] = gr.Dropdown([("as model A", "")] + [(d, d) for d in SAVE_DTYPES], value="",
                                                  label="save U-Net / Flux transformer as", elem_id="save_dtype")
                    c["id_to"] = gr.CheckboxGroup(["image", "PNG info"], value=["PNG info"],
                                                  label="save merged model ID to", elem_id="id_to")
            with gr.Accordion("PNG info → settings", open=False, elem_id="png_in_accordion"):
                c["png_in"] = gr.Image(type="pil", label="Drop a PNG made here (or by A1111 with SuperMerger): its "
                                       "merge and generation settings are loaded", sources=["upload", "clipboard"],
                                       elem_id="png_in", height=200)
            with gr.Row():
                c["merge"] = gr.Button("Merge", elem_id="merge")
                c["merge_gen"] = gr.Button("Merge and Gen", variant="primary", elem_id="merge_gen")
                c["gen"] = gr.Button("Gen", elem_id="gen")
                c["stop"] = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Row():
                c["save_current"] = gr.Button("Save current merge", elem_id="save_current")
                c["unload"] = gr.Button("Unload", elem_id="unload")
                c["clear_cache"] = gr.Button("Clear cache", elem_id="clear_cache")
        with gr.Column(scale=2):
            c["prompt"] = gr.Textbox(label="Prompt (A1111 weights, --n --w --h --d --l --s)", lines=2,
                                     value="a photo of a cat", elem_id="prompt")
            c["negative"] = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
            with gr.Row():
                c["steps"] = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps")
                c["cfg"] = gr.Slider(1, 30, value=7.0, step=0.5,
                                     label="CFG scale (Flux: its distilled guidance, e.g. 3.5)")
            with gr.Row():
                c["width"] = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="width")
                c["height"] = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="height")
            with gr.Row():
                c["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1 random)", elem_id="seed")
                c["sampler"] = gr.Dropdown(list(SAMPLERS), value="Euler a",
                                           label="Sampler (Flux: always flow-matching Euler)")
                c["clip_skip"] = gr.Slider(1, 12, value=1, step=1, label="Clip skip")
            with gr.Row():
                c["batch_count"] = gr.Slider(1, 100, value=1, step=1, label="Batch count")
                c["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                c["vae"] = gr.Dropdown([BAKED] + ws.dirs.vaes(), value=BAKED, label="VAE")
            with gr.Accordion("Hires. fix", open=False, elem_id="hires_accordion"):
                with gr.Row():
                    c["hires"] = gr.Checkbox(label="Hires. fix", value=False, elem_id="hires")
                    c["hires_upscaler"] = gr.Dropdown(list(HIRES_UPSCALERS), value="Latent", label="Upscaler",
                                                      elem_id="hires_upscaler")
                with gr.Row():
                    c["hires_scale"] = gr.Slider(1, 4, value=2.0, step=0.05, label="Upscale by", elem_id="hires_scale")
                    c["hires_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0 = same)",
                                                 elem_id="hires_steps")
                    c["denoise"] = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength (hires, img2img)",
                                             elem_id="denoise")
            with gr.Accordion("img2img: start from an image", open=False, elem_id="img2img_accordion"):
                c["init_image"] = gr.Image(type="pil", label="Start image (resized to width × height; denoising "
                                           "strength above)", sources=["upload", "clipboard"], elem_id="init_image",
                                           height=220)
            with gr.Accordion("LoRAs at generation (up to 5; <lora:name:weight> in the prompt also works)",
                              open=False, elem_id="gen_loras"):
                c["lora_mask"] = gr.Image(type="pil", label="Regional mask: its R, G, B restrict LoRA 1, 2, 3 to "
                                          "regions (0-255 = weight 0-1); LoRA 4-5 stay unmasked",
                                          sources=["upload", "clipboard"], elem_id="lora_mask", height=160)
                c["gen_loras"] = []
                for i in range(5):
                    with gr.Row():
                        c["gen_loras"] += [gr.Dropdown([None] + ws.dirs.loras(), value=None, label=f"LoRA {i + 1}",
                                                       elem_id=f"gen_lora_{i}"),
                                           gr.Slider(-2, 2, value=1.0, step=0.05, label="weight")]
            c["gallery"] = gr.Gallery(label="Output", columns=2, height=420, elem_id="gallery", format="png")
            c["info"] = gr.Textbox(label="PNG info", lines=4, interactive=False, elem_id="pnginfo")
    _wire(ws, c)
    return c


def _wire(ws, c):
    recipe_inputs = [c[k] for k in forms.RECIPE_KEYS]
    gen_inputs = [c[k] for k in forms.GEN_KEYS]
    save_inputs = [c["save_flags"], c["bake_vae"], c["custom_name"], c["save_dtype"]]

    def options_for(flags, bake, dtype=""):
        return forms.save_options(flags, str(ws.dirs.resolve("vae", bake)) if bake else None, dtype or "")

    def modes_changed(mode, calcmode):
        names = calcmode_names(mode)
        cm = calcmode if calcmode in names else "normal"
        uses_beta = mode in MODES_WITH_BETA or get_calcmode(cm).uses_beta
        return gr.update(choices=names, value=cm), gr.update(visible=uses_beta), gr.update(visible=cm == "extract")
    # user input only: Load settings sets mode, calcmode (with its choices) and β/γ itself, and a
    # chained .change from one load could otherwise land after the next one
    for ev in (c["mode"].input, c["calcmode"].input):
        ev(modes_changed, [c["mode"], c["calcmode"]], [c["calcmode"], c["beta_box"], c["gamma"]])

    method_outputs = [c["method_box"], c["method_help"], c["beta_box"]] + [c[f] for f in forms.METHOD_FIELDS]

    def method_changed(method, mode, calcmode):
        """The Method panel for a method, showing the fields it reads with its defaults (β's box is
        replaced by its density/drop there; an MBW β vector still sets that parameter per block);
        the mode's widgets without one."""
        shown = forms.method_fields(method)
        defaults = get_method(method).defaults if method else {}
        fields = [gr.update(visible=shown[f], **({"value": defaults[f]} if f in defaults else {}))
                  for f in forms.METHOD_FIELDS]
        if not method:
            return [gr.update(visible=False), "", modes_changed(mode, calcmode)[1]] + fields
        return [gr.update(visible=True), forms.method_help(method), gr.update(visible=False)] + fields
    c["method"].input(method_changed, [c["method"], c["mode"], c["calcmode"]], method_outputs)
    for key in ("alpha", "beta"):      # in the browser: slider -> box as dragged; box -> slider (clamped)
        c[f"{key}_slider"].release(None, c[f"{key}_slider"], c[key], js="(v) => v")
        c[key].change(None, c[key], c[f"{key}_slider"],
                      js="(v) => (typeof v === 'number' && isFinite(v)) ? Math.min(2, Math.max(-1, v)) : 0")

    def model_a_arch(a) -> str | None:
        try:
            return detect_arch_of_file(ws.dirs.resolve("ckpt", a)) if a else None
        except Exception:  # noqa: BLE001 - reported when merging
            return None

    def model_a_changed(a):
        arch = model_a_arch(a) or "sd1"
        names = [n for n, v in presets(arch).items() if not any(x in v for x in "RUX")]
        return ([arch] + [gr.update(visible=v) for v in forms.visible_blocks(arch)]
                + [gr.update(visible=arch == "flux"), gr.update(choices=names, value=None)])
    c["a"].change(model_a_changed, [c["a"]], [c["arch"]] + c["sliders"] + [c["flux_sliders"], c["preset"]])
    for key in ("a", "b", "c"):        # the full names, which a narrow dropdown may cut (in the browser)
        c[key].change(None, [c["a"], c["b"], c["c"]], c["model_names"], js=MODELS_LINE_JS)

    def picked(*args):
        """The models these settings merge are read in the background while the user sets
        ratios, and a method's α-independent part computed (merger/files/warmup.py)."""
        try:
            ws.warm_recipe(forms.build_recipe(ws, *args, hashed=False))    # hashed by the warm-up
        except Exception:  # noqa: BLE001 - settings not complete yet: the picked models alone
            v = dict(zip(forms.RECIPE_KEYS, args))
            ws.warm(v["a"], v["b"], v["c"], v["models"] or (), v["mode"], v["method"])
    for key in ("a", "b", "c", "models", "mode", "method", "density"):
        c[key].input(picked, recipe_inputs, None, queue=False, show_progress="hidden")

    @safe(29)
    def preset_picked(name, arch, target):
        vals = forms.text_to_sliders(name, arch)
        text = forms.sliders_to_text(vals, arch)
        a, b = (text, gr.update()) if target == "alpha" else (gr.update(), text)
        return f"preset {name} -> MBW {target}", a, b, *vals
    c["preset"].input(preset_picked, [c["preset"], c["arch"], c["target"]],
                      [c["status"], c["mbw_a"], c["mbw_b"]] + c["sliders"])

    def sliders_moved(arch, target, *vals):
        text = forms.sliders_to_text(list(vals), arch)
        return (gr.update(value=text), gr.update()) if target == "alpha" else (gr.update(), gr.update(value=text))
    for s in c["sliders"]:
        s.release(sliders_moved, [c["arch"], c["target"]] + c["sliders"], [c["mbw_a"], c["mbw_b"]])

    for key in ("mbw_a", "mbw_b"):
        c[key].blur(safe(27)(lambda text, arch: ("", *forms.text_to_sliders(text, arch))),
                    [c[key], c["arch"]], [c["status"]] + c["sliders"])

    for s in c["adjust_sliders"]:
        s.release(lambda *v: forms.adjust_text(v), c["adjust_sliders"], c["adjust"])
    c["adjust"].blur(safe(9)(lambda t: ("", *forms.adjust_values(t))), c["adjust"], [c["status"]] + c["adjust_sliders"])

    def refresh():
        ck, vaes = ws.dirs.checkpoints(), ws.dirs.vaes()
        return (gr.update(choices=ck), gr.update(choices=forms.optional(ck)), gr.update(choices=forms.optional(ck)),
                gr.update(choices=[BAKED] + vaes), gr.update(choices=[None] + vaes), f"{len(ck)} checkpoints")
    c["refresh"].click(refresh, None, [c["a"], c["b"], c["c"], c["vae"], c["bake_vae"], c["status"]])

    def do_merge(args, flags, bake, name, dtype, progress):
        recipe = forms.build_recipe(ws, *args)
        problem = ws.flux_generation_problem(recipe) if model_a_arch(recipe.model_a) == "flux" else None
        if problem:                       # a Flux merge that cannot be shown: merged into a file
            if "save model" not in flags:
                raise MergeError(f"{problem}; tick 'save model' to merge it into a file")
            out = ws.save_recipe(recipe, name, options_for(flags, bake, dtype),
                                 progress_cb(progress, "merging into a file"), record=True)
            return f"{out.message} (not generated: {problem})", None
        out = ws.merge(recipe, progress=progress_cb(progress, "merging"))
        msg = f"{out.message} ({out.timings.line()})"
        if "save model" in flags:
            saved = ws.save_current(name, options_for(flags, bake, dtype),
                                    progress=progress_cb(progress, "saving"))
            msg += f"; {saved.message}"
        return msg, out.timings

    def do_gen(gen_args, vae, init_image, id_to, mask, progress, loras=()):
        ws.set_vae(None if vae == BAKED else vae)
        slots = [f"{n}:{w:g}" if n else "" for n, w in zip(loras[::2], loras[1::2])]
        regional, text = slots[:3], ", ".join(s for s in slots[3:] if s)   # slots 1-3 masked when a mask is given
        out = ws.generate(forms.gen_params(*gen_args), progress=progress_cb(progress, "generating"), loras=text,
                          init_image=init_image, id_to=tuple(id_to or ()), mask=mask, regional=regional)
        # the saved PNG files (with their PNG info), so a download from the gallery keeps it
        images = [(str(f), f"seed {im.seed}") for f, im in zip(out.files, out.result.images)]
        if mask is not None and any(regional) and out.result.images:
            images.append((mask_overlay(out.result.images[0].image, mask), "regional mask over the image"))
        n = len(out.result.images)
        return images, out.result.images[0].infotext if n else "", out.timings, n

    n_rec, n_gen = len(recipe_inputs), len(gen_inputs)
    # prompt ... denoise, VAE, start image, merge ID option, regional mask, 5 LoRA slots
    gen_inputs = gen_inputs + [c["vae"], c["init_image"], c["id_to"], c["lora_mask"]] + c["gen_loras"]

    def run_gen(args, progress):
        return do_gen(args[:n_gen], *args[n_gen:n_gen + 4], progress, args[n_gen + 4:])
    c["run_gen"], c["gen_inputs"], c["gen_outputs"] = run_gen, gen_inputs, [c["gallery"], c["info"]]

    @safe(3)
    def merge_only(*args, progress=gr.Progress()):
        msg, _ = do_merge(args[:n_rec], *args[n_rec:], progress)
        return msg, gr.update(), gr.update()

    n_all_gen = len(gen_inputs)

    @safe(3)
    def merge_and_gen(*args, progress=gr.Progress()):
        forms.gen_params(*args[n_rec:n_rec + n_gen])     # refuse bad generation settings before merging
        msg, t = do_merge(args[:n_rec], *args[n_rec + n_all_gen:], progress)
        if t is None:                 # a Flux merge saved to a file: nothing to generate with
            return msg, gr.update(), gr.update()
        images, info, tg, n = run_gen(args[n_rec:n_rec + n_all_gen], progress)
        return f"{msg}; generated {n} image(s) in {tg.generate:.2f} s", images, info

    @safe(3)
    def gen_only(*args, progress=gr.Progress()):
        images, info, tg, n = run_gen(args, progress)
        return f"generated {n} image(s) (generating {tg.generate:.2f} s)", images, info

    outs = [c["status"], c["gallery"], c["info"]]
    c["merge"].click(merge_only, recipe_inputs + save_inputs, outs)
    c["merge_gen"].click(merge_and_gen, recipe_inputs + gen_inputs + save_inputs, outs)
    c["gen"].click(gen_only, gen_inputs, outs)
    # no output: the running action reports "Stopped: ..." in the status line itself
    c["stop"].click(ws.stop, None, None, concurrency_limit=None)

    @safe(1)
    def save_current(flags, bake, name, dtype, progress=gr.Progress()):
        out = ws.save_current(name, options_for(flags, bake, dtype),
                              progress=progress_cb(progress, "saving"))
        return f"{out.message} ({out.timings.line()})"
    c["save_current"].click(save_current, save_inputs, c["status"])
    c["unload"].click(lambda: ws.unload(), None, c["status"])
    c["clear_cache"].click(lambda: ws.clear_cache(), None, c["status"])

    widget_keys = forms.RECIPE_KEYS[1:]      # everything but the detected architecture
    recipe_outputs = ([c[k] for k in widget_keys] + [c["arch"]] + c["sliders"] + c["adjust_sliders"]
                      + [c["beta_box"], c["method_box"], c["method_help"]])

    def recipe_updates(recipe, shown_arch: str | None = None) -> list:
        """Every merge widget from a recipe, consistently: the calcmode with its mode's choices,
        β/γ shown as the mode needs, the MBW sliders of the model's architecture. ``shown_arch``:
        the architecture whose sliders the page shows now (the ``arch`` box, set with them
        whenever it changes); when the recipe's is the same, the sliders get their values only
        (a visibility update makes Gradio build a component per slider, 87 of them: a load
        took 0.57 s in the browser instead of 0.50)."""
        values = forms.recipe_to_widgets(recipe)
        values["calcmode"] = gr.update(choices=calcmode_names(recipe.mode), value=recipe.calcmode)
        values["gamma"] = gr.update(value=recipe.gamma, visible=recipe.calcmode == "extract")
        values["method"] = recipe.method
        shown = forms.method_fields(recipe.method)
        for f in forms.METHOD_FIELDS:
            values[f] = gr.update(value=values[f], visible=shown[f])
        arch = forms.recipe_arch(recipe, model_a_arch(recipe.model_a))
        sliders = (forms.text_to_sliders(values["mbw_a"], arch) if values["mbw_a"]
                   else [0.5] * len(forms.SLIDER_BLOCKS))
        on = forms.visible_blocks(arch)
        slider_updates = ([v if s else gr.skip() for v, s in zip(sliders, on)] if arch == shown_arch
                          else [gr.update(value=v, visible=s) for v, s in zip(sliders, on)])
        return ([values[k] for k in widget_keys] + [arch] + slider_updates
                + forms.adjust_values(values["adjust"])
                + [gr.update(visible=recipe.uses_beta() and not recipe.method),
                   gr.update(visible=bool(recipe.method)), forms.method_help(recipe.method)])

    @safe(1 + len(recipe_outputs))
    def load_settings(ref, shown_arch=None):
        row, recipe = ws.history.get(ref), ws.history.recipe(ref)
        ws.warm_recipe(recipe)
        return (f"loaded settings of merge #{row['id']}: {row['label']}", *recipe_updates(recipe, shown_arch))
    # instant, and a progress marker on each of its ~110 outputs made every load 35% slower
    # (0.61 s against 0.39 s per load in the browser; both grow as a Gradio page ages); not queued:
    # one HTTP request instead of the queue's join + event stream (0.47 -> 0.35 s from click to
    # status in the browser)
    c["load_btn"].click(load_settings, [c["load_id"], c["arch"]], [c["status"]] + recipe_outputs,
                        show_progress="hidden", queue=False)
    c["load_settings"], c["recipe_outputs"] = load_settings, recipe_outputs    # for the Search tab

    @safe(2)
    def inex_print(*args):
        recipe = forms.build_recipe(ws, *args)
        merged, kept = ws.inex_keys(recipe)
        head = f"{len(kept)} key(s) kept as model A's, {len(merged)} merged"
        return head, head + ("\n" + "\n".join(kept) if kept else "")
    c["inex_print"].click(inex_print, recipe_inputs, [c["status"], c["inex_keys"]])

    gen_keys = forms.GEN_KEYS

    @safe(1 + len(recipe_outputs) + len(gen_keys))
    def png_dropped(image):
        """PNG info in, settings out: the merge (exact recipe, or SuperMerger's description) and
        the generation settings of a picture."""
        if image is None:
            return ("", *[gr.update()] * (len(recipe_outputs) + len(gen_keys)))
        recipe, gen, notes = settings_from_png(dict(image.info), ws.dirs.checkpoints())
        gen_values = forms.gen_to_widgets(gen)
        merge = recipe_updates(recipe) if recipe is not None else [gr.update()] * len(recipe_outputs)
        if recipe is not None:
            ws.warm_recipe(recipe)
        what = (f"merge ({model_label(recipe)}) and " if recipe is not None else "") + "generation settings"
        return (f"loaded {what} from the PNG" + "".join(f"; note: {n}" for n in notes), *merge,
                *[gen_values.get(k, gr.update()) for k in gen_keys])
    c["png_in"].upload(png_dropped, c["png_in"], [c["status"]] + recipe_outputs + [c[k] for k in gen_keys])
