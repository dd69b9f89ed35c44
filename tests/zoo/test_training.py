"""The zoo's training recipe: determinism, the saved checkpoint, and the sequence layout it trains on."""

from __future__ import annotations

import json

import pytest
import torch

from embedlens.errors import InputError
from embedlens.synthetic import position_names
from embedlens.zoo.recipe import Recipe, build_corpus, build_llava, caption
from embedlens.zoo.train import make_sequences, train

# one xdist worker runs the whole module: its module-scoped fixture (the training run) is built once
pytestmark = pytest.mark.xdist_group("test_training")

# A recipe small enough to train in seconds: every stage runs, on a few images.
SMOKE = dict(train_images=48, heldout_images=12, contrastive_steps=3, contrastive_batch=16, lm_steps=3, lm_batch=8,
             projector_steps=3, projector_batch=8, finetune_steps=3, finetune_batch=8, vision_layers=2, lm_layers=2,
             vision_hidden=32, lm_hidden=32, text_tower_hidden=32)


def _quiet(msg: str) -> None:
    """Drops the training's progress lines (the tests read train()'s returned report instead)."""


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        r = Recipe(variant="siglip" if name == "c" else "clip", seed=seed, threads=1, **SMOKE)
        folder = tmp_path_factory.mktemp(f"zoo-{name}")
        out[name] = (folder, train(r, folder, log=_quiet))
    return out


@pytest.mark.slow
def test_retraining_is_bit_exact(smoke_runs):
    (_, a), (_, b) = smoke_runs["a"], smoke_runs["b"]
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["heldout_qa"] == b["heldout_qa"]
    for stage in ("tower", "lm", "projector", "finetune"):
        assert a[stage]["last_loss"] == b[stage]["last_loss"]


@pytest.mark.slow
def test_another_seed_gives_other_weights(smoke_runs):
    assert smoke_runs["a"][1]["weights_sha256"] != smoke_runs["c"][1]["weights_sha256"]


@pytest.mark.slow
def test_checkpoint_loads_offline_with_autoprocessor(smoke_runs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from embedlens.adapters import load_model
    from embedlens.zoo.train import weights_hash

    folder, log = smoke_runs["a"]
    proc = AutoProcessor.from_pretrained(folder)
    assert type(proc).__name__ == "LlavaProcessor" and proc.tokenizer.convert_tokens_to_ids("circle") != proc.tokenizer.unk_token_id
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    assert weights_hash(model) == log["weights_sha256"]  # what was saved is what was trained
    adapter = load_model(str(folder))
    assert adapter.tower == "clip"
    saved = json.loads((folder / "recipe.json").read_text())
    assert Recipe.from_dict(saved) == Recipe(variant="clip", seed=0, threads=1, **SMOKE)


@pytest.mark.slow
def test_siglip_tower_starts_from_the_paper_initialisation():
    from embedlens.zoo.recipe import build_contrastive

    r = Recipe(variant="siglip", contrastive_batch=64, **{k: v for k, v in SMOKE.items() if k != "contrastive_batch"})
    m = build_contrastive(r, 300, {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3})
    assert float(m.logit_scale.detach()) == pytest.approx(torch.log(torch.tensor(10.0)).item())
    assert float(m.logit_bias.detach()) == pytest.approx(-torch.log(torch.tensor(64.0)).item())


def test_training_sequences_are_what_the_adapter_encodes():
    """The model is trained on exactly the token layout embedlens evaluates it with (chat template, image tokens, answer)."""
    from embedlens.adapters import wrap_model
    from embedlens.data import Sample

    r = Recipe(**{**SMOKE, "train_images": 4})
    model, processor = build_llava(r)
    corpus = build_corpus(r, "train", processor, keep_images=True)
    img, q, a, _ = corpus.qa[0]
    seqs = make_sequences(processor, r, [corpus.qa[0]])
    adapter = wrap_model(model, processor)
    batch = adapter.encode([Sample([corpus.images[img]], question=q, answer=a)])
    ids = batch.inputs["input_ids"][0].tolist()
    assert seqs.ids[0][: len(ids)] == ids  # training adds only the closing </s>
    assert seqs.ids[0][len(ids):] == [processor.tokenizer.eos_token_id]
    assert torch.allclose(corpus.pixels([img]), batch.inputs["pixel_values"], atol=1e-5)
    answer = processor.tokenizer(f" {a}", add_special_tokens=False)["input_ids"]
    ((start, end),) = seqs.spans[0]  # one answer span: the answer and its </s>
    assert seqs.ids[0][start:end] == answer + [processor.tokenizer.eos_token_id]


def test_grid_tokens_read_each_patch():
    """The LM's grid tokens: a patch is its content words (colour + shape on an object, the written word on text,
    the filler on background) at weight 1/2 each, plus the words of its layout cell's position name (at
    `filler_position_weight` on background, 0 by default: every background patch is exactly the filler)."""
    r = Recipe(**{**SMOKE, "train_images": 8, "word_rate": 1.0})
    _, processor = build_llava(r)
    corpus = build_corpus(r, "train", processor)
    tok = processor.tokenizer
    P, G = r.patch_grid, r.grid
    names = position_names(G)
    seen = set()
    for i, truth in enumerate(corpus.truth):
        word = corpus.captions[i].split(" word ")[-1] if " word " in f" {corpus.captions[i]}" else None
        for k in range(P * P):
            a, b = k // P, k % P
            ids = corpus.grid_ids[i, k].tolist()
            w = corpus.grid_weights[i, k].tolist()
            bag = {}
            for t, x in zip(ids, w):
                if x:
                    bag[tok.convert_ids_to_tokens(t)] = bag.get(tok.convert_ids_to_tokens(t), 0.0) + x
            kind = truth["kind"][a][b]
            seen.add(kind)
            content = {"object": [truth["colour"][a][b], truth["shape"][a][b]], "text": [word, word]}.get(kind, ["background"] * 2)
            pos = names[(2 * a + 1) * G // (2 * P)][(2 * b + 1) * G // (2 * P)].split()
            want = {}
            for t in content:
                want[t] = want.get(t, 0.0) + 0.5
            pw = r.filler_position_weight if kind == "background" else r.grid_position_weight
            for t in pos if pw else []:
                want[t] = want.get(t, 0.0) + pw / len(pos)
            assert bag.keys() == want.keys() and all(abs(bag[t] - want[t]) < 1e-6 for t in want), (i, k, bag, want)
    assert seen == {"background", "object", "text"}


def test_conversations_follow_the_chat_template_and_cover_every_question():
    """Training conversations tokenise exactly as the processor's chat template renders the same turns; their
    spans are the answers (with </s>); together they hold every question of every image and its caption once."""
    from embedlens.zoo.train import CAPTION_QUESTION, make_conversations

    r = Recipe(**{**SMOKE, "train_images": 8, "turns": 3})
    _, processor = build_llava(r)
    corpus = build_corpus(r, "train", processor)
    convs = make_conversations(processor, r, corpus)
    tok = processor.tokenizer
    seen: dict[int, list[tuple[str, str]]] = {}
    for img, ids, spans in zip(convs.image, convs.ids, convs.spans):
        assert 1 <= len(spans) <= 3
        answers = [tok.decode(ids[a:e - 1]) for a, e in spans]
        assert all(ids[e - 1] == tok.eos_token_id for _, e in spans)
        # the questions sit between the answers: rebuild the conversation and render it with the template
        bounds = [0] + [e for _, e in spans]
        questions = []
        for k, (a, _) in enumerate(spans):
            text = tok.decode(ids[bounds[k]:a], skip_special_tokens=False)
            questions.append(text.split("user :")[-1].replace("<image>", "").split("assistant :")[0].strip())
        conv = []
        for k, (q, a) in enumerate(zip(questions, answers)):
            content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
            conv += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        rendered = processor.apply_chat_template(conv, tokenize=False)
        rendered = rendered.replace(processor.image_token, processor.image_token * (r.patch_grid ** 2))
        assert tok(rendered)["input_ids"] == ids
        seen.setdefault(img, []).extend(zip(questions, answers))
    for img, turns in enumerate(corpus.every_qa):
        def key(q, a):
            return tuple(tok(q, add_special_tokens=False)["input_ids"]), tuple(tok(a, add_special_tokens=False)["input_ids"])

        want = sorted([key(q, a) for q, a, _ in turns] + [key(CAPTION_QUESTION, corpus.captions[img])])
        assert sorted(key(q, a) for q, a in seen[img]) == want


def test_every_question_holds_the_drawn_ones_and_only_unambiguous_ones():
    from embedlens.synthetic import SyntheticSpec, all_questions, every_question, render

    spec = SyntheticSpec(n=30, seed=5, size=96, patch_grid=6, background=0.5)
    for i in range(spec.n):
        scene = render(spec, i)
        every = every_question(scene, spec.grid)
        assert all(q in every for q in all_questions(spec, i, scene))
        for qtype, q, a, cands in every:
            assert a in cands
            if qtype == "colour":  # exactly one object has the asked shape
                shape = q.split()[-1].rstrip("?")
                assert [o["colour"] for o in scene.objects if o["shape"] == shape] == [a]


def test_caption_lists_objects_in_reading_order():
    objs = [{"colour": "red", "shape": "circle", "row": 1, "col": 0, "position": "middle left"},
            {"colour": "blue", "shape": "cross", "row": 0, "col": 2, "position": "top right"}]
    assert caption(objs, "cat") == "blue cross top right , red circle middle left , word cat"
    assert caption([], None) == "nothing"


@pytest.mark.parametrize("bad, match", [("lm_steps", "KEY=VALUE"), ("nope=1", "unknown key 'nope'"), ("lm_steps=many", "not a int")])
def test_recipe_overrides_name_the_problem(bad, match):
    with pytest.raises(InputError, match=match):
        Recipe().with_override(bad)


def test_recipe_refuses_a_vision_rate_that_stalls_training():
    with pytest.raises(InputError, match="vision_lr"):
        Recipe(vision_lr=1e-3).check()


def test_alignment_term_is_the_projected_tokens_distance_to_their_grid_tokens():
    """`_llava_step(align=a)` adds a x the relative squared distance between what the projector makes of the batch's
    pixels (recomputed here through `get_image_features`) and the grid tokens, and nothing else."""
    from embedlens.zoo.train import _llava_step, grid_tokens, make_conversations

    r = Recipe(**{**SMOKE, "train_images": 8})
    model, processor = build_llava(r)
    model.eval()
    corpus = build_corpus(r, "train", processor)
    convs = make_conversations(processor, r, corpus)
    idx = [0, 3, 5]
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        plain = _llava_step(model, corpus, convs, idx, pad)
        aligned = _llava_step(model, corpus, convs, idx, pad, align=0.5)
        images = [convs.image[i] for i in idx]
        feats = model.get_image_features(pixel_values=corpus.pixels(images))
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        projected = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        target = grid_tokens(model, corpus, images)
        want = ((projected - target) ** 2).sum(-1).mean() / (target**2).sum(-1).mean()
    assert projected.shape == target.shape == (3, r.patch_grid**2, r.lm_hidden)
    torch.testing.assert_close(aligned - plain, 0.5 * want, rtol=1e-4, atol=1e-6)
    # a projector that returns the grid tokens exactly has nothing to align
    from embedlens.zoo.train import alignment

    assert float(alignment(target, target)) == 0.0 and float(alignment(torch.zeros_like(target), target)) == 1.0


@pytest.mark.parametrize("key", ["filler_position_weight", "align_weight", "finetune_align_weight"])
def test_recipe_refuses_negative_weights(key):
    with pytest.raises(InputError, match=key):
        Recipe(**{key: -1.0}).check()


def test_every_training_text_is_in_the_vocabulary():
    """Questions, answers, candidates and captions of the synthetic data tokenise without <unk> (the word-level
    tokenizer knows every word the zoo trains on)."""
    r = Recipe(**{**SMOKE, "train_images": 40, "word_rate": 0.5})
    _, processor = build_llava(r)
    corpus = build_corpus(r, "train", processor)
    tok = processor.tokenizer
    texts = set(corpus.captions) | {q for _, q, _, _ in corpus.qa} | {c for cands in corpus.candidates for c in cands}
    texts |= {f"{q} {a}" for turns in corpus.every_qa for q, a, _ in turns}
    assert {t for _, _, _, t in corpus.qa} >= {"colour", "shape", "position", "count", "word"}
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"], text
