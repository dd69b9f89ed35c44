"""Models spread over devices (accelerate device maps, disk offload) and quantised loading.

There is one device type here (the CPU), so a split over GPUs cannot be shown;
what can be, is: a device map that offloads half the language model, its
embeddings and its head to disk runs every module through accelerate's own
`AlignDevicesHook` (the machinery a multi-GPU split runs, with weights that
live on the ``meta`` device between forwards), and every probe and every
intervention must give the same bytes as the model in one piece. Where code
must ask each module for its own device, a fake device on a hook shows it does.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from embedlens.adapters import load_model
from embedlens.adapters.placement import Placement, loading_kwargs, module_device, weight
from embedlens.errors import AdapterError, PlanError
from embedlens.plan import load_plan, run_all
from embedlens.plan.store import VOLATILE

ROOT = Path(__file__).resolve().parents[2]

#: Half the decoder, the input embeddings and the head on disk; the rest on the CPU.
SPLIT = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "disk",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk",
    "model.language_model.layers.2": "disk",
    "model.language_model.layers.3": "cpu",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def _plan_text(device_map: dict | None) -> str:
    """partition_study's partition and probes that read the LM's layers and head, interventions.yaml's kinds of
    condition (removal, skipped updates, injection, FastV's attention record, decoding) and a mean ablation: 3 prompts."""
    study = yaml.safe_load((ROOT / "examples" / "partition_study.yaml").read_text())
    ivs = yaml.safe_load((ROOT / "examples" / "interventions.yaml").read_text())
    doc = {
        "model": {"source": "zoo:tiny-llava-clip", **({"device_map": device_map} if device_map else {})},
        "data": {"prompts": str(ROOT / "examples" / "data" / "prompts.jsonl"), "padding_side": "left", "limit": 3},
        "partition": study["partition"],
        "probes": [p for p in study["probes"] if p["name"] in ("token_partition", "sink_detector", "attention_flow", "logit_lens")],
        "conditions": {**{k: v for k, v in ivs["conditions"].items() if k in ("prune_even", "skip_mlp_0_1", "inject_at_2", "fastv")},
                       "mean_dead": [{"name": "ablate", "params": {"tokens": "dead", "value": "mean", "if_empty": "noop"}}]},
        "metrics": [{"name": "next_token_kl"}, {"name": "answer_logprob"}, {"name": "generation", "params": {"max_new_tokens": 2}}],
        "batch_size": 2,
        "output": {"figures": False, "report": False, "formats": ["parquet"]},  # the numbers are what is compared
    }
    return yaml.safe_dump(doc)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


@pytest.mark.slow
def test_a_model_offloaded_by_a_device_map_gives_the_same_probes_and_effects(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_all(load_plan(text=_plan_text(None)), whole)
    run_all(load_plan(text=_plan_text(SPLIT)), split)
    a, b = _files(whole), _files(split)
    assert sorted(a) == sorted(b)  # the offloaded weights (split/offload/) are gone with the run
    assert not (split / "offload").exists()
    assert "effects.parquet" in a and "logit_lens.tokens.parquet" in a and "attention_flow.tokens.parquet" in a
    # the plans differ (device_map), so their hashes do; everything else is the same, byte for byte
    h = [json.loads(x["manifest.json"])["plan_hash"].encode() for x in (a, b)]
    assert h[0] != h[1]
    b = {k: v.replace(h[1], h[0]) for k, v in b.items()}
    assert len(a) > 5
    # run_plan.yaml is each plan as written (they differ in device_map); every output is the same
    assert [k for k in a if a[k] != b[k]] == ["run_plan.yaml"]


def test_offloaded_modules_keep_meta_weights_and_embedlens_reads_the_real_ones(tmp_path):
    whole = load_model("tiny:llava-clip")
    split = load_model("tiny:llava-clip", placement=Placement(SPLIT, offload_dir=tmp_path))
    layer = split.model.model.language_model.layers[1]
    assert layer.self_attn.q_proj.weight.device.type == "meta"  # really offloaded: the hook holds the values
    assert any(p.suffix == ".dat" for p in tmp_path.iterdir())
    assert torch.equal(split.input_embeddings(), whole.input_embeddings())
    assert torch.equal(split.output_embeddings(), whole.output_embeddings())
    assert split.device == torch.device("cpu")  # the embeddings' hook's execution device, not meta
    from embedlens.tracing import collect
    from embedlens.data import Sample
    from embedlens.testing.images import shapes

    s = [Sample([shapes(64, 0)], "what is it?", answer="red", id="a")]
    sites = ["llm.embed", "llm.layers[1]", "llm.layers[3].mlp", "llm.unembed"]
    x, y = collect(whole, whole.encode(s), sites), collect(split, split.encode(s), sites)
    for site in x:
        assert torch.equal(x[site], y[site]), site


def test_a_device_map_naming_no_module_or_leaving_one_out_is_an_error(tmp_path):
    with pytest.raises(AdapterError, match=r"model.device_map\['model.nope'\]: not a module"):
        load_model("tiny:llava-clip", placement=Placement({**SPLIT, "model.nope": "cpu"}, offload_dir=tmp_path))
    partial = {k: v for k, v in SPLIT.items() if k != "lm_head"}
    with pytest.raises(AdapterError, match=r"model.device_map: no device for lm_head.weight"):
        load_model("tiny:llava-clip", placement=Placement(partial, offload_dir=tmp_path))
    with pytest.raises(AdapterError, match="'disk' need a run folder"):
        load_model("tiny:llava-clip", placement=Placement(SPLIT))


class _FakeHook:
    def __init__(self, device):
        self.execution_device = device


def test_module_device_asks_the_module_not_the_model():
    """Each module's own device: a hook's execution device first (what accelerate computes on), else its parameters'."""
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert module_device(m) == torch.device("cpu")
    m[1]._hf_hook = _FakeHook(1)  # a GPU index, as accelerate stores it; never allocated on
    assert module_device(m[1]) == torch.device("cuda:1")
    m[0]._hf_hook = types.SimpleNamespace(hooks=[types.SimpleNamespace(), _FakeHook("cuda:3")])  # a SequentialHook
    assert module_device(m[0]) == torch.device("cuda:3")
    meta = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(AdapterError, match="meta device"):
        weight(meta)


def test_the_engine_places_each_layer_on_its_own_device():
    from embedlens.interventions.engine import Engine

    adapter = load_model("tiny:llava-clip")
    engine = Engine(adapter)
    for i, layer in enumerate(engine.layers):
        layer._hf_hook = _FakeHook(f"cuda:{i % 2}")
    try:
        assert [engine.layer_device(i) for i in range(engine.n_layers)] == [torch.device(f"cuda:{i % 2}") for i in range(engine.n_layers)]
    finally:
        for layer in engine.layers:
            del layer._hf_hook


# -- quantisation ----------------------------------------------------------------------
def test_quantization_without_bitsandbytes_is_an_error_naming_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed (as here)
    with pytest.raises(AdapterError, match=r"model.quantization: .*bitsandbytes"):
        loading_kwargs(Placement(quantization={"load_in_4bit": True}))
    with pytest.raises(AdapterError, match=r"model.quantization.load_in_4bits: not a BitsAndBytesConfig argument. Did you mean: load_in_4bit"):
        loading_kwargs(Placement(quantization={"load_in_4bits": True}))


def test_quantization_is_passed_through_where_the_stack_can(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kw = loading_kwargs(Placement(device_map="auto", max_memory={0: "20GiB", "cpu": "60GiB"},
                                  quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_type": "nf4"}))
    cfg = kw.pop("quantization_config")
    assert kw == {"device_map": "auto", "max_memory": {0: "20GiB", "cpu": "60GiB"}}
    assert (cfg.load_in_4bit, cfg.load_in_8bit, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_compute_dtype) == (True, False, "nf4", torch.bfloat16)


def test_plan_errors_name_the_model_keys(tmp_path):
    base = {"data": {"synthetic": {"n": 2}}, "probes": [{"name": "embedding_lens"}]}
    with pytest.raises(PlanError, match=r"model.quantization: .*bitsandbytes|model.quantization: only checkpoints"):
        run_all(load_plan(text=yaml.safe_dump({**base, "model": {"source": "tiny:llava-clip", "quantization": {"load_in_4bit": True}}})), tmp_path / "q")
    with pytest.raises(PlanError, match=r"model.max_memory: needs device_map"):
        load_plan(text=yaml.safe_dump({**base, "model": {"max_memory": {"cpu": "1GiB"}}}))
    with pytest.raises(PlanError, match=r"model.device: give either device .* or device_map"):
        load_plan(text=yaml.safe_dump({**base, "model": {"device": "cpu", "device_map": "auto"}}))
    with pytest.raises(PlanError, match=r"model.device_map"):
        load_plan(text=yaml.safe_dump({**base, "model": {"device_map": "everywhere"}}))
