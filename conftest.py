"""Collection rules for the whole repository (tests/ and the package's doctests)."""

import importlib.util
import os


def pytest_ignore_collect(collection_path, config):
    """embedlens/lmms/model.py subclasses lmms-eval's model class: without lmms-eval (the lmms extra,
    docs/benchmarks-lmms.md) there is nothing in it to collect, unless CI requires lmms-eval."""
    if collection_path.name == "model.py" and collection_path.parent.name == "lmms" and collection_path.parent.parent.name == "embedlens":
        if importlib.util.find_spec("lmms_eval") is None and not os.environ.get("EMBEDLENS_REQUIRE_LMMS"):
            return True
    return None
