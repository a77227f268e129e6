"""The command line (exact interface of the issue) and the CSV merge history."""
import csv
import multiprocessing
import re
import sys

import pytest
import safetensors.torch as st
import torch

from merger.files.checkpoint_io import load_checkpoint
from merger.engine import merge
from merger.recipe import Recipe
from mergehistory import MergeHistory
from tests.conftest import write
from tests.forked_cli import run_module
from merger.synthetic import random_checkpoint


def cli(*args, fresh=False):
    return run_module("merger", *args, fresh=fresh)


def test_cli_merge_matches_engine_and_records_history(models, tmp_path):
    """In a fresh interpreter, as the user runs it (the other CLI tests fork theirs from a helper
    that has the modules imported: ``tests/forked_cli.py``)."""
    out = tmp_path / "out.safetensors"
    hist = tmp_path / "h.csv"
    r = cli("merge", "--model-a", models["a"], "--model-b", models["b"], "--model-c", models["c"],
            "--mode", "add_difference", "--alpha", "0.6", "--mbw-alpha", "GRAD_V", "--exclude", "BASE attn2",
            "--adjust", "0,0,0,0,1,0,0,0", "--output", out, "--fp16", "--prune", "--history", hist, fresh=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    m = {s: load_checkpoint(p) for s, p in models.items()}
    row = MergeHistory(hist).get(-1)
    recipe = Recipe.from_line(row["recipe"])
    assert recipe.inex == "exclude" and recipe.inex_blocks == ["BASE"] and recipe.inex_elements == ["attn2"]
    assert row["source"] == "cli" and row["saved_to"] == str(out) and len(row["hash_a"]) == 10
    want = merge(recipe, m["a"], m["b"], m["c"]).tensors
    got = st.load_file(str(out))
    assert "model_ema.decay" not in got
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_cli_says_when_it_hashes_files_new_to_it(models, tmp_path):
    """The recipe records each model's A1111 hash, which reads a file new to the app whole: the
    command line says so before that pause, once per file."""
    def run(name, *mode):
        return cli("merge", "--model-a", models["a"], "--model-b", models["b"], "--alpha", "0.5",
                   "--output", tmp_path / name, "--history", tmp_path / "h.csv", *mode)
    first = run("one.safetensors", "--mode", "weight_sum")
    assert first.returncode == 0, first.stderr
    assert "hashing 2 model file(s) new to this app" in first.stderr
    again = run("two.safetensors", "--mode", "add_difference", "--model-c", models["c"])   # C is new
    assert again.returncode == 0 and "hashing 1 model file(s) new to this app" in again.stderr
    known = run("three.safetensors", "--mode", "weight_sum")
    assert known.returncode == 0 and "hashing" not in known.stderr
    import hashlib
    import json
    from safetensors import safe_open
    with safe_open(str(tmp_path / "two.safetensors"), "pt") as f:      # the hashes reach the file's recipe
        meta = json.loads(f.metadata()["sd_merge_recipe"])
    assert [meta[f"model_{s}"] for s in "abc"] == [hashlib.sha256(open(models[s], "rb").read()).hexdigest()[:10]
                                                   for s in "abc"]


def test_cli_folder_output_gets_automatic_name(models, tmp_path):
    r = cli("merge", "--model-a", models["a"], "--model-b", models["b"], "--mode", "weight_sum",
            "--alpha", "0.3", "--output", tmp_path, "--no-history", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("model_ax0.7+model_bx0.3.safetensors")


@pytest.mark.parametrize("extra,msg", [
    (["--mbw-alpha", "0.1,0.2"], "26 needed"),
    (["--calcmode", "cosineA", "--mode", "add_difference"], "works only with Weight sum"),
    (["--adjust", "1,2"], "--adjust needs 8 values"),
    (["--model-b", "/nonexistent.safetensors"], "file not found"),
    (["--model-b", "SDXL"], "is SD 1.x"),
])
def test_cli_bad_input_one_line_reason(models, tmp_path, extra, msg):
    xl = write(tmp_path, "xl.safetensors", random_checkpoint("sdxl", seed=1))
    extra = [str(xl) if e == "SDXL" else e for e in extra]
    base = {"--model-a": models["a"], "--model-b": models["b"], "--model-c": models["c"], "--mode": "weight_sum"}
    args = ["merge"]
    for k, v in base.items():
        if k not in extra:
            args += [k, v]
    out = tmp_path / "o.safetensors"
    r = cli(*args, *extra, "--output", out, "--no-history")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.stderr
    assert not out.exists()


def test_forked_cli_gives_what_a_fresh_interpreter_gives(models, tmp_path):
    """The test harness's forked ``python -m merger`` (``tests/forked_cli.py``) against a real
    interpreter: the same exit code and stdout for a merge, a refusal and a usage error, the same
    stderr for the last two, and for the merge the same progress-bar lines but for the speed."""
    out = tmp_path / "out"
    out.mkdir()
    cases = [["merge", "--model-a", models["a"], "--model-b", models["b"], "--mode", "weight_sum", "--alpha", "0.3",
              "--output", out / "o.safetensors", "--no-history"],
             ["merge", "--model-a", models["a"], "--model-b", models["b"], "--mode", "weight_sum",
              "--output", out / "o.safetensors", "--no-history"],              # now it exists: refused
             ["merge", "--alpha"]]
    for args in cases:
        forked = cli(*args)
        if args is cases[0]:
            (out / "o.safetensors").rename(out / "first.safetensors")
        fresh = cli(*args, fresh=True)
        assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
        if args is cases[0]:       # the bar: its first and last lines, the speed aside (how many between is timing)
            # the first of the two runs also hashed the models, new to the app then
            assert forked.stderr.startswith("hashing 2 model file(s)") and "hashing" not in fresh.stderr
            lines = [[ln for ln in r.stderr.splitlines() if not ln.startswith("hashing ")] for r in (forked, fresh)]
            bars = [[re.sub(r"[\d.]+key/s", "key/s", ls[i]) for i in (0, 1, -1)] for ls in lines]
            assert bars[0] == bars[1] and "merging: 100%" in bars[0][-1], bars
        else:
            assert forked.stderr == fresh.stderr
    assert forked.returncode == 2 and "expected one argument" in forked.stderr
    assert st.load_file(str(out / "first.safetensors")).keys() == st.load_file(str(out / "o.safetensors")).keys()


def test_cli_existing_output_refused(models, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    r = cli("merge", "--model-a", models["a"], "--model-b", models["b"], "--mode", "weight_sum",
            "--output", out, "--no-history")
    assert r.returncode == 1 and "already exists" in r.stderr and out.read_bytes() == b"x"
    assert "pass --overwrite to replace it" in r.stderr          # the CLI user is told their flag


def test_cli_elements(models):
    r = cli("elements", models["a"], "--filter", "time_embed")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 4 and "IN00" in r.stdout


# ----------------------------------------------------------------------------- history
def test_history_ids_lookup_and_search(tmp_path):
    h = MergeHistory(tmp_path / "h.csv")
    ids = [h.append(Recipe(f"m{i}.safetensors", "cat.safetensors" if i % 2 else "dog.safetensors", alpha=i / 10),
                    source="ui") for i in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    assert h.recipe(-1).alpha == 0.4 and h.recipe(-2).alpha == 0.3 and h.recipe(2).alpha == 0.1
    assert [r["id"] for r in h.search("cat")] == ["2", "4"]
    assert [r["id"] for r in h.search("m1 or m3")] == ["2", "4"]
    assert [r["id"] for r in h.search("dog and m4")] == ["5"]
    assert h.search("m1 and dog") == []
    with pytest.raises(Exception, match="no merge with ID 9"):
        h.get(9)


def _writer(path, n, tag):
    h = MergeHistory(path)
    for i in range(n):
        h.append(Recipe(f"{tag}_{i}.safetensors", "b.safetensors"), source=tag)


def test_history_concurrent_writers_and_torn_rows(tmp_path):
    path = tmp_path / "h.csv"
    procs = [multiprocessing.get_context("fork").Process(target=_writer, args=(path, 25, f"p{j}")) for j in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = MergeHistory(path).rows()
    assert sorted(int(r["id"]) for r in rows) == list(range(1, 101))
    with open(path, "a") as f:          # a crash in the middle of a row
        f.write('101,2026-01-01,"half a row')
    h = MergeHistory(path)
    assert len(h.rows()) == 100
    assert h.append(Recipe("after.safetensors", "b")) == 101
    assert h.recipe(-1).model_a == "after.safetensors"
    with open(path) as f:
        assert sum(1 for _ in csv.reader(f)) >= 102
