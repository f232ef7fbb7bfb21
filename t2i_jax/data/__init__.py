"""Datasets: built-in TFDS builders, adapters and the input pipeline."""
