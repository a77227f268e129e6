"""Scale-out on Ray (issue 15), on a 2-worker local Ray instance with the tiny demo models:
a dispatched plot equals the in-process plot pixel for pixel; a worker killed mid-plot has its
cell re-run and every cell lands once in the grid and the history; Stop keeps the finished cells;
a search runs its trials on the workers; shipped model files reach workers that cannot see the
model folder; a worker that cannot start is reported.

The tests that start their own Ray instance (and check that it is shut down) come first. The
others share one local instance (``local_ray``: each start and shutdown took 5-6 s here), on
which their pools start without stopping it; the module's shared pool (``cluster``) is started by
the first test that asks for it."""
from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from merger.errors import MergeError
from merger.pipeline.generate import GenParams
from merger.sweeps.dispatch import (Pool, PoolSettings, _contiguous_runs, clean_mirror, ray_init_options,
                                    start_pool)
from merger.sweeps.xyz_run import PlotSpec, prepare, run

ray = pytest.importorskip("ray")

A, B = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors"
GEN = GenParams(prompt="a cat", steps=2, width=64, height=64, seed=3)


def make_ws(root: Path):
    from tests.conftest import demo_models
    from merger.files.model_dirs import ModelDirs
    from merger.workstation import Workstation
    from mergehistory import MergeHistory
    dirs = ModelDirs.from_models_dir(root / "models")
    demo_models(dirs)
    return Workstation(dirs, device="cpu", dtype=torch.float32, outputs=root / "out",
                       history=MergeHistory(root / "history.csv"))


def plot(ws, x=("alpha", "0.2,0.5,0.8"), y=("seed", "1,2")):
    return prepare(ws, PlotSpec(ws.recipe(A, B), replace(GEN), {"X": x, "Y": y, "Z": ("none", "")}))


def pixels(path) -> bytes:
    from PIL import Image
    return Image.open(path).convert("RGB").tobytes()


def without_id(path) -> str:
    from merger.pipeline.pnginfo import read_png_info
    return re.sub(r", Merge ID: \d+", "", read_png_info(path)["parameters"])


def test_runs_are_contiguous_and_cover_every_task():
    assert _contiguous_runs(7, 2) == [range(0, 4), range(4, 7)]
    assert sum(map(len, _contiguous_runs(3, 4))) == 3
    assert sorted(i for r in _contiguous_runs(26, 3) for i in r) == list(range(26))


def test_a_worker_that_cannot_start_is_reported(tmp_path):
    from merger.files.model_dirs import ModelDirs
    missing = ModelDirs(tmp_path / "nowhere", tmp_path / "l", tmp_path / "v")
    with pytest.raises(MergeError, match=r"could not start: .*model folder .*nowhere is not visible"):
        Pool.start(PoolSettings(workers=1), missing)
    assert not ray.is_initialized()          # the pool it started was shut down


def test_cli_plot_and_dice_on_workers(tmp_path, capsys, monkeypatch):
    from merger.cli import main
    ws = make_ws(tmp_path)
    monkeypatch.setenv("SDMW_DATA_DIR", str(tmp_path / "data"))
    common = ["--models-dir", str(tmp_path / "models"), "--model-a", A, "--model-b", B, "--steps", "2",
              "--size", "64", "--quiet", "--device", "cpu"]
    assert main(["xyz", *common, "--x", "alpha", "0.2,0.8", "--y", "seed", "1,2", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "4/4 cells (merges #1-#4)" in out and not ray.is_initialized()
    grid = Path(out.strip().splitlines()[-1].strip())
    assert grid.is_file() and len(list(grid.parent.glob("cell-*.png"))) == 4
    assert main(["dice", *common, "--rolls", "3", "--dice-seed", "7"]) == 0
    assert "3/3 cells (merges #5-#7)" in capsys.readouterr().out
    from mergehistory import MergeHistory
    rows = MergeHistory(tmp_path / "data" / "mergehistory.csv").rows()
    assert [r["source"] for r in rows] == ["xyz"] * 4 + ["dice"] * 3
    assert main(["xyz", *common, "--x", "alpha", "0.5", "--workers", "0", "--ray-address", "auto"]) == 1
    assert "could not start or join Ray" in capsys.readouterr().err
    del ws


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance, started as a pool starts it, for the rest of the module."""
    assert not ray.is_initialized()
    ray.init(**ray_init_options(PoolSettings(workers=2)))
    yield ray
    ray.shutdown()


def close(pool, ws) -> None:
    """Close a pool on the shared instance (which stays up) and wait until its actors' CPUs are
    free again (``ray.kill`` returns before they are), for the next pool's resource check."""
    pool.close()
    ws.pool = None
    assert ray.is_initialized()
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < deadline, "the closed pool's actors still hold their CPUs"
        time.sleep(0.05)


def test_a_gpu_pool_on_a_cluster_without_gpus_is_refused(tmp_path, local_ray):
    from merger.files.model_dirs import ModelDirs
    missing = ModelDirs(tmp_path / "nowhere", tmp_path / "l", tmp_path / "v")
    with pytest.raises(MergeError, match="1 GPU workers asked for, the Ray cluster has 0"):
        Pool.start(PoolSettings(workers=1, device="cuda"), missing)
    assert ray.is_initialized()              # a Ray instance the pool joined is not the pool's to stop


def test_shipped_models_reach_workers_that_cannot_see_the_folder(tmp_path, local_ray):
    """--ship-models: the workers read the checkpoints from the object store into their node's
    mirror folder (here the same machine, but a folder the workers do not share with the app)."""
    clean_mirror()
    ws = make_ws(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the in-process run uses the workers' thread count, as the other tests here:
    try:                              # on a Zen 3 a U-Net step on 2 threads differs in the last bits
        local = run(ws, plot(ws, x=("alpha", "0.3,0.7"), y=("none", "")))
        pool = start_pool(ws, 2, ship_models=True)
        try:
            shipped = run(ws, plot(ws, x=("alpha", "0.3,0.7"), y=("none", "")))
        finally:
            close(pool, ws)
    finally:
        torch.set_num_threads(threads)
    mirror = Path(tempfile.gettempdir()) / "sdmw-shipped" / "ckpt"
    assert sorted(p.name for p in mirror.iterdir()) == [A, B]
    assert [pixels(p) for p, _, _ in shipped.cells] == [pixels(p) for p, _, _ in local.cells]
    clean_mirror()


def test_flux_cells_on_workers_equal_in_process(tmp_path, local_ray):
    """A Flux plot on 2 workers: each worker gets the app's T5 tokenizer folder (--t5-tokenizer) and
    renders the in-process pictures."""
    import safetensors.torch as st

    from merger.synthetic import random_checkpoint
    from tests.test_flux_pipeline import tiny_t5_tokenizer
    ws = make_ws(tmp_path)
    for name, seed in (("fa.safetensors", 1), ("fb.safetensors", 2)):
        st.save_file(random_checkpoint("flux", seed=seed, dtype=torch.bfloat16), str(ws.dirs.ckpt / name))
    ws.pipeline.t5_tokenizer = tiny_t5_tokenizer(tmp_path / "t5")
    gen = GenParams(prompt="a photo of a cat", steps=2, width=64, height=64, seed=3, cfg=3.5)
    spec = PlotSpec(ws.recipe("fa.safetensors", "fb.safetensors"), gen,
                    {"X": ("alpha", "0.2,0.8"), "Y": ("none", ""), "Z": ("none", "")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run(ws, prepare(ws, spec))
        pool = start_pool(ws, 2)
        try:
            remote = run(ws, prepare(ws, spec))
        finally:
            close(pool, ws)
    finally:
        torch.set_num_threads(threads)
    assert remote.cells_done == 2
    # the same merges and seeds: the same pictures. (Flux on the CPU was bit-identical across
    # processes here when run alone but not always within the whole suite, cause not found; SD
    # plots are compared bit for bit above. Allowed here: a few levels on a few pixels.)
    for (p1, _, _), (p2, _, _) in zip(local.cells, remote.cells):
        a, b = (torch.frombuffer(bytearray(pixels(p)), dtype=torch.uint8).float() for p in (p1, p2))
        assert (a - b).abs().max() <= 8 and (a - b).abs().mean() < 0.5, ((a - b).abs().max(), (a - b).abs().mean())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, local_ray):
    ws = make_ws(tmp_path_factory.mktemp("dispatch"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # the in-process runs use the workers' thread count
    pool = start_pool(ws, 2)
    ws.pool = None
    yield ws, pool
    close(pool, ws)
    torch.set_num_threads(threads)


@pytest.fixture
def ws(cluster, tmp_path):
    from mergehistory import MergeHistory
    ws, pool = cluster
    ws.history = MergeHistory(tmp_path / "history.csv")
    ws.pool = None
    pool.on_dispatch = None
    yield ws
    ws.pool = None
    pool.on_dispatch = None


def test_two_workers_give_the_in_process_images(ws, cluster):
    local = run(ws, plot(ws))
    ws.pool = cluster[1]
    remote = run(ws, plot(ws))
    assert remote.cells_done == local.cells_done == 6 and not remote.stopped
    assert [pixels(p) for p, _, _ in remote.cells] == [pixels(p) for p, _, _ in local.cells]
    assert [without_id(p) for p, _, _ in remote.cells] == [without_id(p) for p, _, _ in local.cells]
    rows = ws.history.rows()
    ids = [int(r["id"]) for r in rows]
    assert len(rows) == 12 and ids == sorted(ids) and len(set(ids)) == 12
    recipes = [json.loads(r["recipe"]) for r in rows]
    assert recipes[6:] == recipes[:6] and {r["source"] for r in rows} == {"xyz"}
    from merger.pipeline.pnginfo import read_png_info
    # each cell's PNG carries its own merge ID and recipe, written by the app
    for (path, hid, _), r in zip(remote.cells, rows[6:]):
        info = read_png_info(path)
        assert hid == int(r["id"]) and info["sdmw_merge_id"] == str(hid) and f"Merge ID: {hid}" in info["parameters"]
    assert len(remote.grids) == 1 and pixels(remote.grids[0]) == pixels(local.grids[0])


def test_a_worker_killed_mid_plot_has_its_cell_rerun(ws, cluster):
    pool = cluster[1]
    victim = pool.pids()[0]
    killed = []

    def kill_once(slot, index):
        if slot == 0 and index == 1 and not killed:      # worker 0's second cell: its process dies
            os.kill(victim, signal.SIGKILL)
            killed.append(index)
    before = pool.replaced
    local = run(ws, plot(ws))
    ws.history = type(ws.history)(Path(str(ws.history.path) + ".2"))
    ws.pool, pool.on_dispatch = pool, kill_once
    res = run(ws, plot(ws))
    assert killed == [1] and pool.replaced == before + 1 and victim not in pool.pids()
    assert res.cells_done == 6 and not res.stopped
    rows = ws.history.rows()
    assert [json.loads(r["recipe"])["alpha"] for r in rows] == [0.2, 0.5, 0.8] * 2     # each cell once, in order
    assert len({r["id"] for r in rows}) == 6
    assert [pixels(p) for p, _, _ in res.cells] == [pixels(p) for p, _, _ in local.cells]


def test_stop_keeps_the_finished_cells_and_the_pool_works_on(ws, cluster):
    ws.pool = cluster[1]
    prep = plot(ws, x=("alpha", "0.1,0.2,0.3,0.4,0.5,0.6"), y=("none", ""))
    res = run(ws, prep, on_cell=lambda grids: ws.stop())
    assert res.stopped and 1 <= res.cells_done < 6 and len(res.grids) == 1
    rows = ws.history.rows()
    assert len(rows) == res.cells_done == len(res.cells)
    assert all(p.exists() for p, _, _ in res.cells)
    again = run(ws, plot(ws, x=("alpha", "0.9"), y=("none", "")))
    assert again.cells_done == 1 and not again.stopped


def test_a_cell_error_is_reported_as_the_workers_message(ws, cluster):
    ws.pool = cluster[1]
    prep = plot(ws, x=("alpha", "0.2,0.4"), y=("none", ""))
    (ws.dirs.ckpt / B).rename(ws.dirs.ckpt / "moved.safetensors")
    try:
        with pytest.raises(MergeError, match="not found|no such|does not exist|missing"):
            run(ws, prep)
    finally:
        (ws.dirs.ckpt / "moved.safetensors").rename(ws.dirs.ckpt / B)


def test_a_search_runs_its_trials_on_the_workers(ws, cluster, tmp_path):
    from merger.sweeps.search import Search, SearchSpace, SearchSpec
    ws.merge(ws.recipe(A, B, alpha=0.7))
    ref = ws.generate(replace(GEN, seed=1), save=False).result.images[0].image
    spec = SearchSpec(ws.recipe(A, B), SearchSpace(global_alpha=True), GEN, prompts=["a cat"], seeds=[1, 2],
                      objective="like", sampler="random", trials=4, seed=0, references=[ref], study="ray")
    ws.pool = cluster[1]
    s = Search(ws, spec, f"sqlite:///{tmp_path / 's.db'}")
    trials = s.run()
    assert len(trials) == 4 and len(s.finished()) == 4 and all(len(t.images) == 2 for t in trials)
    rows = [r for r in ws.history.rows() if r["source"] == "search"]
    assert sorted(int(r["id"]) for r in rows) == sorted(t.merge_id for t in trials)
    top = max(trials, key=lambda t: t.score)
    assert s.best().number == top.number
    # the same trial rendered in-process gives the same images (the workers' images are the app's)
    ws.pool = None
    again = s.render(top.number, top.params)
    assert [a.tobytes() for a in again.images] == [b.tobytes() for b in top.images]


def test_dice_rolls_and_reservations_run_on_the_workers(ws, cluster, tmp_path):
    from merger.sweeps.dice import DiceSettings
    from merger.sweeps.reservations import ReservationQueue
    dice = DiceSettings(template_alpha="ALL_R", seed=11, digits=3)
    spec = PlotSpec(ws.recipe(A, B), replace(GEN), {"X": ("random", "3"), "Y": ("none", ""), "Z": ("none", "")}, dice)
    local = run(ws, prepare(ws, spec))
    ws.pool = cluster[1]
    remote = run(ws, prepare(ws, spec))
    assert [pixels(p) for p, _, _ in remote.cells] == [pixels(p) for p, _, _ in local.cells]
    rows = ws.history.rows()
    assert [r["source"] for r in rows] == ["dice"] * 6
    assert [json.loads(r["recipe"])["mbw_alpha"] for r in rows[3:]] == [json.loads(r["recipe"])["mbw_alpha"]
                                                                        for r in rows[:3]]
    q = ReservationQueue(tmp_path / "q.json")
    q.add(PlotSpec(ws.recipe(A, B), replace(GEN), {"X": ("alpha", "0.1,0.9|0.4"), "Y": ("none", ""),
                                                   "Z": ("none", "")}))
    assert q.run_waiting(ws) == 2
    assert [e["status"] for e in q.rows()] == ["finished", "finished"] and len(ws.history.rows()) == 9
