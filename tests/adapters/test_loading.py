"""Loading from a saved folder goes through `from_pretrained` and picks the adapter from the config."""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters import load_model
from embedlens.testing import TINY_SPECS, save_tiny_model, tiny_model
from tests.conftest import mixed_samples


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_folder_round_trip(name, tmp_path):
    folder = save_tiny_model(name, tmp_path / name, seed=3)
    adapter = load_model(str(folder))
    assert adapter.name == TINY_SPECS[name].family
    model, _ = tiny_model(name, seed=3)
    batch = adapter.encode(mixed_samples(adapter=adapter)[:2])
    with torch.no_grad():
        ours = adapter.model(**adapter.model_inputs(batch)).logits
        ref = model(**adapter.model_inputs(batch)).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
