"""Interventions proved by equivalences with hand-built runs of the Hugging Face model.

Every test runs on every tiny family (LLaVA with CLIP and SigLIP towers,
OneVision, PaliGemma with its bidirectional prefix, Gemma 3 with sliding-window
layers shorter than the prompts). The independent side is always the HF model's
own forward, fed inputs built by hand: rows cut out of the input embeddings with
their original position ids, a two-phase run, hooks on the HF forward, or the
eager attention pattern.

On sliding-window layers a token hidden by a mask still takes its place in the
window (HF counts the window in sequence index), a removed one does not; there
mask-mode results are checked against HF runs with those tokens at 0 in the 2-D
attention mask (`hf_masked_run`) instead of against removal.
"""

from __future__ import annotations

import pytest
import torch

from conftest import get_adapter, hf_masked_run, hf_run, sample_positions
from embedlens.adapters.base import resolve_path
from embedlens.data import Sample
from embedlens.errors import InterventionError
from embedlens.interventions import Engine
from embedlens.interventions.ablate import Ablate
from embedlens.interventions.condition import Condition
from embedlens.interventions.layers import AttentionKnockout, InjectAtLayer, SkipSublayer, WithdrawAtLayer
from embedlens.interventions.prune import FastV, Prune, PruneRandomMatched
from embedlens.testing.images import noise, shapes
from embedlens.tracing import collect

TOL = 1e-5


def prompt_samples() -> list[Sample]:
    return [
        Sample([shapes(64, seed=1)], question="what is it?", id="a"),
        Sample([noise(40, 70, seed=2)], question="what colour is the big square on the left?", id="b"),
        Sample([shapes(48, seed=3)], question="count", id="c"),
    ]


def planted_group(batch, seed: int = 0, denom: int = 5) -> torch.Tensor:
    """A random subset of each sample's visual tokens, a different size per sample."""
    gen = torch.Generator().manual_seed(seed)
    vis = batch.roles.visual
    out = torch.zeros_like(vis)
    for b in range(vis.shape[0]):
        pos = vis[b].nonzero().flatten()
        n = max(1, len(pos) * (b + 1) // denom)
        out[b, pos[torch.randperm(len(pos), generator=gen)[:n]]] = True
    return out


def hf_run_from(adapter, batch, b, keep, embeds, layer: int, state: torch.Tensor):
    """`hf_run`, with decoder layer `layer`'s input replaced by `state` (a two-phase run)."""

    def swap(module, args, kwargs):
        return (state[None], *args[1:]), kwargs

    handle = resolve_path(adapter.model, adapter.paths.llm_layers)[layer].register_forward_pre_hook(swap, with_kwargs=True)
    try:
        return hf_run(adapter, batch, b, keep, embeds)
    finally:
        handle.remove()


def attention_layers(eng) -> list[int]:
    """The decoder layers with attention (all but a hybrid model's linear-attention layers)."""
    return [i for i in range(eng.n_layers) if i not in eng.linear]


def window_bites(eng, batch) -> bool:
    """Masking and removal differ: some sliding-window layer's window (or chunked layer's chunk: Llama 4) is shorter
    than a sample, or the model has
    linear-attention layers (Qwen3.5's Gated DeltaNet: a masked token keeps its step of the recurrent scan and its
    place in the short causal convolution, as in HF with a 0 in the 2-D mask; a removed one has neither)."""
    windows = [getattr(w, "size", w) for w in eng.windows if w is not None]  # a sliding window, or a chunk's size
    return bool(eng.linear) or (bool(windows) and min(windows) < int((~batch.roles.padding).sum(dim=1).max()))


@pytest.fixture(params=["left", "right"])
def setup(request, adapter):
    batch = adapter.encode(prompt_samples(), padding_side=request.param)
    return adapter, batch, Engine(adapter)


def test_baseline_equals_hf(setup):
    adapter, batch, eng = setup
    out = eng.run(batch)
    with torch.no_grad():
        ref = adapter.model(**adapter.model_inputs(batch), position_ids=adapter.position_ids(batch.inputs)).logits
    valid = ~batch.roles.padding
    torch.testing.assert_close(out.logits()[valid], ref[valid], atol=TOL, rtol=0)


def test_prune_remove_mask_and_hand_cut_agree(setup):
    adapter, batch, eng = setup
    group = planted_group(batch)
    groups = {"dead": group}.__getitem__
    removed = eng.run(batch, [Prune(tokens="dead")], groups=groups)
    masked = eng.run(batch, [Prune(tokens="dead", mode="mask")], groups=groups)
    keep = ~group & ~batch.roles.padding
    assert int(removed.counts["visual"][0].sum()) == int(batch.roles.image_span.sum() - group.sum())
    assert int(masked.counts["visual"][0].sum()) == int(batch.roles.image_span.sum())
    text = batch.roles.text | batch.roles.bos | batch.roles.special
    embeds = eng.embed(batch)
    if not window_bites(eng, batch):
        torch.testing.assert_close(removed.logits()[text & keep], masked.logits()[text & keep], atol=TOL, rtol=0)
    else:  # a masked token keeps its place in a sliding window: HF with the token at 0 in the 2-D mask
        for b in range(3):
            ref = hf_masked_run(adapter, batch, b, group[b], embeds).logits[0]
            at = (text & keep)[b][~batch.roles.padding[b]]
            torch.testing.assert_close(masked.logits()[b][text[b] & keep[b]], ref[at], atol=TOL, rtol=0)
    # Batched with a different prune count per sample == each sample alone, cut by hand.
    assert len({int(group[b].sum()) for b in range(3)}) == 3
    for b in range(3):
        ref = hf_run(adapter, batch, b, keep[b], embeds).logits[0]
        torch.testing.assert_close(removed.logits()[b][keep[b]], ref, atol=TOL, rtol=0)


def test_masked_tokens_stay_hidden_from_decoded_tokens(setup):
    """Scoring a multi-token continuation (forced choice, answer log-prob) after pruning by mask equals it after
    removal: decoded tokens must not see keys every prompt query was blocked from."""
    adapter, batch, eng = setup
    groups = {"dead": planted_group(batch, seed=2)}.__getitem__
    removed = eng.run(batch, [Prune(tokens="dead")], groups=groups, cache=True)
    masked = eng.run(batch, [Prune(tokens="dead", mode="mask")], groups=groups, cache=True)
    conts = [[5, 9, 12, 7]] * 3
    if not window_bites(eng, batch):
        torch.testing.assert_close(masked.score(conts), removed.score(conts), atol=1e-5, rtol=0)
        torch.testing.assert_close(masked.generate(4), removed.generate(4))
        return
    # sliding windows: the continuation's log-prob as HF gives it with the pruned tokens at 0 in the 2-D mask,
    # prompt and continuation in one forward (no cache), so the decoded tokens' windows count the masked tokens too
    embeds = eng.embed(batch)
    emb = adapter.model.get_input_embeddings()
    got = masked.score(conts)
    for b in range(3):
        cont = torch.tensor(conts[b])
        with torch.no_grad():
            logits = hf_masked_run(adapter, batch, b, groups("dead")[b], embeds, extra_embeds=emb(cont)).logits[0]
        logp = logits[-len(cont) - 1 : -1].double().log_softmax(-1).gather(1, cont[:, None]).sum()
        torch.testing.assert_close(got[b], logp, atol=1e-5, rtol=0)


def test_generation_after_pruning_matches_hand_built(setup):
    adapter, batch, eng = setup
    group = planted_group(batch, seed=1)
    out = eng.run(batch, [Prune(tokens="dead")], groups={"dead": group}.__getitem__, cache=True)
    gen = out.generate(5)
    embeds = eng.embed(batch)
    keep = ~group
    for b in range(3):
        valid = ~batch.roles.padding[b]
        first = hf_run(adapter, batch, b, keep[b], embeds, use_cache=True)
        pkv, nxt = first.past_key_values, int(first.logits[0, -1].argmax())
        # decoded text continues one past the largest prompt position (with M-RoPE: over t, h and w, as HF's rope_deltas)
        tokens, pos = [nxt], int(sample_positions(adapter, batch, b)[..., valid].max()) + 1
        for i in range(4):
            with torch.no_grad():
                o = adapter.model(
                    input_ids=torch.tensor([[nxt]]), past_key_values=pkv, position_ids=torch.tensor([[pos + i]]), use_cache=True
                )
            pkv, nxt = o.past_key_values, int(o.logits[0, -1].argmax())
            tokens.append(nxt)
        assert gen[b].tolist() == tokens
    # generation leaves the prefill cache as it was: a second call gives the same tokens
    assert torch.equal(out.generate(5), gen)


def test_no_op_conditions_reproduce_baseline_exactly(setup):
    adapter, batch, eng = setup
    base = eng.run(batch).logits()
    n = adapter.n_llm_layers
    attends = attention_layers(eng)  # knockout applies to attention layers (not Qwen3.5's Gated DeltaNet ones)
    for ivs in (
        [InjectAtLayer(layer=0)],
        [WithdrawAtLayer(layer=n)],
        [SkipSublayer(tokens="none", sublayers=[0, 0.5, n - 0.5], if_empty="noop")],
        [AttentionKnockout(source="none", target="visual", layers=attends, if_empty="noop")],
        [AttentionKnockout(source="all", target="none", layers=attends[:1], if_empty="noop")],
    ):
        out = eng.run(batch, ivs).logits()
        assert torch.equal(out.nan_to_num(), base.nan_to_num()), ivs


def test_inject_at_layer_1_equals_two_phase_run(setup):
    adapter, batch, eng = setup
    out = eng.run(batch, [InjectAtLayer(layer=1)])
    embeds = eng.embed(batch)
    image = batch.roles.image_span
    for b in range(3):
        valid = ~batch.roles.padding[b]
        text = valid & ~image[b]
        # phase 1: text alone through layer 0
        h1 = hf_run(adapter, batch, b, text, embeds, output_hidden_states=True).hidden_states[1][0]
        merged = embeds[b][valid].clone()
        merged[text[valid]] = h1
        # phase 2: everything from layer 1 on, image rows entering as projector outputs
        ref = hf_run_from(adapter, batch, b, valid, embeds, 1, merged).logits[0]
        torch.testing.assert_close(out.logits()[b][valid], ref, atol=TOL, rtol=0)
    assert out.counts["visual"][0].sum() == 0 and torch.equal(out.counts["visual"][1], image.sum(1))


def test_knockout_of_image_from_text_equals_pruning_the_image(setup):
    adapter, batch, eng = setup
    n = adapter.n_llm_layers
    if eng.linear:  # knockout cannot reach a linear-attention layer: it refuses them by name, listing the others
        with pytest.raises(InterventionError, match=rf"decoder layers? {', '.join(map(str, eng.linear))} (are|is a) "
                                                    rf"linear-attention.*Attention applies in layers {', '.join(map(str, attention_layers(eng)))}$"):
            eng.run(batch, [AttentionKnockout(source="not image_span", target="image_span", layers=[f"0-{n - 1}"])])
        return
    out = eng.run(batch, [AttentionKnockout(source="not image_span", target="image_span", layers=[f"0-{n - 1}"])])
    embeds = eng.embed(batch)
    for b in range(3):
        keep = ~batch.roles.padding[b] & ~batch.roles.image_span[b]
        if window_bites(eng, batch):  # the hidden image still fills sliding windows: HF with it at 0 in the mask
            ref = hf_masked_run(adapter, batch, b, batch.roles.image_span[b], embeds).logits[0][keep[~batch.roles.padding[b]]]
        else:
            ref = hf_run(adapter, batch, b, keep, embeds).logits[0]
        torch.testing.assert_close(out.logits()[b][keep], ref, atol=TOL, rtol=0)


def test_skip_sublayer_equals_hooks_on_hf_forward(setup):
    adapter, batch, eng = setup
    sel = batch.roles.visual & (batch.roles.col % 2 == 0)
    out = eng.run(batch, [SkipSublayer(tokens="visual and col % 2 == 0", sublayers=[0.5, {"layer": 1, "sublayer": "attn"}])])
    layers = resolve_path(adapter.model, adapter.paths.llm_layers)
    embeds = eng.embed(batch)
    for b in range(3):
        valid = ~batch.roles.padding[b]
        rows = sel[b][valid]
        hooks = [  # the modules the adapter names (Gemma 4's MLP update is its post-norm over the MLP and the experts)
            resolve_path(layers[0], adapter.paths.mlp).register_forward_hook(lambda m, a, o: o.masked_fill(rows[None, :, None], 0.0)),
            resolve_path(layers[1], adapter.paths.attn).register_forward_hook(
                lambda m, a, o: (o[0].masked_fill(rows[None, :, None], 0.0), *o[1:])),
        ]
        try:
            ref = hf_run(adapter, batch, b, valid, embeds).logits[0]
        finally:
            for h in hooks:
                h.remove()
        torch.testing.assert_close(out.logits()[b][valid], ref, atol=TOL, rtol=0)


def test_withdraw_equals_two_phase_run(setup):
    """Image tokens leave from layer 2: layers 2.. see only text, whose state comes from a full run."""
    adapter, batch, eng = setup
    out = eng.run(batch, [WithdrawAtLayer(layer=2)])
    embeds = eng.embed(batch)
    for b in range(3):
        valid = ~batch.roles.padding[b]
        text = valid & ~batch.roles.image_span[b]
        h2 = hf_run(adapter, batch, b, valid, embeds, output_hidden_states=True).hidden_states[2][0]
        ref = hf_run_from(adapter, batch, b, text, embeds, 2, h2[text[valid]]).logits[0]
        torch.testing.assert_close(out.logits()[b][text], ref, atol=TOL, rtol=0)


def test_ablate_zero_and_mean(setup):
    adapter, batch, eng = setup
    sel = batch.roles.visual & (batch.roles.row == 0)
    out = eng.run(batch, [Ablate(tokens="visual and row == 0", value="zero")])
    embeds = eng.embed(batch)
    zeroed = embeds.masked_fill(sel[..., None], 0.0)
    for b in range(3):
        valid = ~batch.roles.padding[b]
        ref = hf_run(adapter, batch, b, valid, zeroed).logits[0]
        torch.testing.assert_close(out.logits()[b][valid], ref, atol=TOL, rtol=0)
    # the data-set mean from the fit pass equals the mean of the collected LLM inputs
    cond = Condition("mean", [Ablate(tokens="visual", value="mean", site="llm.embed")])
    other = adapter.encode(prompt_samples()[:2], padding_side="left")
    cond.fit(adapter, [batch, other])
    acts = [collect(adapter, x, ["llm.embed"]) for x in (batch, other)]
    rows = torch.cat([a[next(iter(a))][x.roles.visual] for a, x in zip(acts, (batch, other))]).double()
    torch.testing.assert_close(cond.interventions[0].mean, rows.mean(0), atol=1e-9, rtol=0)


def test_ablate_with_a_word_embedding(setup):
    """value: word puts the word's input-embedding row in each selected slot: HF on hand-edited embeddings agrees."""
    adapter, batch, eng = setup
    sel = batch.roles.visual & (batch.roles.col == 1)
    out = eng.run(batch, [Ablate(tokens="visual and col == 1", value="word", word="background")])
    wid = adapter.tokenizer.convert_tokens_to_ids("background")
    embeds = eng.embed(batch)
    edited = torch.where(sel[..., None], adapter.input_embeddings()[wid].detach().to(embeds), embeds)
    for b in range(3):
        valid = ~batch.roles.padding[b]
        ref = hf_run(adapter, batch, b, valid, edited).logits[0]
        torch.testing.assert_close(out.logits()[b][valid], ref, atol=TOL, rtol=0)
    same = eng.run(batch, [Ablate(tokens="visual and col == 1", value="word", word=wid)])  # an id is the same word
    valid = ~batch.roles.padding
    torch.testing.assert_close(same.logits()[valid], out.logits()[valid], atol=0, rtol=0)
    with pytest.raises(InterventionError, match="word: 'not-a-word-at-all' is not one token"):
        Ablate(tokens="visual", value="word", word="not-a-word-at-all").check(adapter)
    with pytest.raises(InterventionError, match="word: give a word"):
        Ablate(tokens="visual", value="word")


def test_ablate_mean_at_a_layer(setup):
    adapter, batch, eng = setup
    iv = Ablate(tokens="visual", value="mean", site="llm.layers[1]")
    Condition("m", [iv]).fit(adapter, [batch])
    out = eng.run(batch, [iv])
    layers = resolve_path(adapter.model, adapter.paths.llm_layers)
    embeds = eng.embed(batch)
    for b in range(3):
        valid = ~batch.roles.padding[b]
        rows = batch.roles.visual[b][valid]
        h = layers[1].register_forward_hook(lambda m, a, o: torch.where(rows[None, :, None], iv.mean.to(o), o))
        try:
            ref = hf_run(adapter, batch, b, valid, embeds).logits[0]
        finally:
            h.remove()
        torch.testing.assert_close(out.logits()[b][valid], ref, atol=TOL, rtol=0)


def test_fastv_ranks_by_the_eager_attention_pattern(setup):
    adapter, batch, eng = setup
    eager = get_adapter_eager(adapter)
    out = Engine(adapter).run(batch, [FastV(layer=2, keep=0.5)])
    with torch.no_grad():
        # HF returns the attention layers' patterns only (a hybrid model's linear-attention layers have none)
        ref = eager.model(
            **eager.model_inputs(batch), position_ids=eager.position_ids(batch.inputs), output_attentions=True
        ).attentions[attention_layers(eng).index(1)]
    ctx = out.context
    last = batch.roles.last_index
    for b in range(3):
        valid = ~batch.roles.padding[b]
        pattern = ref[b, :, last[b]]  # [heads, seq]
        torch.testing.assert_close(ctx.attention[1][b][:, valid], pattern[:, valid], atol=1e-5, rtol=0)
        vis = batch.roles.visual[b].nonzero().flatten()
        score = pattern.mean(0)[vis]
        n_drop = len(vis) - -(-len(vis) // 2)
        expected = set(vis[torch.argsort(score, stable=True)[:n_drop]].tolist())
        dropped = set((batch.roles.visual[b] & (ctx.exit[b] == 2)).nonzero().flatten().tolist())
        assert dropped == expected
    n_visual = batch.roles.visual.sum(1)
    assert torch.equal(out.counts["visual"][2], out.counts["visual"][1] - n_visual // 2)


_EAGER: dict[str, object] = {}


def get_adapter_eager(adapter):
    from embedlens.adapters import load_model

    if adapter.source not in _EAGER:
        _EAGER[adapter.source] = load_model(adapter.source, attn_implementation="eager")
    return _EAGER[adapter.source]


def test_prune_random_matched(adapter):
    batch = adapter.encode(prompt_samples(), padding_side="left")
    eng = Engine(adapter)
    group = planted_group(batch, denom=8)
    groups = {"dead": group}.__getitem__

    def chosen(seed, b=batch, g=groups):
        ctx = eng.context(b, groups=g)
        PruneRandomMatched(target="dead", seed=seed).setup(ctx)
        return (ctx.exit == 0) & ~b.roles.padding

    a, again, other = chosen(0), chosen(0), chosen(1)
    assert torch.equal(a, again) and not torch.equal(a, other)
    for c in (a, other):
        assert not (c & group).any()  # never the target
        assert not (c & ~batch.roles.visual).any()  # never text
        assert torch.equal(c.sum(1), group.sum(1))  # matched count
    # batching does not change a sample's draw
    alone = adapter.encode(prompt_samples()[1:2], padding_side="left")
    alone_group = torch.zeros_like(alone.roles.visual)
    alone_group[0, alone.roles.visual[0].nonzero().flatten()[group[1][batch.roles.visual[1]]]] = True
    c = chosen(0, alone, {"dead": alone_group}.__getitem__)
    assert torch.equal(c[0][alone.roles.visual[0]], a[1][batch.roles.visual[1]])


def test_ablate_random_matched_draws_what_prune_random_matched_draws(adapter):
    """Same seed, target and pool: the ablation control replaces exactly the tokens the pruning control removes;
    with exclude_target false the draw may include target tokens, still matched in count."""
    from embedlens.interventions.ablate import AblateRandomMatched

    batch = adapter.encode(prompt_samples(), padding_side="left")
    eng = Engine(adapter)
    group = planted_group(batch, denom=8)
    groups = {"dead": group}.__getitem__
    for exclude in (True, False):
        ctx = eng.context(batch, groups=groups)
        PruneRandomMatched(target="dead", seed=3, exclude_target=exclude).setup(ctx)
        pruned = (ctx.exit == 0) & ~batch.roles.padding
        ablate = AblateRandomMatched(target="dead", seed=3, value="zero", exclude_target=exclude)
        ablate.setup(eng.context(batch, groups=groups))
        assert torch.equal(ablate._mask, pruned)
        assert torch.equal(pruned.sum(1), group.sum(1))


def test_empty_group_is_an_error_or_an_explicit_noop(adapter):
    batch = adapter.encode(prompt_samples(), padding_side="right")
    eng = Engine(adapter)
    empty = {"dead": torch.zeros_like(batch.roles.visual)}.__getitem__
    with pytest.raises(InterventionError, match=r"condition 'ctrl', interventions\[0\] \(prune_random_matched\): target: selection 'dead' matches no image token in sample\(s\) \['a', 'b', 'c'\]"):
        eng.run(batch, [PruneRandomMatched(target="dead")], condition="ctrl", groups=empty)
    out = eng.run(batch, [PruneRandomMatched(target="dead", if_empty="noop")], groups=empty)
    assert torch.equal(out.logits().nan_to_num(), eng.run(batch).logits().nan_to_num())


def test_bad_selections_name_condition_and_value():
    adapter = get_adapter("llava-clip")
    batch = adapter.encode(prompt_samples(), padding_side="right")
    n = adapter.n_llm_layers
    with pytest.raises(InterventionError, match=rf"condition 'deep', interventions\[0\] \(inject_at_layer\): layer: layer 40 is out of range for this model \(0..{n - 1}\)"):
        Condition.build("deep", [{"name": "inject_at_layer", "params": {"layer": 40}}]).check(adapter)
    with pytest.raises(InterventionError, match=r"condition 'skip', interventions\[1\] \(skip_sublayer\): sublayer 1.3 is neither"):
        Condition.build("skip", [{"name": "prune", "params": {"tokens": "visual"}}, {"name": "skip_sublayer", "params": {"tokens": "visual", "sublayers": [1.3]}}])
    with pytest.raises(InterventionError, match=r"condition 'k', interventions\[0\] \(attention_knockout\): layers: '9-3' is not a layer"):
        Condition.build("k", [{"name": "attention_knockout", "params": {"source": "last", "target": "visual", "layers": ["9-3"]}}]).check(adapter)
    with pytest.raises(InterventionError, match=r"condition 'p', interventions\[0\] \(prune\): tokens: selection 'visual and row > 100' matches no image token"):
        Engine(adapter).run(batch, Condition.build("p", [{"name": "prune", "params": {"tokens": "visual and row > 100"}}]).interventions, condition="p")
    with pytest.raises(InterventionError, match=r"condition 'p', interventions\[0\] \(prune\): tokens: unknown name 'rows'"):
        Condition.build("p", [{"name": "prune", "params": {"tokens": "visual and rows > 1"}}])
    with pytest.raises(InterventionError, match=r"names group 'dead' .* defines no partition"):
        Engine(adapter).run(batch, [Prune(tokens="dead")])
    with pytest.raises(InterventionError, match=r"fastv.*layer: FastV prunes after layer K with 1 <= K"):
        Condition.build("f", [{"name": "fastv", "params": {"layer": 0}}]).check(adapter)
    with pytest.raises(InterventionError, match=r"ablate.*site: ablate acts on llm.embed or llm.layers\[i\]; got 'projector'"):
        Condition.build("a", [{"name": "ablate", "params": {"tokens": "visual", "site": "projector"}}])
