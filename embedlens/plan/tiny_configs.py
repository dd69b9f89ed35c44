"""The ``tiny:`` models' configs, stored, so that `embedlens validate` reads a tiny model's architecture as it reads a
checkpoint's ``config.json``: without building the model (no torch, no transformers import).

``embedlens/resources/tiny_configs.json`` holds, per tiny model (`embedlens.testing.TINY_SPECS`), the config of the
model its builder makes (``config.to_dict()``, with ``architectures`` set to the model's class). It is generated
from the builders themselves (``python -m embedlens.plan.tiny_configs``), and a test fails while it differs from
what they build, naming that command. A tiny name it does not hold is built by validate, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STORE = Path(__file__).resolve().parents[1] / "resources" / "tiny_configs.json"


def build_configs() -> dict[str, dict[str, Any]]:
    """``{tiny name: config dict}`` of every tiny model, by building each one (seconds)."""
    from embedlens.testing.tiny import TINY_SPECS, tiny_model

    out = {}
    for name in sorted(TINY_SPECS):
        model, _ = tiny_model(name)
        config = {k: v for k, v in model.config.to_dict().items() if k != "transformers_version"}  # no churn on upgrades
        out[name] = {**config, "architectures": [type(model).__name__]}
    return out


def store_text() -> str:
    return json.dumps(build_configs(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def stored_config(name: str) -> dict[str, Any] | None:
    """The stored config of tiny model `name`, or None where none is stored (an old spelling in
    `embedlens.testing.TINY_ALIASES` too: building it gives its deprecation warning)."""
    configs = json.loads(STORE.read_text(encoding="utf-8")) if STORE.is_file() else {}
    return configs.get(name)


if __name__ == "__main__":
    STORE.write_text(store_text(), encoding="utf-8")
    print(f"wrote {STORE}")
