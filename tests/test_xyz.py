"""XYZ plots, dice rolls, reservations and incremental re-merge on tiny models."""
import json
from dataclasses import replace

import pytest
import torch

from merger.sweeps.dice import DiceSettings, roll
from merger.engine import plan_merge
from merger.errors import MergeError
from merger.pipeline.generate import GenParams
from merger.files.model_dirs import ModelDirs
from merger.pipeline.resident import ResidentPipeline
from merger.pipeline.pnginfo import read_png_info
from merger.recipe import Recipe
from merger.sweeps.reservations import ReservationQueue
from merger.synthetic import random_checkpoint
from merger.workstation import Workstation
from merger.sweeps.xyz import parse_axis, plan_cells
from merger.sweeps.xyz_run import PlotSpec, prepare, run
from tests.conftest import demo_models, tiny

A, B = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors"
GEN = GenParams(prompt="a cat", steps=2, width=64, height=64, seed=3)


@pytest.fixture
def ws(tmp_path):
    dirs = ModelDirs.from_models_dir(tmp_path / "models")
    demo_models(dirs)
    return Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")


def spec(ws, x=("alpha", "0.2,0.8"), y=("none", ""), z=("none", ""), mode="weight_sum", dice=None, **kw):
    r = ws.recipe(A, B, "demo-sd1-tiny-C.safetensors" if mode != "weight_sum" else "", mode=mode, **kw)
    return PlotSpec(r, replace(GEN), {"X": x, "Y": y, "Z": z}, dice)


# ----------------------------------------------------------------------------- axis parsing
@pytest.mark.parametrize("kind,text,values", [
    ("alpha", "0.1, 0.5,1", [0.1, 0.5, 1.0]),
    ("beta", "0.3", [0.3]),
    ("alpha and beta", "0, 0.5 0.1, 0.3 0.4", [(0, 0), (0.5, 0.1), (0.3, 0.4)]),
    ("seed", "1,2", [1, 2]),
    ("model_B", "x.safetensors,y.safetensors", ["x.safetensors", "y.safetensors"]),
    ("calcmode", "normal,cosineA", ["normal", "cosineA"]),
    ("prompt", "a cat\na dog", ["a cat", "a dog"]),
    ("random", "3", [0, 1, 2]),
    ("elemental", "OUT05::0.5\n\nIN01::1\nOUT01:attn:0", ["OUT05::0.5", "IN01::1\nOUT01:attn:0"]),
    ("adjust", "0,0,0,0,0,0,0,0\n1,2,3,4,5,6,7,8", [[0.0] * 8, [1.0, 2, 3, 4, 5, 6, 7, 8]]),
])
def test_axis_values(kind, text, values):
    assert parse_axis(kind, text, "X", "sd1", "weight_sum").values == values


def test_pinpoint_and_mbw_axes():
    ax = parse_axis("pinpoint blocks", "IN01, OUT10 OUT11, OUT03-OUT05, NOT M00 OUT03-OUT11", "Y", "sd1", "weight_sum")
    assert ax.values[:3] == [["IN01"], ["OUT10", "OUT11"], ["OUT03", "OUT04", "OUT05"]]
    assert "M00" not in ax.values[3] and "OUT02" in ax.values[3] and len(ax.values[3]) == 26 - 10
    mbw = parse_axis("mbw", "GRAD_V\nFLAT_25", "X", "sd1", "weight_sum")
    assert len(mbw) == 2 and mbw.values[1][0] == [0.0] + [0.25] * 25 and mbw.values[0][1] is None
    pair = parse_axis("mbw", "GRAD_V\nFLAT_25", "X", "sd1", "triple_sum")
    assert len(pair) == 1 and pair.values[0][1][1] == 0.25


@pytest.mark.parametrize("kind,text,msg", [
    ("alpha", "0.1,abc", "X axis: 'abc' is not a number"),
    ("mbw", "GRAD_V\nFLAT_25\nALL_A", "pairs"),
    ("mbw", "0.5,0.5", "26 needed"),
    ("calcmode", "normal,trainDifference", "does not work with weight_sum"),
    ("pinpoint blocks", "IN99", "unknown block"),
    ("random", "many", "number of rolls"),
    ("adjust", "1,2,3", "needs 8 values"),
    ("model_A", "missing.safetensors", "not found"),
])
def test_bad_axis_values_are_rejected_with_the_axis_named(kind, text, msg):
    mode = "triple_sum" if kind == "mbw" and "ALL_A" in text else "weight_sum"
    with pytest.raises(MergeError, match=msg):
        parse_axis(kind, text, "X", "sd1", mode, models=["a.safetensors"])


def test_cells_pinpoint_takes_the_opposite_axis_and_seed_minus_one_is_fixed():
    r = Recipe("a", "b", alpha=0.5)
    x = parse_axis("alpha", "0,1", "X", "sd1", "weight_sum")
    y = parse_axis("pinpoint blocks", "IN01,OUT11", "Y", "sd1", "weight_sum")
    cells = plan_cells(r, GEN, x, y, parse_axis("none", "", "Z", "sd1", "weight_sum"), "sd1")
    assert len(cells) == 4
    assert cells[1].recipe.mbw_alpha[2] == 1.0 and cells[1].recipe.mbw_alpha[1] == 0.5   # IN01 is index 2
    assert cells[3].recipe.mbw_alpha[25] == 1.0 and cells[3].recipe.mbw_alpha[2] == 0.5
    with pytest.raises(MergeError, match="needs an alpha or beta axis"):
        plan_cells(r, GEN, parse_axis("seed", "1", "X", "sd1", "weight_sum"), y,
                   parse_axis("none", "", "Z", "sd1", "weight_sum"), "sd1")
    s = parse_axis("seed", "-1,-1", "X", "sd1", "weight_sum")
    cells = plan_cells(r, GEN, s, parse_axis("alpha", "0.1,0.2", "Y", "sd1", "weight_sum"),
                       parse_axis("none", "", "Z", "sd1", "weight_sum"), "sd1")
    assert cells[0].gen.seed == cells[2].gen.seed != -1 and cells[0].gen.seed != cells[1].gen.seed


# ----------------------------------------------------------------------------- dice
def test_dice_modes_seeds_limits_and_rounding():
    keys = list(random_checkpoint("sd1", seed=1))
    d = DiceSettings(template_alpha="R,U,X," + ",".join(["0.5"] * 20) + ",ER,0,0", lower="0.2", upper="0.4", digits=2)
    a, b = roll(d, "sd1", keys, 7), roll(d, "sd1", keys, 7)
    assert a == b and roll(d, "sd1", keys, 8) != a
    v = a.mbw_alpha
    assert 0 <= v[0] < 1 and -0.5 <= v[1] < 1.5 and 0.2 <= v[2] <= 0.4 and v[3] == 0.5
    assert all(round(x, 2) == x for x in v)
    assert v[23] == 0.0 and a.elemental.startswith("OUT09:model.diffusion_model.output_blocks.9.")
    assert all(0 <= float(line.rsplit(":", 1)[1]) < 1 for line in a.elemental.splitlines())
    e = roll(replace(d, template_alpha="0," + ",".join(["EU"] * 12 + ["EX"] * 13)), "sd1", keys, 3)
    ratios = {line.split(":")[0]: [] for line in e.elemental.splitlines()}
    for line in e.elemental.splitlines():
        ratios[line.split(":")[0]].append(float(line.rsplit(":", 1)[1]))
    assert all(-1 <= v <= 1 for b, vs in ratios.items() if b.startswith("IN") for v in vs)    # eratiodealer: -2r+1
    assert all(0.2 <= v <= 0.4 for b, vs in ratios.items() if b.startswith(("M", "OUT")) for v in vs)
    assert len(set(ratios["OUT05"])) > 1                                  # one ratio per element
    clamp = roll(replace(d, template_alpha="ALL_U", clamp_min=0.0, clamp_max=1.0), "sd1", keys, 1)
    assert all(0 <= x <= 1 for x in clamp.mbw_alpha)
    both = roll(replace(d, template_alpha="ALL_R", template_beta="ALL_X"), "sdxl", keys, 1)
    assert len(both.mbw_alpha) == 20 and all(0.2 <= x <= 0.4 for x in both.mbw_beta)
    with pytest.raises(MergeError, match="dice template"):
        roll(replace(d, template_alpha="R,Q"), "sd1", keys, 1)


def _supermerger_draws(seed: int):
    import numpy as np
    np.random.seed(seed)
    return np.random.rand(3000)


def test_dice_reproduces_supermerger_rolls_on_sd1_and_sdxl():
    """randdealer: entry i of alpha uses randomer[i], beta randomer[50 + i]; SDXL: the 26-entry
    template is drawn at its SD positions, then weighttoxl keeps BASE, IN00-08, M00, OUT00-08."""
    from merger.blocks import sd_vector_to_xl
    r = _supermerger_draws(123)
    d = DiceSettings(template_alpha="ALL_R", template_beta="ALL_U", digits=4, seed=123)
    sd1 = roll(d, "sd1", [], 123)
    assert sd1.mbw_alpha == [round(x, 4) for x in r[:26]]
    assert sd1.mbw_beta == [round(-2 * x + 1.5, 4) for x in r[50:76]]
    xl = roll(replace(d, template_alpha=",".join(["R"] * 26)), "sdxl", [], 123)
    assert xl.mbw_alpha == sd_vector_to_xl([round(x, 4) for x in r[:26]])
    assert xl.mbw_alpha[10] == round(r[13], 4)                   # M00: SD position 13, not 10
    x26 = roll(replace(d, template_alpha=",".join(["X"] * 26), lower=",".join(["0.1"] * 26),
                       upper=",".join(str(i / 100) for i in range(26))), "sdxl", [], 123)
    assert x26.mbw_alpha[10] == round((0.1 - 0.13) * r[13] + 0.13, 4)     # 26-value limits on SDXL


def test_dice_elements_are_unclamped_and_d_and_probabilities_work():
    keys = list(random_checkpoint("sd1", seed=1))
    r = _supermerger_draws(5)
    d = DiceSettings(template_alpha="0," + ",".join(["EU"] * 25), clamp_min=0.0, clamp_max=0.1, digits=3)
    lines = roll(d, "sd1", keys, 5).elemental.splitlines()
    key = lines[0].split(":")[1]
    assert float(lines[0].rsplit(":", 1)[1]) == round(-2 * r[keys.index(key) + 100] + 1, 3)   # not clamped
    assert any(float(ln.rsplit(":", 1)[1]) > 0.1 or float(ln.rsplit(":", 1)[1]) < 0 for ln in lines)
    dd = roll(DiceSettings(template_alpha=",".join(["D"] * 26), lower="0.4", upper="0.5", digits=4), "sd1", [], 9)
    r9 = _supermerger_draws(9)
    assert dd.mbw_alpha == [round(0.5 + 0.4 * (x - 0.5), 4) for x in r9[:26]]
    never = roll(DiceSettings(template_alpha=",".join(["X"] * 26), lower="0.2R0", upper="0.8"), "sd1", [], 9)
    always = roll(DiceSettings(template_alpha=",".join(["X"] * 26), lower="0.2R1", upper="0.8", digits=4), "sd1", [], 9)
    assert never.mbw_alpha == [0.0] * 26
    assert always.mbw_alpha == [round((0.2 - 0.8) * x + 0.8, 4) for x in r9[:26]]
    some = DiceSettings(template_alpha=",".join(["X"] * 26), lower="0.2R0.5", upper="0.8")
    assert roll(some, "sd1", [], 9) == roll(some, "sd1", [], 9)                # the coin flips are seeded
    assert 0 < roll(some, "sd1", [], 9).mbw_alpha.count(0.0) < 26
    with pytest.raises(MergeError, match="lower limit 'x' is not a number or aRp"):
        roll(replace(some, lower="x"), "sd1", [], 1)


# ----------------------------------------------------------------------------- runs
def test_2x2_plot_saves_cells_grid_and_history(ws):
    prep = prepare(ws, spec(ws, x=("alpha", "0.2,0.8"), y=("seed", "1,2")))
    seen = []
    res = run(ws, prep, on_cell=lambda grids: seen.append(len(grids)))
    assert res.cells_done == 4 and len(res.grids) == 1 and seen == [1, 1, 1, 1]
    cells = sorted(p.name for p in res.folder.glob("cell-*.png"))
    assert len(cells) == 4 and cells[0].startswith("cell-z00-y00-x00")
    from PIL import Image
    grid = Image.open(res.grids[0])
    assert grid.width > 2 * 64 and grid.height > 2 * 64
    assert "XYZ plot" in read_png_info(res.grids[0])["parameters"]
    rows = ws.history.rows()
    assert len(rows) == 4 and {r["source"] for r in rows} == {"xyz"}
    assert [json.loads(r["recipe"])["alpha"] for r in rows] == [0.2, 0.8, 0.2, 0.8]


def test_every_axis_type_runs(ws):
    for x in [("beta", "0.1,0.3"), ("alpha and beta", "0.1 0.2,0.3 0.1"), ("mbw", "GRAD_V\nGRAD_A\nFLAT_25\nFLAT_75"),
              ("model_C", "demo-sd1-tiny-A.safetensors,demo-sd1-tiny-C.safetensors"), ("calcmode", "normal"),
              ("prompt", "a cat\na dog"), ("elemental", "OUT05::0.9"), ("adjust", "0,0,0,0,0,0,0,0\n1,0,0,0,0,0,0,0")]:
        res = run(ws, prepare(ws, spec(ws, x=x, mode="sum_twice")))
        assert res.cells_done >= 1 and res.grids, x
    prep = prepare(ws, spec(ws, x=("model_A", f"{A},{B}")))
    assert prep.axes["X"].labels[0].startswith(f"A: {A} [") and len(prep.axes["X"].labels[0]) == len(f"A: {A} []") + 10
    res = run(ws, prep)
    assert res.cells_done == 2
    res = run(ws, prepare(ws, spec(ws, x=("alpha", "0,1"), y=("pinpoint blocks", "IN01,OUT05"))))
    assert res.cells_done == 4
    recipes = [json.loads(r["recipe"]) for r in ws.history.rows()[-4:]]
    assert recipes[1]["mbw_alpha"][2] == 1 and recipes[1]["mbw_alpha"][0] == 0.5


def test_bad_value_rejected_before_any_work(ws):
    with pytest.raises(MergeError, match="Y axis: 'x' is not a number"):
        prepare(ws, spec(ws, x=("alpha", "0.2,0.8"), y=("beta", "0.1,x")))
    assert ws.history.rows() == []


def test_dice_plot_records_each_roll_and_same_seed_same_ratios(ws):
    d = DiceSettings(template_alpha="ALL_R", seed=42, digits=3)
    r1 = run(ws, prepare(ws, spec(ws, x=("random", "3"), dice=d)))
    rows = ws.history.rows()
    assert r1.cells_done == 3 and [r["source"] for r in rows] == ["dice"] * 3
    rolls = [json.loads(r["recipe"]) for r in rows]
    assert len({tuple(r["mbw_alpha"]) for r in rolls}) == 3 and [r["seed"] for r in rolls] == [42, 43, 44]
    prepared = prepare(ws, spec(ws, x=("random", "3"), dice=d))
    assert [c.recipe.mbw_alpha for c in prepared.cells] == [r["mbw_alpha"] for r in rolls]
    fresh = prepare(ws, spec(ws, x=("random", "2"), dice=replace(d, seed=-1)))
    assert fresh.dice_seed != -1 and fresh.cells[0].recipe.seed == fresh.dice_seed
    big = spec(ws, x=("random", "12"), dice=d)
    big.save_elist = True
    res = run(ws, prepare(ws, big))
    from PIL import Image
    g = Image.open(res.grids[0])
    assert g.width < 12 * 64 and g.height > 2 * 64                # more than 10 images: a 2-D grid
    assert (res.folder / "e-list.csv").read_text().startswith("key,alpha,beta\nroll1:")


def test_stop_ends_after_the_current_cell(ws):
    prep = prepare(ws, spec(ws, x=("alpha", "0.1,0.2,0.3,0.4")))
    res = run(ws, prep, on_cell=lambda grids: ws.stop())
    assert res.stopped and res.cells_done == 1 and len(res.grids) == 1


def test_reservations_split_persist_and_survive_errors(ws, tmp_path):
    q = ReservationQueue(tmp_path / "q.json")
    ids = q.add(spec(ws, x=("alpha", "0.1,0.2|0.3")))
    assert ids == [1, 2] and [e["status"] for e in q.rows()] == ["waiting", "waiting"]
    bad = spec(ws, x=("alpha", "0.5"))
    bad.axes["Y"] = ("beta", "nope")
    q.add(bad)
    q.add(spec(ws, x=("seed", "1")))
    q.entries[0]["status"] = "running"      # as if the app died mid-plot
    q._save()
    q = ReservationQueue(tmp_path / "q.json")
    assert q.rows()[0]["status"] == "waiting"
    assert q.run_waiting(ws) == 3
    st = [(e["status"], e["message"]) for e in q.rows()]
    assert [s for s, _ in st] == ["finished", "finished", "error", "finished"]
    assert "Y axis" in st[2][1] and st[0][1] == "2/2 cells"


# ----------------------------------------------------------------------------- incremental
def test_incremental_swap_recomputes_only_changed_keys_and_equals_full():
    Ac, Bc = tiny("sd1", 1), tiny("sd1", 2)
    vec = [0.5] * 26
    rp = ResidentPipeline("cpu", torch.float32)
    rp.swap(plan_merge(Recipe("a", "b", mbw_alpha=vec), Ac, Bc))
    vec2 = list(vec)
    vec2[20] = 0.9                                           # OUT06 only
    stats = rp.swap(plan_merge(Recipe("a", "b", mbw_alpha=vec2), Ac, Bc))
    n_out06 = sum(1 for k in Ac.tensors if ".output_blocks.6." in k)
    assert stats.keys == n_out06
    full = ResidentPipeline("cpu", torch.float32)
    full.swap(plan_merge(Recipe("a", "b", mbw_alpha=vec2), Ac, Bc))
    for comp, m in rp.modules.items():
        other = dict(full.modules[comp].named_parameters())
        assert all(torch.equal(p, other[n]) for n, p in m.named_parameters()), comp
    stats = rp.swap(plan_merge(Recipe("a", "b", mbw_alpha=vec2, calcmode="normal", mode="weight_sum"),
                               Ac, tiny("sd1", 3)))             # another model: everything again
    assert stats.keys == len(Ac.tensors)


def test_lora_axis(ws):
    ax = parse_axis("lora", "demo-sd1-tiny-lora:0.5\ndemo-sd1-tiny-lora:1.5:OUTALL", "X", "sd1", "weight_sum")
    assert ax.values == ["demo-sd1-tiny-lora:0.5", "demo-sd1-tiny-lora:1.5:OUTALL"]
    with pytest.raises(MergeError, match="LoRA weight"):
        parse_axis("lora", "x:heavy", "X", "sd1", "weight_sum")
    res = run(ws, prepare(ws, spec(ws, x=("lora", "demo-sd1-tiny-lora:0.5\ndemo-sd1-tiny-lora:1.5"))))
    assert res.cells_done == 2
    assert [json.loads(r["recipe"])["loras"] for r in ws.history.rows()] == ["demo-sd1-tiny-lora:0.5", "demo-sd1-tiny-lora:1.5"]
