"""The LoRA list with computed type and dimensions, cached on disk: only new or changed files
are opened again."""
from __future__ import annotations

import json
import os
from pathlib import Path

from merger.errors import MergeError
from merger.files.paths import data_dir

from .formats import load_lora


def lora_table(folder: Path, names: list[str], cache_file: Path | None = None) -> list[dict]:
    """One row per LoRA: name, type, dim, conv dim, modules (or the error for a bad file)."""
    cache_file = cache_file or data_dir() / "cache" / "lora_dims.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    rows, changed = [], False
    for name in names:
        p = folder / name
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        row = cache.get(key)
        if row is None:
            try:
                lf = load_lora(p)
                lin, conv = lf.dims()
                row = {"type": lf.network_type(), "dim": lin, "conv_dim": conv, "modules": len(lf.modules),
                       "base": lf.metadata.get("ss_base_model_version", "")}
            except MergeError as e:
                row = {"type": "error", "dim": 0, "conv_dim": 0, "modules": 0, "base": str(e)[:80]}
            cache[key] = row
            changed = True
        rows.append({"name": name, **row})
    if changed:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return rows
