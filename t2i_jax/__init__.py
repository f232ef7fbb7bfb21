"""t2i_jax: text-to-image generation in JAX/Flax (GAN, VAE and diffusion side by side).

pipe = t2i_jax.Pipeline.from_workdir("runs/demo")
images = pipe(["a red circle"], num=4, seed=0)
"""

__version__ = "0.1.0"
__all__ = ["Pipeline"]


def __getattr__(name: str):
    # Imported on first use, so `t2i --help` and `import t2i_jax.errors` stay light.
    if name == "Pipeline":
        from t2i_jax.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 't2i_jax' has no attribute {name!r}")
