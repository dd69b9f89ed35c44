"""Model folders may not bring code: a config that asks transformers to import the folder's own Python is refused.

transformers runs a checkpoint's own ``*.py`` when its ``config.json`` (or its processor or tokenizer config)
has an ``auto_map``, and for an unknown ``model_type`` it asks on a terminal whether to run it, where a "y"
imports the folder's code. embedlens passes ``trust_remote_code=False`` to every ``from_pretrained`` (so
transformers never asks) and, before that, refuses such a folder with a message that names the file and key.
A folder whose ``model_type`` transformers ships (many hub checkpoints carry an ``auto_map`` beside one) loads
with transformers' own classes: the ``auto_map`` is ignored, with a warning naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from embedlens.errors import AdapterError

#: Passed to every `from_pretrained` of a config, processor, tokenizer or model.
NO_REMOTE_CODE = {"trust_remote_code": False}

#: The files in a model folder whose ``auto_map`` points transformers at the folder's own code.
_CONFIGS = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
            "image_processor_config.json", "video_preprocessor_config.json")
#: A config larger than this is not a config (and is not read whole to find out).
_MAX_CONFIG_BYTES = 16 << 20


def refuse_remote_code(source: str | Path) -> None:
    """Refuse a local model folder whose configs name code in the folder (``auto_map``) or a model type
    transformers does not know (which only the folder's own code could build).

    An ``auto_map`` beside a ``model_type`` transformers ships is not refused: under ``trust_remote_code=False``
    transformers builds that type with its own classes, so the folder loads natively and a warning names the
    ``auto_map`` that is ignored. Hub ids are left to transformers, which refuses them itself under
    ``trust_remote_code=False``.

    Raises:
        AdapterError: naming the file, the key and its value.
    """
    folder = Path(source)
    try:
        if not folder.is_dir():
            return
    except OSError:
        return
    code = sorted(p.name for p in folder.glob("*.py"))[:5]
    shown = f" (the folder holds {', '.join(code)})" if code else ""
    main = _read_json(folder / "config.json")
    model_type = main.get("model_type") if isinstance(main, dict) else None
    if isinstance(main, dict) and "model_type" in main:
        from transformers import CONFIG_MAPPING

        native = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    else:
        native = False
    for name in _CONFIGS:
        path = folder / name
        config = main if name == "config.json" else _read_json(path)
        if not isinstance(config, dict) or "auto_map" not in config:
            continue
        value = json.dumps(config["auto_map"])[:200]
        if native:
            import warnings

            warnings.warn(f"{path}: auto_map {value} is ignored: embedlens never runs code from a model folder "
                          f"(trust_remote_code=False){shown}; the model loads with transformers' own {model_type!r} classes",
                          UserWarning, stacklevel=1)  # one place: shown once, however many loaders ask
            continue
        raise AdapterError(f"{path}: auto_map {value} asks to import Python code from the model folder{shown}; embedlens "
                           "never runs code from a model folder (trust_remote_code=False). Use a checkpoint of a family "
                           "transformers ships, or convert this one to it")
    if isinstance(main, dict) and "model_type" in main and not native:
        raise AdapterError(f"{folder / 'config.json'}: model_type {model_type!r} is not a model type transformers knows; only "
                           f"the folder's own code could build it{shown}, and embedlens never runs code from a model "
                           "folder (trust_remote_code=False)")


def _read_json(path: Path):
    """The JSON of a small file, or None (missing, too large, not JSON: transformers reports those). Links are read:
    a hub cache's snapshot folder is links into its blobs."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_CONFIG_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
