"""The merge history at scale and after crashes (issue 10): O(1) appends, torn tails, old files,
and a merge that survives a history it cannot write."""
import csv
from pathlib import Path

import pytest

from mergehistory import COLUMNS, MergeHistory
from mergehistory.history import TAIL_BLOCK
from merger.errors import MergeError
from merger.recipe import Recipe

OLD_COLUMNS = [c for c in COLUMNS if c != "notes"]


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _fill(path: Path, n: int, columns=COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for i in range(1, n + 1):
            r = Recipe(f"model_{i}.safetensors", "b.safetensors", alpha=(i % 10) / 10)
            row = {c: "" for c in columns} | {"id": i, "model_a": r.model_a, "model_b": r.model_b,
                                                "mode": r.mode, "recipe": r.to_line()}
            w.writerow([row[c] for c in columns])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc")
def test_append_reads_a_bounded_tail_whatever_the_size(tmp_path):
    path = tmp_path / "h.csv"
    _fill(path, 30_000)
    size = path.stat().st_size
    assert size > 10 * TAIL_BLOCK
    h = MergeHistory(path)
    before = _bytes_read()
    new_id = h.append(Recipe("next.safetensors", "b.safetensors"))
    read = _bytes_read() - before
    assert new_id == 30_001
    assert read < 4 * TAIL_BLOCK, f"append read {read} bytes of a {size}-byte history"
    assert h.get(-1)["model_a"] == "next.safetensors" and len(h) == 30_001


def test_reads_are_incremental(tmp_path):
    path = tmp_path / "h.csv"
    _fill(path, 5_000)
    h = MergeHistory(path)
    assert len(h.search("model_4999")) == 1
    before = _bytes_read()
    h.append(Recipe("late.safetensors", "b.safetensors"))
    assert [r["model_a"] for r in h.search("late")] == ["late.safetensors"]
    assert _bytes_read() - before < 4 * TAIL_BLOCK
    rows, total = h.find("model_", newest=10)
    assert total == 5_000 and [r["id"] for r in rows] == [str(i) for i in range(4991, 5001)]


@pytest.mark.parametrize("cut", [1, 2])
def test_a_tail_torn_inside_a_utf8_character_loses_only_that_row(tmp_path, cut):
    path = tmp_path / "h.csv"
    h = MergeHistory(path)
    for i in range(3):
        h.append(Recipe(f"猫_{i}.safetensors", "b.safetensors"))
    MergeHistory(path).append(Recipe("ネコ_torn.safetensors", "b.safetensors"))
    data = path.read_bytes()
    torn_at = data.rindex("ネ".encode()) + cut          # inside the 3-byte character
    path.write_bytes(data[:torn_at])
    h = MergeHistory(path)
    assert [r["model_a"] for r in h.rows()] == [f"猫_{i}.safetensors" for i in range(3)]
    assert h.append(Recipe("after.safetensors", "b.safetensors")) == 4
    rows = MergeHistory(path).rows()
    assert [r["model_a"] for r in rows][-1] == "after.safetensors" and len(rows) == 4
    assert path.read_bytes().split(b"\n")[-2].startswith(b"4,")      # the new row starts its own line


def test_a_torn_tail_never_blocks_a_merge(demo_ws):
    ws = demo_ws
    ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.2))
    with open(ws.history.path, "ab") as f:
        f.write('9,2026,"猫'.encode()[:-1])                 # cut inside 猫
    out = ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.6))
    assert out.history_id == 2 and ws.history.recipe(-1).alpha == 0.6 and len(ws.history) == 2


def test_a_history_from_the_previous_version_is_kept_and_gets_the_notes_column(tmp_path):
    path = tmp_path / "h.csv"
    _fill(path, 3, OLD_COLUMNS)
    h = MergeHistory(path)
    assert [r["model_a"] for r in h.rows()] == [f"model_{i}.safetensors" for i in (1, 2, 3)]
    assert h.append(Recipe("new.safetensors", "b.safetensors"), notes=["model B has no VAE"]) == 4
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == COLUMNS and all(len(r) == len(COLUMNS) for r in table)
    rows = MergeHistory(path).rows()
    assert [r["id"] for r in rows] == ["1", "2", "3", "4"] and rows[-1]["notes"] == "model B has no VAE"
    assert MergeHistory(path).recipe(2).model_a == "model_2.safetensors"


def test_a_history_that_cannot_be_written_does_not_fail_the_merge(demo_ws, tmp_path):
    ws = demo_ws
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the history folder should be")
    ws.history = MergeHistory(blocker / "mergehistory.csv")
    out = ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.7))
    assert out.history_id is None and "the history row could not be written" in out.message
    assert ws.pipeline.recipe.alpha == 0.7            # the merge the user sees stays


def test_cli_reports_a_history_it_cannot_write_but_keeps_the_saved_merge(tmp_path, models, capsys):
    from merger.cli import main
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = tmp_path / "m.safetensors"
    rc = main(["merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--mode", "weight_sum",
               "--output", str(out), "--history", str(blocker / "h.csv"), "--quiet"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 0 and out.is_file()
    assert len(err) == 1 and err[0].startswith(f"warning: {out} was saved, but its history row could not be written")


def test_merge_notes_reach_the_status_and_the_history_row(demo_ws):
    import safetensors.torch as st
    ws = demo_ws
    from merger.files.checkpoint_io import load_checkpoint
    full = load_checkpoint(ws.dirs.ckpt / "demo-sd1-tiny-B.safetensors").tensors
    st.save_file({k: v for k, v in full.items() if not k.startswith("first_stage_model.")},
                 str(ws.dirs.ckpt / "no-vae.safetensors"))
    out = ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "no-vae.safetensors", alpha=0.5))
    note = "model B (no-vae.safetensors) has no VAE: model A's VAE is used as it is (not merged)"
    assert out.notes == [note] and note in out.message
    assert ws.history.get(-1)["notes"] == note


def test_bad_history_reference_is_a_clear_error(tmp_path):
    h = MergeHistory(tmp_path / "h.csv")
    with pytest.raises(MergeError, match="only 0 merges"):
        h.get(-1)
    with pytest.raises(MergeError, match="must be a number"):
        h.get("abc")
