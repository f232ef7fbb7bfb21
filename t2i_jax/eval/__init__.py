"""Evaluating runs: sampling from a workdir, sample grids and reports."""
