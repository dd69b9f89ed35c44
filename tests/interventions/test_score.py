"""`Outcome.score_with_greedy`: a continuation's log-probability and whether greedy decoding produces it."""

from __future__ import annotations

import torch

from conftest import get_adapter, mixed_samples
from embedlens.interventions import Engine


def test_greedy_flag_matches_greedy_decoding_and_scores_match_score():
    adapter = get_adapter("llava-clip")
    batch = adapter.encode(mixed_samples(adapter=adapter))
    out = Engine(adapter).run(batch, cache=True)
    greedy = out.generate(3).tolist()  # the independent truth: what greedy decoding writes
    other = [[*g[:2], (g[2] + 1) % len(adapter.tokenizer)] for g in greedy]  # last token changed
    conts = [greedy[0], other[1], greedy[2][:1]]
    logp, is_greedy = out.score_with_greedy(conts)
    assert is_greedy.tolist() == [True, False, True]
    # a one-token continuation, by hand: the log-softmax of the prompt's last logits at that token
    first = out.last_logits()[2].double().log_softmax(-1)[conts[2][0]]
    torch.testing.assert_close(logp[2], first.cpu())
    empty_logp, empty_greedy = out.score_with_greedy([[], [], []])
    assert empty_logp.tolist() == [0.0, 0.0, 0.0] and empty_greedy.all()
