"""Gradio UI: wires widgets to :class:`merger.workstation.Workstation` calls (no math here)."""
