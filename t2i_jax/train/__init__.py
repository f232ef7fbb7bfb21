"""The generic trainer: loop, state sharding, checkpoints and logs, shared by all methods."""
