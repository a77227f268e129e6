"""Names that come from the UI or the API, confined to their folder.

The app never opens or writes a path it was handed: a *save name* must be a plain file name
(no folder part at all), and a *model name* (a checkpoint, LoRA or VAE picked from a list) is a
path relative to its folder whose every part is a plain name. Checks are lexical — ``..``,
absolute paths, drive letters, backslashes, NUL and control characters and leading dots are
refused before the file system is asked anything — so a name cannot probe for files outside the
folder: a refused lookup answers exactly like a name that does not exist. Unicode letters and
spaces are fine. Links the user placed inside their own folders are followed as usual.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from ..errors import MergeError

MAX_NAME_BYTES = 255


def _bad_part(part: str) -> str | None:
    """Why ``part`` (one path component) is not a plain name, or None."""
    if not part.strip():
        return "it is empty"
    if part in (".", "..") or part.startswith("."):
        return "it starts with a dot"
    if any(unicodedata.category(ch) in ("Cc", "Cs") or ch == "\x00" for ch in part):
        return "it contains control characters"
    if any(ch in part for ch in "/\\"):
        return "it contains a path separator"
    if ":" in part[:2] and part[:1].isalpha():
        return "it names a drive"
    if part != part.strip():
        return "it starts or ends with spaces"
    if len(part.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


def check_save_name(name: str, what: str = "file name") -> str:
    """A name for a new file in one of the app's folders: one plain file name, returned
    unchanged. Anything else is a :class:`MergeError` saying why."""
    if not isinstance(name, str):
        raise MergeError(f"{what} must be text")
    why = _bad_part(name)
    if why:
        shown = name.encode("unicode_escape").decode()[:80]
        raise MergeError(f"{what} {shown!r} is not allowed: {why} (give a plain file name; it is saved in the "
                         f"configured folder)")
    return name


def relative_parts(name: str) -> list[str] | None:
    """The parts of a relative model name (``sub/model.safetensors``), or None if it is not one."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")):
        return None
    parts = name.split("/")
    return parts if all(_bad_part(p) is None for p in parts) else None


def resolve_in(folder: Path, name: str, what: str, suffixes: tuple[str, ...] = ("",)) -> Path:
    """The existing file ``folder/name`` (trying each of ``suffixes`` appended), or the same
    ":what: not found" error whether the name is unknown or not a plain relative name."""
    parts = relative_parts(name)
    if parts is not None:
        for suffix in suffixes:
            cand = Path(folder).joinpath(*parts[:-1], parts[-1] + suffix)
            if cand.is_file():
                return cand
    raise MergeError(f"{what} not found: {name} (looked in {folder})")
