"""Probes over visual tokens, found through `embedlens.registry.probes`."""

from embedlens.probes.base import Probe, Table
from embedlens.probes.embedding_lens import EmbeddingLens, nearest_vocab

__all__ = ["EmbeddingLens", "Probe", "Table", "nearest_vocab"]
