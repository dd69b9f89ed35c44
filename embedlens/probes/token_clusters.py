"""Clustering visual tokens with scikit-learn k-means, against the token groups."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedlens.errors import PlanError
from embedlens.probes._util import FirstImage, Reservoir, frame_maps, parse_site, token_groups, visual_rows
from embedlens.probes.base import Probe, Table
from embedlens.registry import probes
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


@probes.register("token_clusters")
class TokenClusters(Probe):
    """k-means on visual tokens at a site; clusters vs groups (contingency, purity) and a cluster map.

    Tokens are kept in a seeded reservoir of at most `max_tokens` (k-means
    on a uniform sample), then clustered once at the end of the run with
    scikit-learn's `KMeans`. Purity is the share of tokens whose group is
    their cluster's majority group.

    Args:
        n_clusters: k.
        site: where the tokens are read (``llm.embed``, ``llm.layers[i]``,
            ``projector``, ``vision.layers[i]``, ...; ``llm.layers[i].experts``: each token's routing,
            multi-hot over the experts, in a mixture-of-experts family).
        max_tokens: reservoir size.
        normalize: cluster unit-norm vectors (cosine geometry) instead of raw ones.
        n_init: k-means restarts.
        seed: seed of the reservoir and of k-means.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=2)
        >>> probe = TokenClusters(n_clusters=3)
        >>> _ = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))
        >>> sum(probe.result()["cluster_sizes"])
        32
    """

    def __init__(
        self,
        n_clusters: int = 8,
        site: str = "llm.embed",
        max_tokens: int = 20_000,
        normalize: bool = True,
        n_init: int = 4,
        seed: int = 0,
    ):
        if n_clusters < 2:
            raise PlanError(f"token_clusters.n_clusters: must be >= 2; got {n_clusters}")
        self.n_clusters, self.site, self.max_tokens, self.normalize, self.n_init, self.seed = n_clusters, site, max_tokens, normalize, n_init, seed
        self._res = Reservoir(max_tokens, seed)
        self._first = FirstImage()
        self._first_x: torch.Tensor | None = None
        self._first_frame: torch.Tensor | None = None  # the frame of each row of `_first_x` (-1 off video)
        self._model = None
        self._fitted_on = -1

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state without the fitted KMeans: a cache, refitted (seeded) from the reservoir when needed."""
        state = super().state_dict()
        state.pop("_model")
        state["_fitted_on"] = -1
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._model, self._fitted_on = None, -1

    def sites(self, adapter: "Adapter") -> list[Site]:
        return [parse_site("token_clusters", "site", adapter, self.site)]

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        x = x.float()
        return torch.nn.functional.normalize(x, dim=-1) if self.normalize else x

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        site = self.sites(adapter)[0]
        vt = batch.roles.visual_tokens()
        x = self._prep(visual_rows(adapter, site, acts[site], vt, batch.inputs)).cpu()
        groups = token_groups(batch, vt["sample"], vt["position"])
        self._res.add(x, group=groups)
        if self._first.data is None:
            self._first.offer(adapter, batch, vt, group=groups)
            if self._first.data is not None:
                sel = (vt["sample"] == 0) & (vt["image"] == 0) & (vt["tile"] == 0)
                self._first_x = x[sel]
                self._first_frame = vt["frame"][sel]  # a video: each map takes its frame's rows
        return {}

    def fit(self):
        """The k-means model on the reservoir (fitted once per reservoir state)."""
        from sklearn.cluster import KMeans

        if self._fitted_on != self._res.seen:
            x = self._res.rows().double().numpy()
            k = min(self.n_clusters, x.shape[0])
            self._model = KMeans(n_clusters=k, n_init=self.n_init, random_state=self.seed).fit(x)
            self._fitted_on = self._res.seen
        return self._model

    def contingency(self) -> tuple[list[str], torch.Tensor]:
        """(group names, ``[clusters, groups]`` counts) over the reservoir."""
        import torch

        km = self.fit()
        groups = sorted(set(self._res.labels["group"]))
        table = torch.zeros(km.n_clusters, len(groups), dtype=torch.long)
        for c, g in zip(km.labels_.tolist(), self._res.labels["group"]):
            table[c, groups.index(g)] += 1
        return groups, table

    def result(self) -> dict[str, Any]:
        if len(self._res) < 2:
            return {"n_tokens": len(self._res), "cluster_sizes": [], "purity": None}
        groups, table = self.contingency()
        return {
            "n_tokens": len(self._res),
            "tokens_seen": self._res.seen,
            "cluster_sizes": table.sum(1).tolist(),
            "groups": groups,
            "contingency": table.tolist(),
            "purity": float(table.max(1).values.sum() / table.sum()),
            "inertia": float(self.fit().inertia_),
        }

    def final_tables(self) -> dict[str, Table]:
        if len(self._res) < 2:
            return {}
        groups, table = self.contingency()
        out: Table = {"cluster": list(range(table.shape[0])), "size": table.sum(1).tolist()}
        for j, g in enumerate(groups):
            out[g] = table[:, j].tolist()
        return {"contingency": out}

    def figures(self, out_dir: Path) -> list[Path]:
        import torch

        if self._first.data is None or len(self._res) < 2:
            return []
        from embedlens.figures import category_map

        km = self.fit()
        frame = self._first_frame if self._first_frame is not None else torch.full((len(self._first_x),), -1)

        def draw(f, path, where):
            labels = km.predict(self._first_x[frame == f.get("frame", -1)].double().numpy()).tolist()
            return category_map(f["pixels"], f["row"], f["col"], [f"cluster {c}" for c in labels], path,
                                title=f"k-means clusters at {self.site} (k={self.n_clusters}) - {f['sample_id']}{where}")

        return frame_maps(self._first, out_dir, "token_clusters_map", draw)
