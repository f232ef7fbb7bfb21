"""t2i_jax: text-to-image generation in JAX/Flax (GAN, VAE and diffusion side by side)."""

__version__ = "0.1.0"
