"""Generative families plugged into the generic trainer through `methods.base.Method`."""
