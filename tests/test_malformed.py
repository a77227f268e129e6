"""Every malformed input: one clean line, nothing written, the pipeline keeps its merge (issue 10)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merger.errors import MergeError
from tests import malformed_corpus

ROOT = Path(__file__).resolve().parent.parent


def test_the_corpus_is_large_and_varied(tmp_path):
    names = malformed_corpus.build(tmp_path)
    assert len(names) >= 40
    for kind in ("trunc-", "hlen-", "header-", "offsets-overlap", "dtype-", "shape-", "nan-", "inf-", "sdxl-",
                 "missing-", "pickle-code", "zero-bytes", "dir-model"):
        assert any(n.startswith(kind) for n in names), kind


def test_cli_refuses_every_case_as_a_b_and_c_with_one_error_line(tmp_path):
    code = ("import json, sys; sys.path.insert(0, '.'); from tests.malformed_corpus import run_cli_cases; "
            f"print(json.dumps(run_cli_cases({str(tmp_path)!r})))")
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    results = json.loads(proc.stdout)
    assert len(results) >= 120
    bad = {}
    for case, r in results.items():
        lines = r["stderr"].splitlines()
        if not (r["rc"] == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "unexpected" not in lines[0]
                and "Traceback" not in r["stderr"] and not r["output"]):
            bad[case] = r
    assert not bad, json.dumps(dict(list(bad.items())[:5]), indent=1)
    assert not (tmp_path / "history.csv").exists()
    assert not Path("/tmp/sdmw-pwned").exists()


def test_workstation_refuses_every_case_and_keeps_its_last_good_merge(demo_ws):
    ws = demo_ws
    names = malformed_corpus.build(ws.dirs.ckpt / "bad")
    good = {"a": "demo-sd1-tiny-A.safetensors", "b": "demo-sd1-tiny-B.safetensors", "c": "demo-sd1-tiny-C.safetensors"}
    first = ws.merge(ws.recipe(good["a"], good["b"], alpha=0.3))
    held = {k: v.clone() for k, v in ws.pipeline.state_dict().items()}
    recipe_before = ws.pipeline.recipe
    failures = {}
    for name in names:
        for slot in "abc":
            models = {**good, slot: f"bad/{name}"}
            try:
                ws.merge(ws.recipe(models["a"], models["b"], models["c"], mode="add_difference", alpha=0.5))
                failures[f"{name} [{slot}]"] = "merged"
            except MergeError as e:
                msg = str(e)
                if "\n" in msg or "unexpected" in msg or not msg:
                    failures[f"{name} [{slot}]"] = msg
            except Exception as e:  # noqa: BLE001
                failures[f"{name} [{slot}]"] = f"{type(e).__name__}: {e}"
    assert not failures, failures
    assert len(ws.history) == 1 and ws.history.get(-1)["id"] == str(first.history_id)
    assert ws.pipeline.recipe == recipe_before
    now = ws.pipeline.state_dict()
    assert all(torch.equal(now[k], v) for k, v in held.items())
    assert not list(ws.outputs.rglob("*.png")) if ws.outputs.exists() else True


@pytest.mark.parametrize("case", ["nan-values.safetensors", "offsets-overlap.safetensors", "zero-bytes.ckpt"])
def test_lora_cli_refuses_bad_lora_files(tmp_path, case, capsys):
    from lora_ops.cli import main
    malformed_corpus.build(tmp_path / "bad")
    out = tmp_path / "merged.safetensors"
    assert main(["merge-loras", "--loras", f"{tmp_path / 'bad' / case}:0.5", "--output", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not out.exists()


def test_a_nan_lora_is_refused_for_merging_into_a_checkpoint_and_for_merge_loras(tmp_path, models, capsys):
    import safetensors.torch as st

    from lora_ops.cli import main
    from merger.demo import demo_lora
    from merger.synthetic import random_checkpoint
    sd = demo_lora(random_checkpoint("sd1", seed=1, extras=False))
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    lora = tmp_path / "nan.safetensors"
    st.save_file(sd, str(lora))
    for argv in (["merge-ckpt", "--model", str(models["a"]), "--loras", f"{lora}:0.5"],
                 ["merge-loras", "--loras", f"{lora}:0.5, {lora}:0.2"]):
        out = tmp_path / "out.safetensors"
        assert main(argv + ["--output", str(out)]) == 1 and not out.exists()
        err = capsys.readouterr().err.splitlines()
        assert err == [f"error: nan.safetensors contains NaN/Inf values in {key}: it cannot be used"]
