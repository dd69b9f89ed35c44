"""Offline tiny models of every supported family, for tests, demos and plugin authors.

What stays installed here is what a plugin author needs: the tiny models
(``tiny:`` sources), their images, the planted scenarios and the conformance
checks. The builders from Hugging Face's test configurations (``TESTER_CONFIGS``
and friends) and the headless-browser check serve only embedlens's own suite and
moved there (``tests/support/``).
"""

from embedlens.testing.tiny import TINY_ALIASES, TINY_SPECS, TinySpec, save_tiny_model, tiny_batch, tiny_model

__all__ = ["TINY_ALIASES", "TINY_SPECS", "TinySpec", "save_tiny_model", "tiny_batch", "tiny_model"]

_MOVED = {name: "tests/support/hf_testers/"
          for name in ("BLOCK_TESTER_CONFIGS", "HFTesterConfig", "TESTER_CONFIGS", "hf_tester_model")}


def __getattr__(name: str):
    if name in _MOVED:  # deprecated names: an error that says where they went, not a bare AttributeError
        raise ImportError(
            f"embedlens.testing.{name} was removed from the installed package: the Hugging Face tester "
            f"configurations serve only embedlens's own test suite and live in {_MOVED[name]} of the "
            "embedlens source repository (from its root: from tests.support.hf_testers import ...)"
        )
    raise AttributeError(f"module 'embedlens.testing' has no attribute {name!r}")
