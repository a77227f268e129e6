"""Loading (safetensors zero-copy, safe ckpt), hashing, the model cache, layouts, architecture
detection, block mapping, presets and the elements list."""
import hashlib
import math
import os
import pickle

import pytest
import torch

from merger.files import checkpoint_io
from merger.arch import detect_arch
from merger.blocks import block_ids, block_of, expand_blocks
from merger.files.checkpoint_io import HashCache, load_checkpoint, short_hash
from merger.elements import list_elements
from merger.errors import MergeError
from merger.ldm_layout import arch_params, checkpoint_layout, tiny_layout, unet_layout
from merger.files.model_cache import ModelCache
from merger.presets import parse_vector, presets
from merger.synthetic import random_checkpoint
from tests.conftest import write


def test_full_size_layouts_have_the_real_parameter_counts():
    n = lambda d: sum(math.prod(s) for s in d.values())  # noqa: E731
    assert n(unet_layout(arch_params("sd1")["unet"])) == 859_520_964
    assert n(checkpoint_layout("sd1")) == 1_066_235_307
    assert n(unet_layout(arch_params("sdxl")["unet"])) == 2_567_463_684
    assert n(checkpoint_layout("sdxl")) == 3_468_837_868
    assert n(unet_layout(arch_params("sd2")["unet"])) == 865_910_724


def test_safetensors_round_trip_zero_copy_and_copy_on_write(tmp_path):
    sd = random_checkpoint("sd1", seed=3, dtype=torch.float16)
    sd["bf"] = torch.randn(3, 5).bfloat16()
    sd["empty"] = torch.zeros(0)
    p = write(tmp_path, "m.safetensors", sd, metadata={"k": "v"})
    ck = load_checkpoint(p)
    assert ck.metadata == {"k": "v"}
    for k, v in sd.items():
        assert ck.tensors[k].dtype == v.dtype and torch.equal(ck.tensors[k], v)
    before = p.read_bytes()
    k = "model.diffusion_model.out.2.weight"
    ck.tensors[k].mul_(3)   # private mapping: the file is not touched
    assert p.read_bytes() == before
    # tensors are views into one mapping, not copies: neighbouring keys share the mapping's pages
    addrs = sorted(t.data_ptr() for t in load_checkpoint(p).tensors.values() if t.numel())
    assert addrs[-1] - addrs[0] < p.stat().st_size


@pytest.mark.parametrize("damage,msg", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:4], "truncated header"),
    (lambda b: b[:8] + b"\x00garbage" + b[16:], "not valid JSON"),
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "bad header length"),
])
def test_damaged_safetensors_give_clear_errors(tmp_path, damage, msg):
    p = write(tmp_path, "m.safetensors", random_checkpoint("sd1", seed=1))
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(MergeError, match=msg):
        load_checkpoint(p)


def test_ckpt_nested_state_dict(tmp_path):
    sd = random_checkpoint("sd1", seed=2)
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 10, "epoch": 1}, p)
    ck = load_checkpoint(p)
    assert set(ck.tensors) == set(sd) and torch.equal(ck.tensors["model.diffusion_model.out.2.bias"],
                                                      sd["model.diffusion_model.out.2.bias"])


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sdmw_pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": Evil()}, p)
    if os.path.exists("/tmp/sdmw_pwned"):
        os.remove("/tmp/sdmw_pwned")
    with pytest.raises(MergeError, match="refused to load evil.ckpt"):
        load_checkpoint(p)
    assert not os.path.exists("/tmp/sdmw_pwned")
    raw = tmp_path / "raw.ckpt"   # legacy non-zip pickle with code
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(MergeError):
        load_checkpoint(raw)
    assert not os.path.exists("/tmp/sdmw_pwned")


def test_corrupt_ckpt_and_missing_file(tmp_path):
    p = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"x": torch.ones(100)}}, p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(MergeError, match="bad.ckpt"):
        load_checkpoint(p)
    with pytest.raises(MergeError, match="file not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(MergeError, match="unsupported file type"):
        load_checkpoint(tmp_path / "x.txt")


def test_short_hash_is_a1111s_and_cached(tmp_path, monkeypatch):
    p = write(tmp_path, "m.safetensors", {"model.diffusion_model.x.weight": torch.ones(4)})
    want = hashlib.sha256(p.read_bytes()).hexdigest()[:10]
    assert short_hash(p) == want
    calls = []
    real = checkpoint_io.file_sha256
    monkeypatch.setattr(checkpoint_io, "file_sha256", lambda q: calls.append(q) or real(q))
    cache = HashCache()          # a fresh object reads the JSON cache file: no re-hash
    assert cache.short_hash(p) == want and calls == []
    os.utime(p, ns=(1, 1))       # changed mtime -> recomputed
    assert cache.short_hash(p) == want and len(calls) == 1


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 5000])
def test_file_sha256_is_hashlibs_at_any_size(tmp_path, size):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(size))
    assert checkpoint_io.file_sha256(p, chunk=1024) == hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="side by side needs two cores")
def test_short_hashes_reads_distinct_files_side_by_side_and_each_once(tmp_path, monkeypatch):
    import threading
    paths = [write(tmp_path, f"m{i}.safetensors", {"model.diffusion_model.x.weight": torch.full((4,), float(i))})
             for i in range(3)]
    want = [hashlib.sha256(p.read_bytes()).hexdigest()[:10] for p in paths]
    together = threading.Barrier(2, timeout=10)     # the first two reads wait for each other
    calls = []
    real = checkpoint_io.file_sha256

    def hashing(q):
        calls.append(q)
        if len(calls) <= 2:
            together.wait()
        return real(q)
    monkeypatch.setattr(checkpoint_io, "file_sha256", hashing)
    got = checkpoint_io.short_hashes([paths[0], paths[1], paths[0], paths[2]])
    assert got == [want[0], want[1], want[0], want[2]]
    assert sorted(calls) == sorted(p.resolve() for p in paths)      # each file read once
    monkeypatch.setattr(checkpoint_io, "ThreadPoolExecutor", None)    # all known: no threads started
    assert checkpoint_io.short_hashes(paths) == want and len(calls) == 3
    with pytest.raises(OSError):
        checkpoint_io.short_hashes([paths[0], tmp_path / "missing.safetensors"])


def test_model_cache_lru_budget(tmp_path):
    paths = [write(tmp_path, f"m{i}.safetensors", random_checkpoint("sd1", seed=i)) for i in range(3)]
    one = load_checkpoint(paths[0]).nbytes
    cache = ModelCache(budget_bytes=int(one * 2.5))
    a = cache.get(paths[0])
    assert cache.get(paths[0]) is a                 # hit
    cache.get(paths[1])
    cache.get(paths[2])                             # evicts the least recently used (m0)
    assert paths[0] not in cache and paths[1] in cache and len(cache) == 2
    cache.get(paths[0], pinned=(paths[1],))          # m2 evicted, m1 pinned
    assert paths[1] in cache and paths[2] not in cache
    assert cache.unload(paths[1]) and paths[1] not in cache
    assert cache.clear() == 1 and len(cache) == 0


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_detect_arch(arch):
    sd = random_checkpoint(arch, seed=1)
    assert detect_arch(sd) == arch
    unet_only = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    assert detect_arch(unet_only) == arch


def test_detect_arch_rejects_non_checkpoints():
    with pytest.raises(MergeError, match="looks like a LoRA"):
        detect_arch({"lora_unet_down_blocks_0.lora_down.weight": torch.ones(1)})
    with pytest.raises(MergeError, match="refiner"):
        detect_arch({"model.diffusion_model.x": 1, "conditioner.embedders.0.model.ln_final.weight": 1})


@pytest.mark.parametrize("key,arch,block", [
    ("model.diffusion_model.time_embed.0.weight", "sd1", "IN00"),
    ("model.diffusion_model.input_blocks.0.0.weight", "sd1", "IN00"),
    ("model.diffusion_model.input_blocks.11.0.in_layers.2.weight", "sd1", "IN11"),
    ("model.diffusion_model.middle_block.1.proj_in.weight", "sd1", "M00"),
    ("model.diffusion_model.output_blocks.10.1.norm.bias", "sd1", "OUT10"),
    ("model.diffusion_model.out.2.weight", "sd1", "OUT11"),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1", "BASE"),
    ("cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight", "sd2", "BASE"),
    ("first_stage_model.decoder.up.1.block.0.conv1.weight", "sd1", "BASE"),
    ("model.diffusion_model.label_emb.0.0.weight", "sdxl", "IN00"),
    ("model.diffusion_model.time_embed.2.bias", "sdxl", "IN00"),
    ("model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", "sdxl", "IN07"),
    ("model.diffusion_model.output_blocks.2.2.conv.weight", "sdxl", "OUT02"),
    ("model.diffusion_model.out.0.bias", "sdxl", "OUT08"),
    ("conditioner.embedders.1.model.text_projection", "sdxl", None),
    ("conditioner.embedders.1.model.ln_final.weight", "sdxl", "BASE"),
])
def test_block_of(key, arch, block):
    assert block_of(key, arch) == block


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_block_is_used_by_real_layouts(arch):
    used = {block_of(k, arch) for k in tiny_layout(arch)}
    assert set(block_ids(arch)) <= used
    assert len(block_ids(arch)) == (20 if arch == "sdxl" else 26)


def test_expand_blocks():
    assert expand_blocks("IN01 OUT03-OUT05", "sd1") == (False, ["IN01", "OUT03", "OUT04", "OUT05"])
    assert expand_blocks("NOT OUT05-OUT03", "sd1") == (True, ["OUT03", "OUT04", "OUT05"])
    with pytest.raises(MergeError, match="unknown block 'IN09'"):
        expand_blocks("IN09", "sdxl")


def test_presets_are_supermergers():
    sd, xl = presets("sd1"), presets("sdxl")
    assert len(sd) == 41 and set(sd) == set(xl)
    for name in ("GRAD_V", "GRAD_A", "FLAT_25", "WRAP08", "SMOOTHSTEP", "COSINE", "ALL_A", "ALL_B", "ALL_R"):
        assert name in sd
    g = parse_vector("GRAD_V", "sd1")
    assert len(g) == 26 and g[:3] == [0.0, 1.0, 0.9166666667] and g[13] == 0.0 and g[-1] == 1.0
    gx = parse_vector("GRAD_V", "sdxl")
    assert len(gx) == 20 and gx == g[:10] + g[13:23]
    assert parse_vector("0.5," * 25 + "1", "sd1")[-1] == 1.0
    with pytest.raises(MergeError, match="dice"):
        parse_vector("ALL_R", "sd1")
    with pytest.raises(MergeError, match="neither a preset"):
        parse_vector("NOPE", "sd1")


def test_elements_list():
    sd = random_checkpoint("sdxl", seed=1, dtype=torch.float16)
    rows = list_elements(sd, contains="label_emb")
    assert [r.key for r in rows] == [k for k in sd if "label_emb" in k]
    assert rows[0].block == "IN00" and rows[0].dtype == "float16" and rows[0].shape == tuple(sd[rows[0].key].shape)
    assert len(list_elements(sd)) == len(sd)
