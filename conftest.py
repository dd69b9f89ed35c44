"""Collection rules for the whole repository (tests/ and the package's doctests), and one thread per test
worker when the suite runs in parallel."""

import importlib.util
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's test command): each worker is one process on one core. Torch's and the BLAS
    # libraries' own thread pools would put two threads per worker on each core (measured on 2 cores: 15 min
    # with them, 8 min without); the environment reaches the runs tests start as subprocesses too, so a
    # run in a subprocess and one in the worker use the same thread count (scikit-learn's KMeans sums its inertia
    # in thread order: different counts differ in the last bit).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_ignore_collect(collection_path, config):
    """embedlens/lmms/model.py subclasses lmms-eval's model class: without lmms-eval (the lmms extra,
    docs/benchmarks-lmms.md) there is nothing in it to collect, unless CI requires lmms-eval."""
    if collection_path.name == "model.py" and collection_path.parent.name == "lmms" and collection_path.parent.parent.name == "embedlens":
        if importlib.util.find_spec("lmms_eval") is None and not os.environ.get("EMBEDLENS_REQUIRE_LMMS"):
            return True
    return None
