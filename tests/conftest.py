"""Shared fixtures: tiny models of every family, built once per session, and a
guard that fails any test in which something tries to install a package."""

from __future__ import annotations

import os
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from embedlens.adapters import Capability, load_model  # noqa: E402
from embedlens.data import Sample  # noqa: E402
from embedlens.testing import TINY_SPECS  # noqa: E402
from embedlens.testing.images import noise, shapes  # noqa: E402

FAMILIES = list(TINY_SPECS)

_real_popen_init = subprocess.Popen.__init__
#: Folders a test may `pip install --no-deps --target` into (see `pip_target`): installs there never touch the venv.
_ALLOWED_TARGETS: set[str] = set()


def _allowed_install(args) -> bool:
    """Exactly ``python -m pip install --no-deps --no-build-isolation --target ALLOWED ...``, as a list."""
    if not isinstance(args, (list, tuple)) or "--target" not in args:
        return False
    args = [str(a) for a in args]
    target = args[args.index("--target") + 1] if args.index("--target") + 1 < len(args) else ""
    return (args[1:4] == ["-m", "pip", "install"] and "--no-deps" in args and "--no-build-isolation" in args
            and target in _ALLOWED_TARGETS)


def _guarded_popen_init(self, args, *a, **k):
    text = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
    if "install" in text and ("pip" in text or "uv" in text) and not _allowed_install(args):
        raise AssertionError(f"a package install was attempted at run time: {text}")
    return _real_popen_init(self, args, *a, **k)


@pytest.fixture
def pip_target(tmp_path):
    """A temporary folder a test may install plugin packages into with
    ``python -m pip install --no-deps --no-build-isolation --target FOLDER``, then
    put on a subprocess's PYTHONPATH: the venv itself is never modified."""
    target = tmp_path / "site"
    target.mkdir()
    _ALLOWED_TARGETS.add(str(target))
    yield target
    _ALLOWED_TARGETS.discard(str(target))


@pytest.fixture(autouse=True, scope="session")
def no_installs():
    """TransformerLens may `pip install torchvision` on its own; never let it."""
    subprocess.Popen.__init__ = _guarded_popen_init
    yield
    subprocess.Popen.__init__ = _real_popen_init


_CACHE: dict[str, object] = {}


def get_adapter(name: str):
    if name not in _CACHE:
        _CACHE[name] = load_model(f"tiny:{name}")
    return _CACHE[name]


@pytest.fixture(params=FAMILIES)
def adapter(request):
    return get_adapter(request.param)


def mixed_samples(n_images_last: int = 1, adapter=None) -> list[Sample]:
    """Three samples with different prompt lengths, image sizes and answers.

    The last has no answer, except for families that pass answers separately
    (PaliGemma's suffix), where a batch is all-or-none.
    """
    last_answer = "two" if adapter is not None and adapter.has(Capability.ANSWER_SUFFIX) else None
    return [
        Sample([shapes(64, seed=1)], question="what is it?", answer="a red circle", id="a"),
        Sample([noise(40, 70, seed=2)], question="what colour is the big square on the left?", answer="blue", id="b"),
        Sample([shapes(48, seed=3) for _ in range(n_images_last)], question="count", answer=last_answer, id="c"),
    ]


def run_probe(probe, adapter, batch):
    """One `update` of `probe` on `batch`, with the activations it asks for."""
    from embedlens.tracing import collect

    return probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))


def plan_error(workdir, text: str) -> str:
    """Write `text` as ``workdir/plan.yaml`` and return the `PlanError` that loading and preparing it raise."""
    from embedlens.errors import PlanError
    from embedlens.plan import load_plan, prepare

    path = workdir / "plan.yaml"
    path.write_text(text)
    with pytest.raises(PlanError) as e:
        prepare(load_plan(path))
    return str(e.value)


def sample_positions(adapter, batch, b):
    """Sample b's position ids: `[seq]`, or `[3, seq]` for M-RoPE families (Qwen-VL's (t, h, w) ids)."""
    return adapter.position_ids(batch.inputs).select(-2, b)


def _type_keys(adapter, batch) -> list[str]:
    """The token-type inputs the model's forward reads its attention blocks from: PaliGemma's prefix and Gemma 3's
    images (``token_type_ids``), Gemma 4's images (``mm_token_type_ids``)."""
    import inspect

    params = inspect.signature(adapter.model.forward).parameters
    return [k for k in ("token_type_ids", "mm_token_type_ids") if k in batch.inputs and k in params]


def hf_run(adapter, batch, b, keep, embeds=None, **extra):
    """HF forward of sample b with only the `keep` rows, at their original position ids: the hand-cut reference
    for token removal. The explicit all-ones attention mask matters: without one, transformers (>= 5.24) reads
    the gaps in the position ids as packed sequences and stops attention across them."""
    import torch

    from embedlens.interventions import Engine

    if embeds is None:
        embeds = Engine(adapter).embed(batch)
    keep = keep & ~batch.roles.padding[b]
    kwargs = dict(
        inputs_embeds=embeds[b][keep][None],
        position_ids=sample_positions(adapter, batch, b)[..., keep].unsqueeze(-2),
        attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
    )
    for key in _type_keys(adapter, batch):
        kwargs[key] = batch.inputs[key][b][keep][None]
    per_layer = Engine(adapter).per_layer_token_inputs(batch)  # Gemma 4: the kept tokens' own identities
    if per_layer is not None:
        kwargs["per_layer_inputs"] = per_layer[b][keep][None]
    if adapter.has(Capability.DEEPSTACK):
        return _hf_run_deepstack(adapter, batch, b, keep, kwargs, extra)
    with torch.no_grad():
        return adapter.model(**kwargs, **extra)


def _hf_run_deepstack(adapter, batch, b, keep, kwargs, extra):
    """`hf_run` for DeepStack families (Qwen3-VL): the model's forward takes no DeepStack features with
    `inputs_embeds`, so run its language model with the kept visual tokens' features and mask, then the head."""
    from types import SimpleNamespace

    import torch

    from embedlens.adapters.base import resolve_path
    from embedlens.interventions import Engine

    feats = Engine(adapter).deepstack(batch)
    image = batch.roles.image_span[b][keep]
    kwargs = dict(kwargs, visual_pos_masks=image[None], deepstack_visual_embeds=[f[b][keep][image] for f in feats])
    with torch.no_grad():
        out = resolve_path(adapter.model, adapter.paths.language_model)(**kwargs, **extra)
        logits = resolve_path(adapter.model, adapter.paths.unembed)(out.last_hidden_state)
    return SimpleNamespace(logits=logits, hidden_states=out.hidden_states, past_key_values=getattr(out, "cache", None) or out.past_key_values)


def hf_masked_run(adapter, batch, b, hidden, embeds, extra_embeds=None):
    """HF forward of sample b (padding dropped) with the `hidden` tokens at 0 in the 2-D attention mask, at the
    position ids it has alone: the reference for hiding tokens by mask, which on sliding-window layers still count
    in the window (HF measures it in sequence index). `extra_embeds` (`[n, d]`) are appended as continuation tokens
    at the following positions."""
    import torch

    valid = ~batch.roles.padding[b]
    x = embeds[b][valid]
    pos = sample_positions(adapter, batch, b)[..., valid]  # `[n]`, or M-RoPE's `[3, n]`
    mask = (~hidden[valid]).long()
    types = {k: batch.inputs[k][b][valid] for k in _type_keys(adapter, batch)}
    if extra_embeds is not None:
        n = extra_embeds.shape[0]
        x = torch.cat([x, extra_embeds])
        pos = torch.cat([pos, (pos.max() + 1 + torch.arange(n)).expand(*pos.shape[:-1], n)], dim=-1)
        mask = torch.cat([mask, torch.ones(n, dtype=torch.long)])
        types = {k: torch.cat([t, torch.zeros(n, dtype=t.dtype)]) for k, t in types.items()}
    kwargs = dict(inputs_embeds=x[None], position_ids=pos.unsqueeze(-2), attention_mask=mask[None], **{k: t[None] for k, t in types.items()})
    from embedlens.interventions import Engine

    per_layer = Engine(adapter).per_layer_token_inputs(batch)  # Gemma 4 (no continuation tokens there)
    if per_layer is not None:
        # continuation tokens would need their own per-layer inputs (token ids the reference does not have)
        assert extra_embeds is None, "hf_masked_run has no reference for continuation tokens with per-layer inputs (Gemma 4)"
        kwargs["per_layer_inputs"] = per_layer[b][valid][None]
    with torch.no_grad():
        return adapter.model(**kwargs)
