"""`embedlens validate` without weights: the plan against each model's config, refusals at their keys, `--deep` loading.

Speed is measured in benchmarks/ (`run.py --only validate`); these tests check behaviour: no weights are loaded
(the loader is replaced by one that fails, and a fresh interpreter imports neither torch nor transformers),
the config's counts equal the loaded model's, and the layout a pool count assumes is the one the adapter encodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.data import Sample
from embedlens.plan.architecture import Architecture, ConfigAdapter, NeedsModel, adapter_name, architecture
from embedlens.plan.pools import fixed_layout
from embedlens.testing import TINY_SPECS
from embedlens.testing.images import checkerboard

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture
def no_weights(monkeypatch):
    """Fail any model load during the test (validate's loader is `load_plan_model`)."""
    import embedlens.plan.preparation as preparation

    def refuse(*a, **k):
        raise AssertionError("validate loaded a model")

    monkeypatch.setattr(preparation, "load_plan_model", refuse)


def _invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output and not isinstance(r.exception, AssertionError), r.output
    return r


#: Examples whose matched control validate counts on the model's fixed token layout (LLaVA's grid): the count
#: evaluates the selections as a run does, on a role map of torch tensors, so these import torch (at the count only).
COUNTS_A_POOL = ("interventions.yaml",)


@pytest.mark.parametrize("plan", EXAMPLES, ids=lambda p: p.name)
def test_validate_checks_every_example_without_loading_a_model(plan, no_weights):
    """``tiny:`` models too: their configs are stored (`embedlens.plan.tiny_configs`), read as a checkpoint's is."""
    r = _invoke("validate", plan)
    assert r.exit_code == 0, r.output
    assert "ok (" in r.output and "checked against its config (no weights loaded)" in r.output


def _fresh_validate(plans: list[str]) -> tuple[list[tuple[int, str]], set[str]]:
    """``validate`` on each plan in one fresh interpreter: (exit code, output) of each, and the heavy packages loaded."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom embedlens.cli import app\n"
        f"for plan in {plans!r}:\n"
        "    r = CliRunner().invoke(app, ['validate', plan])\n"
        "    print(f'EXIT={r.exit_code} ' + ' '.join(r.output.split()))\n"
        "print('LOADED=' + ','.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'nnsight', 'safetensors'})))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    runs = [(int(x.split()[0][5:]), x) for x in lines if x.startswith("EXIT=")]
    return runs, set(filter(None, lines[-1][len("LOADED="):].split(",")))


def test_validate_imports_neither_torch_nor_model_code_in_a_fresh_process(tmp_path):
    """What makes validate fast: the plugins a plan names are imported alone, and they import torch only in the
    functions that compute; the model is its config (a file, or a tiny model's stored one). Every example, the
    misspelt group of the issue (``tokens: ded``) and an over-drawn control on a family without a fixed layout."""
    ded = tmp_path / "ded.yaml"
    ded.write_text((ROOT / "examples" / "pruning_study.yaml").read_text()
                   .replace("{tokens: dead, if_empty: noop}", "{tokens: ded, if_empty: noop}")
                   .replace("data/", str(ROOT / "examples" / "data") + "/"))
    plans = [str(p) for p in EXAMPLES if p.name not in COUNTS_A_POOL] + [str(ded)]
    runs, loaded = _fresh_validate(plans)
    assert [code for code, _ in runs] == [0] * (len(plans) - 1) + [2], runs
    assert "conditions.prune_dead[0].params.tokens: condition 'prune_dead' (prune): unknown group 'ded'" in runs[-1][1]
    assert loaded == set()


def test_validate_counting_a_fixed_layouts_pool_imports_torch_and_no_model_code(tmp_path):
    """The control pools validate counts (a fixed grid, selections without groups) are counted by the run's own
    selection code on torch tensors: torch, but still no transformers, no weights."""
    plan = _plan(tmp_path, OVERDRAWN % "")
    runs, loaded = _fresh_validate([str(ROOT / "examples" / n) for n in COUNTS_A_POOL] + [str(plan)])
    assert [code for code, _ in runs] == [0] * len(COUNTS_A_POOL) + [2], runs
    assert "conditions.first_random[0].params: prune_random_matched: sample " in runs[-1][1]
    assert loaded == {"torch"}


def _plan(tmp_path: Path, body: str, source: str = "zoo:tiny-llava-clip") -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text(f"model: {{source: {source}}}\ndata: {{synthetic: {{n: 4, seed: 1}}}}\n{body}output: {{dir: out}}\n")
    return p


# the zoo's CLIP LLaVA: 96 px images, 16 px patches -> a 6 x 6 grid, CLS dropped ("default"): 36 visual tokens per image
OVERDRAWN = """conditions:
  first:
    - {name: prune, params: {tokens: "index < 28"}}
  first_random:
    - {name: prune_random_matched, params: {target: "index < 28"%s}}
metrics: [{name: next_token_kl}]
"""


def test_an_overdrawn_control_is_refused_at_validate_naming_its_key_and_counts(tmp_path, no_weights):
    plan = _plan(tmp_path, OVERDRAWN % "")
    r = _invoke("validate", plan)
    assert r.exit_code == 2
    assert f"{plan}:7 conditions.first_random[0].params: prune_random_matched: sample " in r.output
    assert "has 28 target tokens ('index < 28') but only 8 pool tokens ('visual') outside the target" in r.output
    assert "(as do 3 more of the plan's 4 samples)" in r.output and "exclude_target: false" in r.output
    # drawn from the whole pool, the same plan is valid
    r = _invoke("validate", _plan(tmp_path, OVERDRAWN % ", exclude_target: false"))
    assert r.exit_code == 0, r.output


def test_a_pool_that_fits_passes_and_a_group_target_is_left_to_the_run(tmp_path, no_weights):
    r = _invoke("validate", _plan(tmp_path, (OVERDRAWN % "").replace("index < 28", "row < 3")))  # 18 of 36: 18 left
    assert r.exit_code == 0 and "control pool" not in r.output, r.output
    body = ("partition: {anchors: {dead: [5]}}\nconditions:\n  dead_random:\n    - {name: prune_random_matched, params: {target: dead}}\n"
            "metrics: [{name: next_token_kl}]\n")
    r = _invoke("validate", _plan(tmp_path, body))
    assert r.exit_code == 0, r.output
    assert "control pool left to the run: conditions.dead_random[0] (prune_random_matched): the pool outside the target " \
           "depends on the partition's group(s) dead, known only from the model's forward pass" in r.output


def test_a_misspelt_group_is_refused_without_a_model(no_weights, tmp_path):
    text = (ROOT / "examples" / "pruning_study.yaml").read_text().replace("{tokens: dead, if_empty: noop}", "{tokens: ded, if_empty: noop}")
    (tmp_path / "plan.yaml").write_text(text.replace("data/", str(ROOT / "examples" / "data") + "/"))
    r = _invoke("validate", tmp_path / "plan.yaml")
    assert r.exit_code == 2 and "conditions.prune_dead[0].params.tokens: condition 'prune_dead' (prune): unknown group 'ded'" in r.output


@pytest.mark.parametrize("body, key, message", [
    ("probes:\n  - {name: embedding_lens, params: {layers: [0, 9]}}\n", "probes[0].params.layers", "layer 9"),
    ("conditions:\n  inject:\n    - {name: inject_at_layer, params: {layer: 7}}\nmetrics: [{name: next_token_kl}]\n",
     "conditions.inject[0].params.layer", "7"),
    ("probes:\n  - {name: token_clusters, params: {site: 'vision.layers[4]'}}\n", "probes[0].params.site", "layer 4"),
    ("probes:\n  - {name: sink_detector, params: {sink_dims: [128]}}\n", "probes[0].params.sink_dims", "[128]"),
])
def test_sites_and_layers_are_checked_against_the_config(tmp_path, no_weights, body, key, message):
    """The zoo model has 4 LLM layers, 4 tower layers and hidden size 128 (its config.json)."""
    r = _invoke("validate", _plan(tmp_path, body))
    assert r.exit_code == 2, r.output
    assert f" {key}: " in r.output and message in r.output and "out" in r.output


def test_a_config_no_adapter_takes_is_refused_at_the_source(tmp_path, no_weights):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config = json.loads((ROOT / "embedlens/resources/zoo/tiny-llava-clip/config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["FooForBar"]}))
    r = _invoke("validate", _plan(tmp_path, "probes: [{name: embedding_lens}]\n", source="./ckpt"))
    assert r.exit_code == 2 and "model.source: No adapter supports architecture FooForBar" in r.output


def test_quantization_this_installation_cannot_do_is_refused_without_loading(tmp_path, no_weights):
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: {source: zoo:tiny-llava-clip, quantization: {load_in_4bit: true}}\ndata: {synthetic: {n: 2}}\n"
                    "probes: [{name: embedding_lens}]\noutput: {dir: out}\n")
    r = _invoke("validate", plan)
    assert r.exit_code == 2 and f"{plan}:1 model.quantization: " in r.output, r.output
    assert ("bitsandbytes" in r.output) or ("CUDA GPU" in r.output)


def test_deep_loads_the_model(tmp_path, monkeypatch):
    import embedlens.plan.preparation as preparation

    calls = []
    real = preparation.load_plan_model
    monkeypatch.setattr(preparation, "load_plan_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    r = _invoke("validate", _plan(tmp_path, "probes:\n  - {name: embedding_lens, params: {layers: [0]}}\n"), "--deep")
    assert r.exit_code == 0 and "checked with the model loaded" in r.output and len(calls) == 1, r.output


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_the_config_gives_the_loaded_models_counts(name):
    """Every family: the counts read from the config equal the loaded model's (its modules and embedding matrix)."""
    from conftest import get_adapter

    ad = get_adapter(name)
    config = {**ad.config.to_dict(), "architectures": [type(ad.model).__name__]}  # as save_pretrained writes it
    arch = Architecture.from_config(name, adapter_name(config, None), config)
    assert arch.adapter == ad.name
    stored = architecture(f"tiny:{name}")  # what validate reads for a tiny: source: the same counts, no model built
    assert (stored.adapter, stored.n_fields, stored.fixed_grid()) == (arch.adapter, arch.n_fields, arch.fixed_grid())
    view = ConfigAdapter(arch)
    assert (view.n_llm_layers, view.n_vision_layers) == (ad.n_llm_layers, ad.n_vision_layers)
    assert view.input_embeddings().shape == ad.input_embeddings().shape
    assert view.output_embeddings().shape == ad.output_embeddings().shape  # Molmo2: fewer rows than its input table
    with pytest.raises(NeedsModel):
        view.tokenizer


def test_the_stored_tiny_configs_are_what_the_builders_make():
    from embedlens.plan.tiny_configs import STORE, store_text

    assert STORE.read_text(encoding="utf-8") == store_text(), (
        "embedlens/resources/tiny_configs.json is stale; regenerate it with: python -m embedlens.plan.tiny_configs")


@pytest.mark.parametrize("source", ["zoo:tiny-llava-clip", "zoo:tiny-llava-siglip", "tiny:llava-clip"])
def test_the_fixed_layout_is_the_one_the_adapter_encodes(source):
    """Pools are counted on `fixed_layout`: it must be each image span exactly as the adapter builds it."""
    from embedlens.adapters import load_model

    ad = load_model(source)
    arch = architecture(source) or Architecture.from_config(source, ad.name, ad.config.to_dict())
    for k in (1, 2):
        batch = ad.encode([Sample([checkerboard()] * k, question="what?", id="a")])
        span = batch.roles.image_span[0]
        want = fixed_layout(arch.fixed_grid(), k, arch.kept_cls())
        for field in ("kind", "image", "row", "col"):
            assert torch.equal(getattr(batch.roles, field)[0][span], getattr(want, field)[0]), (source, k, field)


def test_a_kept_cls_token_is_in_the_layout():
    roles = fixed_layout((2, 2), 2, cls=True)
    assert roles.image_cls.sum().item() == 2 and roles.visual.sum().item() == 8 and roles.image_span.sum().item() == 10


@pytest.mark.parametrize("damage, message", [
    ("no weights", "the folder has no weights"),
    ("truncated", "model.safetensors is not a whole safetensors file (its tensors end at byte"),
    ("garbage", "model.safetensors is not a whole safetensors file (its header"),
    ("index outside", "its weight index names '../model.safetensors', not a file of the folder"),
])
def test_a_model_folders_weight_files_are_checked_from_their_headers(tmp_path, no_weights, damage, message):
    """Without reading a tensor: loading would refuse these folders, so validate does."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(ROOT / "embedlens/resources/zoo/tiny-llava-clip", folder)
    weights = folder / "model.safetensors"
    if damage == "no weights":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage":
        weights.write_bytes(b"not a safetensors file" * 8)
    else:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../model.safetensors"}}))
    r = _invoke("validate", _plan(tmp_path, "probes: [{name: embedding_lens}]\n", source="./ckpt"))
    assert r.exit_code == 2 and "model.source: cannot load the model from" in r.output and message in r.output, r.output
    shutil.copy(ROOT / "embedlens/resources/zoo/tiny-llava-clip/model.safetensors", weights)  # whole again: valid
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    assert _invoke("validate", _plan(tmp_path, "probes: [{name: embedding_lens}]\n", source="./ckpt")).exit_code == 0


def test_a_forced_adapter_is_read_from_the_config_where_it_lists_the_architecture(tmp_path, no_weights):
    """`model.adapter: llava` on a LLaVA checkpoint needs no load; onto another architecture's checkpoint, only
    the weights tell whether they fit (tests/adapters/test_loading.py: validate loads it and names model.adapter)."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: {source: zoo:tiny-llava-clip, adapter: llava}\ndata: {synthetic: {n: 2}}\n"
                    "probes: [{name: embedding_lens}]\noutput: {dir: out}\n")
    r = _invoke("validate", plan)
    assert r.exit_code == 0 and "checked against its config (no weights loaded)" in r.output, r.output
    plan.write_text(plan.read_text().replace("adapter: llava}", "adapter: paligemma}"))
    r = CliRunner().invoke(app, ["validate", str(plan)])
    assert isinstance(r.exception, AssertionError) and str(r.exception) == "validate loaded a model"


def test_processor_kwargs_the_family_does_not_take_are_refused_without_loading(tmp_path, no_weights):
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: {source: zoo:tiny-llava-clip, processor_kwargs: {max_pixels: 512}}\ndata: {synthetic: {n: 2}}\n"
                    "probes: [{name: embedding_lens}]\noutput: {dir: out}\n")
    r = _invoke("validate", plan)
    assert r.exit_code == 2, r.output
    assert f"{plan}:1 model.processor_kwargs.max_pixels: llava's processor does not take it" in r.output


def test_adapters_sharing_an_architecture_are_told_apart_by_the_tower_from_the_config_alone():
    """`LlavaForConditionalGeneration` is `llava` with a CLIP or SigLIP tower and `llava_pixtral` with Pixtral's; from
    config.json alone (no import of the families) validate picks as `load_model` does, and refuses a tower no adapter
    takes with the loader's reasons."""
    from embedlens.errors import AdapterError
    from embedlens.plan.architecture import adapter_name

    llava = {"architectures": ["LlavaForConditionalGeneration"]}
    assert adapter_name({**llava, "vision_config": {"model_type": "clip_vision_model"}}, None) == "llava"
    assert adapter_name({**llava, "vision_config": {"model_type": "siglip_vision_model"}}, None) == "llava"
    assert adapter_name({**llava, "vision_config": {"model_type": "pixtral"}}, None) == "llava_pixtral"
    dino = {**llava, "vision_config": {"model_type": "dinov2"}}
    assert adapter_name(dino, None, missing_ok=True) is None
    with pytest.raises(AdapterError, match=r"No adapter supports architecture LlavaForConditionalGeneration \(its vision "
                                           r"tower is 'dinov2'; adapter 'llava' takes"):
        adapter_name(dino, None)
