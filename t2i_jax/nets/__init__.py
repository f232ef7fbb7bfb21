"""Flax network modules (Linen): the UNet, the GAN networks and their table, the
autoencoders, the code prior, LPIPS and the evaluators' networks. Building blocks shared
with the text encoders are in t2i_jax/layers.py."""
