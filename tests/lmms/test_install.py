"""Installing the lmms extra never replaces torch: torchvision stays absent and, where CI recorded the torch
build before installing the extra (EMBEDLENS_TORCH_BEFORE), it is the build that runs now."""

from __future__ import annotations

import importlib.util
import os

import torch


def test_torchvision_absent():
    assert importlib.util.find_spec("torchvision") is None, "torchvision was installed (lmms-eval's own requirements?)"


def test_torch_build_unchanged():
    before = os.environ.get("EMBEDLENS_TORCH_BEFORE")
    if before:
        assert torch.__version__ == before
    assert "+cu" not in torch.__version__ or torch.cuda.is_available(), f"a CUDA torch build ({torch.__version__}) on a machine without CUDA"
