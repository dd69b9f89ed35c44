"""The built-in plugins as ``embedlens list`` shows them, stored so that listing them needs no import of torch.

``embedlens/resources/builtin_plugins.json`` holds, per registry, each built-in
plugin's name, module (which a look-up of that name imports, and no other),
summary line, parameters (as `plugin_params` renders them) and,
for adapters, architectures. It is generated from the registries themselves
(``python -m embedlens.plugin_index``), and a test fails while it differs from
what the registries hold, naming that command. Third-party plugins are not in
it: ``embedlens list`` loads their entry points, as before.
"""

from __future__ import annotations

import json
from typing import Any

from embedlens.registry import BUILTIN_INDEX as INDEX  # the registry reads each built-in's module from it


def describe_builtins() -> dict[str, list[dict[str, Any]]]:
    """``{registry: [{name, module, summary, params, architectures?, capabilities?, vision_towers?}, ...]}`` of the built-in plugins, by importing them."""
    from embedlens.registry import REGISTRIES, plugin_params, summary

    out: dict[str, list[dict[str, Any]]] = {}
    for kind, reg in REGISTRIES.items():
        rows = []
        for name, cls in reg.items():
            if not cls.__module__.startswith("embedlens."):
                continue
            row: dict[str, Any] = {"name": name, "module": cls.__module__, "summary": summary(cls)}
            if kind == "adapters":
                row["architectures"] = list(cls.architectures)
                row["capabilities"] = sorted(c.value for c in cls.capabilities)  # what validate may ask without the model
                if cls.vision_towers:  # adapters sharing an architecture are told apart by the tower (`Adapter.mismatch`)
                    row["vision_towers"] = list(cls.vision_towers)
            else:
                row["params"] = [str(p) for p in plugin_params(cls)]
            rows.append(row)
        out[kind] = rows
    return out


def index_text() -> str:
    return json.dumps(describe_builtins(), indent=1, ensure_ascii=False) + "\n"


def read_index() -> dict[str, list[dict[str, Any]]]:
    """The stored description of the built-ins (no import of any plugin)."""
    return json.loads(INDEX.read_text(encoding="utf-8"))


if __name__ == "__main__":
    INDEX.write_text(index_text(), encoding="utf-8")
    print(f"wrote {INDEX}")
