"""Anchor discovery as a probe: the vocabulary ids that mark sink and dead tokens, with the evidence for each verdict."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from embedlens.anchors import EVIDENCE_COLUMNS, AnchorRule, Discoverer, discovery_sites, discovery_warnings
from embedlens.errors import EmbedLensError, PlanError
from embedlens.probes._util import records_given as _records_given
from embedlens.probes.base import Probe, Table
from embedlens.registry import probes
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch
    from embedlens.groups import Partition


@probes.register("anchor_discovery")
class AnchorDiscovery(Probe):
    """Find the vocabulary ids that sink and dead visual tokens land on, and show why each id was or was not chosen.

    Every visual token at the LLM input is counted under its nearest
    vocabulary id. An id is an anchor by what lands on it (`embedlens.anchors`):
    a **dead** anchor's tokens collapse onto nearly one point across images
    (their dispersion is at most ``max_dispersion`` of the other tokens'), a
    **sink** anchor's tokens are mostly ViT high-norm or massive-activation
    outliers; either must be the nearest id of some token in at least
    ``min_image_fraction`` of the images. A content word that occurs in every
    image is not an anchor: its tokens still differ. This is the discovery
    ``partition: {discover: true}`` runs, with the same defaults; the
    ``candidates`` table holds the evidence of every id seen in two images or
    more.

    One run has one discovery: when the plan's partition discovers its anchors
    (a ``partition:`` block, or ``token_partition``), this probe reports that
    discovery (its evidence, anchors and warnings) instead of running its own,
    and a parameter given here that differs from the partition's is an error
    naming the partition key to set instead.

    Args:
        min_image_fraction: share of images an anchor must occur in (and at least two).
        max_dispersion: a dead anchor's dispersion at most this share of the other tokens'.
        sink_fraction: share of an id's tokens that must be outliers for a sink anchor.
        max_anchors: anchors kept per group (most tokens first).
        matrix: "input" or "output" embeddings.
        vit_layer: vision layer of the norm test.
        vit_sigma: norm > mean + vit_sigma * std over the image ...
        vit_ratio: ... and >= vit_ratio x the image's median norm.
        massive: also count massive LLM activations as sink evidence (runs the LLM; False stops at its input).
        massive_threshold: |a| above this ...
        massive_ratio: ... and this many times the median |a| (any LLM layer).
        chunk_size: vocabulary rows compared at once.
        search: "exact" or "approximate" vocabulary search.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=3)
        >>> probe = AnchorDiscovery()
        >>> _ = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))
        >>> probe.result()["n_images"]
        3
    """

    @_records_given
    def __init__(
        self,
        min_image_fraction: float = AnchorRule.min_image_fraction,
        max_dispersion: float = AnchorRule.max_dispersion,
        sink_fraction: float = AnchorRule.sink_fraction,
        max_anchors: int = AnchorRule.max_anchors,
        matrix: Literal["input", "output"] = "input",
        vit_layer: int = -2,
        vit_sigma: float = 2.0,
        vit_ratio: float = 2.0,
        massive: bool = True,
        massive_threshold: float = 100.0,
        massive_ratio: float = 1000.0,
        chunk_size: int = 4096,
        search: Literal["exact", "approximate"] = "exact",
    ):
        try:
            rule = AnchorRule(min_image_fraction, max_dispersion, sink_fraction, max_anchors)
        except EmbedLensError as e:
            raise PlanError(f"anchor_discovery.{e}") from None
        if search not in ("exact", "approximate"):
            raise PlanError(f"anchor_discovery.search: must be 'exact' or 'approximate'; got {search!r}")
        if chunk_size < 1:
            raise PlanError(f"anchor_discovery.chunk_size: must be >= 1; got {chunk_size}")
        self.min_image_fraction, self.max_dispersion, self.sink_fraction, self.max_anchors = (
            min_image_fraction, max_dispersion, sink_fraction, max_anchors)
        self.matrix, self.vit_layer, self.vit_sigma, self.vit_ratio, self.massive = matrix, vit_layer, vit_sigma, vit_ratio, massive
        self.massive_threshold, self.massive_ratio, self.chunk_size, self.search = massive_threshold, massive_ratio, chunk_size, search
        self._rule = rule
        self._disc: Discoverer | None = None
        self._table: list[dict[str, Any]] = []
        self._partition: "Partition | None" = None

    def use_partition(self, partition: "Partition") -> None:
        """Report `partition`'s discovery (the run's one) instead of running a second one.

        Raises:
            PlanError: a parameter given here (in the plan's params, or to the constructor), even one equal to its
                default, that differs from the partition's, naming both keys.
        """
        if not partition.discover:
            return  # the partition's anchors are given: this probe's discovery is the run's only one
        mine = {"min_image_fraction": "discover_min_images", "max_dispersion": "discover_max_dispersion",
                "sink_fraction": "discover_sink_fraction", "max_anchors": "discover_max_anchors", "matrix": "matrix",
                "vit_layer": "vit_layer", "vit_sigma": "vit_sigma", "vit_ratio": "vit_ratio", "chunk_size": "chunk_size",
                "search": "search", "massive_threshold": "massive_threshold", "massive_ratio": "massive_ratio"}
        for key, theirs in mine.items():
            value = getattr(self, key)
            if key in self._given and value != getattr(partition, theirs):
                raise PlanError(f"{key}: anchor_discovery reports the run's one discovery, the partition's "
                                f"(partition.{theirs} = {getattr(partition, theirs)!r}); set {theirs} in the partition: "
                                f"block and give anchor_discovery no {key}")
        if "massive" in self._given and self.massive != (partition.massive is not None):
            raise PlanError("massive: anchor_discovery reports the partition's discovery, which counts massive activations "
                            "only when partition.massive names a group; set it there")
        self._partition, self._rule = partition, partition.anchor_rule()

    def _discoverer(self, adapter: "Adapter") -> Discoverer:
        if self._disc is None:
            self._disc = Discoverer(
                rule=self._rule, matrix=self.matrix, chunk_size=self.chunk_size, search=self.search, vit_layer=self.vit_layer,
                vit_sigma=self.vit_sigma, vit_ratio=self.vit_ratio, massive_layers=list(range(adapter.n_llm_layers)) if self.massive else None,
                massive_threshold=self.massive_threshold, massive_ratio=self.massive_ratio,
            )
        return self._disc

    def sites(self, adapter: "Adapter") -> list[Site]:
        if self._partition is not None:
            return []  # the partition's own pass collects the evidence
        try:  # without building the discoverer (its evidence is tensors): checking a plan imports no torch
            return discovery_sites(adapter, self.vit_layer, list(range(adapter.n_llm_layers)) if self.massive else None)
        except EmbedLensError as e:
            raise PlanError(f"anchor_discovery.vit_layer: {e}") from None

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        if self._partition is not None:
            self._table = list(self._partition.evidence)
            return {}
        disc = self._discoverer(adapter)
        disc.update(adapter, batch, acts)
        self._table = disc.table(adapter)
        return {}

    def candidates(self) -> list[dict[str, Any]]:
        """The evidence table: anchors first, then every other id seen in two images or more."""
        return list(self._table)

    def anchors(self) -> dict[str, list[int]]:
        """``{"sink": [...], "dead": [...]}`` from the evidence."""
        out: dict[str, list[int]] = {"sink": [], "dead": []}
        for c in self._table:
            if c["verdict"] in out:
                out[c["verdict"]].append(c["id"])
        return out

    def result(self) -> dict[str, Any]:
        if self._partition is not None:
            self._table = list(self._partition.evidence)
            n_images, n_tokens = self._partition.discovery_counts.get("images", 0), self._partition.discovery_counts.get("tokens", 0)
            warnings = list(self._partition.discovery_notes)
        else:
            ev = self._disc.evidence if self._disc is not None else None
            n_images, n_tokens = (ev.n_images, ev.n_tokens) if ev else (0, 0)
            warnings = discovery_warnings(self._table, self._rule, "anchor_discovery.max_dispersion")
        return {
            "source": "partition" if self._partition is not None else "anchor_discovery",
            "n_images": n_images,
            "n_visual_tokens": n_tokens,
            "anchors": {g: [{"id": c["id"], "token": c["token"]} for c in self._table if c["verdict"] == g] for g in ("sink", "dead")},
            "candidates": self.candidates(),
            "warnings": warnings,
        }

    def final_tables(self) -> dict[str, Table]:
        return {"candidates": {k: [c[k] for c in self._table] for k in EVIDENCE_COLUMNS}} if self._table else {}

    def figures(self, out_dir: Path) -> list[Path]:
        if not self._table:
            return []
        from embedlens.figures import evidence_figure

        return [evidence_figure(self._table, self._rule, Path(out_dir) / "anchor_discovery.png")]

