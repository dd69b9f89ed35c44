"""Token groups: the sink / dead / alive partition of visual tokens.

EmbedLens's anchor rule puts a visual token in a group when any of its top-k
nearest input-embedding rows (cosine, at the LLM input) is one of the group's
anchor ids. Further rules can send tokens to a group without a vocabulary:
ViT high-norm tokens, tokens with a massive LLM activation, tokens whose
vocabulary similarities are flat (high entropy). A token several groups claim
goes to the first in the precedence order (sink before dead by default);
tokens no group claims are ``alive``. Overlaps are counted before precedence.

Anchor ids can also be *discovered* from the data (``discover=True``): a
first pass collects the evidence of `embedlens.anchors` (where tokens land,
whether they collapse, whether they are outliers) and keeps the ids that
pass its rule, with the evidence for every verdict (`evidence`).

A partition keeps a tally of the groups of every image it labels, so a run
can report group fractions and warn when the partition looks degenerate
(`summary`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar, Iterable

from embedlens._torch import no_grad
from embedlens.anchors import AnchorRule, Discoverer, discovery_warnings
from embedlens.errors import InterventionError, ParameterError
from embedlens.signals import massive_token_flags, similarity_entropy, vit_norm_token_flags
from embedlens.sites import Site
from embedlens.state import Stateful, check_state, restore
from embedlens.vocab import visual_nearest

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch

DEFAULT_ORDER = ("sink", "dead")
#: `AnchorRule` field -> the partition parameter that sets it.
_RULE_PARAMS = {"min_image_fraction": "discover_min_images", "max_dispersion": "discover_max_dispersion",
                "sink_fraction": "discover_sink_fraction", "max_anchors": "discover_max_anchors"}


def _param_error(key: str, detail: str) -> ParameterError:
    """A partition parameter that cannot work: ``partition.KEY: detail`` (an `InterventionError`), keyed."""
    return ParameterError("partition", key, detail)


@dataclass
class PartitionState:
    """A partition's streaming state, apart from its parameters: the last batch's overlaps and rule verdicts;
    what `Partition.fit` found and why; the group counts of every image labelled, by "sample id/image"
    (relabelling one overwrites it); the anchors decoded. A `Partition` reads and sets these as its own attributes."""

    last_overlap: dict[str, int] = field(default_factory=dict)
    last_rules: dict[str, torch.Tensor] = field(default_factory=dict)
    discovered: dict[str, list[int]] = field(default_factory=dict)
    evidence: list[dict] = field(default_factory=list)
    discovery_notes: list[str] = field(default_factory=list)
    discovery_counts: dict[str, int] = field(default_factory=dict)
    tally: dict[str, dict[str, int]] = field(default_factory=dict)
    decoded: dict[int, str] = field(default_factory=dict)

    #: every field is state, none a plan parameter (`embedlens.state.check_state` compares those with the plan)
    fitted_params: ClassVar[tuple[str, ...]] = ("last_overlap", "last_rules", "discovered", "evidence", "discovery_notes",
                                                "discovery_counts", "tally", "decoded")


@dataclass
class Partition(Stateful):
    """Sink / dead / alive (or any named groups) from the rules selected.

    Args:
        anchors: group name -> anchor vocabulary ids (EmbedLens's rule).
        k: a token matches an anchor if the anchor is among its top-k neighbours.
        matrix: "input" embeddings (EmbedLens) or "output" (unembedding) for the neighbours.
        chunk_size: vocabulary rows compared at once.
        search: "exact" or "approximate" (`embedlens.vocab.nearest_vocab`; FAISS) for every vocabulary search.
        vit_norm: group that receives ViT high-norm tokens (e.g. "sink"), or None.
        vit_layer: vision layer of the norm test (-2: LLaVA's feature layer).
        vit_sigma: flag norms above mean + vit_sigma * std over the image.
        vit_threshold: absolute norm threshold instead of the sigma rule.
        vit_ratio: and at least this many times the image's median norm (the sigma rule alone flags the
            upper tail of any image; see `embedlens.signals.norm_outliers`).
        massive: group that receives tokens with a massive activation (e.g. "sink"), or None.
        massive_layers: LLM layers (outputs) searched; default: all.
        massive_threshold, massive_ratio: |a| > threshold and > ratio x median |a|.
        entropy: group that receives tokens with flat vocabulary similarities (e.g. "dead"), or None.
        entropy_threshold: normalised entropy (0..1, entropy / log vocab) above which the rule fires.
        temperature: softmax temperature over cosine similarities.
        discover: find anchor ids from the data first (`fit`); given anchors are kept.
        discover_min_images: share of images an id must be the nearest id of some token in to be
            an anchor (`embedlens.anchors.AnchorRule.min_image_fraction`).
        discover_max_dispersion: a dead anchor's tokens spread at most this share of the other
            tokens' (`AnchorRule.max_dispersion`): dead tokens collapse, content tokens do not.
        discover_sink_fraction: share of an id's tokens that must be ViT-norm / massive outliers
            for a sink anchor (the massive test counts when `massive` is set).
        discover_max_anchors: anchors kept per group.
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
    chunk_size: int = 4096
    search: str = "exact"
    vit_norm: str | None = None
    vit_layer: int = -2
    vit_sigma: float = 2.0
    vit_threshold: float | None = None
    vit_ratio: float = 2.0
    massive: str | None = None
    massive_layers: list[int] | None = None
    massive_threshold: float = 100.0
    massive_ratio: float = 1000.0
    entropy: str | None = None
    entropy_threshold: float = 0.9
    temperature: float = 0.05
    discover: bool = False
    discover_min_images: float = AnchorRule.min_image_fraction
    discover_max_dispersion: float = AnchorRule.max_dispersion
    discover_sink_fraction: float = AnchorRule.sink_fraction
    discover_max_anchors: int = AnchorRule.max_anchors
    order: list[str] | None = None
    #: what the partition learns and counts as batches stream through (`PartitionState`), apart from the parameters
    streaming: PartitionState = field(default_factory=lambda: PartitionState(), init=False, repr=False, compare=False)

    def __post_init__(self):
        self.anchors = {g: list(ids) for g, ids in self.anchors.items()}
        for g in self.rule_groups():
            if g == "alive":
                raise _param_error("", "'alive' is what no group claims; no rule can assign to it")
        if self.matrix not in ("input", "output"):
            raise _param_error("matrix", f"must be 'input' or 'output'; got {self.matrix!r}")
        if self.k < 1:
            raise _param_error("k", f"must be >= 1; got {self.k}")
        if self.search not in ("exact", "approximate"):
            raise _param_error("search", f"must be 'exact' or 'approximate'; got {self.search!r}")
        if self.chunk_size < 1:
            raise _param_error("chunk_size", f"must be >= 1; got {self.chunk_size}")
        if not 0 < self.entropy_threshold <= 1:
            raise _param_error("entropy_threshold", f"must be in (0, 1]; got {self.entropy_threshold}")
        if not self.vit_ratio >= 0:
            raise _param_error("vit_ratio", f"must be >= 0; got {self.vit_ratio}")
        if self.temperature <= 0:
            raise _param_error("temperature", f"must be > 0; got {self.temperature}")
        try:
            self.anchor_rule()
        except ParameterError as e:  # the rule's own field names -> this partition's parameters
            raise e.moved("partition", _RULE_PARAMS[e.key]) from None
        if not self.rule_groups() and not self.discover:
            raise _param_error("", "no rule selected; give anchors, discover: true, or one of vit_norm / massive / entropy")
        if self.order is not None:
            missing = [g for g in self.rule_groups() if g not in self.order]
            if missing:
                raise _param_error("order", f"{self.order} does not rank the groups {missing}")

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

    def anchor_rule(self) -> AnchorRule:
        """The discovery thresholds of this partition."""
        return AnchorRule(self.discover_min_images, self.discover_max_dispersion, self.discover_sink_fraction, self.discover_max_anchors)

    @property
    def needs_fit(self) -> bool:
        return self.discover and not self.discovered

    # -- checks and sites --------------------------------------------------------
    def check(self, adapter: "Adapter") -> None:
        vocab = adapter.input_embeddings().shape[0]
        for g, ids in self.anchors.items():
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise _param_error(f"anchors.{g}", f"ids {bad} are outside the vocabulary (0..{vocab - 1})")
        self.sites(adapter)
        self._decode(adapter)

    def _massive_layers(self, adapter: "Adapter") -> list[int]:
        n = adapter.n_llm_layers
        layers = range(n) if self.massive_layers is None else self.massive_layers
        out = []
        for layer in layers:
            idx = layer + n if layer < 0 else layer
            if not 0 <= idx < n:
                raise _param_error("massive_layers", f"layer {layer} is out of range for this model (0..{n - 1})")
            out.append(idx)
        return out

    def sites(self, adapter: "Adapter") -> list[Site]:
        """The activations labelling a batch needs."""
        out = []
        if self.vit_norm is not None:
            try:
                out.append(adapter.resolve(Site("vision.layers", self.vit_layer)))
            except Exception as e:
                raise _param_error("vit_layer", str(e)) from None
        if self.anchors or self.discover or self.entropy is not None:
            out.append(Site("llm.embed"))
        if self.massive is not None:
            out += [Site("llm.layers", i) for i in self._massive_layers(adapter)]
        return out

    # -- discovery ---------------------------------------------------------------
    def discoverer(self, adapter: "Adapter") -> Discoverer:
        """The shared discovery (`embedlens.anchors`) with this partition's settings."""
        return Discoverer(
            rule=self.anchor_rule(), matrix=self.matrix, chunk_size=self.chunk_size, search=self.search, vit_layer=self.vit_layer,
            vit_sigma=self.vit_sigma, vit_threshold=self.vit_threshold, vit_ratio=self.vit_ratio,
            massive_layers=self._massive_layers(adapter) if self.massive is not None else None,
            massive_threshold=self.massive_threshold, massive_ratio=self.massive_ratio,
        )

    def fit(self, adapter: "Adapter", batches: Iterable["Batch"]) -> dict[str, list[int]]:
        """Discover anchor ids over `batches`; returns them. `evidence` keeps every candidate's statistics and verdict."""
        from embedlens.tracing import collect

        sites = self.fit_sites(adapter)
        return self.fit_stream(adapter, ((batch, collect(adapter, batch, sites)) for batch in batches))

    def fit_sites(self, adapter: "Adapter") -> list[Site]:
        """The activations the discovery pass reads."""
        return self.discoverer(adapter).sites(adapter)

    def fit_stream(self, adapter: "Adapter", stream: Iterable[tuple["Batch", dict[Site, torch.Tensor]]]) -> dict[str, list[int]]:
        """`fit` over batches whose activations at `fit_sites` were read elsewhere (e.g. by other ranks), in batch order."""
        disc = self.discoverer(adapter)
        for batch, acts in stream:
            disc.update(adapter, batch, acts)
        found = disc.anchors()
        self.discovered = {g: found.get(g, []) for g in DEFAULT_ORDER}
        self.evidence = disc.table(adapter)
        self.discovery_notes = discovery_warnings(self.evidence, disc.rule, "partition.discover_max_dispersion")
        self.discovery_counts = {"images": disc.evidence.n_images, "tokens": disc.evidence.n_tokens}
        self._decode(adapter)
        return self.discovered

    def _all_anchors(self) -> dict[str, list[int]]:
        out = {g: list(ids) for g, ids in self.anchors.items()}
        for g, ids in self.discovered.items():
            out[g] = sorted(set(out.get(g, [])) | set(ids))
        return out

    # -- labelling -----------------------------------------------------------------
    @no_grad
    def rules(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each rule's verdict before precedence: ``{"anchors:dead": [tokens] bool, "vit_norm": ..., ...}``.

        Tokens are the batch's visual tokens in `TokenRoles.visual_tokens` order.
        """
        import torch

        if self.needs_fit:
            raise InterventionError("partition: discover is set but fit() has not run; call partition.fit(adapter, batches)")
        vt = batch.roles.visual_tokens()
        out: dict[str, torch.Tensor] = {}
        anchors = self._all_anchors()
        vocab = None
        if anchors or self.entropy is not None:
            vocab = (adapter.input_embeddings() if self.matrix == "input" else adapter.output_embeddings()).detach()
        if anchors:  # the layer-0 lens of the same pass searches alike: computed once (`visual_nearest`)
            _, ids = visual_nearest(batch, Site("llm.embed"), acts[Site("llm.embed")], vocab, self.k, self.chunk_size, self.search)
            for g, a in anchors.items():
                out[f"anchors:{g}"] = torch.isin(ids, torch.tensor(a, dtype=ids.dtype).to(ids.device, non_blocking=True)).any(-1)
        if self.entropy is not None:
            h = acts[Site("llm.embed")]
            x = h[vt["sample"].to(h.device), vt["position"].to(h.device)].to(vocab.device)  # [tokens, d]
            ent = similarity_entropy(x, vocab, self.temperature, self.chunk_size) / math.log(vocab.shape[0])
            out["entropy"] = ent > self.entropy_threshold
        if self.vit_norm is not None:
            out["vit_norm"] = vit_norm_token_flags(adapter, batch, acts, self.vit_layer, self.vit_sigma, self.vit_threshold, self.vit_ratio)
        if self.massive is not None:
            out["massive"] = massive_token_flags(batch, acts, self._massive_layers(adapter), self.massive_threshold, self.massive_ratio)
        return _to_host(out)

    def _rule_target(self, rule: str) -> str:
        if rule.startswith("anchors:"):
            return rule.split(":", 1)[1]
        return {"vit_norm": self.vit_norm, "massive": self.massive, "entropy": self.entropy}[rule]

    def assign(self, rules: dict[str, torch.Tensor], n: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Apply precedence to rule verdicts; returns (``{group: [tokens] bool}`` incl. alive, overlaps)."""
        import torch

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
        self._count(batch, groups)
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
        import torch

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

    # -- what the run reports ------------------------------------------------------
    def _decode(self, adapter: "Adapter") -> None:
        ids = sorted({i for ids in self._all_anchors().values() for i in ids})
        self.decoded = {i: str(adapter.tokenizer.convert_ids_to_tokens(i)) for i in ids}

    def _count(self, batch: "Batch", groups: dict[str, torch.Tensor]) -> None:
        import torch

        vt = batch.roles.visual_tokens()
        key = vt["sample"] * 10_000 + vt["image"]
        keys, inverse = key.unique(return_inverse=True)
        counts = {g: torch.bincount(inverse[m], minlength=len(keys)).tolist() for g, m in groups.items()}  # per image
        for j, k in enumerate(keys.tolist()):
            s, img = divmod(k, 10_000)
            sid = batch.samples[s].id or f"#{len(self.tally)}"  # an unnamed sample cannot be recognised when relabelled
            self.tally[f"{sid}/{img}"] = {g: c[j] for g, c in counts.items()}

    def anchor_table(self, adapter: "Adapter | None" = None) -> list[dict]:
        """Every anchor in use, decoded: ``[{group, id, token, source}]`` (source: given or discovered)."""
        if adapter is not None:
            self._decode(adapter)
        out = []
        for g, ids in self._all_anchors().items():
            given = set(self.anchors.get(g, []))
            for i in ids:
                out.append({"group": g, "id": i, "token": self.decoded.get(i, str(i)), "source": "given" if i in given else "discovered"})
        return out

    def summary(self) -> dict:
        """Group fractions over every image labelled, per-image spread, the anchors decoded, discovery evidence, warnings."""
        names = list(self.names)
        total = {g: sum(t.get(g, 0) for t in self.tally.values()) for g in names}
        n = sum(total.values())
        per_image = {}
        for g in names:
            fr = [t.get(g, 0) / max(sum(t.values()), 1) for t in self.tally.values()]
            per_image[g] = {"mean": sum(fr) / len(fr) if fr else 0.0, "min": min(fr, default=0.0), "max": max(fr, default=0.0)}
        emptied = {g: sorted(k for k, t in self.tally.items() if t.get(g, 0) and t.get(g, 0) == sum(t.values())) for g in names if g != "alive"}
        out = {
            "order": names,
            "n_images": len(self.tally),
            "n_visual_tokens": n,
            "counts": total,
            "fractions": {g: c / n if n else 0.0 for g, c in total.items()},
            "per_image_fraction": per_image,
            "anchors": self.anchor_table(),
            "warnings": partition_warnings(self, total, emptied),
        }
        if self.discover:
            out["discovered_anchors"] = {g: [{"id": i, "token": self.decoded.get(i, str(i))} for i in ids] for g, ids in self.discovered.items()}
            out["discovery"] = self.evidence
        return out


    # -- state (checkpointed flat, as one set of attributes: the file format of before the split) -----------
    def state_dict(self) -> dict:
        params = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "streaming"}
        return {**params, **vars(self.streaming)}

    def load_state_dict(self, state: dict) -> None:
        """The parameters checked and set as any plugin's; the streaming keys checked against and set on `streaming`.

        Raises:
            CheckpointError: naming the attribute and what is wrong with its saved value.
        """
        streamed = {f.name for f in fields(PartitionState)}
        if not isinstance(state, dict):
            return super().load_state_dict(state)  # refused there, with what the file holds
        super().load_state_dict({k: v for k, v in state.items() if k not in streamed})
        mine = {k: v for k, v in state.items() if k in streamed}
        check_state(self.streaming, mine, type(self).__name__)
        for key, value in mine.items():
            setattr(self.streaming, key, restore(getattr(self.streaming, key), value, f"{type(self).__name__}.{key}"))


def _streamed(name: str) -> property:
    return property(lambda self: getattr(self.streaming, name), lambda self, value: setattr(self.streaming, name, value),
                    doc=f"`PartitionState.{name}` of this partition.")


for _name in (f.name for f in fields(PartitionState)):  # partition.tally, partition.evidence, ... as before the split
    setattr(Partition, _name, _streamed(_name))


def _to_host(flags: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rule verdicts (each on its device) to the host in one copy: ``{rule: [tokens] bool}`` on the CPU."""
    import torch

    if not flags:
        return {}
    names = list(flags)
    dev = flags[names[0]].device
    both = torch.stack([flags[r].to(dev) for r in names]).cpu()  # [rules, tokens]
    return dict(zip(names, both.unbind(0)))


#: Thresholds of the degenerate-partition warnings: dead above / below these shares of all visual tokens.
DEAD_HIGH, DEAD_LOW = 0.9, 0.02


def partition_warnings(part: Partition, total: dict[str, int], emptied: dict[str, list[str]]) -> list[str]:
    """What looks degenerate about a partition, each with what to check."""
    out = list(part.discovery_notes)
    n = sum(total.values())
    if not n:
        return out
    if "dead" in total:
        dead = total["dead"] / n
        how = "discovered" if part.discover else "given"
        if dead > DEAD_HIGH:
            out.append(f"partition: {dead:.0%} of visual tokens are dead (more than {DEAD_HIGH:.0%}); the dead anchors "
                       f"({how}: {', '.join(repr(a['token']) for a in part.anchor_table() if a['group'] == 'dead')}) "
                       f"probably include content words: {_dead_setting(part)}")
        elif dead < DEAD_LOW:
            out.append(f"partition: only {dead:.1%} of visual tokens are dead (less than {DEAD_LOW:.0%}); "
                       + (_no_dead_anchor(part) if part.discover and not part._all_anchors().get("dead") else "check the dead anchors and k"))
    for g, keys in emptied.items():
        if keys:
            shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
            out.append(f"partition: group {g!r} holds every visual token of {len(keys)} image(s) ({shown}); "
                       f"a condition that removes {g!r} leaves those images without visual tokens")
    return out


def _dead_setting(part: Partition) -> str:
    """What produced the dead anchors, for the too-many-dead warning: the anchors given, or the discovery setting."""
    if not part.discover:
        return "they were given in partition.anchors.dead: check them and k"
    default = AnchorRule.max_dispersion
    rels = [r["relative_dispersion"] for r in part.evidence if r["verdict"] == "dead"]
    ev = f"their relative dispersion is {min(rels):.3g}-{max(rels):.3g}" if rels else "no dead anchor was discovered"
    if part.discover_max_dispersion > default:
        return (f"partition.discover_max_dispersion={part.discover_max_dispersion:g} is above the default {default:g} and "
                f"{ev}: the loosened rule accepts spread-out words; check the discovery evidence")
    return f"discovered with partition.discover_max_dispersion={part.discover_max_dispersion:g}, {ev}: check the discovery evidence, or give anchors / a larger data set"


def _no_dead_anchor(part: Partition) -> str:
    """Why discovery found no dead anchor, with the closest candidate's evidence against the threshold."""
    cands = [r for r in part.evidence if r["verdict"] == "content" and not math.isnan(r["relative_dispersion"])]
    msg = "no dead anchor was found: this model may have no dead tokens, or the data set is too small"
    if cands:
        c = min(cands, key=lambda r: r["relative_dispersion"])
        msg += (f"; the closest candidate, {c['token']!r} (nearest id in {c['image_fraction']:.0%} of the images), has relative "
                f"dispersion {c['relative_dispersion']:.3g} against partition.discover_max_dispersion="
                f"{part.discover_max_dispersion:g} (dense images, with few background patches that all touch objects, "
                "spread the background's tokens)")
    return msg
