"""Shared library of the moescope scripts: model loading, the MoE adapter, capture, data, statistics, runs."""
