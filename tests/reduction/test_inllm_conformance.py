"""The in-LLM token-reduction methods pass the intervention conformance checks on every tiny family: finite
logits that do not depend on padding, a checkpointable state, a valid registration."""

from __future__ import annotations

import pytest

from embedlens.registry import interventions
from embedlens.testing.conformance import check_intervention

METHODS = ("fastv_budget", "pyramiddrop", "dart", "sparsevlm")


@pytest.mark.parametrize("name", METHODS)
def test_conforms_on_every_tiny_family(name):
    check_intervention(interventions.get(name), params={"keep": 0.5})
