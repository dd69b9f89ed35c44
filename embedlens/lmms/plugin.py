"""How lmms-eval finds the ``embedlens`` model.

lmms-eval 0.7.3 resolves ``--model NAME`` through its model registry (``lmms_eval.models.MODEL_REGISTRY_V2``),
which reads the entry-point group ``lmms_eval.models`` when ``lmms_eval.models`` is first imported. embedlens
declares ``embedlens = "embedlens.lmms.plugin:manifest"`` there (pyproject.toml), so an installed embedlens is
found with no flag. `register` adds the same manifest by hand, for a source tree that is not installed (and for
``embedlens eval``, which does not depend on the installed metadata).

This module imports nothing heavy: lmms-eval calls `manifest` while its own model package is still importing.
"""

from __future__ import annotations

#: The name lmms-eval knows the model by.
MODEL_NAME = "embedlens"
#: The plugin class, imported by lmms-eval only when the model is used.
CLASS_PATH = "embedlens.lmms.model.EmbedLensLMM"


def manifest():
    """The model's lmms-eval manifest (the ``lmms_eval.models`` entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Register the model with lmms-eval's registry in this process (idempotent)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
