"""Remote execution on NDIF (nnsight's remote backend), tested up to the network: the request is built, never sent."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from embedlens.adapters import load_model
from embedlens.adapters.remote import load_skeleton
from embedlens.data import Sample
from embedlens.errors import AdapterError, PlanError
from embedlens.plan import load_plan, prepare
from embedlens.testing.images import shapes
from embedlens.tracing import collect

HUB_ID = "llava-hf/llava-1.5-7b-hf"


class _Sent(Exception):
    """Raised where the request would go out."""


@pytest.fixture
def intercepted(monkeypatch):
    """Every remote request nnsight builds, with its payload; nothing reaches the network."""
    import nnsight.modeling.huggingface as hf
    from nnsight.intervention.backends.remote import RemoteBackend

    monkeypatch.setitem(hf._ID_CACHE, HUB_ID, HUB_ID)  # the hub's canonical id, normally asked of the hub
    sent = []

    def request(self, request, tracer):
        sent.append({"request": request, "blob": self._serialize(tracer), "host": self.host})
        raise _Sent

    def no_network(*a, **k):
        raise AssertionError("a network call was made")

    monkeypatch.setattr(RemoteBackend, "request", request)
    monkeypatch.setattr(RemoteBackend, "_post", no_network)
    import websocket

    monkeypatch.setattr(websocket, "create_connection", no_network)
    return sent


def _remote_tiny():
    adapter = load_model("tiny:llava-clip")
    adapter.model.config._name_or_path = HUB_ID  # as from_pretrained(HUB_ID) leaves it
    adapter.remote = True
    return adapter


def test_a_probe_pass_builds_the_ndif_request_for_the_hub_model(intercepted):
    adapter = _remote_tiny()
    batch = adapter.encode([Sample([shapes(64, 0)], "what colour is the circle?", answer="red", id="a")])
    with pytest.raises(_Sent):
        collect(adapter, batch, ["llm.embed", "llm.layers[1]"])
    (sent,) = intercepted
    key = sent["request"].model_key
    cls, _, spec = key.partition(":")
    assert cls == "nnsight.modeling.transformers.TransformersModel"
    assert json.loads(spec)["repo_id"] == HUB_ID
    assert sent["host"].startswith("https://")
    # the payload: the traced block (its sites read and saved, the early stop) and this batch's inputs, images
    # included; no weights (the server has the model)
    blob = sent["blob"]
    if sent["request"].compress:
        import zstandard

        blob = zstandard.ZstdDecompressor().decompress(blob, max_output_size=10**8)
    for piece in (b"pixel_values", b"input_ids", b"_read", b"save", b"stop"):
        assert piece in blob, piece
    assert len(blob) < 10 * sum(v.numel() for v in batch.inputs.values() if torch.is_tensor(v)) + 200_000


def test_a_remote_skeleton_has_no_weights_and_fetches_the_vocabulary_remotely(tmp_path, intercepted):
    from transformers import LlavaForConditionalGeneration

    local = load_model("tiny:llava-clip")
    local.model.config.save_pretrained(tmp_path)  # the config is all a remote model downloads (besides its processor)
    skeleton = load_skeleton(LlavaForConditionalGeneration, str(tmp_path), torch.float32)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    adapter = type(local)(skeleton, local.processor, source=HUB_ID)
    adapter.model.config._name_or_path = HUB_ID
    adapter.remote = True
    with pytest.raises(_Sent):
        adapter.input_embeddings()  # one remote trace saving embed_tokens.weight
    assert json.loads(intercepted[0]["request"].model_key.partition(":")[2])["repo_id"] == HUB_ID


def test_remote_is_refused_for_sources_ndif_cannot_have():
    with pytest.raises(AdapterError, match="model.remote: NDIF runs hub checkpoints"):
        load_model("zoo:tiny-llava-clip", remote=True)


PLAN = {
    "model": {"source": HUB_ID, "remote": True, "dtype": "bfloat16"},
    "data": {"synthetic": {"n": 2}},
    "probes": [{"name": "embedding_lens"}],
}


def test_an_engine_intervention_with_remote_is_refused_before_anything_loads():
    plan = dict(PLAN, conditions={"prune_dead": [{"name": "prune", "params": {"tokens": "visual"}}]}, metrics=[{"name": "next_token_kl"}])
    with pytest.raises(PlanError, match=r"conditions.prune_dead\[0\]: prune \(condition 'prune_dead'\) runs the intervention engine, "
                                        r"which runs locally only; model.remote: true"):
        prepare(load_plan(text=yaml.safe_dump(plan)))


def test_the_cli_says_so_without_a_traceback(tmp_path):
    from embedlens.cli import app

    plan = dict(PLAN, conditions={"skip": [{"name": "skip_sublayer", "params": {"tokens": "visual", "sublayers": [0.5]}}]},
                metrics=[{"name": "next_token_kl"}])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plan))
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "p.yaml")])
    assert r.exit_code == 2
    assert "skip_sublayer" in r.output and "model.remote" in r.output and "Traceback" not in r.output


def test_remote_excludes_device_map_and_quantization():
    with pytest.raises(PlanError, match=r"model.remote: a remote model is placed by NDIF"):
        load_plan(text=yaml.safe_dump(dict(PLAN, model={"source": HUB_ID, "remote": True, "device_map": "auto"})))
