"""The resident Flux.1 pipeline (issue 16): built offline from the shipped configs, a merge
swapped in equals diffusers' own weights for the same merge (the key map at tiny width), an
incremental re-merge equals a fresh one, and a tiny all-in-one Flux model generates through the
workstation with the flow-matching Euler sampler and distilled guidance."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from merger.errors import MergeError
from merger.files.checkpoint_io import load_checkpoint
from merger.files.model_dirs import ModelDirs
from merger.flux_layout import PREFIX, strip_prefix
from merger.pipeline.flux_keymap import to_diffusers
from merger.pipeline.generate import GenParams
from merger.recipe import Recipe
from merger.synthetic import random_checkpoint

GEN = GenParams(prompt="a photo of a cat", steps=2, width=64, height=64, seed=5, cfg=3.5)


def tiny_t5_tokenizer(folder: Path) -> Path:
    """A T5 tokenizer (SentencePiece unigram, as T5's) over a small vocabulary: the real one is a
    file users have, not something a test can ship."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast
    words = "a photo of cat dog the on in painting".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -2.0) for w in words] + \
        [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("▁", -3.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                         extra_ids=0, model_max_length=32)
    t5.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def flux_ws(tmp_path_factory):
    from merger.workstation import Workstation
    from mergehistory import MergeHistory
    root = tmp_path_factory.mktemp("fluxpipe")
    dirs = ModelDirs.from_models_dir(root / "models")
    dirs.create()
    for name, seed in (("fa.safetensors", 1), ("fb.safetensors", 2)):
        st.save_file(random_checkpoint("flux", seed=seed, dtype=torch.bfloat16), str(dirs.ckpt / name))
    ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=root / "out",
                     history=MergeHistory(root / "history.csv"))
    ws.pipeline.t5_tokenizer = tiny_t5_tokenizer(root / "t5")
    return ws


def test_a_swapped_flux_merge_is_the_merge_in_diffusers_names(flux_ws):
    ws = flux_ws
    ws.merge(ws.recipe("fa.safetensors", "fb.safetensors", alpha=0.3))
    a, b = (load_checkpoint(ws.dirs.ckpt / n) for n in ("fa.safetensors", "fb.safetensors"))
    from merger.engine import merge
    want = merge(Recipe("a", "b", alpha=0.3), a, b).tensors
    got = ws.pipeline.modules["transformer"].state_dict()
    ref = to_diffusers({k: v.float() for k, v in want.items() if k.startswith(PREFIX)})
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    clip = ws.pipeline.modules["text_encoder"].state_dict()
    key = "encoder.layers.1.mlp.fc2.weight"
    assert torch.equal(clip[key], want["text_encoders.clip_l.transformer.text_model." + key].float())
    t5 = ws.pipeline.modules["text_encoder_2"].state_dict()
    assert torch.equal(t5["encoder.block.1.layer.1.DenseReluDense.wo.weight"],
                       want["text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo.weight"].float())
    # the pipeline's weights read back in the checkpoint's layout are the merge itself
    back = ws.pipeline.state_dict()
    assert all(torch.equal(back[k].float(), want[k].float()) for k in want if k in back)
    assert {k for k in want if k.startswith(PREFIX) and ("weight" in k or "bias" in k)} <= set(back)


def test_an_incremental_flux_re_merge_equals_a_fresh_one(flux_ws):
    ws = flux_ws
    vec = [0.5] * 61
    ws.merge(ws.recipe("fa.safetensors", "fb.safetensors", alpha=0.5, mbw_alpha=vec))
    vec2 = list(vec)
    vec2[10] = 0.9                                  # D07 only
    ws.merge(ws.recipe("fa.safetensors", "fb.safetensors", alpha=0.5, mbw_alpha=vec2))
    inc = {k: v.clone() for k, v in ws.pipeline.modules["transformer"].state_dict().items()}
    ws.pipeline._last = None                        # force a full re-merge
    ws.merge(ws.recipe("fa.safetensors", "fb.safetensors", alpha=0.5, mbw_alpha=vec2))
    full = ws.pipeline.modules["transformer"].state_dict()
    assert all(torch.equal(inc[k], full[k]) for k in full)


def test_a_tiny_flux_model_generates_and_alpha_changes_the_image(flux_ws):
    ws = flux_ws
    ws.merge(ws.recipe("fa.safetensors", "fb.safetensors", alpha=0.1))
    one = ws.generate(GEN, save=False).result.images[0]
    again = ws.generate(GEN, save=False).result.images[0]
    assert one.image.size == (64, 64) and one.image.tobytes() == again.image.tobytes()     # seeded
    assert "Sampler: Euler (flow matching)" in one.infotext and "Distilled CFG Scale: 3.5" in one.infotext
    assert f"Merge ID: {ws.history_id}" in one.infotext
    ws.merge(ws.recipe("fa.safetensors", "fb.safetensors", alpha=0.9))
    other = ws.generate(GEN, save=False).result.images[0]
    assert other.image.tobytes() != one.image.tobytes()
    with pytest.raises(MergeError, match="no negative prompt"):
        ws.generate(replace(GEN, negative="ugly"), save=False)


def test_flux_generation_needs_the_t5_tokenizer_and_an_all_in_one_model(tmp_path):
    from merger.workstation import Workstation
    dirs = ModelDirs.from_models_dir(tmp_path / "models")
    dirs.create()
    sd = random_checkpoint("flux", seed=1, dtype=torch.bfloat16)
    st.save_file(sd, str(dirs.ckpt / "aio.safetensors"))
    bare = {strip_prefix(k): v for k, v in sd.items() if k.startswith(PREFIX)}
    st.save_file(bare, str(dirs.ckpt / "bare.safetensors"))
    ws = Workstation(dirs, device="cpu", dtype=torch.float32, outputs=tmp_path / "out")
    with pytest.raises(MergeError, match="needs the T5 tokenizer.*--t5-tokenizer"):
        ws.merge(ws.recipe("aio.safetensors", "aio.safetensors", alpha=0.5))
    with pytest.raises(MergeError, match="transformer-only Flux.1 file"):
        ws.merge(ws.recipe("bare.safetensors", "bare.safetensors", alpha=0.5))


def test_flux_xyz_pinpoint_and_dice_plots(flux_ws):
    import json

    from merger.sweeps.dice import DiceSettings
    from merger.sweeps.xyz_run import PlotSpec, prepare, run
    ws = flux_ws
    base = ws.recipe("fa.safetensors", "fb.safetensors", alpha=0.5)
    before = len(ws.history.rows())
    pin = run(ws, prepare(ws, PlotSpec(base, replace(GEN), {"X": ("alpha", "0,1"), "Y": ("pinpoint blocks", "D00,S10"),
                                                           "Z": ("none", "")})))
    assert pin.cells_done == 4 and len(pin.grids) == 1
    rows = [json.loads(r["recipe"]) for r in ws.history.rows()[before:]]
    assert [len(r["mbw_alpha"]) for r in rows] == [61] * 4
    assert rows[1]["mbw_alpha"][3] == 1 and rows[1]["mbw_alpha"][4] == 0.5        # D00 pinned to 1
    assert rows[3]["mbw_alpha"][22 + 10] == 1                                       # S10
    dice = DiceSettings(template_alpha="DEEP_R", template_beta="", seed=7, digits=3)
    rolled = run(ws, prepare(ws, PlotSpec(base, replace(GEN), {"X": ("random", "2"), "Y": ("none", ""),
                                                               "Z": ("none", "")}, dice)))
    assert rolled.cells_done == 2
    last = [json.loads(r["recipe"])["mbw_alpha"] for r in ws.history.rows()[-2:]]
    assert all(len(v) == 61 and v[:3] == [0, 0, 0] and v[-1] == 0 for v in last) and last[0] != last[1]
    assert len(set(last[0][3:60])) > 30                                             # each deep block rolled


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "flux"])
def test_a_swap_leaves_no_parameter_uninitialised(arch, tmp_path, monkeypatch):
    """The pipeline's modules get uninitialised storage: fill it with NaN, swap a merge in, and
    every parameter and buffer must have been written. Tied weights (T5's ``encoder.embed_tokens``
    is its ``shared`` embedding, which the files name once) must stay tied: before, T5 embedded its
    tokens with whatever memory it was given (zeros in a fresh process, so the tests passed alone,
    NaN after a long run: a black image)."""
    import merger.pipeline.resident as resident
    from merger.engine import plan_merge
    from merger.files.checkpoint_io import Checkpoint
    real = resident.empty_module
    built = []

    def poisoned(*a, **k):
        module = real(*a, **k)
        with torch.no_grad():
            for t in (*module.parameters(), *module.buffers()):
                if t.is_floating_point():
                    t.fill_(float("nan"))
        built.append(module)
        return module
    monkeypatch.setattr(resident, "empty_module", poisoned)
    dtype = torch.bfloat16 if arch == "flux" else torch.float16
    a, b = (Checkpoint(Path(f"{arch}{s}.safetensors"), random_checkpoint(arch, seed=s, dtype=dtype)) for s in (1, 2))
    rp = resident.ResidentPipeline("cpu", torch.float32)
    if arch == "flux":
        rp.t5_tokenizer = tiny_t5_tokenizer(tmp_path / "t5")
    rp.swap(plan_merge(Recipe("a", "b", alpha=0.3), a, b))
    assert built
    for module in built:
        for name, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers()):
            assert not (t.is_floating_point() and bool(t.isnan().any())), f"{type(module).__name__}.{name} was never written"
    if arch == "flux":
        t5 = rp.modules["text_encoder_2"]
        assert t5.encoder.embed_tokens.weight is t5.shared.weight
