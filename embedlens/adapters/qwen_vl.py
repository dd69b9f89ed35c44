"""Deprecated module name: the Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters live in `embedlens.adapters.qwen2_vl`
(one spelling per family: the module is named after the adapter ``qwen2_vl``, which it hosts with its two
successors). Importing this module still works and warns."""

from __future__ import annotations

import warnings

from embedlens.adapters.qwen2_vl import (  # noqa: F401 - re-exported under the old module name
    Qwen2_5_VLAdapter,
    Qwen2_5_VLImageProcessor,
    Qwen2VLAdapter,
    Qwen2VLImageProcessor,
    Qwen3VLAdapter,
    Qwen3VLImageProcessor,
)

warnings.warn("embedlens.adapters.qwen_vl is deprecated; import from embedlens.adapters.qwen2_vl", DeprecationWarning,
              stacklevel=2)
