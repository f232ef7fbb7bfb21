"""Flax network modules (Linen): shared layers, the diffusion U-Net."""
