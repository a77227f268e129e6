"""Runaway work and leftovers (issue 10): plot size limit with an estimate, bad values refused
before a plot starts, stale temp files of killed saves, and clear messages for bad widget values."""
import os
import subprocess
import sys
import time

import pytest

from merger.errors import MergeError
from merger.files.saving import SaveOptions, clean_stale_temps, save_tensors
from merger.pipeline.generate import GenParams
from merger.sweeps.xyz_run import PlotSpec, estimate, prepare, run
from ui import forms

A, B = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors"
GEN = GenParams(prompt="cat", steps=1, width=64, height=64, seed=3)


def _spec(ws, x, y=("none", ""), gen=GEN, **kw):
    return PlotSpec(ws.recipe(A, B), gen, {"X": x, "Y": y, "Z": ("none", "")}, **kw)


def test_a_plot_above_the_cell_limit_needs_confirming(demo_ws):
    ws = demo_ws
    x = ("alpha", ",".join(f"{i / 100:g}" for i in range(30)))
    y = ("seed", ",".join(str(i) for i in range(20)))
    with pytest.raises(MergeError, match=r"600 cells \(time unknown until a cell has run\), more than the limit of "
                                         r"500: tick 'allow large plots'"):
        prepare(ws, _spec(ws, x, y))
    assert len(prepare(ws, _spec(ws, x, y, allow_large=True)).cells) == 600
    ws.max_cells = 10
    with pytest.raises(MergeError, match="12 cells .* limit of 10"):
        prepare(ws, _spec(ws, ("alpha", "0.1,0.2,0.3"), ("seed", "1,2,3,4")))
    assert len(ws.history) == 0 and not (ws.outputs / "xyz").exists()


def test_the_estimate_comes_from_the_cells_already_run(demo_ws):
    ws = demo_ws
    assert estimate(ws, 100) == "time unknown until a cell has run"
    res = run(ws, prepare(ws, _spec(ws, ("alpha", "0.2,0.8"))))
    assert res.cells_done == 2 and ws.cell_seconds > 0
    ws.cell_seconds = 2.0
    assert estimate(ws, 30) == "about 60 s" and estimate(ws, 600) == "about 20 min"
    assert estimate(ws, 10_000) == "about 5.6 h"
    ws.max_cells = 1
    with pytest.raises(MergeError, match=r"2 cells \(about 4 s\)"):
        prepare(ws, _spec(ws, ("alpha", "0.2,0.8")))


@pytest.mark.parametrize("where", ["base", "axis"])
def test_a_bad_seed_is_refused_before_any_merge_folder_or_history_row(demo_ws, where):
    ws = demo_ws
    from dataclasses import replace
    spec = _spec(ws, ("alpha", "0.2,0.8"), gen=replace(GEN, seed=2**70)) if where == "base" else \
        _spec(ws, ("seed", f"1, {2**70}"))
    with pytest.raises(MergeError, match="seed must be -1 .* or a whole number from 0 to"):
        prepare(ws, spec)
    assert len(ws.history) == 0 and not (ws.outputs / "xyz").exists()


def test_widget_values_give_specific_messages(demo_ws):
    ws = demo_ws
    args = dict(arch="sd1", a=A, b=B, c=None, mode="weight_sum", calcmode="normal", alpha=0.5, beta=0.2, gamma=1.0,
                use_mbw=False, mbw_a="", mbw_b="", elemental="", inex="off", inex_text="", adjust="")
    with pytest.raises(MergeError, match="model A is not selected"):
        forms.build_recipe(ws, **{**args, "a": None})
    with pytest.raises(MergeError, match="model A is not selected"):
        forms.build_recipe(ws, **{**args, "a": ""})
    with pytest.raises(MergeError, match="adjust IN must be a number, got 'x'"):
        forms.build_recipe(ws, **{**args, "adjust": "x,y"})
    with pytest.raises(MergeError, match="adjust takes 8 values"):
        forms.adjust_values("1,2,3,4,5,6,7,8,9")
    with pytest.raises(MergeError, match="gamma must be a number, got None"):
        forms.build_recipe(ws, **{**args, "gamma": None})
    gen = ["cat", "", 20, 7.0, 2**70, 512, 512, 1, 1, 1, "Euler a"]
    with pytest.raises(MergeError, match="seed must be -1 .* from 0 to 9223372036854775807"):
        forms.gen_params(*gen)
    with pytest.raises(MergeError, match="seed must be a number, got None"):
        forms.gen_params(*gen[:4], None, *gen[5:])
    with pytest.raises(MergeError, match="seed must be a finite whole number, got 1.5"):
        forms.gen_params(*gen[:4], 1.5, *gen[5:])
    assert forms.gen_params(*gen[:4], -1, *gen[5:]).seed == -1


def test_stale_temp_files_of_killed_saves_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 60
    stale = tmp_path / f".merge.safetensors.tmp-{dead.pid}-0123abcd"
    alive = tmp_path / f".other.safetensors.tmp-{os.getppid()}-0123abcd"     # its writer still runs
    fresh = tmp_path / f".new.safetensors.tmp-{dead.pid}-89abcdef"            # written after we started
    foreign = [tmp_path / ".merge.safetensors.tmp-x", tmp_path / "merge.safetensors.tmp-1-0123abcd",
               tmp_path / "model.safetensors"]
    for p in (stale, alive, *foreign):
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    started = time.time() - 1
    fresh.write_bytes(b"x")
    assert clean_stale_temps([tmp_path, tmp_path / "missing"], started) == [stale]
    assert not stale.exists() and alive.exists() and fresh.exists() and all(p.exists() for p in foreign)


def test_a_killed_save_leaves_a_temp_that_the_next_start_removes(tmp_path, monkeypatch):
    import app
    import torch
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    code = "\n".join([
        "import os, sys, torch",
        "sys.path.insert(0, '.')",
        "from merger.files.saving import SaveOptions, save_stream",
        "def items():",
        "    yield 'a', torch.zeros(4)",
        "    os._exit(9)            # killed in the middle of the save",
        f"save_stream({str(folder / 'x.safetensors')!r}, {{'a': ((4,), torch.float32), 'b': ((4,), torch.float32)}},",
        "            items(), SaveOptions())"])
    assert subprocess.run([sys.executable, "-c", code], cwd=app.ROOT, timeout=120).returncode == 9
    left = list(folder.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".x.safetensors.tmp-")
    monkeypatch.setattr(app, "STARTED", time.time() + 1)       # the app starts after the kill
    app.make_workstation(app.parse_args(["--models-dir", str(tmp_path / "models")]))
    assert list(folder.iterdir()) == []
    assert save_tensors(tmp_path / "ok.safetensors", {"a": torch.zeros(2)}, SaveOptions()).is_file()
