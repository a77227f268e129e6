"""A corpus of malformed model files, each of which must be refused with one clear line.

``build(folder)`` writes every case into ``folder`` and returns their file names. The cases start
from a valid tiny SD1 checkpoint (fp16, real LDM key names) and break it one way each: truncated
at many offsets, bad header lengths, broken JSON, header entries of the wrong type, dtype/shape
that disagree with the data, overlapping or gapped offsets, NaN/Inf, architecture mixes, missing
keys, pickles that need code, empty files and a directory that looks like a model.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from merger.synthetic import random_checkpoint

UNET_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def _valid_sd1(seed: int = 9) -> dict[str, torch.Tensor]:
    return random_checkpoint("sd1", seed=seed, dtype=torch.float16)


def _st_bytes(tensors: dict[str, torch.Tensor], metadata=None) -> bytes:
    import safetensors.torch as st
    return st.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _edit_header(raw: bytes, edit) -> bytes:
    header, data = _split(raw)
    edit(header)
    return _join(header, data)


def _first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(header: dict) -> None:
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = keys[10], keys[11]
    n = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][0]          # b now reads a's bytes (same size needed: pick by size)
    header[b]["data_offsets"] = [start, start + n]


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /tmp/sdmw-pwned",))


def _pickle_ckpt(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol)
    return buf.getvalue()


def _legacy_pickle(obj, protocol: int = 4) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    return buf.getvalue()


def _evil_zip() -> bytes:
    """A torch zip checkpoint whose data.pkl calls os.system when unpickled."""
    good = _pickle_ckpt({"state_dict": {"x": torch.zeros(1)}})
    src = zipfile.ZipFile(io.BytesIO(good))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = pickle.dumps(_Evil(), protocol=2)
            z.writestr(info, data)
    return out.getvalue()


def cases() -> dict[str, object]:
    """file name -> bytes to write (or the string "dir" for a directory)."""
    sd = _valid_sd1()
    raw = _st_bytes(sd)
    (hlen,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + hlen
    out: dict[str, object] = {}
    # truncated at several offsets
    for i, cut in enumerate([1, 7, 8, 9, data_start // 2, data_start - 1, data_start, data_start + 1,
                             data_start + 4096, len(raw) // 2, len(raw) - 2, len(raw) - 1]):
        out[f"trunc-{i:02}-at-{cut}.safetensors"] = raw[:cut]
    out["zero-bytes.safetensors"] = b""
    out["zero-bytes.ckpt"] = b""
    # header length
    out["hlen-huge.safetensors"] = struct.pack("<Q", 2**63) + raw[8:]
    out["hlen-zero.safetensors"] = struct.pack("<Q", 0) + raw[8:]
    out["hlen-past-end.safetensors"] = struct.pack("<Q", len(raw)) + raw[8:]
    out["hlen-short.safetensors"] = struct.pack("<Q", hlen - 5) + raw[8:]
    # header contents
    out["header-not-json.safetensors"] = struct.pack("<Q", 16) + b"this is not json" + raw[data_start:]
    out["header-not-utf8.safetensors"] = struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc" + raw[data_start:]
    out["header-list.safetensors"] = _join([1, 2, 3], raw[data_start:])
    out["header-entry-number.safetensors"] = _edit_header(raw, lambda h: h.__setitem__(_first_tensor(h), 5))
    out["header-entry-string.safetensors"] = _edit_header(raw, lambda h: h.__setitem__(_first_tensor(h), "x"))
    out["offsets-string.safetensors"] = _edit_header(
        raw, lambda h: h[_first_tensor(h)].__setitem__("data_offsets", "xy"))
    out["offsets-one-number.safetensors"] = _edit_header(
        raw, lambda h: h[_first_tensor(h)].__setitem__("data_offsets", [0]))
    out["offsets-reversed.safetensors"] = _edit_header(
        raw, lambda h: h[_first_tensor(h)].__setitem__("data_offsets", h[_first_tensor(h)]["data_offsets"][::-1]))
    out["offsets-negative.safetensors"] = _edit_header(
        raw, lambda h: h[_first_tensor(h)].__setitem__("data_offsets", [-8, h[_first_tensor(h)]["data_offsets"][1] - 8]))
    out["offsets-overlap.safetensors"] = _edit_header(raw, _overlap)
    out["offsets-past-end.safetensors"] = _edit_header(
        raw, lambda h: h[_first_tensor(h)].__setitem__("data_offsets", [len(raw), len(raw) + 2]))
    out["metadata-string.safetensors"] = _edit_header(raw, lambda h: h.__setitem__("__metadata__", "x"))
    out["metadata-list.safetensors"] = _edit_header(raw, lambda h: h.__setitem__("__metadata__", [1]))
    out["dtype-unknown.safetensors"] = _edit_header(raw, lambda h: h[_first_tensor(h)].__setitem__("dtype", "F99"))
    out["dtype-missing.safetensors"] = _edit_header(raw, lambda h: h[_first_tensor(h)].pop("dtype"))
    out["dtype-wrong-size.safetensors"] = _edit_header(raw, lambda h: h[_first_tensor(h)].__setitem__("dtype", "F32"))
    out["shape-wrong.safetensors"] = _edit_header(
        raw, lambda h: h[_first_tensor(h)].__setitem__("shape", [3, 3, 3, 3, 3]))
    out["shape-negative.safetensors"] = _edit_header(raw, lambda h: h[_first_tensor(h)].__setitem__("shape", [-1]))
    out["shape-string.safetensors"] = _edit_header(raw, lambda h: h[_first_tensor(h)].__setitem__("shape", "big"))
    out["empty-header.safetensors"] = _join({}, b"")
    # values
    nan = dict(sd)
    nan[UNET_KEY] = nan[UNET_KEY].clone()
    nan[UNET_KEY][0] = float("nan")
    out["nan-values.safetensors"] = _st_bytes(nan)
    inf = dict(sd)
    inf["first_stage_model.decoder.conv_out.weight"] = torch.full_like(sd["first_stage_model.decoder.conv_out.weight"],
                                                                       float("inf"))
    out["inf-values.safetensors"] = _st_bytes(inf)
    out["nan-values.ckpt"] = _pickle_ckpt({"state_dict": nan})
    intw = dict(sd)
    intw[UNET_KEY] = torch.zeros(sd[UNET_KEY].shape, dtype=torch.int16)
    out["weight-as-int.safetensors"] = _st_bytes(intw)
    shape = dict(sd)
    shape[UNET_KEY] = torch.zeros((7, 3), dtype=torch.float16)
    out["weight-other-shape.safetensors"] = _st_bytes(shape)
    # other architectures / not a checkpoint
    out["sdxl-model.safetensors"] = _st_bytes(random_checkpoint("sdxl", seed=3, dtype=torch.float16))
    out["sd2-model.safetensors"] = _st_bytes(random_checkpoint("sd2", seed=3, dtype=torch.float16))
    out["sd1-unet-sdxl-te.safetensors"] = _st_bytes(
        {**{k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")},
         **{k: v for k, v in random_checkpoint("sdxl", seed=3, dtype=torch.float16).items()
            if k.startswith("conditioner.")}})
    out["a-vae.safetensors"] = _st_bytes({k[len("first_stage_model."):]: v for k, v in sd.items()
                                          if k.startswith("first_stage_model.")})
    out["a-lora.safetensors"] = _st_bytes({"lora_unet_x.lora_down.weight": torch.zeros(4, 8),
                                           "lora_unet_x.lora_up.weight": torch.zeros(8, 4)})
    out["no-tensors.safetensors"] = _st_bytes({"junk": torch.zeros(2)})
    # missing keys (a part of the U-Net / text encoder gone)
    out["missing-unet-keys.safetensors"] = _st_bytes(
        {k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.output_blocks.2.")})
    out["missing-te-keys.safetensors"] = _st_bytes(
        {k: v for k, v in sd.items() if ".encoder.layers.0." not in k})
    # pickles
    out["pickle-code.ckpt"] = pickle.dumps({"state_dict": _Evil()}, protocol=2)
    out["pickle-code-zip.ckpt"] = _evil_zip()
    out["pickle-protocol4-legacy.ckpt"] = _legacy_pickle({"state_dict": {"x": torch.zeros(1)}})
    out["pickle-list.ckpt"] = _pickle_ckpt([torch.zeros(1)])
    out["pickle-no-tensors.ckpt"] = _pickle_ckpt({"state_dict": {"a": 1}})
    zipped = _pickle_ckpt({"state_dict": sd})
    out["pickle-zip-truncated.ckpt"] = zipped[: len(zipped) // 2]
    out["safetensors-named-ckpt.ckpt"] = raw
    out["ckpt-named-safetensors.safetensors"] = zipped
    out["random-bytes.ckpt"] = bytes(range(256)) * 16
    out["dir-model.safetensors"] = "dir"
    return out


def build(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, content in cases().items():
        p = folder / name
        if content == "dir":
            p.mkdir()
            (p / "inside.txt").write_text("not a model")
        else:
            p.write_bytes(content)
        names.append(name)
    return names


def run_cli_cases(folder: str) -> dict[str, dict]:
    """Every case as model A, B and C of ``python -m merger merge`` (add difference), in this
    process with its real stderr captured per case: {"case [slot]": {rc, stderr, output}}."""
    import contextlib
    import warnings

    import safetensors.torch as st

    from merger.cli import main
    folder = Path(folder)
    names = build(folder / "bad")
    good = {}
    for i, s in enumerate("abc"):
        good[s] = folder / f"good_{s}.safetensors"
        st.save_file(random_checkpoint("sd1", seed=i + 1, dtype=torch.float16), str(good[s]))
    warnings.simplefilter("always")        # any warning would show in the captured stderr
    results = {}
    for name in names:
        for slot in "abc":
            paths = {**good, slot: folder / "bad" / name}
            out = folder / "out" / f"{name}-{slot}.safetensors"
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(["merge", "--model-a", str(paths["a"]), "--model-b", str(paths["b"]), "--model-c",
                           str(paths["c"]), "--mode", "add_difference", "--output", str(out), "--quiet",
                           "--history", str(folder / "history.csv")])
            results[f"{name} [{slot}]"] = {"rc": rc, "stderr": err.getvalue(), "output": out.parent.exists()
                                           and any(out.parent.iterdir())}
    return results
