"""Search tab: an optimizer proposes merges of the Merge tab's models; the user (or a scorer)
judges. Widgets only: the search itself is :mod:`merger.sweeps.search`."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from merger.errors import MergeError
from merger.sweeps.search import SAMPLERS, Search, SearchSpace, SearchSpec

from . import forms
from .common import progress_cb, safe

TOP = 4                    # best trials of a run shown together
OBJECTIVES = [("your eye: pick the best of each batch", "eye"), ("look like these images", "like"),
              ("scorer: CLIP score + aesthetic + ImageReward (files given at launch)", "scorer")]


def _range(text: str, name: str) -> tuple[float, float] | None:
    parts = str(text or "").replace(",", " ").split()
    if not parts:
        return None
    if len(parts) != 2:
        raise MergeError(f"{name} range: two numbers, low and high")
    return forms.number(parts[0], f"{name} low"), forms.number(parts[1], f"{name} high")


def build(ws, mc):
    c: dict = {}
    gr.Markdown("An optimizer (Optuna) proposes merges of the models chosen in the **Merge** tab (mode, "
                "method, calcmode and unsearched ratios as set there); each trial is merged, rendered for every "
                "prompt × seed below and judged. Every trial is a history row. Searches are stored and resume "
                "under their study name.")
    with gr.Row():
        c["blocks"] = gr.Textbox(value="IN00-IN11 M00 OUT00-OUT11", label="blocks searched (IDs, ranges, NOT ...)",
                                 elem_id="search_blocks", scale=3)
        c["which"] = gr.CheckboxGroup(["α per block", "β per block", "global α", "global β"], value=["α per block"],
                                      label="search", elem_id="search_which", scale=2)
    with gr.Row():
        c["alpha_range"] = gr.Textbox(value="0 1", label="α range", elem_id="search_alpha_range")
        c["beta_range"] = gr.Textbox(value="0 1", label="β range", elem_id="search_beta_range")
        c["density_range"] = gr.Textbox(value="", label="density range (methods; blank: not searched)",
                                        elem_id="search_density_range")
        c["drop_range"] = gr.Textbox(value="", label="drop range (methods; blank: not searched)",
                                     elem_id="search_drop_range")
        c["calcmodes"] = gr.Textbox(value="", label="calcmodes to choose among (comma-separated)",
                                    elem_id="search_calcmodes")
    with gr.Row():
        c["objective"] = gr.Radio(OBJECTIVES, value="eye", label="objective", elem_id="search_objective", scale=3)
        c["sampler"] = gr.Dropdown(list(SAMPLERS), value="tpe", label="optimizer (value objectives)",
                                   elem_id="search_sampler", scale=1)
    c["references"] = gr.File(file_count="multiple", file_types=["image"], label="reference images (look like these)",
                              elem_id="search_references")
    with gr.Row():
        c["prompts"] = gr.Textbox(label="prompts, one per line (blank: the Merge tab's prompt)", lines=2,
                                  elem_id="search_prompts", scale=3)
        c["seeds"] = gr.Textbox(value="1", label="seeds", elem_id="search_seeds", scale=1)
        c["trials"] = gr.Number(value=30, precision=0, label="trial budget", elem_id="search_trials", scale=1)
        c["batch"] = gr.Number(value=4, precision=0, label="batch (eye)", elem_id="search_batch", scale=1)
        c["study"] = gr.Textbox(value="", label="study name (same name resumes; blank: from the models)",
                                elem_id="search_study", scale=2)
    with gr.Row():
        c["start"] = gr.Button("Start / resume", variant="primary", elem_id="search_start")
        c["stop"] = gr.Button("Stop after this trial", variant="stop", elem_id="search_stop")
    c["status"] = gr.Textbox(label="Search status", interactive=False, elem_id="search_status")
    c["gallery"] = gr.Gallery(label=f"Candidates (eye) / the {TOP} best trials of this run", columns=4, height=420, object_fit="contain",
                              elem_id="search_gallery", format="png")
    with gr.Row():
        c["pick"] = gr.Radio([], label="the best of this batch (trial)", elem_id="search_pick", scale=3)
        c["ranking"] = gr.Textbox(label="optional: rank the others too (trial numbers, best first)",
                                  elem_id="search_ranking", scale=2)
        c["prefer"] = gr.Button("This one is best → next batch", elem_id="search_prefer", scale=1)
    with gr.Row():
        c["plot"] = gr.LinePlot(pd.DataFrame({"trial": [], "score": [], "series": []}), x="trial", y="score",
                                color="series", label="score per trial", elem_id="search_plot", height=260)
        c["importance"] = gr.Textbox(label="parameter importances (fANOVA)", lines=8, interactive=False,
                                     elem_id="search_importance")
    with gr.Row():
        c["best_id"] = gr.Textbox(label="merge ID of the best trial", interactive=False, elem_id="search_best_id")
        c["swap_best"] = gr.Button("Swap the best in", elem_id="search_swap_best")
        c["save_best"] = gr.Button("Save the best", elem_id="search_save_best")
        c["to_merge"] = gr.Button("Best → Merge tab (then XYZ around it)", elem_id="search_to_merge")
    _wire(ws, mc, c)
    return c


def _wire(ws, mc, c):
    state: dict = {"search": None}
    n_rec, n_gen = len(forms.RECIPE_KEYS), len(forms.GEN_KEYS)
    keys = ["blocks", "which", "alpha_range", "beta_range", "density_range", "drop_range", "calcmodes", "objective",
            "sampler", "references", "prompts", "seeds", "trials", "batch", "study"]
    inputs = [mc[k] for k in forms.RECIPE_KEYS + forms.GEN_KEYS] + [c[k] for k in keys]

    def spec_of(values) -> SearchSpec:
        from PIL import Image
        recipe = forms.build_recipe(ws, *values[:n_rec])
        gen = forms.gen_params(*values[n_rec:n_rec + n_gen])
        v = dict(zip(keys, values[n_rec + n_gen:]))
        which = set(v["which"] or [])
        space = SearchSpace(blocks=(v["blocks"] or "").split(), block_alpha="α per block" in which,
                            block_beta="β per block" in which, global_alpha="global α" in which,
                            global_beta="global β" in which, alpha=_range(v["alpha_range"], "α") or (0.0, 1.0),
                            beta=_range(v["beta_range"], "β") or (0.0, 1.0),
                            density=_range(v["density_range"], "density"), drop=_range(v["drop_range"], "drop"),
                            calcmodes=[x.strip() for x in (v["calcmodes"] or "").split(",") if x.strip()])
        prompts = [p.strip() for p in (v["prompts"] or "").splitlines() if p.strip()] or [gen.prompt]
        seeds = [int(forms.number(s, "seed", whole=True)) for s in (v["seeds"] or "").replace(",", " ").split()]
        refs = [Image.open(f).convert("RGB") for f in (v["references"] or [])]   # Gradio's uploads
        return SearchSpec(recipe, space, gen, prompts=prompts, seeds=seeds or [1], objective=v["objective"],
                          sampler=v["sampler"], trials=int(forms.number(v["trials"], "trial budget", whole=True)),
                          batch=int(forms.number(v["batch"], "batch", whole=True)), study=(v["study"] or "").strip(),
                          references=refs, clip_dir=ws.scorer_files.get("clip"),
                          aesthetic=ws.scorer_files.get("aesthetic"),
                          imagereward=ws.scorer_files.get("imagereward"))

    def plot_df(search) -> pd.DataFrame:
        pts = sorted(search.scores())
        best, rows = float("-inf"), []
        for n, s in pts:
            best = max(best, s)
            rows += [{"trial": n, "score": s, "series": "trial"}, {"trial": n, "score": best, "series": "best so far"}]
        return pd.DataFrame(rows or {"trial": [], "score": [], "series": []})

    def show(trials, scores: bool = False) -> list:
        return [(t.images[i], f"trial {t.number} · merge #{t.merge_id}" + (f" · score {t.score:.4f}" if scores else ""))
                for t in trials for i in range(len(t.images))]

    def batch_outputs(search, batch, round_msg):
        choices = [(f"trial {t.number}", t.number) for t in batch]
        return (round_msg, show(batch), gr.update(choices=choices, value=None), gr.update(), gr.update(),
                gr.update())

    outs = [c["status"], c["gallery"], c["pick"], c["plot"], c["importance"], c["best_id"]]

    @safe(len(outs))
    def start(*values, progress=gr.Progress()):
        spec = spec_of(values)
        ws.stop_event.clear()
        search = Search(ws, spec)
        state["search"] = search
        if spec.objective == "eye":
            batch = search.candidates(progress=progress_cb(progress, "rendering candidates"))
            return batch_outputs(search, batch, f"study {spec.study_name()}: round {_round(search)} — pick the best "
                                 f"of {len(batch)} candidates")
        done_before = len(search.finished())

        top: list = []          # the best trials of this run, with their images

        def tick(i, n, t):
            progress(i / max(n, 1), desc=f"trial {t.number}: score {t.score:.4f}")
            top.append(t)
            top.sort(key=lambda x: -x.score)
            del top[TOP:]
        search.run(progress=tick, should_stop=ws.should_stop)
        best = search.best()
        imp = search.importances()
        msg = (f"study {spec.study_name()}: {len(search.finished())} trials ({len(search.finished()) - done_before} now)"
               + (f"; best trial {best.number}, score {best.score:.4f}, merge #{best.merge_id}" if best else "")
               + ("; stopped" if ws.should_stop() else ""))
        return (msg, show(top, scores=True), gr.update(choices=[], value=None), plot_df(search),
                "\n".join(f"{k}: {v:.3f}" for k, v in imp.items()) or "(after a few trials)",
                str(best.merge_id) if best and best.merge_id is not None else "")
    c["start"].click(start, inputs, outs)

    @safe(len(outs))
    def prefer(best, ranking, progress=gr.Progress()):
        search = state["search"]
        if search is None or search.objective is not None:
            raise MergeError("start a search with the 'your eye' objective first")
        if best is None:
            raise MergeError("choose the best candidate first")
        order = [int(forms.number(x, "ranking", whole=True)) for x in str(ranking or "").replace(",", " ").split()]
        search.prefer(int(best), [int(best)] + order if order else None)
        batch = search.candidates(progress=progress_cb(progress, "rendering candidates"))
        fav = search.best()
        out = list(batch_outputs(search, batch, f"round {_round(search)}: trial {best} preferred; pick the best of "
                                 f"{len(batch)}"))
        out[-1] = str(fav.merge_id) if fav and fav.merge_id is not None else ""
        return tuple(out)
    c["prefer"].click(prefer, [c["pick"], c["ranking"]], outs)
    c["stop"].click(ws.stop, None, None, concurrency_limit=None)

    def best_recipe():
        search = state["search"]
        best = search.best() if search is not None else None
        if best is None:
            raise MergeError("no best trial yet: run a search first")
        return best

    @safe(1)
    def swap_best():
        best = best_recipe()
        return ws.merge(best.recipe, source="search").message
    c["swap_best"].click(swap_best, None, c["status"])

    @safe(1)
    def save_best(progress=gr.Progress()):
        return ws.save_recipe(best_recipe().recipe, progress=progress_cb(progress, "saving")).message
    c["save_best"].click(save_best, None, c["status"])

    @safe(2)
    def to_merge():
        best = best_recipe()
        if best.merge_id is None:
            raise MergeError("the best trial has no merge ID (its history row could not be written)")
        return f"merge #{best.merge_id} → Merge tab: press Load settings there", str(best.merge_id)
    c["to_merge"].click(to_merge, None, [c["status"], mc["load_id"]]).then(
        mc["load_settings"], [mc["load_id"], mc["arch"]], [mc["status"]] + mc["recipe_outputs"],
        show_progress="hidden")


def _round(search) -> int:
    return 1 + len(search.study.get_preferences(deepcopy=False)) // max(1, search.spec.batch - 1)
