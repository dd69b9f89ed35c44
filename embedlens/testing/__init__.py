"""Offline tiny models of every supported family, for tests, demos and plugin authors."""

from embedlens.testing.hf_testers import BLOCK_TESTER_CONFIGS, TESTER_CONFIGS, HFTesterConfig, hf_tester_model
from embedlens.testing.tiny import TINY_SPECS, TinySpec, save_tiny_model, tiny_batch, tiny_model

__all__ = ["BLOCK_TESTER_CONFIGS", "HFTesterConfig", "TESTER_CONFIGS", "TINY_SPECS", "TinySpec", "hf_tester_model", "save_tiny_model", "tiny_batch", "tiny_model"]
