"""A run's directory read back: its config, method, checkpointed state and frozen weights
(`loading`, `frozen_store`), and sampling from it (`sampling`). Used by the trainer, the
evaluation commands and the Python API alike."""
