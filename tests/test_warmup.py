"""Models picked in the Merge tab are loaded and scanned in the background before Merge is pressed
(merger/files/warmup.py): once each, confined to the models' folder, cancelled by Clear cache."""
import os
import shutil
import sys
import threading

import pytest
import torch
from PIL import Image

import merger.engine.tensor_ops as tensor_ops
import merger.files.model_cache as model_cache
import merger.files.warmup as warmup
from merger.errors import MergeError

A, B, C = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", "demo-sd1-tiny-C.safetensors"


def float_tensors(ws, *names):
    return sum(t.is_floating_point() and t.numel() > 0 for n in names
               for t in ws.cache.get(ws.dirs.resolve("ckpt", n)).tensors.values())


class Calls:
    """Wraps a function: counts calls by thread name; with ``gate``, the first call waits for
    ``release`` (after setting ``entered``)."""

    def __init__(self, fn, gate: bool = False):
        self.fn, self.gate = fn, gate
        self.by_thread: dict[str, int] = {}
        self.entered, self.release = threading.Event(), threading.Event()
        self.lock = threading.Lock()

    def __call__(self, *a, **k):
        with self.lock:
            name = threading.current_thread().name
            self.by_thread[name] = self.by_thread.get(name, 0) + 1
            first = sum(self.by_thread.values()) == 1
        if self.gate and first:
            self.entered.set()
            assert self.release.wait(20)
        return self.fn(*a, **k)

    @property
    def total(self) -> int:
        return sum(self.by_thread.values())


@pytest.fixture
def scans(monkeypatch):
    calls = Calls(tensor_ops.finite_top)
    monkeypatch.setattr(tensor_ops, "finite_top", calls)    # value_stats imports it at each call
    return calls


@pytest.fixture
def loads(monkeypatch):
    calls = Calls(model_cache.load_checkpoint)
    monkeypatch.setattr(model_cache, "load_checkpoint", calls)
    return calls


@pytest.mark.parametrize("pick, read", [
    (dict(model_a=A, model_b=B, model_c=C), (A, B)),                                   # weight sum: no C
    (dict(model_a=A, model_b=B, model_c=C, mode="add_difference"), (A, B, C)),
    (dict(model_a=A, model_b=B, models=[B, C], method="ties"), (A, B, C)),               # a method: base + models
    (dict(model_a=A, model_b=A, model_c=""), (A,)),                                     # read once
])
def test_the_models_a_merge_would_read_are_loaded_and_scanned_before_it(demo_ws, scans, loads, pick, read):
    ws = demo_ws
    files = ws.warm(**pick)
    assert files == tuple(ws.dirs.resolve("ckpt", n) for n in read)
    assert ws.warmer.wait(30)
    assert set(loads.by_thread) == {"model-warm-up"} and loads.total == len(read)
    assert set(scans.by_thread) == {"model-warm-up"}
    assert scans.total == float_tensors(ws, *read)
    assert len(ws.cache) == len(read)
    before = scans.total, loads.total
    recipe = ws.recipe(pick["model_a"], pick["model_b"], pick.get("model_c", ""), pick.get("models", ()),
                       mode=pick.get("mode", "weight_sum"), method=pick.get("method", ""), alpha=0.3)
    assert ws.merge(recipe).history_id == 1
    assert (scans.total, loads.total) == before          # the merge found them loaded and scanned


def test_a_merge_during_the_warm_up_waits_for_its_scan_instead_of_scanning_again(demo_ws, monkeypatch, loads):
    ws = demo_ws
    scans = Calls(tensor_ops.finite_top, gate=True)
    monkeypatch.setattr(tensor_ops, "finite_top", scans)
    ws.warm(A, B)
    assert scans.entered.wait(30)                          # the warm-up is inside A's scan
    done: list = []
    merging = threading.Thread(target=lambda: done.append(ws.merge(ws.recipe(A, B, alpha=0.4))), name="merge")
    merging.start()
    merging.join(0.5)
    assert merging.is_alive() and not done                 # waiting for A's scan, not scanning it again
    scans.release.set()
    merging.join(30)
    assert ws.warmer.wait(30)
    assert done and done[0].history_id == 1
    assert scans.total == float_tensors(ws, A, B)          # every tensor scanned once, by one thread or the other
    assert loads.total == 2                                # and each file loaded once
    want = ws.recipe(A, B, alpha=0.4)
    assert ws.history.recipe(1) == want


def test_names_outside_the_models_folder_are_never_opened(demo_ws, loads, tmp_path):
    ws = demo_ws
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(ws.dirs.resolve("ckpt", A), outside)
    for name in ("../outside.safetensors", str(outside), "missing.safetensors", "../../etc/passwd"):
        assert ws.warm(name, name) == ()
    assert ws.warmer.wait(30)
    assert loads.total == 0 and len(ws.cache) == 0


@pytest.mark.parametrize("gated", ["load", "scan"])
def test_clear_cache_during_a_warm_up_leaves_the_cache_empty(demo_ws, monkeypatch, gated):
    """Clear cache while the warm-up loads A (it must not put A back afterwards) or scans A (B,
    still to come, is not loaded)."""
    ws = demo_ws
    target = (model_cache, "load_checkpoint") if gated == "load" else (tensor_ops, "finite_top")
    calls = Calls(getattr(*target), gate=True)
    monkeypatch.setattr(*target, calls)
    ws.warm(A, B)
    assert calls.entered.wait(30)
    assert ws.clear_cache().startswith("cleared")
    calls.release.set()
    assert ws.warmer.wait(30)
    assert len(ws.cache) == 0


def test_a_newer_pick_replaces_the_rest_of_the_running_one(demo_ws, monkeypatch, loads):
    ws = demo_ws
    scans = Calls(tensor_ops.finite_top, gate=True)
    monkeypatch.setattr(tensor_ops, "finite_top", scans)
    ws.warm(A, B)
    assert scans.entered.wait(30)
    ws.warm(C)                                             # picked while A is being read
    scans.release.set()
    assert ws.warmer.wait(30)
    assert ws.dirs.resolve("ckpt", B) not in ws.cache
    assert ws.dirs.resolve("ckpt", C) in ws.cache
    assert scans.total == float_tensors(ws, A, C)
    ws.warm(B)                                             # a later pick starts a new warm-up thread
    assert ws.warmer.wait(30) and ws.dirs.resolve("ckpt", B) in ws.cache


def test_a_broken_file_is_skipped_and_the_merge_reports_it(demo_ws, scans):
    ws = demo_ws
    (ws.dirs.ckpt / "broken.safetensors").write_bytes(b"\x09\x00\x00\x00\x00\x00\x00\x00{not json")
    ws.warm("broken.safetensors", A)
    assert ws.warmer.wait(30)
    assert ws.dirs.resolve("ckpt", A) in ws.cache and scans.total == float_tensors(ws, A)
    with pytest.raises(MergeError, match="broken.safetensors is corrupt"):
        ws.merge(ws.recipe("broken.safetensors", A, alpha=0.5))


def test_the_warm_up_runs_below_the_others_and_leaves_their_thread_counts_alone(demo_ws, monkeypatch):
    """One torch thread and (Linux) nice 10 in the warm-up thread only."""
    seen: list = []

    def scan(t):
        seen.append((torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, 0)))
        return real(t)
    real = tensor_ops.finite_top
    monkeypatch.setattr(tensor_ops, "finite_top", scan)
    before = torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, 0)
    demo_ws.warm(A, B)
    assert demo_ws.warmer.wait(30)
    assert set(seen) == {(1, min(19, before[1] + warmup.NICE))} or not sys.platform.startswith("linux")
    assert (torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, 0)) == before


def _listeners(demo, component, event):
    return [f for f in demo.fns.values() if (component._id, event) in [(t[0], t[1]) for t in f.targets]]


def test_the_merge_tab_warms_what_is_picked_loaded_or_dropped(demo_ws, monkeypatch):
    """The Merge tab's model, mode, method and density pickers start the warm-up of the complete
    settings on input (of the picked models alone while the settings are incomplete); Load
    settings and a dropped PNG warm the recipe's models."""
    from ui import forms
    from ui.app_ui import build_ui
    ws = demo_ws
    asked: list = []
    monkeypatch.setattr(ws, "warm", lambda *a: asked.append(a))
    monkeypatch.setattr(ws, "warm_recipe", lambda r: asked.append(("recipe", r)))
    demo = build_ui(ws)
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    ties = ws.recipe(A, models=[B, C], method="ties", density=0.4, alpha=0.7)
    values = dict(forms.recipe_to_widgets(ties), arch="sd1")
    unhashed = ws.recipe(A, models=[B, C], method="ties", density=0.4, alpha=0.7, hashed=False)
    assert unhashed.hash_a == "" and unhashed.model_hashes == [] and ties.hash_a
    incomplete = dict(values, alpha=None)                          # the α box emptied: no recipe yet
    (merge,) = _listeners(demo, by_id["merge"], "click")
    settings = [i._id for i in merge.inputs[:len(forms.RECIPE_KEYS)]]   # the Merge button's recipe inputs
    for elem in ("model_a", "model_b", "model_c", "method_models", "mode", "method", "method_density"):
        fns = [f for f in _listeners(demo, by_id[elem], "input") if [i._id for i in f.inputs] == settings]
        assert len(fns) == 1, elem
        asked.clear()
        fns[0].fn(*[values[k] for k in forms.RECIPE_KEYS])
        assert asked == [("recipe", unhashed)]                      # the warm-up hashes the files itself
        asked.clear()
        fns[0].fn(*[incomplete[k] for k in forms.RECIPE_KEYS])
        assert asked == [(A, "", "", [B, C], "weight_sum", "ties")]
    asked.clear()
    recipe = ws.recipe(A, B, alpha=0.2)
    ws.merge(recipe)
    (load,) = _listeners(demo, by_id["load_settings"], "click")
    out = load.fn(1, "sd1")
    assert out[0].startswith("loaded settings of merge #1") and asked == [("recipe", ws.history.recipe(1))]
    asked.clear()
    image = Image.new("RGB", (8, 8))
    image.info = {"parameters": "a cat\nSteps: 3, Seed: 1", "sdmw_recipe": recipe.to_line()}
    (dropped,) = _listeners(demo, by_id["png_in"], "upload")
    assert dropped.fn(image)[0].startswith("loaded merge") and asked == [("recipe", recipe)]



def _fresh(ws):
    from merger.workstation import Workstation
    return Workstation(ws.dirs, device="cpu", dtype=torch.float32, outputs=ws.outputs)


def _same_weights(ws1, ws2):
    one, two = ws1.pipeline.state_dict(), ws2.pipeline.state_dict()
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_a_method_s_thresholds_are_computed_in_the_background_and_the_merge_uses_them(demo_ws, monkeypatch):
    import merger.engine.methods.ties as ties
    ws = demo_ws
    calls = Calls(ties.input_thresholds)
    monkeypatch.setattr(ties, "input_thresholds", calls)
    recipe = ws.recipe(A, models=[B, C], method="ties", density=0.3, alpha=0.8, sign="count")
    reference = _fresh(ws)
    reference.merge(recipe)                     # no warm-up: the merge computes every threshold
    keys = calls.total
    assert keys > 0 and "model-warm-up" not in calls.by_thread
    calls.by_thread.clear()
    assert ws.warm_recipe(recipe) == tuple(ws.dirs.resolve("ckpt", n) for n in (A, B, C))
    assert ws.warmer.wait(60)
    assert calls.by_thread == {"model-warm-up": keys}       # all of them, on the warm-up's thread alone
    ws.merge(recipe)
    assert calls.total == keys                  # the merge found them all
    assert _same_weights(ws, reference)


def test_a_merge_takes_over_from_a_background_preparation_without_computing_anything_twice(demo_ws, monkeypatch):
    import merger.engine.methods.ties as ties
    ws = demo_ws
    recipe = ws.recipe(A, models=[B, C], method="ties", density=0.6, alpha=0.5)
    counted = Calls(ties.input_thresholds)
    monkeypatch.setattr(ties, "input_thresholds", counted)
    reference = _fresh(ws)
    reference.merge(recipe)
    keys = counted.total
    gated = Calls(ties.input_thresholds, gate=True)   # the warm-up's first key waits for the merge
    monkeypatch.setattr(ties, "input_thresholds", gated)
    ws.warm_recipe(recipe)
    assert gated.entered.wait(60)
    done: list = []
    merging = threading.Thread(target=lambda: done.append(ws.merge(recipe)), name="merge")
    merging.start()
    merging.join(0.3)
    assert merging.is_alive()                   # waiting for the warm-up to stop at its next key
    gated.release.set()
    merging.join(60)
    assert done and ws.warmer.wait(30)
    assert gated.by_thread.get("model-warm-up") == 1     # it stopped after the key it was on
    assert gated.total == keys                  # the merge computed the rest, nothing twice
    assert _same_weights(ws, reference)


def test_a_bad_method_recipe_in_the_background_is_left_to_the_merge_to_report(demo_ws):
    ws = demo_ws
    recipe = ws.recipe(A, models=[B, C], method="ties", density=0.3, alpha=0.8)
    bad = ws.recipe("demo-sdxl-tiny.safetensors", models=[B, C], method="ties", density=0.3, alpha=0.8)
    ws.warm_recipe(bad)                         # SDXL base with SD1 models: refused, quietly
    assert ws.warmer.wait(60)
    with pytest.raises(MergeError):
        ws.merge(bad)
    ws.warm_recipe(recipe)
    assert ws.warmer.wait(60)
    assert ws.merge(recipe).history_id == 1


def test_the_warm_up_hashes_the_files_and_a_second_caller_waits_for_its_hash(demo_ws, monkeypatch):
    """A1111's short hash (the sha256 of the whole file) is computed by the warm-up, once: the
    recipe made at Merge and the merge find it; a recipe made meanwhile waits for it."""
    import merger.files.checkpoint_io as checkpoint_io
    ws = demo_ws
    hashes = Calls(checkpoint_io.file_sha256, gate=True)
    monkeypatch.setattr(checkpoint_io, "file_sha256", hashes)
    ws.warm(A, B)
    assert hashes.entered.wait(30)                        # the warm-up is hashing A
    made: list = []
    recipe_thread = threading.Thread(target=lambda: made.append(ws.recipe(A, B, alpha=0.5)), name="recipe")
    recipe_thread.start()
    recipe_thread.join(0.3)
    assert recipe_thread.is_alive()                       # waiting for A's hash, not computing it again
    hashes.release.set()
    recipe_thread.join(30)
    assert ws.warmer.wait(30) and made
    assert hashes.total == 2 and hashes.by_thread["model-warm-up"] >= 1   # each file hashed once, by either
    assert ws.merge(made[0]).history_id == 1 and hashes.total == 2
    assert made[0].hash_a == checkpoint_io.file_sha256(ws.dirs.resolve("ckpt", A))[:10]
