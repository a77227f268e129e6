"""The review loop's engine side (issue 11): axes that cannot change a plot are refused, dice
cells are labelled with what was rolled, grid labels wrap instead of being cut."""
import pytest
from PIL import ImageFont

from merger.errors import MergeError
from merger.pipeline.generate import GenParams
from merger.sweeps.xyz import Axis, grid_image, wrap_label
from merger.sweeps.xyz_run import PlotSpec, prepare

A, B, C = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", "demo-sd1-tiny-C.safetensors"
GEN = GenParams(prompt="cat", steps=1, width=64, height=64, seed=3)


def _spec(ws, x, y=("none", ""), **recipe):
    return PlotSpec(ws.recipe(A, B, recipe.pop("c", ""), **recipe), GEN, {"X": x, "Y": y, "Z": ("none", "")})


@pytest.mark.parametrize("x, y, recipe, why", [
    (("alpha", "0.1,0.5,0.9"), ("none", ""), {"mbw_alpha": [0.5] * 26}, "X axis (alpha) cannot change the result: "
                                                                       "an MBW alpha vector is set"),
    (("mbw", "GRAD_V\nGRAD_A"), ("alpha", "0.1,0.9"), {}, "Y axis (alpha) cannot change the result: an MBW alpha"),
    (("beta", "0.1,0.9"), ("none", ""), {}, "weight_sum with calcmode normal does not use beta"),
    (("model_C", f"{B},{C}"), ("none", ""), {}, "weight_sum does not use model C"),
    (("model_B", f"{B},{C}"), ("none", ""), {"calcmode": "self"}, "calcmode self does not use model B"),
    (("seed", "5,5"), ("alpha", "0.2,0.8"), {}, "X axis (seed) cannot change the result: every value gives the same"),
])
def test_an_axis_that_cannot_change_the_plot_is_refused_before_running(demo_ws, x, y, recipe, why):
    with pytest.raises(MergeError, match=why.replace("(", r"\(").replace(")", r"\)")):
        prepare(demo_ws, _spec(demo_ws, x, y, **recipe))
    assert len(demo_ws.history) == 0


@pytest.mark.parametrize("x, y, recipe", [
    (("alpha", "0.1,0.9"), ("none", ""), {}),
    (("beta", "0.1,0.9"), ("none", ""), {"mode": "triple_sum", "c": C}),
    (("alpha", "0.1,0.9"), ("pinpoint blocks", "IN01, OUT11"), {"mbw_alpha": [0.5] * 26}),   # pinpoint sets blocks
    (("model_C", f"{B},{C}"), ("none", ""), {"mode": "add_difference", "c": C}),
    (("seed", "1,2"), ("prompt", "cat\ndog"), {}),
])
def test_axes_that_matter_are_accepted(demo_ws, x, y, recipe):
    assert prepare(demo_ws, _spec(demo_ws, x, y, **recipe)).cells


def test_dice_cells_are_labelled_with_what_was_rolled(demo_ws):
    from merger.sweeps.dice import DiceSettings
    spec = _spec(demo_ws, ("random", "2"))
    spec.dice = DiceSettings(template_alpha="ALL_R", seed=11)
    prep = prepare(demo_ws, spec)
    labels = prep.axes["X"].labels
    assert [lb.split(" α ")[0] for lb in labels] == ["roll 1", "roll 2"]
    for label, cell in zip(labels, prep.cells):
        shown = [float(v) for v in label.split(" α ")[1].split()]
        assert shown == cell.recipe.mbw_alpha and len(shown) == 26


def test_labels_wrap_to_the_cell_instead_of_being_cut():
    font = ImageFont.load_default(size=12)
    text = "roll 1 α " + " ".join(["0.25"] * 26)
    lines = wrap_label(text, font, 120, 10)
    assert len(lines) > 1 and all(font.getlength(s) <= 120 for s in lines)
    assert " ".join(lines) == text
    assert wrap_label("x" * 200, font, 50, 3)[-1].endswith("…")
    from PIL import Image
    im = Image.new("RGB", (64, 64), "red")
    one = grid_image([im, im], Axis("alpha", [1, 2], ["a", "b"]), Axis())
    tall = grid_image([im, im], Axis("random", [0, 1], [text, text]), Axis("seed", [1], ["a long row label " * 3]))
    assert tall.height > one.height and tall.width > one.width     # room for the wrapped labels
