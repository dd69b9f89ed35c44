"""Offline tiny models of every supported family, for tests, demos and plugin authors."""

from embedlens.testing.tiny import TINY_SPECS, TinySpec, save_tiny_model, tiny_batch, tiny_model

__all__ = ["TINY_SPECS", "TinySpec", "save_tiny_model", "tiny_batch", "tiny_model"]
