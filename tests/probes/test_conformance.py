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
