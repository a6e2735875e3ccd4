"""Analyses behind ``tools/analyze.py``: complexity tables against the papers, graph statistics."""
