"""Helpers shared by the tabs: error-safe handlers and progress adapters."""
from __future__ import annotations

import logging
import traceback

import gradio as gr

from merger.errors import MergeError, MergeStopped

log = logging.getLogger("sdmw.ui")


def safe(n_outputs: int):
    """Wrap a handler whose first output is the status line: bad input becomes a readable
    status (and a toast) instead of a traceback; other outputs are left as they were."""
    def deco(fn):
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except MergeStopped as e:
                msg = f"Stopped: {e}"
            except MergeError as e:
                msg = f"Error: {e}"
                gr.Warning(str(e))
            except Exception as e:  # noqa: BLE001 - the page must keep working
                log.error("unexpected error\n%s", traceback.format_exc())
                msg = f"Error: unexpected {type(e).__name__}: {e}"
                gr.Warning(msg)
            rest = [gr.update()] * (n_outputs - 1)
            return (msg, *rest) if n_outputs > 1 else msg
        wrapper.__name__ = fn.__name__
        return wrapper
    return deco


def selected_id(df, evt: gr.SelectData) -> str:
    """The ``id`` column of the table row the user clicked."""
    return str(df.iloc[evt.index[0]]["id"])


def progress_cb(progress: gr.Progress, desc: str):
    def cb(done, total, what=""):
        progress(done / max(total, 1), desc=desc)
    return cb
