"""Model folders may not bring code: a config that asks transformers to import the folder's own Python is refused.

transformers runs a checkpoint's own ``*.py`` when its ``config.json`` (or its processor or tokenizer config)
has an ``auto_map``, and for an unknown ``model_type`` it asks on a terminal whether to run it, where a "y"
imports the folder's code. embedlens passes ``trust_remote_code=False`` to every ``from_pretrained`` (so
transformers never asks) and, before that, refuses such a folder with a message that names the file and key.
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

    Hub ids are left to transformers, which refuses them itself under ``trust_remote_code=False``.

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
    for name in _CONFIGS:
        path = folder / name
        config = _read_json(path)
        if not isinstance(config, dict):
            continue
        if "auto_map" in config:
            value = json.dumps(config["auto_map"])[:200]
            raise AdapterError(f"{path}: auto_map {value} asks to import Python code from the model folder{shown}; embedlens "
                               "never runs code from a model folder (trust_remote_code=False). Use a checkpoint of a family "
                               "transformers ships, or convert this one to it")
        if name == "config.json" and "model_type" in config:
            from transformers import CONFIG_MAPPING

            model_type = config["model_type"]
            if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
                raise AdapterError(f"{path}: model_type {model_type!r} is not a model type transformers knows; only the "
                                   f"folder's own code could build it{shown}, and embedlens never runs code from a model "
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
