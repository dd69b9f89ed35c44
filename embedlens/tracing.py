"""Reading sites through an nnsight trace.

nnsight compiles the body of a ``with model.trace()`` block from this file's
source, so the trace lives here, in a module, and touches sites in forward
order (vision tower before the language model).

A trace stops as soon as its last site has been read: a pass whose sites end
at the projector or at ``llm.embed`` (the language model's input) never runs
the language model, and a pass that reads decoder layers but not
``llm.unembed`` never computes the head. Only a pass that reads the logits
runs the whole model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from embedlens.adapters.base import mixer_path, resolve_path
from embedlens.sites import COMPONENTS, Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch

#: the components the vision tower (and its projector) computes
VISION = ("vision.embed", "vision.layers", "vision.features", "projector")


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _read(root, adapter: "Adapter", site: Site):
    """The envoy value behind one resolved site (inside a trace)."""
    p = adapter.paths
    comp = site.component
    if comp == "vision.embed":
        return _first(resolve_path(root, p.vision_embed).output)
    if comp == "vision.layers":
        return _first(resolve_path(root, p.vision_layers)[site.layer].output)
    if comp == "vision.features":
        return resolve_path(root, p.projector).input
    if comp == "projector":
        return _first(resolve_path(root, p.projector).output)
    if comp == "llm.embed":
        return resolve_path(root, p.language_model).inputs[1]["inputs_embeds"]
    if comp == "llm.norm":
        return _first(resolve_path(root, p.llm_norm).output)
    if comp == "llm.unembed":
        return _first(resolve_path(root, p.unembed).output)
    layer = resolve_path(root, p.llm_layers)[site.layer]
    if site.sub == "in":
        return layer.input
    if site.sub == "attn":
        # a hybrid model's linear-attention layer: its mixer's update (no `attn` there)
        return _first(resolve_path(layer, p.attn_out or mixer_path(layer, p)).output)
    if site.sub == "mlp":
        return _first(resolve_path(layer, p.mlp_out or p.mlp).output)
    if site.sub == "experts":
        # Gemma 4's, Qwen3-VL-MoE's and GLM-4.5V's (``mlp.gate``) routers return (logits or probabilities, top-k weights,
        # top-k expert ids) over the batch's rows flattened, `[batch * seq, k]`; the family names the item
        # (`Adapter.router_output`: Llama 4's router gives its logits, whose top-k `site_value` takes)
        return resolve_path(layer, p.router).output[adapter.router_output]
    return _first(layer.output)


def _value(adapter: "Adapter", site: Site, saved, inputs: dict) -> torch.Tensor:
    """A saved site value as the site defines it: `llm.unembed` is the model's logits,
    so it carries the final-logit softcapping (Gemma2) that follows `lm_head`; a family's
    documented view of its own tensors (`Adapter.site_value`: Qwen-VL's packed tower) applies."""
    value = saved.detach()
    if site.sub == "experts":  # the router's rows are the batch's positions flattened: `[batch, seq, k]`
        value = value.reshape(*inputs["input_ids"].shape, -1)
    value = adapter.site_value(site, value, inputs)
    return adapter.softcap_logits(value) if site.component == "llm.unembed" else value


def _needs_whole_forward(resolved: list[Site]) -> bool:
    """Whether the last site (in forward order) is the logits, the one output after which nothing runs."""
    return bool(resolved) and resolved[-1].component == "llm.unembed"


def _skipped_vision_layers(adapter: "Adapter", resolved: list[Site], inputs: dict) -> range:
    """Encoder layers that feed nothing the trace reads: after the deepest one the model's image features
    select (`Adapter.vision_layers_needed`) and the deepest `vision.layers[i]` site read. Empty unless the
    trace runs the tower once (it has images or videos, not both: a skip acts on the tower's first call) and reads
    something past it (otherwise it stops before them anyway)."""
    if (inputs.get("pixel_values") is None) == (inputs.get("pixel_values_videos") is None) or not resolved or resolved[-1].component in ("vision.embed", "vision.layers") or getattr(adapter, "remote", False):
        return range(0)
    keep = max([adapter.vision_layers_needed] + [s.layer + 1 for s in resolved if s.component == "vision.layers"])
    return range(keep, adapter.n_vision_layers)


def _skip(root, adapter: "Adapter", layers: range) -> None:
    """Skip encoder `layers` (inside a trace, in forward order): each passes its input through unchanged,
    so the tower's hidden states keep their count and the selected ones are exactly the model's own."""
    modules = resolve_path(root, adapter.paths.vision_layers)
    for i in layers:
        modules[i].skip(modules[i].input)


def _trace(root, inputs: dict, adapter: "Adapter", resolved: list[Site]) -> dict[Site, torch.Tensor]:
    """Read `resolved` (in forward order) in one trace, stopping right after the last one."""
    import torch

    saved = {}
    with torch.no_grad():
        with root.trace(**inputs, **({"remote": True} if getattr(adapter, "remote", False) else {})) as tracer:  # NDIF runs a remote one
            skip = _skipped_vision_layers(adapter, resolved, inputs)
            for site in resolved:
                if skip and COMPONENTS.index(site.component) > COMPONENTS.index("vision.layers"):  # past the tower
                    _skip(root, adapter, skip)
                    skip = range(0)
                saved[site] = _read(root, adapter, site).save()
            if not _needs_whole_forward(resolved):
                tracer.stop()  # nothing after the last site is read: the model does not run past it
    return {s: _value(adapter, s, v, inputs) for s, v in saved.items()}


def collect(adapter: "Adapter", batch: "Batch", sites: Iterable["str | Site"]) -> dict[Site, torch.Tensor]:
    """Run the model once on `batch` and return the activations at `sites`.

    Args:
        adapter: the model's adapter.
        batch: from `adapter.encode`.
        sites: site names or `Site`s (negative layers allowed).

    The forward stops right after the last site: sites that end at the
    projector or ``llm.embed`` cost the vision tower alone, and the head runs
    only when ``llm.unembed`` is asked for. The activations are the same,
    bit for bit, as a whole forward's.

    Returns:
        dict from resolved `Site` to a detached tensor, shaped as the module
        gives it (``[batch, seq, d]`` for LLM sites, ``[images*tiles, tokens, d]``
        for vision sites).

    Raises:
        AdapterError: a site the model does not have or a layer out of range.
    """
    import torch

    resolved = sorted({adapter.resolve(s) for s in sites}, key=Site.order_key)
    inputs = adapter.model_inputs(batch)
    passes = adapter.vision_passes(inputs)
    vision = [s for s in resolved if s.component in VISION]
    if not passes or not vision:
        return _trace(adapter.nnsight, inputs, adapter, resolved)
    # the tower runs more than once in this forward (Qwen-VL: a batch's images, then its videos): each run is read
    # in a trace of its own, which stops before the language model, and the runs' packed sequences are joined
    parts = [_trace(adapter.nnsight, p, adapter, vision) for p in passes]
    out = {s: torch.cat([part[s] for part in parts], dim=1) for s in vision}  # packed towers: [1, patches, d]
    rest = [s for s in resolved if s.component not in VISION]
    return {**out, **(_trace(adapter.nnsight, inputs, adapter, rest) if rest else {})}


def collect_text(adapter: "Adapter", texts: list[str], sites: Iterable["str | Site"]) -> tuple[dict[Site, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Run the model on text alone (no image) and return LLM activations at `sites`.

    Args:
        texts: passages, tokenized with the model's tokenizer (right padding).
        sites: LLM sites only (``llm.embed``, ``llm.layers[i]``, ...).

    Returns:
        (activations by site ``[batch, seq, d]``, ``input_ids``, ``attention_mask``).
    """
    import torch

    resolved = sorted({adapter.resolve(s) for s in sites}, key=Site.order_key)
    bad = [str(s) for s in resolved if not s.component.startswith("llm.")]
    if bad:
        from embedlens.errors import AdapterError

        raise AdapterError(f"collect_text reads LLM sites only; got {bad}")
    from embedlens.adapters.base import Adapter

    if len(texts) > 1 and type(adapter).block_ids is not Adapter.block_ids:
        # prefix-LM families (PaliGemma) mask padded text-only batches differently from the language
        # model alone; one passage per forward keeps every passage exactly as the LM reads it
        parts = [collect_text(adapter, [t], resolved) for t in texts]
        width = max(p[1].shape[1] for p in parts)
        pad = lambda x, v: torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]) if x.dim() == 3 else (0, width - x.shape[1]), value=v)  # noqa: E731
        acts = {s: torch.cat([pad(p[0][s], 0.0) for p in parts]) for s in resolved}
        pad_id = adapter.tokenizer.pad_token_id or 0
        return acts, torch.cat([pad(p[1], pad_id) for p in parts]), torch.cat([pad(p[2], False) for p in parts])
    tok = adapter.tokenizer
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        enc = tok(list(texts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    mask = enc["attention_mask"]
    inputs = {
        "input_ids": enc["input_ids"].to(adapter.device),
        "attention_mask": mask.to(adapter.device),
        # each passage is numbered as if it ran alone, from the family's first position (PaliGemma: 1)
        "position_ids": ((mask.long().cumsum(1) - 1).clamp(min=0) + adapter.position_offset).to(adapter.device),
    }
    return _trace(adapter.nnsight, inputs, adapter, resolved), enc["input_ids"], enc["attention_mask"].bool()
