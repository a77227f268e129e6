"""Runs of many merges: XYZ plots, dice rolls, reservations and guided search."""
