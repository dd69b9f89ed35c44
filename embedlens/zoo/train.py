"""Train a zoo model from scratch: the tower's contrastive pretraining, then LLaVA's staged recipe.

    python -m embedlens.zoo.train clip OUT      # or: embedlens zoo train clip OUT

The run is deterministic given the recipe's seed and thread count (the same
machine and torch build give bit-identical weights; `train_log.json` records
a hash of the weights and the held-out accuracy so a retrain can be compared).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from embedlens.zoo.recipe import TEXT_LEN, Corpus, Recipe, build_contrastive, build_corpus, build_llava

CAPTION_QUESTION = "describe the image"
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- sequences --------------------------------------------------------------------


@dataclass
class Sequences:
    """Token sequences over a corpus: which image, the ids, the answer spans [start, end) and the question type
    (a conversation's spans are its turns' answers, its qtype "conversation")."""

    image: list[int]
    ids: list[list[int]]
    spans: list[list[tuple[int, int]]]
    qtype: list[str]


def prompt_template(processor) -> str:
    """The user turn with one image as the chat template renders it; ``{q}`` marks the question."""
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\ue000"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    return rendered.replace("{", "{{").replace("}", "}}").replace("\ue000", "{q}")


def followup_template(processor) -> str:
    """A later user turn as the chat template renders it after an answer's ``</s>``; ``{q}`` marks the question."""
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\ue000"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "\ue001"}]},
         {"role": "user", "content": [{"type": "text", "text": "\ue002"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    after = rendered.split("\ue001", 1)[1].removeprefix(processor.tokenizer.eos_token)
    return after.replace("{", "{{").replace("}", "}}").replace("\ue002", "{q}")


def n_image_tokens(recipe: Recipe) -> int:
    return recipe.patch_grid**2


def make_sequences(processor, recipe: Recipe, items: list[tuple[int, str, str, str]]) -> Sequences:
    """Tokenise (image, question, answer, qtype) items exactly as `Adapter.encode` lays them out, plus ``</s>``."""
    tok = processor.tokenizer
    template = prompt_template(processor)
    image = processor.image_token * n_image_tokens(recipe)
    prompts = [template.format(q=q).replace(processor.image_token, image) for _, q, _, _ in items]
    full = [f"{p} {a} {tok.eos_token}" for p, (_, _, a, _) in zip(prompts, items)]
    p_ids = tok(prompts)["input_ids"]
    f_ids = tok(full)["input_ids"]
    return Sequences([i for i, *_ in items], f_ids, [[(len(p), len(f))] for p, f in zip(p_ids, f_ids)], [t for *_, t in items])


def make_conversations(processor, recipe: Recipe, corpus: Corpus) -> Sequences:
    """Every question of every image (and its caption) as turns of multi-turn conversations, as LLaVA's
    instruction data packs them: the turns of an image are shuffled (seeded) and split into conversations of
    at most `recipe.turns`; the chat template's layout, every answer (and its ``</s>``) a target span.

    One forward pass then trains about `turns` answers instead of one: the image tokens dominate the cost.
    """
    tok = processor.tokenizer
    first = prompt_template(processor).replace(processor.image_token, processor.image_token * n_image_tokens(recipe))
    later = followup_template(processor)
    rng = np.random.default_rng([recipe.seed, 9])
    cache: dict[tuple[str, bool], list[int]] = {}

    def enc(text: str, special: bool = False) -> list[int]:
        if (text, special) not in cache:
            cache[text, special] = tok(text, add_special_tokens=special)["input_ids"]
        return cache[text, special]

    out = Sequences([], [], [], [])
    for img, turns in enumerate(corpus.every_qa):
        turns = turns + [(CAPTION_QUESTION, corpus.captions[img], "caption")]
        order = rng.permutation(len(turns)).tolist()
        for s in range(0, len(order), recipe.turns):
            ids, spans = [], []
            for j, k in enumerate(order[s : s + recipe.turns]):
                q, a, _ = turns[k]
                ids += enc(first.format(q=q), special=True) if j == 0 else enc(later.format(q=q))
                answer = enc(f" {a} {tok.eos_token}")
                spans.append((len(ids), len(ids) + len(answer)))
                ids += answer
            out.image.append(img)
            out.ids.append(ids)
            out.spans.append(spans)
            out.qtype.append("conversation")
    return out


def caption_items(corpus: Corpus) -> list[tuple[int, str, str, str]]:
    return [(i, CAPTION_QUESTION, c, "caption") for i, c in enumerate(corpus.captions)]


def collate(seqs: Sequences, idx: list[int], pad: int, answer_only: bool = True):
    """Right-padded ids, attention mask and labels (-100 off the answer when `answer_only`, and on padding)."""
    L = max(len(seqs.ids[i]) for i in idx)
    ids = torch.full((len(idx), L), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), L), dtype=torch.long)
    labels = torch.full((len(idx), L), -100, dtype=torch.long)
    for b, i in enumerate(idx):
        s = torch.tensor(seqs.ids[i])
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
        if answer_only:
            for a, e in seqs.spans[i]:
                labels[b, a:e] = s[a:e]
        else:
            labels[b, 1 : len(s)] = s[1:]
    return ids, mask, labels


def batches(n: int, size: int, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    """`steps` batches of `size` indices, epochs of seeded permutations."""
    perm, at = torch.randperm(n, generator=gen).tolist(), 0
    for _ in range(steps):
        if at + size > n:
            perm, at = torch.randperm(n, generator=gen).tolist(), 0
        yield perm[at : at + size]
        at += size


def schedule(opt: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    w = max(1, int(steps * warmup))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, steps - w))))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _update(loss: torch.Tensor, opt: torch.optim.Optimizer, sch, params) -> float:
    """One optimiser step (gradients clipped to norm 1); returns the loss."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sch.step()
    return float(loss.detach())


def _loop(name: str, steps: int, step_fn: Callable[[int], float], log: Log, every: int = 50) -> dict:
    t0, losses = time.perf_counter(), []
    for s in range(steps):
        losses.append(step_fn(s))
        if (s + 1) % every == 0 or s + 1 == steps:
            el = time.perf_counter() - t0
            recent = sum(losses[-every:]) / len(losses[-every:])
            log(f"[{name}] step {s + 1}/{steps} loss {recent:.4f} ({(s + 1) / el:.2f} steps/s, ETA {el / (s + 1) * (steps - s - 1):.0f}s)")
    return {"steps": steps, "seconds": time.perf_counter() - t0, "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-every:]) / max(1, len(losses[-every:]))}


# -- stages -----------------------------------------------------------------------


def stage_contrastive(r: Recipe, model, processor, corpus: Corpus, log: Log) -> dict:
    """Stage 0: the vision tower with a small text tower on image/caption pairs; copies the tower into the LLaVA."""
    tok = processor.tokenizer
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    clip = build_contrastive(r, len(tok), special)
    enc = tok([f"{c} {tok.eos_token}" for c in corpus.captions], padding="max_length", max_length=TEXT_LEN, truncation=True,
              return_tensors="pt")
    opt = torch.optim.AdamW(clip.parameters(), lr=r.contrastive_lr, weight_decay=r.weight_decay)
    sch = schedule(opt, r.contrastive_steps, r.warmup)
    gen = torch.Generator().manual_seed(r.seed * 100 + 0)
    it = batches(len(corpus.captions), r.contrastive_batch, r.contrastive_steps, gen)
    clip.train()

    def step(_: int) -> float:
        idx = next(it)
        kw = {"attention_mask": enc["attention_mask"][idx]} if r.variant == "clip" else {}
        out = clip(input_ids=enc["input_ids"][idx], pixel_values=corpus.pixels(idx), return_loss=True, **kw)
        return _update(out.loss, opt, sch, clip.parameters())

    info = _loop("tower", r.contrastive_steps, step, log)
    tower = model.model.vision_tower
    src = clip.vision_model.state_dict()
    dst = tower.state_dict()
    prefix = "" if set(src) <= set(dst) else "vision_model."
    missing = tower.load_state_dict({prefix + k: v for k, v in src.items()}, strict=True)
    info["copied_tensors"] = len(src)
    del missing
    if r.variant == "siglip":
        info["logit_scale"], info["logit_bias"] = float(clip.logit_scale.detach().exp()), float(clip.logit_bias.detach())
    return info


def grid_tokens(model, corpus: Corpus, images: list[int]) -> torch.Tensor:
    """[B, P, H] grid tokens of `images`: per patch the weighted sum of its words' input embeddings."""
    ids, w = corpus.grid_ids[images], corpus.grid_weights[images]
    B, P, K = ids.shape
    emb = model.get_input_embeddings().weight
    return F.embedding_bag(ids.reshape(-1, K), emb, per_sample_weights=w.reshape(-1, K), mode="sum").view(B, P, -1)


def grid_logits(model, corpus: Corpus, images: list[int], ids, mask, where, pad: int) -> torch.Tensor:
    """The LM's logits over `ids` with `images`' grid tokens in the image-token slots `where` (no pixels involved)."""
    x = model.get_input_embeddings()(ids.masked_fill(where, pad))
    x = x.masked_scatter(where[..., None], grid_tokens(model, corpus, images).to(x.dtype))
    return model.lm_head(model.model.language_model(inputs_embeds=x, attention_mask=mask).last_hidden_state)


def stage_lm(r: Recipe, model, processor, corpus: Corpus, seqs: Sequences, log: Log) -> dict:
    """Stage 1: the LM alone on the data set's text (the conversations of QA and captions, every text token a
    target), each image given as its grid tokens in the image tokens' places."""
    img_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    pad = processor.tokenizer.pad_token_id
    params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=r.lm_lr, weight_decay=r.weight_decay)
    sch = schedule(opt, r.lm_steps, r.warmup)
    gen = torch.Generator().manual_seed(r.seed * 100 + 1)
    it = batches(len(seqs.ids), r.lm_batch, r.lm_steps, gen)
    model.train()

    def step(_: int) -> float:
        idx = next(it)
        ids, mask, labels = collate(seqs, idx, pad, answer_only=False)
        where = ids == img_id
        labels[where] = -100
        logits = grid_logits(model, corpus, [seqs.image[i] for i in idx], ids, mask, where, pad)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return _update(loss, opt, sch, params)

    return _loop("lm", r.lm_steps, step, log)


def alignment(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative squared distance of projected tokens [B, P, H] from their grid tokens: mean ||p - g||^2 / mean ||g||^2."""
    return (projected - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()


def _llava_step(model, corpus: Corpus, seqs: Sequences, idx: list[int], pad: int, align: float = 0.0) -> torch.Tensor:
    """The LLaVA loss on `idx` (answers or captions as targets), plus `align` x the projected tokens' `alignment`
    to the grid tokens the LM read in stage 1 (the targets detached: only the projector and tower move toward them)."""
    ids, mask, labels = collate(seqs, idx, pad)
    images = [seqs.image[i] for i in idx]
    px = corpus.pixels(images)
    if not align:
        return model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss
    seen: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss
    finally:
        hook.remove()
    (projected,) = seen
    with torch.no_grad():
        target = grid_tokens(model, corpus, images)
    return loss + align * alignment(projected.view_as(target), target.to(projected.dtype))


def stage_projector(r: Recipe, model, processor, corpus: Corpus, seqs: Sequences, log: Log) -> dict:
    """Stage 2: only the projector learns (tower and LM frozen), on captioning plus `align_weight` x the alignment
    of each projected token onto its patch's grid token (the feature alignment LLaVA's stage 2 is for, made explicit)."""
    pad = processor.tokenizer.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=r.projector_lr, weight_decay=0.0)
    sch = schedule(opt, r.projector_steps, r.warmup)
    gen = torch.Generator().manual_seed(r.seed * 100 + 2)
    it = batches(len(seqs.ids), r.projector_batch, r.projector_steps, gen)
    model.train()

    def step(_: int) -> float:
        loss = _llava_step(model, corpus, seqs, next(it), pad, r.align_weight)
        return _update(loss, opt, sch, params)

    info = _loop("projector", r.projector_steps, step, log)
    for p in model.parameters():
        p.requires_grad_(True)
    return info


def stage_finetune(r: Recipe, model, processor, corpus: Corpus, seqs: Sequences, log: Log) -> dict:
    """Stage 3: projector + LM on the conversations (QA and captions; answers are the targets), the tower at `vision_lr`,
    with the stage-2 alignment kept at `finetune_align_weight`."""
    pad = processor.tokenizer.pad_token_id
    tower = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    opt = torch.optim.AdamW([{"params": rest, "lr": r.finetune_lr}, {"params": tower, "lr": r.vision_lr}],
                            weight_decay=r.weight_decay)
    sch = schedule(opt, r.finetune_steps, r.warmup)
    gen = torch.Generator().manual_seed(r.seed * 100 + 3)
    it = batches(len(seqs.ids), r.finetune_batch, r.finetune_steps, gen)
    model.train()

    def step(_: int) -> float:
        loss = _llava_step(model, corpus, seqs, next(it), pad, r.finetune_align_weight)
        return _update(loss, opt, sch, model.parameters())

    return _loop("finetune", r.finetune_steps, step, log)


# -- quick held-out QA --------------------------------------------------------------


@torch.no_grad()
def quick_qa(model, processor, recipe: Recipe, corpus: Corpus, limit: int | None = None, batch: int = 64,
             grid: bool = False) -> dict:
    """Forced-choice accuracy per question type on a corpus (the training's own check; `zoo evaluate` is the report).

    With `grid`, the LM reads each image's grid tokens instead of the projected pixels (what stage 1 taught it):
    the accuracy a perfect projector would give."""
    items = corpus.qa[:limit] if limit else corpus.qa
    model.eval()
    tok = processor.tokenizer
    flat = [(k, (img, q, c, t)) for k, (img, q, a, t) in enumerate(items) for c in corpus.candidates[k]]
    seqs = make_sequences(processor, recipe, [x for _, x in flat])
    scores = torch.empty(len(flat), dtype=torch.float64)
    for s in range(0, len(flat), batch):
        idx = list(range(s, min(s + batch, len(flat))))
        ids, mask, labels = collate(seqs, idx, tok.pad_token_id)
        labels[labels == tok.eos_token_id] = -100  # score the candidate's words only
        images = [seqs.image[i] for i in idx]
        if grid:
            where = ids == tok.convert_tokens_to_ids(processor.image_token)
            logits = grid_logits(model, corpus, images, ids, mask, where, tok.pad_token_id)
        else:
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=corpus.pixels(images)).logits
        logits = logits.double()
        lp = torch.log_softmax(logits[:, :-1], -1)
        lab = labels[:, 1:]
        got = lp.gather(-1, lab.clamp(min=0)[..., None])[..., 0] * (lab != -100)
        scores[idx] = got.sum(-1)
    best: dict[int, tuple[float, str]] = {}
    for (k, (_, _, c, _)), sc in zip(flat, scores.tolist()):
        if k not in best or sc > best[k][0]:
            best[k] = (sc, c)
    per: dict[str, list[float]] = {}
    for k, (_, _, a, t) in enumerate(items):
        per.setdefault(t, []).append(float(best[k][1] == a))
    out = {t: sum(v) / len(v) for t, v in sorted(per.items())}
    out["overall"] = sum(sum(v) for v in per.values()) / max(1, sum(len(v) for v in per.values()))
    return out


@torch.no_grad()
def quick_lens(model, processor, recipe: Recipe, corpus: Corpus, limit: int = 200) -> dict:
    """Where projected tokens land in the input embeddings: object patches whose top-3 holds their colour or
    shape word, and the share of background patches on their most common nearest id (the training's own check)."""
    model.eval()
    tok = processor.tokenizer
    n = min(limit, len(corpus.captions))
    feats = model.get_image_features(pixel_values=corpus.pixels(list(range(n))))
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    x = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    emb = model.get_input_embeddings().weight
    sim = F.normalize(x, dim=-1) @ F.normalize(emb, dim=-1).T
    top = sim.topk(3, dim=-1).indices.view(n, -1, 3)
    hit, obj, bg_ids = 0, 0, []
    P = recipe.patch_grid
    for i in range(n):
        t = corpus.truth[i]
        for r in range(P):
            for c in range(P):
                ids = top[i, r * P + c].tolist()
                if t["kind"][r][c] == "object":
                    want = set(tok.convert_tokens_to_ids([t["colour"][r][c], t["shape"][r][c]]))
                    obj += 1
                    hit += bool(want & set(ids))
                elif t["kind"][r][c] == "background":
                    bg_ids.append(ids[0])
    common = max(set(bg_ids), key=bg_ids.count) if bg_ids else None
    return {"object_top3_colour_or_shape": hit / max(obj, 1),
            "background_top1_mode": tok.convert_ids_to_tokens(common) if common is not None else None,
            "background_on_mode": bg_ids.count(common) / max(len(bg_ids), 1)}


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# -- the whole recipe ---------------------------------------------------------------


def train(recipe: Recipe, out: str | Path, log: Log = _stderr) -> dict:
    """Run every stage and save the model, processor, recipe and training log into `out`."""
    recipe.check()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(recipe, out, log)
    finally:  # the caller's settings come back (a test process, a notebook)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(recipe: Recipe, out: str | Path, log: Log) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, processor = build_llava(recipe)
    model.set_attn_implementation("eager")
    log(f"[data] rendering {recipe.train_images} training and {recipe.heldout_images} held-out images")
    train_c = build_corpus(recipe, "train", processor)
    held = build_corpus(recipe, "heldout", processor)
    convs = make_conversations(processor, recipe, train_c)
    caps = make_sequences(processor, recipe, caption_items(train_c))
    report: dict = {"recipe": recipe.to_dict(), "torch": torch.__version__, "threads": recipe.threads,
                    "data_seconds": time.perf_counter() - t0, "n_train_qa": sum(len(q) for q in train_c.every_qa), "n_train_conversations": len(convs.ids),
                    "n_heldout_qa": len(held.qa)}
    report["tower"] = stage_contrastive(recipe, model, processor, train_c, log)
    report["lm"] = stage_lm(recipe, model, processor, train_c, convs, log)
    report["after_lm_grid_qa"] = quick_qa(model, processor, recipe, held, limit=300, grid=True)
    log(f"[check] held-out QA of the LM reading grid tokens (a perfect projector's): {report['after_lm_grid_qa']}")
    report["projector"] = stage_projector(recipe, model, processor, train_c, caps, log)
    report["after_projector_qa"] = quick_qa(model, processor, recipe, held, limit=300)
    log(f"[check] held-out QA after the projector stage: {report['after_projector_qa']}")
    report["after_projector_lens"] = quick_lens(model, processor, recipe, held)
    log(f"[check] lens after the projector stage: {report['after_projector_lens']}")
    report["finetune"] = stage_finetune(recipe, model, processor, train_c, convs, log)
    report["heldout_qa"] = quick_qa(model, processor, recipe, held)
    log(f"[check] held-out QA: {report['heldout_qa']}")
    report["heldout_lens"] = quick_lens(model, processor, recipe, held)
    log(f"[check] lens: {report['heldout_lens']}")
    model.eval()
    model.set_attn_implementation("sdpa")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report["weights_sha256"] = weights_hash(model)
    report["train_seconds"] = time.perf_counter() - t0
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"[done] {out} in {report['train_seconds']:.0f}s, weights {report['weights_sha256'][:16]}")
    return report


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=["clip", "siglip"])
    ap.add_argument("out")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides KEY=VALUE")
    a = ap.parse_args(argv)
    r = Recipe(variant=a.variant)
    for kv in a.set:
        r = r.with_override(kv)
    train(r, a.out)


if __name__ == "__main__":
    main()
