"""N-model methods through the app: CLI, workstation merge + history recall, XYZ axes and dice."""
import pytest
import safetensors.torch as st
import torch

from merger.sweeps.dice import DiceSettings
from merger.engine import merge
from merger.errors import MergeError
from merger.files.checkpoint_io import load_checkpoint
from merger.pipeline.generate import GenParams
from merger.recipe import Recipe
from merger.sweeps.xyz_run import PlotSpec, prepare, run
from mergehistory import MergeHistory
from tests.forked_cli import run_module

A, B, C = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", "demo-sd1-tiny-C.safetensors"
GEN = GenParams(prompt="cat", steps=1, width=64, height=64, seed=3)


def cli(*args):
    return run_module("merger", *args)


def test_cli_method_merge_matches_engine_and_history(models, tmp_path):
    out, hist = tmp_path / "ties.safetensors", tmp_path / "h.csv"
    r = cli("merge", "--method", "ties", "--base", models["a"], "--models", models["b"], models["c"],
            "--weights", "1", "0.5", "--alpha", "0.8", "--density", "0.3", "--mbw-alpha", "GRAD_V",
            "--output", out, "--history", hist, "--quiet")
    assert r.returncode == 0, r.stderr
    row = MergeHistory(hist).get(-1)
    recipe = Recipe.from_line(row["recipe"])
    assert (recipe.method, recipe.density, recipe.weights, recipe.sign) == ("ties", 0.3, [1.0, 0.5], "sum")
    assert recipe.models == ["model_b.safetensors", "model_c.safetensors"] and len(recipe.model_hashes[1]) == 10
    assert row["mode"] == "ties" and row["model_b"] == "model_b.safetensors + model_c.safetensors"
    m = {s: load_checkpoint(p) for s, p in models.items()}
    want = merge(recipe, m["a"], models=[m["b"], m["c"]]).tensors
    got = st.load_file(str(out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_cli_bar_names_the_step_before_the_first_key(models, tmp_path):
    """TIES computes every key's thresholds before the first key is merged: the console bar
    says so instead of standing still at 'merging'."""
    r = cli("merge", "--method", "ties", "--base", models["a"], "--models", models["b"], models["c"],
            "--output", tmp_path / "t.safetensors", "--no-history")
    assert r.returncode == 0, r.stderr
    bar = r.stderr.replace("\r", "\n")
    assert "ties: preparing" in bar and "merging: 100%" in bar, bar[-500:]
    assert bar.index("ties: preparing") < bar.index("merging: 100%")


def test_cli_random_method_is_repeatable_by_seed(models, tmp_path):
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"dare{i}.safetensors")
        r = cli("merge", "--method", "dare_ties", "--base", models["a"], "--models", models["b"], models["c"],
                "--drop", "0.5", "--seed", "77", "--output", outs[-1], "--no-history", "--quiet")
        assert r.returncode == 0, r.stderr
    a, b = st.load_file(str(outs[0])), st.load_file(str(outs[1]))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,msg", [
    (["--method", "ties", "--models", "B", "--mode", "weight_sum"], "do not apply"),
    (["--mode", "weight_sum", "--model-b", "B", "--models", "B"], "--models needs --method"),
    (["--method", "ties", "--models", "B", "C", "--weights", "1"], "2 finite numbers"),
    (["--method", "ties", "--models"] + ["B"] * 9, "1 to 8 models"),
    (["--method", "dare_linear", "--models", "B", "--drop", "2"], "drop must be between 0 and 1"),
])
def test_cli_method_bad_input_one_line(models, tmp_path, extra, msg):
    extra = [str(models["b"]) if e == "B" else str(models["c"]) if e == "C" else e for e in extra]
    out = tmp_path / "o.safetensors"
    r = cli("merge", "--base", models["a"], *extra, "--output", out, "--no-history", "--quiet")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_workstation_merge_recall_and_save(demo_ws):
    ws = demo_ws
    recipe = ws.recipe(A, models=[B, C], method="dare_linear", alpha=0.6, drop=0.3)
    outcome = ws.merge(recipe)
    assert outcome.history_id == 1
    row = ws.history.get(1)
    again = Recipe.from_line(row["recipe"])
    assert again == recipe and again.seed >= 0
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    held = ws.pipeline.state_dict()[key]
    saved = ws.save_recipe(again, "recalled.safetensors")
    got = st.load_file(str(saved.path))
    torch.testing.assert_close(got[key].float(), held.float(), rtol=0, atol=1e-3)   # fp16 file vs fp32 pipeline
    ck = {n: load_checkpoint(ws.dirs.resolve("ckpt", n)) for n in (A, B, C)}
    want = merge(again, ck[A], models=[ck[B], ck[C]]).tensors
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_workstation_ties_alpha_change_reuses_thresholds(demo_ws, monkeypatch):
    """In the resident workstation, a TIES re-merge that changes only α keeps the thresholds of
    the loaded models (the demo models' token embedding takes the fused path); the pipeline then
    holds exactly the merge computed from freshly loaded files."""
    import merger.engine.methods.ties as ties_mod
    counted = []
    real = ties_mod.input_thresholds
    monkeypatch.setattr(ties_mod, "input_thresholds", lambda *a, **k: counted.append(1) or real(*a, **k))
    ws = demo_ws
    ws.merge(ws.recipe(A, models=[B, C], method="ties", alpha=1.0, density=0.3))
    first = len(counted)
    recipe = ws.recipe(A, models=[B, C], method="ties", alpha=0.45, density=0.3)
    ws.merge(recipe)
    assert first >= 1 and len(counted) == first
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    ck = {n: load_checkpoint(ws.dirs.resolve("ckpt", n)) for n in (A, B, C)}
    want = merge(recipe, ck[A], models=[ck[B], ck[C]]).tensors[key]
    held = {k: v for k, v in ws.pipeline.state_dict().items() if k == key}
    assert held and torch.equal(held[key].to(want.dtype), want)


def test_changed_model_file_refused_on_recall(demo_ws):
    recipe = demo_ws.recipe(A, models=[B, C], method="ties")
    recipe.model_hashes[1] = "0000000000"
    with pytest.raises(MergeError, match="has changed since this merge was recorded"):
        demo_ws.merge(recipe)


def _spec(ws, x, y=("none", ""), **recipe):
    return PlotSpec(ws.recipe(A, models=[B, C], **recipe), GEN, {"X": x, "Y": y, "Z": ("none", "")})


def test_xyz_method_and_density_axes(demo_ws):
    prep = prepare(demo_ws, _spec(demo_ws, ("method", "ties, dare_ties"), ("density", "0.2, 0.8"), method="ties"))
    cells = prep.cells
    assert [(c.recipe.method, c.recipe.density) for c in cells] == [
        ("ties", 0.2), ("dare_ties", 0.2), ("ties", 0.8), ("dare_ties", 0.8)]
    assert len({c.recipe.seed for c in cells}) == 1          # one seed for the whole plot
    assert all(c.recipe.models == [B, C] and len(c.recipe.model_hashes) == 2 for c in cells)
    result = run(demo_ws, prep)
    assert result.cells_done == 4 and len(result.history_ids) == 4
    rows = [Recipe.from_line(demo_ws.history.get(i)["recipe"]) for i in result.history_ids]
    assert [r.method for r in rows] == ["ties", "dare_ties", "ties", "dare_ties"]


@pytest.mark.parametrize("x, recipe, why", [
    (("density", "0.2,0.8"), {"method": "model_stock"}, "method model_stock does not use density"),
    (("drop", "0.2,0.8"), {"method": "ties"}, "method ties does not use drop"),
    (("density", "0.2,0.8"), {"method": "ties", "mbw_beta": [0.3] * 26}, "replaces density in every block"),
])
def test_xyz_axes_a_method_ignores_are_refused(demo_ws, x, recipe, why):
    with pytest.raises(MergeError, match=why):
        prepare(demo_ws, _spec(demo_ws, x, **recipe))


def test_xyz_method_axis_needs_models(demo_ws):
    spec = PlotSpec(demo_ws.recipe(A, B), GEN, {"X": ("method", "ties,della"), "Y": ("none", ""), "Z": ("none", "")})
    with pytest.raises(MergeError, match="needs the method's models"):
        prepare(demo_ws, spec)


def test_dice_rolls_a_method_and_keep_its_seed(demo_ws):
    spec = _spec(demo_ws, ("random", "2"), method="dare_ties", seed=42)
    spec.dice = DiceSettings(template_alpha="ALL_R", seed=11)
    prep = prepare(demo_ws, spec)
    assert [c.recipe.seed for c in prep.cells] == [42, 42]
    assert prep.cells[0].recipe.mbw_alpha != prep.cells[1].recipe.mbw_alpha
    assert all(c.recipe.method == "dare_ties" for c in prep.cells)
