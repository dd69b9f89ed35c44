"""The plugin passes embedlens's public conformance checks, and its R^2 is scikit-learn's."""

import numpy as np
import pytest
import torch

from embedlens.testing.conformance import check_probe
from embedlens_patch_position import PatchPosition, ridge_r2


def test_conforms():
    check_probe(PatchPosition, params={"layers": [0, 1]}, families=("llava-clip", "paligemma"))


def test_ridge_r2_is_scikit_learns():
    """Independent computation: StandardScaler + Ridge per fold, R^2 over the pooled held-out predictions."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6))
    y = np.stack([x[:, 0] * 2 + rng.normal(scale=0.1, size=120), rng.normal(size=120)], 1)
    fold = np.arange(120) % 3
    pred = np.empty_like(y)
    for f in range(3):
        tr, te = fold != f, fold == f
        sc = StandardScaler().fit(x[tr])
        sc.scale_ = x[tr].std(0, ddof=1)  # the probe uses the unbiased std
        pred[te] = Ridge(alpha=1.0).fit(sc.transform(x[tr]), y[tr]).predict(sc.transform(x[te]))
    want = 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    got = ridge_r2(torch.tensor(x), torch.tensor(y), torch.tensor(fold), 1.0)
    assert got == pytest.approx(want.tolist(), abs=1e-9)
    assert got[0] > 0.95 and got[1] < 0.1  # the planted signal is found, the noise is not


def test_planted_position_is_read_back():
    """Tokens that carry their own position (planted in two dimensions) give R^2 near 1."""
    from embedlens.adapters import load_model
    from embedlens.synthetic import SyntheticSpec
    from embedlens.tracing import collect

    adapter = load_model("tiny:llava-clip")
    batch = adapter.encode(SyntheticSpec(n=24, size=64).samples(adapter))
    probe = PatchPosition(layers=[0])
    site = probe.sites(adapter)[0]
    acts = collect(adapter, batch, [site])
    vt = batch.roles.visual_tokens()
    h = acts[site].clone()
    h[vt["sample"], vt["position"], 0] = vt["row"].float() * 10  # plant row and col in two dims
    h[vt["sample"], vt["position"], 1] = vt["col"].float() * 10
    probe.update(adapter, batch, {site: h})
    (score,) = probe.result()["layers"]
    assert score["r2_row"] > 0.95 and score["r2_col"] > 0.95 and score["n_tokens"] == len(vt["sample"])
    plain = PatchPosition(layers=[0])
    plain.update(adapter, batch, acts)  # the random tiny model's own tokens: position is not planted there
    assert plain.result()["layers"][0]["r2_row"] < score["r2_row"] - 0.2
