"""Every registered probe passes the public conformance checks on every tiny family."""

from __future__ import annotations

import pytest

from embedlens.registry import probes
from embedlens.testing.conformance import DEFAULT_FAMILIES, check_probe


@pytest.mark.parametrize("family", DEFAULT_FAMILIES)
@pytest.mark.parametrize("name", list(probes))
def test_registered_probe_conforms(name, family):
    check_probe(probes.get(name), families=(family,))


def test_conformance_catches_a_padding_dependent_probe():
    from embedlens.probes.embedding_lens import EmbeddingLens

    class Leaky(EmbeddingLens):
        """Reports the raw sequence position as a float (depends on padding). Example: none. k layers matrix chunk_size figure_layer search n_probe"""

        def update(self, adapter, batch, acts):
            out = super().update(adapter, batch, acts)
            out["tokens"]["pos_float"] = [float(p) for p in out["tokens"]["position"]]
            return out

    with pytest.raises(AssertionError, match="depends on padding"):
        check_probe(Leaky, families=("llava-clip",))


def _with_placeholders():
    import math

    import torch

    from embedlens.probes.embedding_lens import EmbeddingLens

    class Placeholder(EmbeddingLens):
        """Keeps a NaN placeholder (a value not yet known) and a finite scale. Example: none. k layers matrix chunk_size figure_layer search n_probe"""

        def check(self, adapter):
            super().check(adapter)
            self.pending = torch.full((3,), math.nan)  # NaN until a later batch would set it
            self.scale = torch.ones(3)

    return Placeholder


def test_a_plugin_state_with_a_nan_placeholder_resumes_and_nan_where_fresh_is_finite_is_refused():
    """A third-party probe may keep NaN as a placeholder: its state round-trips through a checkpoint and it passes
    conformance (was: every saved tensor holding NaN refused). NaN planted where the freshly built probe keeps finite
    values is still refused, naming the attribute."""
    import json
    import math

    from embedlens.adapters import load_model
    from embedlens.state import CheckpointError, decode_state, encode_state

    Placeholder = _with_placeholders()
    check_probe(Placeholder, families=("llava-clip",))
    adapter = load_model("tiny:llava-clip")
    probe = Placeholder(k=2, layers=[0])
    probe.check(adapter)
    meta, tensors = encode_state(probe, "placeholder")
    fresh = Placeholder(k=2, layers=[0])
    fresh.check(adapter)
    decode_state(fresh, json.loads(json.dumps(meta, allow_nan=False)), dict(tensors), "placeholder")
    assert fresh.pending.isnan().all() and fresh.scale.eq(1).all()
    for bad in (math.nan, math.inf):
        hostile = {k: (v.clone().fill_(bad) if v.equal(probe.scale) else v) for k, v in tensors.items()}
        again = Placeholder(k=2, layers=[0])
        again.check(adapter)
        with pytest.raises(CheckpointError, match=r"Placeholder\.scale: the checkpoint holds NaN or infinite values where a run keeps finite"):
            decode_state(again, json.loads(json.dumps(meta, allow_nan=False)), hostile, "placeholder")
