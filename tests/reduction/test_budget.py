"""`Budget`: the one meaning of `keep` shared by every token-reduction method, against a brute-force count."""

import math

import pytest
import torch

from embedlens.errors import InterventionError
from embedlens.reduction.budget import Budget


def brute_force(budget: Budget, scores, candidates, image):
    out = torch.zeros_like(candidates)
    for b in range(scores.shape[0]):
        for img in sorted({int(i) for i in image[b] if i >= 0}):
            idx = [t for t in range(scores.shape[1]) if candidates[b, t] and image[b, t] == img]
            n = len(idx)
            k = min(n, math.ceil(n * budget.keep) if budget.is_fraction else budget.keep)
            ranked = sorted(idx, key=lambda t: (-float(scores[b, t]), t))  # highest first, earlier on ties
            out[b, ranked[:k]] = True
    return out


@pytest.mark.parametrize("keep", [1, 3, 64, 0.11, 0.5, 1.0])
def test_keep_mask_equals_brute_force_per_image(keep):
    gen = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 5, (3, 40), generator=gen).float()  # many ties, to test the tie rule
    candidates = torch.rand(3, 40, generator=gen) < 0.8
    image = torch.full((3, 40), -1)
    image[:, 2:18], image[:, 20:38] = 0, 1
    image[2, 20:38] = -1  # one sample with a single image
    candidates &= image >= 0
    budget = Budget.parse(keep)
    got = budget.keep_mask(scores, candidates, image)
    assert torch.equal(got, brute_force(budget, scores, candidates, image))


def test_fraction_counts_match_the_papers_budgets():
    b = Budget.parse
    n = torch.tensor([576, 576, 576, 36, 0])
    assert b(0.3333).counts(n)[0] == 192 and b(0.2222).counts(n)[1] == 128 and b(0.1111).counts(n)[2] == 64
    assert b(0.1111).counts(n)[3] == 4 and b(0.5).counts(n)[4] == 0
    assert b(600).counts(n).tolist() == [576, 576, 576, 36, 0]


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, True, "64", None])
def test_bad_budgets_are_refused_with_the_key(bad):
    with pytest.raises(InterventionError, match="keep: "):
        Budget.parse(bad)
