"""Support of the lmms-eval bridge tests: lmms-eval itself (the lmms extra), offline settings, a plan on a zoo
model with the pruning conditions.

Not a conftest.py: tests elsewhere import the suite's fixtures with ``from conftest import ...``, and a second
conftest module would shadow tests/conftest.py. Test modules import `lmms_env` from here.
"""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local tasks read local files; nothing may reach a hub

PLAN = """\
model:
  source: {source}
data:
  {data}
  padding_side: left
partition:
  anchors: {{dead: [{dead}]}}
conditions:
  prune_dead:
    - {{name: prune, params: {{tokens: dead, if_empty: noop}}}}
  prune_random:
    - {{name: prune_random_matched, params: {{target: dead, seed: 0, if_empty: noop, exclude_target: false}}}}
metrics:
  - {{name: generation, params: {{max_new_tokens: 8}}}}
  - {{name: forced_choice}}
  - {{name: answer_logprob}}
output:
  dir: {out}
batch_size: 3
seed: 0
"""


def need_lmms_eval():
    """lmms-eval, or a skip; a failure where CI installed the extra (EMBEDLENS_REQUIRE_LMMS=1)."""
    try:
        import lmms_eval.evaluator  # noqa: F401
    except ImportError as e:
        if os.environ.get("EMBEDLENS_REQUIRE_LMMS"):
            pytest.fail(f"EMBEDLENS_REQUIRE_LMMS is set but lmms-eval does not import: {e}")
        pytest.skip(f"lmms-eval is not installed (the lmms extra: docs/benchmarks-lmms.md): {e}")


_real_connect = socket.socket.connect


def _local_only_connect(self, address):
    """Loopback and Unix sockets only: a bridge test that reaches for a hub (data sets, models, nltk) fails."""
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and not (host in ("localhost", "::1") or str(host).startswith("127.")):
        raise AssertionError(f"a network connection was attempted during an lmms-eval bridge test: {address}")
    return _real_connect(self, address)


@pytest.fixture(scope="session")
def lmms_env(tmp_path_factory):
    """lmms-eval importable, its data set cache in a temporary folder (not the user's HF cache), and no
    connection leaving the machine for the rest of the session (the suite-wide guard already fails installs)."""
    need_lmms_eval()
    cache = tmp_path_factory.mktemp("lmms_datasets_cache")
    old = os.environ.get("LMMS_EVAL_DATASETS_CACHE")
    os.environ["LMMS_EVAL_DATASETS_CACHE"] = str(cache)
    socket.socket.connect = _local_only_connect
    yield cache
    socket.socket.connect = _real_connect
    if old is None:
        os.environ.pop("LMMS_EVAL_DATASETS_CACHE", None)
    else:
        os.environ["LMMS_EVAL_DATASETS_CACHE"] = old


#: The zoo models' dead anchor: the word their background patches land on (README: the model zoo).
DEAD_WORD = "background"


def write_plan(folder, source: str = "zoo:tiny-llava-clip", data: str = "synthetic: {n: 4, seed: 0, size: 96}", name: str = "plan.yaml"):
    """A plan with the pruning conditions, the zoo's dead anchor given (so every plan labels alike), `data` as given."""
    from embedlens.adapters import load_model

    tok = load_model(source).tokenizer
    dead = tok.convert_tokens_to_ids(DEAD_WORD)
    path = folder / name
    path.write_text(PLAN.format(source=source, data=data, dead=dead, out=folder / "run"))
    return path
