"""Names from the UI / API resolve inside their configured folder or are refused (issue 10)."""
import re
from pathlib import Path

import pytest
import safetensors.torch as st

import app
from merger.demo import DEMO_LORA
from merger.errors import MergeError
from merger.files.names import check_save_name, relative_parts
from merger.presets import parse_vector

HOSTILE = ["../../../../tmp/x", "/tmp/x", "..", ".", ".hidden", "sub/x", "..\\..\\x", "x\x00y", "x\ny", "C:x",
           "a\x1bb", "", "   ", " x", "x" * 300]


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("name", HOSTILE)
def test_save_names_that_could_leave_the_folder_are_refused(name):
    with pytest.raises(MergeError, match="is not allowed"):
        check_save_name(name)


@pytest.mark.parametrize("name", ["my merge", "猫とネコ_v2", "model (final).safetensors", "a..b", "x-1.2"])
def test_unicode_spaces_and_inner_dots_are_fine(name):
    assert check_save_name(name) == name


def test_every_save_action_refuses_a_hostile_name_and_writes_nothing(demo_ws, tmp_path):
    ws = demo_ws
    ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.4))
    target = tmp_path / "escaped"
    before = _all_files(tmp_path)
    from merger.files.saving import SaveOptions
    for name in ["../../escaped", str(target), "..", "/etc/x", "sub/dir"]:
        for action in (
                lambda n: ws.save_current(n, SaveOptions(overwrite=True)),
                lambda n: ws.save_recipe(ws.history.recipe(-1), n, SaveOptions(overwrite=True)),
                lambda n: ws.merge_lora_files(f"{DEMO_LORA}:0.5", "svd", new_rank=2, name=n),
                lambda n: ws.extract_from_loras(DEMO_LORA, DEMO_LORA, 0.5, 0.0, rank=2, name=n),
                lambda n: ws.extract_lora("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", dim=2, name=n)):
            with pytest.raises(MergeError, match="is not allowed"):
                action(name)
    assert _all_files(tmp_path) == before
    # a plain unicode name with spaces is saved inside the checkpoint folder
    out = ws.save_current("猫 merge", SaveOptions())
    assert out.path == ws.dirs.ckpt / "猫 merge.safetensors" and out.path.is_file()


def _outside_lora(tmp_path) -> Path:
    """A valid LoRA file outside the LoRA folder."""
    src = next(p for p in (tmp_path / "models" / "Lora").iterdir())
    dst = tmp_path / "outside-lora.safetensors"
    dst.write_bytes(src.read_bytes())
    return dst


def test_lora_names_resolve_only_inside_the_lora_folder_and_cannot_probe(demo_ws, tmp_path):
    ws = demo_ws
    outside = _outside_lora(tmp_path)
    assert ws.load_lora_file(DEMO_LORA) and ws.load_lora_file(DEMO_LORA[: -len(".safetensors")])
    messages = {}
    for name in [str(outside), "../outside-lora.safetensors", "../outside-lora", "/etc/shadow", "no-such-lora",
                 "/etc/passwd", "..\\outside-lora"]:
        with pytest.raises(MergeError) as e:
            ws.load_lora_file(name)
        messages[name] = str(e.value).replace(name, "NAME")
    assert len(set(messages.values())) == 1, messages          # an existing file answers like a missing one
    assert "LoRA not found: NAME" in next(iter(messages.values()))
    rec = ws.recipe("demo-sd1-tiny-A.safetensors", calcmode="self", alpha=1.0, loras="/etc/shadow:0.5")
    with pytest.raises(MergeError, match="LoRA not found: /etc/shadow"):
        ws.merge(rec)
    with pytest.raises(MergeError, match="LoRA not found"):
        ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", calcmode="self", alpha=1.0, loras=f"{outside}:0.5"))
    assert len(ws.history) == 0


def test_lora_tags_slots_and_the_xyz_lora_axis_are_confined(demo_ws, tmp_path):
    from merger.pipeline.generate import GenParams
    from merger.sweeps.xyz_run import PlotSpec, prepare, run
    ws = demo_ws
    outside = _outside_lora(tmp_path)
    ws.merge(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", alpha=0.5))
    g = GenParams(prompt=f"cat <lora:{outside}:1>", steps=1, width=64, height=64, seed=1)
    with pytest.raises(MergeError, match="LoRA not found"):
        ws.generate(g, save=False)
    with pytest.raises(MergeError, match="LoRA not found"):
        ws.generate(GenParams(prompt="cat", steps=1, width=64, height=64, seed=1), save=False,
                    loras="../outside-lora:0.7")
    spec = PlotSpec(ws.recipe("demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors"),
                    GenParams(prompt="cat", steps=1, width=64, height=64, seed=1),
                    {"X": ("lora", f"{outside}:0.5"), "Y": ("none", ""), "Z": ("none", "")})
    with pytest.raises(MergeError, match="LoRA not found"):
        run(ws, prepare(ws, spec))


def test_model_vae_and_preset_names_are_confined(demo_ws, tmp_path):
    ws = demo_ws
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((ws.dirs.ckpt / "demo-sd1-tiny-A.safetensors").read_bytes())
    for name in [str(outside), "../outside.safetensors", "../../models/Stable-diffusion/demo-sd1-tiny-A.safetensors"]:
        with pytest.raises(MergeError, match=re.escape(f"model not found: {name}")):
            ws.recipe(name, "demo-sd1-tiny-B.safetensors")
        with pytest.raises(MergeError, match="model not found"):
            ws.load_model(name)
    vae = next(ws.dirs.vae.iterdir())
    with pytest.raises(MergeError, match="VAE not found"):
        ws.set_vae(str(vae))
    with pytest.raises(MergeError, match="VAE not found"):
        ws.set_vae("../VAE/" + vae.name)
    assert ws.dirs.resolve("vae", vae.name) == vae
    with pytest.raises(MergeError, match="neither a preset name"):
        parse_vector("../../../etc/passwd", "sd1")
    # subfolders inside the model folder keep working
    sub = ws.dirs.ckpt / "sub folder"
    sub.mkdir()
    (sub / "m.safetensors").write_bytes((ws.dirs.ckpt / "demo-sd1-tiny-A.safetensors").read_bytes())
    assert "sub folder/m.safetensors" in ws.dirs.checkpoints()
    assert ws.dirs.resolve("ckpt", "sub folder/m.safetensors") == sub / "m.safetensors"
    assert relative_parts("sub folder/../x") is None and relative_parts("/abs") is None


def test_the_cli_keeps_accepting_paths(tmp_path, models):
    from lora_ops.cli import main as lora_main
    from merger.cli import main
    out = tmp_path / "cli-out.safetensors"
    assert main(["merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--mode", "weight_sum",
                 "--output", str(out), "--no-history", "--quiet"]) == 0 and out.is_file()
    from merger.demo import demo_lora
    from merger.synthetic import random_checkpoint
    lora = tmp_path / "elsewhere" / "l.safetensors"
    lora.parent.mkdir()
    st.save_file(demo_lora(random_checkpoint("sd1", seed=1, extras=False)), str(lora))
    out2 = tmp_path / "cli-lora.safetensors"
    assert lora_main(["merge-ckpt", "--model", str(models["a"]), "--loras", f"{lora}:0.5", "--output", str(out2)]) == 0
    assert out2.is_file()


def test_share_and_public_host_warn_and_auth_is_passed(capsys):
    assert app.auth_of(app.parse_args([])) is None
    assert capsys.readouterr().err == ""
    for argv in (["--share"], ["--host", "0.0.0.0"]):
        assert app.auth_of(app.parse_args(argv)) is None
        err = capsys.readouterr().err
        assert "WARNING" in err and "--auth USER:PASS" in err
    assert app.auth_of(app.parse_args(["--share", "--auth", "me:secret:x"])) == [("me", "secret:x")]
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit, match="USER:PASS"):
        app.auth_of(app.parse_args(["--auth", "nopassword"]))
