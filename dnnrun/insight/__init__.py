"""Seeing what happened: per-layer diagnostics, the diagnosis, console, loggers, plots, reports."""
