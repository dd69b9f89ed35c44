"""Token groups: the sink / dead / alive partition of visual tokens.

EmbedLens's anchor rule puts a visual token in a group when any of its top-k
nearest input-embedding rows (cosine, at the LLM input) is one of the group's
anchor ids. Further rules can send tokens to a group without a vocabulary:
ViT high-norm tokens, tokens with a massive LLM activation, tokens whose
vocabulary similarities are flat (high entropy). A token several groups claim
goes to the first in the precedence order (sink before dead by default);
tokens no group claims are ``alive``. Overlaps are counted before precedence.

Anchor ids can also be *discovered* from the data (``discover=True``), which
runs `embedlens.probes.anchor_discovery` over the run's batches first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch

from embedlens.errors import InterventionError
from embedlens.sites import Site
from embedlens.signals import massive_entries, similarity_entropy, vit_norm_outliers
from embedlens.state import Stateful

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch

DEFAULT_ORDER = ("sink", "dead")


def vision_to_tokens(flags: torch.Tensor, vt: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-patch flags of the vision batch (``[rows, patches]``) read at each visual token; ``[tokens]``."""
    return flags[vt["feature_row"].to(flags.device), vt["feature_col"].to(flags.device)]


@dataclass
class Partition(Stateful):
    """Sink / dead / alive (or any named groups) from the rules selected.

    Args:
        anchors: group name -> anchor vocabulary ids (EmbedLens's rule).
        k: a token matches an anchor if the anchor is among its top-k neighbours.
        matrix: "input" embeddings (EmbedLens) or "output" (unembedding) for the neighbours.
        chunk_size: vocabulary rows compared at once.
        vit_norm: group that receives ViT high-norm tokens (e.g. "sink"), or None.
        vit_layer: vision layer of the norm test (-2: LLaVA's feature layer).
        vit_sigma: flag norms above mean + vit_sigma * std over the image.
        vit_threshold: absolute norm threshold instead of the sigma rule.
        massive: group that receives tokens with a massive activation (e.g. "sink"), or None.
        massive_layers: LLM layers (outputs) searched; default: all.
        massive_threshold, massive_ratio: |a| > threshold and > ratio x median |a|.
        entropy: group that receives tokens with flat vocabulary similarities (e.g. "dead"), or None.
        entropy_threshold: normalised entropy (0..1, entropy / log vocab) above which the rule fires.
        temperature: softmax temperature over cosine similarities.
        discover: find anchor ids from the data first (`fit`); given anchors are kept.
        discover_min_images: share of images an id must be nearest to some token in to be
            discovered as an anchor (raise it when a few content words occur in most images).
        order: precedence among groups; default sink, dead, then the others as named.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> adapter, batch = tiny_batch("llava-clip", n=1)
        >>> part = Partition({"sink": [5], "dead": [6, 7]}, k=3, vit_norm="sink")
        >>> masks = part.label(adapter, batch)
        >>> sorted(masks)
        ['alive', 'dead', 'sink']
        >>> int(sum(m.sum() for m in masks.values())) == int(batch.roles.visual.sum())
        True
    """

    anchors: dict[str, list[int]] = field(default_factory=dict)
    k: int = 3
    matrix: str = "input"
    chunk_size: int = 8192
    vit_norm: str | None = None
    vit_layer: int = -2
    vit_sigma: float = 2.0
    vit_threshold: float | None = None
    massive: str | None = None
    massive_layers: list[int] | None = None
    massive_threshold: float = 100.0
    massive_ratio: float = 1000.0
    entropy: str | None = None
    entropy_threshold: float = 0.9
    temperature: float = 0.05
    discover: bool = False
    discover_min_images: float = 0.5
    order: list[str] | None = None
    # state, not parameters: the last batch's overlaps and rule verdicts, and anchors found by `fit`
    last_overlap: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    last_rules: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    discovered: dict[str, list[int]] = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.anchors = {g: list(ids) for g, ids in self.anchors.items()}
        for g in self.rule_groups():
            if g == "alive":
                raise InterventionError("partition: 'alive' is what no group claims; no rule can assign to it")
        if self.matrix not in ("input", "output"):
            raise InterventionError(f"partition.matrix: must be 'input' or 'output'; got {self.matrix!r}")
        if self.k < 1:
            raise InterventionError(f"partition.k: must be >= 1; got {self.k}")
        if self.chunk_size < 1:
            raise InterventionError(f"partition.chunk_size: must be >= 1; got {self.chunk_size}")
        if not 0 < self.entropy_threshold <= 1:
            raise InterventionError(f"partition.entropy_threshold: must be in (0, 1]; got {self.entropy_threshold}")
        if self.temperature <= 0:
            raise InterventionError(f"partition.temperature: must be > 0; got {self.temperature}")
        if not 0 < self.discover_min_images <= 1:
            raise InterventionError(f"partition.discover_min_images: must be in (0, 1]; got {self.discover_min_images}")
        if not self.rule_groups() and not self.discover:
            raise InterventionError(
                "partition: no rule selected; give anchors, discover: true, or one of vit_norm / massive / entropy"
            )
        if self.order is not None:
            missing = [g for g in self.rule_groups() if g not in self.order]
            if missing:
                raise InterventionError(f"partition.order: {self.order} does not rank the groups {missing}")

    def rule_groups(self) -> list[str]:
        gs = list(self.anchors)
        if self.discover:
            gs += [g for g in DEFAULT_ORDER if g not in gs]
        for g in (self.vit_norm, self.massive, self.entropy):
            if g is not None and g not in gs:
                gs.append(g)
        return gs

    @property
    def names(self) -> tuple[str, ...]:
        """Group names in precedence order, ``alive`` last."""
        groups = self.rule_groups()
        if self.order is not None:
            ranked = [g for g in self.order if g in groups]
        else:
            ranked = [g for g in DEFAULT_ORDER if g in groups] + [g for g in groups if g not in DEFAULT_ORDER]
        return (*ranked, "alive")

    @property
    def needs_fit(self) -> bool:
        return self.discover and not self.discovered

    # -- checks and sites --------------------------------------------------------
    def check(self, adapter: "Adapter") -> None:
        vocab = adapter.input_embeddings().shape[0]
        for g, ids in self.anchors.items():
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InterventionError(f"partition.anchors.{g}: ids {bad} are outside the vocabulary (0..{vocab - 1})")
        self.sites(adapter)

    def _massive_layers(self, adapter: "Adapter") -> list[int]:
        n = adapter.n_llm_layers
        layers = range(n) if self.massive_layers is None else self.massive_layers
        out = []
        for layer in layers:
            idx = layer + n if layer < 0 else layer
            if not 0 <= idx < n:
                raise InterventionError(f"partition.massive_layers: layer {layer} is out of range for this model (0..{n - 1})")
            out.append(idx)
        return out

    def sites(self, adapter: "Adapter") -> list[Site]:
        """The activations labelling a batch needs."""
        out = []
        if self.vit_norm is not None:
            try:
                out.append(adapter.resolve(Site("vision.layers", self.vit_layer)))
            except Exception as e:
                raise InterventionError(f"partition.vit_layer: {e}") from None
        if self.anchors or self.discover or self.entropy is not None:
            out.append(Site("llm.embed"))
        if self.massive is not None:
            out += [Site("llm.layers", i) for i in self._massive_layers(adapter)]
        return out

    # -- discovery ---------------------------------------------------------------
    def fit(self, adapter: "Adapter", batches: Iterable["Batch"]) -> dict[str, list[int]]:
        """Discover anchor ids over `batches` (anchor_discovery's classification); returns them."""
        from embedlens.probes.anchor_discovery import AnchorDiscovery
        from embedlens.tracing import collect

        # discovery counts nearest ids only (k=1): with larger k an anchor's own close neighbours
        # would look content-independent too; membership then uses the partition's k
        probe = AnchorDiscovery(k=1, min_image_fraction=self.discover_min_images, matrix=self.matrix, chunk_size=self.chunk_size, vit_layer=self.vit_layer)
        for batch in batches:
            probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))
        found = probe.anchors()
        self.discovered = {g: found.get(g, []) for g in DEFAULT_ORDER}
        return self.discovered

    def _all_anchors(self) -> dict[str, list[int]]:
        out = {g: list(ids) for g, ids in self.anchors.items()}
        for g, ids in self.discovered.items():
            out[g] = sorted(set(out.get(g, [])) | set(ids))
        return out

    # -- labelling -----------------------------------------------------------------
    @torch.no_grad()
    def rules(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each rule's verdict before precedence: ``{"anchors:dead": [tokens] bool, "vit_norm": ..., ...}``.

        Tokens are the batch's visual tokens in `TokenRoles.visual_tokens` order.
        """
        if self.needs_fit:
            raise InterventionError("partition: discover is set but fit() has not run; call partition.fit(adapter, batches)")
        from embedlens.probes.embedding_lens import nearest_vocab

        vt = batch.roles.visual_tokens()
        out: dict[str, torch.Tensor] = {}
        anchors = self._all_anchors()
        vocab = None
        if anchors or self.entropy is not None:
            vocab = (adapter.input_embeddings() if self.matrix == "input" else adapter.output_embeddings()).detach()
            x = acts[Site("llm.embed")][vt["sample"], vt["position"]].to(vocab.device)  # [tokens, d]
        if anchors:
            _, ids = nearest_vocab(x, vocab, self.k, self.chunk_size)
            for g, a in anchors.items():
                out[f"anchors:{g}"] = torch.isin(ids, torch.tensor(a, dtype=ids.dtype, device=ids.device)).any(-1).cpu()
        if self.entropy is not None:
            ent = similarity_entropy(x, vocab, self.temperature, self.chunk_size) / math.log(vocab.shape[0])
            out["entropy"] = (ent > self.entropy_threshold).cpu()
        if self.vit_norm is not None:
            site = adapter.resolve(Site("vision.layers", self.vit_layer))
            flags = vit_norm_outliers(acts[site], self.vit_sigma, self.vit_threshold, adapter.n_prefix_tokens)
            out["vit_norm"] = vision_to_tokens(flags, vt).cpu()
        if self.massive is not None:
            hit = torch.zeros(len(vt["sample"]), dtype=torch.bool)
            valid = ~batch.roles.padding
            for layer in self._massive_layers(adapter):
                h = acts[Site("llm.layers", layer)]
                flags, _ = massive_entries(h, valid.to(h.device), self.massive_threshold, self.massive_ratio)
                hit |= flags.any(-1)[vt["sample"], vt["position"]].cpu()
            out["massive"] = hit
        return out

    def _rule_target(self, rule: str) -> str:
        if rule.startswith("anchors:"):
            return rule.split(":", 1)[1]
        return {"vit_norm": self.vit_norm, "massive": self.massive, "entropy": self.entropy}[rule]

    def assign(self, rules: dict[str, torch.Tensor], n: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Apply precedence to rule verdicts; returns (``{group: [tokens] bool}`` incl. alive, overlaps)."""
        claims = {g: torch.zeros(n, dtype=torch.bool) for g in self.names[:-1]}
        for rule, hit in rules.items():
            claims[self._rule_target(rule)] |= hit
        names = list(claims)
        overlap = {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                c = int((claims[a] & claims[b]).sum())
                if c:
                    overlap[f"{a}&{b}"] = c
        taken = torch.zeros(n, dtype=torch.bool)
        out = {}
        for g in names:
            out[g] = claims[g] & ~taken
            taken |= claims[g]
        out["alive"] = ~taken
        return out, overlap

    def token_groups(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{group: [tokens] bool}`` over the batch's visual tokens (precedence applied)."""
        self.last_rules = self.rules(adapter, batch, acts)
        groups, self.last_overlap = self.assign(self.last_rules, int(batch.roles.visual.sum()))
        return groups

    def label(
        self,
        adapter: "Adapter",
        batch: "Batch",
        acts: dict[Site, torch.Tensor] | None = None,
        embeds: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{group: [batch, seq] bool}`` masks over the batch's visual tokens, plus ``alive``.

        Args:
            acts: activations at `sites(adapter)`; collected with a trace when missing.
            embeds: the LLM input embeddings, when that is all the rules need.
        """
        from embedlens.tracing import collect

        need = self.sites(adapter)
        acts = dict(acts or {})
        if embeds is not None:
            acts.setdefault(Site("llm.embed"), embeds)
        if any(s not in acts for s in need):
            acts.update(collect(adapter, batch, [s for s in need if s not in acts]))
        groups = self.token_groups(adapter, batch, acts)
        vis = batch.roles.visual
        out = {}
        for g, hit in groups.items():
            full = torch.zeros_like(vis)
            full[vis] = hit
            out[g] = full
        return out
