"""The example classes of docs/writing-a-probe.md and docs/writing-an-intervention.md register and pass the public
conformance checks (in a fresh interpreter, so their names never reach this session's registries)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_class_block(doc: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / doc).read_text(), flags=re.S | re.M)
    return next(b for b in blocks if "register(" in b)


def test_the_documented_plugins_conform():
    code = "\n".join([
        _first_class_block("writing-a-probe.md"),
        _first_class_block("writing-an-intervention.md"),
        "from embedlens.testing.conformance import check_intervention, check_probe",
        "from embedlens.registry import interventions, probes",
        "assert probes.get('token_norm') is TokenNorm and interventions.get('scale_visual') is ScaleVisual",
        "check_probe(TokenNorm, params={'layer': 1}, families=('llava-clip',))",
        "check_intervention(ScaleVisual, params={'tokens': 'visual', 'factor': 0.5}, families=('llava-clip',))",
        "print('CONFORMS')",
    ])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "CONFORMS" in proc.stdout, proc.stderr[-3000:]


def test_check_intervention_catches_a_padding_dependent_edit():
    """Planted bug: scaling by the padded position makes the effect depend on the padding side."""
    import pytest
    import torch

    from embedlens.interventions.base import Intervention
    from embedlens.testing.conformance import check_intervention

    class Leaky(Intervention):
        """Scales image tokens by their padded position. Example: none.

        Args:
            scale: how much.
        """

        def __init__(self, scale: float = 0.1):
            self.scale = scale

        def setup(self, ctx):
            self._mask = ctx.roles.image_span & ctx.valid

        def edit_embeds(self, ctx, embeds):
            pos = torch.arange(embeds.shape[1], device=embeds.device, dtype=embeds.dtype)[None, :, None]
            return torch.where(self._mask[..., None], embeds * (1 + self.scale * pos), embeds)

    with pytest.raises(AssertionError, match="next-token logits of sample c0 depend on padding"):
        check_intervention(Leaky, families=("llava-clip",))
