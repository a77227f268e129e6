"""PNG text chunks: A1111's ``parameters`` plus this app's merge recipe and history ID, so a
picture is enough to find (and reload) the merge that made it."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import MergeError


def png_info(infotext: str, recipe_line: str = "", history_id: int | str = ""):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", infotext)
    if recipe_line:
        info.add_text("sdmw_recipe", recipe_line)
    if history_id != "":
        info.add_text("sdmw_merge_id", str(history_id))
    return info


def save_png(image, path: str | os.PathLike, infotext: str, recipe_line: str = "",
             history_id: int | str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=png_info(infotext, recipe_line, history_id))
    return path


def read_png_info(path: str | os.PathLike) -> dict[str, str]:
    """``{"parameters": ..., "sdmw_recipe": ..., "sdmw_merge_id": ...}`` (those present)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return {k: v for k, v in im.info.items() if isinstance(v, str)}
    except (OSError, UnidentifiedImageError) as e:
        raise MergeError(f"cannot read {Path(path).name} as an image: {e}") from None
