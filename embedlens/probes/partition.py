"""The sink / dead / alive partition of visual tokens as probes: `anchor_groups` and `token_partition`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np

from embedlens.anchors import AnchorRule
from embedlens.errors import ParameterError, PlanError
from embedlens.groups import Partition
from embedlens.probes._util import FirstImage, records_given, token_meta
from embedlens.probes.base import Probe, Table
from embedlens.registry import probes
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


class _PartitionProbe(Probe):
    """Labels every visual token with a `Partition` and counts groups, rules and overlaps."""

    name = "partition"
    partition: Partition

    def _build(self, **kw) -> None:
        try:
            self.partition = Partition(**kw)
        except ParameterError as e:  # the partition's parameters are this probe's: token_partition.k
            raise PlanError(str(e.moved(self.name))) from None
        self._counts: dict[str, int] = {g: 0 for g in self.partition.names}
        self._rule_counts: dict[str, int] = {}
        self._overlap: dict[str, int] = {}
        self._per_image: list[dict[str, float]] = []
        self._n = 0
        self._first = FirstImage()
        self._time: dict[str, torch.Tensor] = {}  # group -> [content..., all] x [places ever in it, sum of their shares, always in it]
        self._time_places: torch.Tensor | None = None  # [content...]: places of each content seen (over_time_by_content)

    def use_partition(self, partition: Partition) -> None:
        """Label with `partition` (the run's one partition, from the plan) instead of the one built from parameters.

        Raises:
            PlanError: a parameter given to this probe (even one equal to its default) that differs from the
                partition's, naming the partition key to set instead.
        """
        for key in sorted(getattr(self, "_given", ())):
            mine, theirs = getattr(self.partition, key), getattr(partition, key)
            if mine != theirs:
                raise PlanError(f"{key}: {self.name} labels with the run's one partition (partition.{key} = {theirs!r}, "
                                f"here {mine!r}); set {key} in the partition: block and give {self.name} no {key}")
        self.partition = partition
        self._counts = {g: 0 for g in partition.names}

    @property
    def needs_fit(self) -> bool:
        return self.partition.needs_fit

    def fit(self, adapter: "Adapter", batches: Iterable["Batch"]) -> None:
        self.partition.fit(adapter, batches)

    def check(self, adapter: "Adapter") -> None:
        try:
            self.partition.check(adapter)
        except ParameterError as e:
            raise PlanError(str(e.moved(self.name))) from None

    def sites(self, adapter: "Adapter") -> list[Site]:
        return self.partition.sites(adapter)

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        vt = batch.roles.visual_tokens()
        groups = self.partition.token_groups(adapter, batch, acts)
        rules = self.partition.last_rules
        n = len(vt["sample"])
        label = np.full(n, "alive", dtype=object)
        for g, hit in groups.items():  # exclusive after precedence
            label[hit.numpy()] = g
        label = label.tolist()
        rows = token_meta(batch, vt)
        rows["group"] = label
        for r, hit in rules.items():
            rows[r.replace(":", "_")] = hit.tolist()
            self._rule_counts[r] = self._rule_counts.get(r, 0) + int(hit.sum())
        for g, hit in groups.items():
            self._counts[g] += int(hit.sum())
        for k, v in self.partition.last_overlap.items():
            self._overlap[k] = self._overlap.get(k, 0) + v
        key = vt["sample"] * 10_000 + vt["image"]
        for img in key.unique().tolist():
            sel = key == img
            self._per_image.append({g: float(groups[g][sel].float().mean()) for g in groups})
        self._n += n
        self._first.offer(adapter, batch, vt, group=label)
        out = {"tokens": rows}
        if bool((vt["frame"] >= 0).any()):  # a video batch: each place's groups over its frames
            out["frames"] = self._over_time(batch, vt, groups)
        return out

    def _over_time(self, batch: "Batch", vt: dict[str, torch.Tensor], groups: dict[str, torch.Tensor]) -> Table:
        """One row per place of the frame grid (sample, image, row, col): its content (`over_time.place_content`),
        its frames and in how many each group holds its token; the run's tally per group (places ever in it, summed
        share of their frames in it, places in it in every frame), over all places and per content, for `result`'s
        ``over_time`` and ``over_time_by_content``."""
        import torch

        from embedlens.probes.over_time import CONTENT, group_persistence, place_content

        masks = dict(groups)  # exclusive after precedence; alive: in none of the others, where not given
        if "alive" not in masks:
            masks["alive"] = ~torch.stack(list(groups.values())).any(0) if groups else torch.ones_like(vt["frame"], dtype=torch.bool)
        rows: Table = {}
        content = None
        for g in self.partition.names:
            keys, n_frames, n_in = group_persistence(vt, masks[g])
            if not rows:
                k = keys.cpu()
                content = place_content(batch, keys)  # static background / static object / moving, -1 without truth
                names = list(CONTENT) + ["unknown"]
                rows = {"sample_id": [batch.samples[i].id for i in k[:, 0].tolist()], "image": k[:, 1].tolist(),
                        "row": k[:, 2].tolist(), "col": k[:, 3].tolist(), "content": [names[c] for c in content.cpu().tolist()],
                        "n_frames": n_frames.tolist()}
            rows[f"n_{g}"] = n_in.tolist()
            ever = n_in > 0
            # [content + all, 3]: per place set (each content, then every place), places ever in g, their summed
            # share of frames in g, places in g in every frame
            sets = torch.stack([content == i for i in range(len(CONTENT))] + [torch.ones_like(ever)])  # [4, places]
            per = torch.stack([ever, torch.where(ever, n_in / n_frames, 0.0), ever & (n_in == n_frames)]).double()  # [3, places]
            tally = (sets.double() @ per.T).cpu()  # [4, 3]
            self._time[g] = self._time[g] + tally if g in self._time else tally
        if content is not None:
            shown = torch.stack([(content == i).sum() for i in range(len(CONTENT))]).cpu()  # places of each content
            self._time_places = self._time_places + shown if self._time_places is not None else shown
        return rows

    def result(self) -> dict[str, Any]:
        n = max(self._n, 1)
        per_image = {
            g: {
                "mean": sum(d[g] for d in self._per_image) / max(len(self._per_image), 1),
                "min": min((d[g] for d in self._per_image), default=0.0),
                "max": max((d[g] for d in self._per_image), default=0.0),
            }
            for g in self._counts
        }
        out = {
            "n_visual_tokens": self._n,
            "order": list(self.partition.names),
            "counts": dict(self._counts),
            "fractions": {g: c / n for g, c in self._counts.items()},
            "per_image_fraction": per_image,
            "rule_counts": dict(self._rule_counts),
            "overlaps": dict(self._overlap),
        }
        summ = self.partition.summary()
        out["anchors"] = summ["anchors"]
        if self.partition.discover:
            out["discovered_anchors"] = summ["discovered_anchors"]
            out["discovery"] = summ["discovery"]
        out["warnings"] = summ["warnings"]
        if self._time:  # video: does a token stay in its group across frames (table: <probe>.frames)
            from embedlens.probes.over_time import CONTENT

            def tally(t: torch.Tensor) -> dict[str, Any]:
                return {"places_ever": int(t[0]), "mean_share_of_frames": float(t[1] / t[0]) if t[0] else None,
                        "share_in_every_frame": float(t[2] / t[0]) if t[0] else None}

            out["over_time"] = {g: tally(t[-1]) for g, t in self._time.items()}
            # split by what the place shows (ground truth of synthetic videos): static content should keep its group
            by = {c: {"places": int(self._time_places[i]), **{g: tally(t[i]) for g, t in self._time.items()}}
                  for i, c in enumerate(CONTENT) if self._time_places is not None and self._time_places[i] > 0}
            if by:  # only where the videos have the truth
                out["over_time_by_content"] = by
        return out

    def figures(self, out_dir: Path) -> list[Path]:
        f = self._first.data
        if f is None:
            return []
        from embedlens.figures import category_map

        from embedlens.figures import evidence_figure

        fr = self.result()["fractions"]
        summary = ", ".join(f"{g} {fr[g]:.0%}" for g in self.partition.names)
        frames = self._first.frames  # a video: one map per frame (temporal patch), each with that frame's tokens
        out = [
            category_map(
                e["pixels"], e["row"], e["col"], e["group"],
                Path(out_dir) / (f"{self.name}_map.png" if e.get("frame", -1) < 0 else f"{self.name}_map_frame{e['frame']}.png"),
                title=f"{self.name} - {e['sample_id']}" + (f", frame {e['frame']} of {len(frames)}" if e.get("frame", -1) >= 0 else "")
                + f" (run: {summary})",
            )
            for e in frames
        ]
        if self.partition.evidence:
            out.append(evidence_figure(self.partition.evidence, self.partition.anchor_rule(), Path(out_dir) / f"{self.name}_discovery.png",
                                       title="Partition: discovered anchors and the rejected candidates (marker size: token share)"))
        return out


@probes.register("anchor_groups")
class AnchorGroups(_PartitionProbe):
    """EmbedLens's anchor rule: a token is in a group if any of its top-k nearest vocabulary ids is an anchor.

    Groups are tried in precedence order (sink, dead, then others), tokens
    in no group are alive, and tokens several groups claim are counted as
    overlaps before precedence. LLaVA-1.5-7B's published anchors are
    ``{"sink": [1141, 26673], "dead": [30296]}``; for other vocabularies use
    `anchor_discovery`.

    Args:
        anchors: group name -> anchor vocabulary ids.
        k: neighbours compared with the anchors.
        matrix: "input" embeddings (EmbedLens) or "output" (unembedding).
        chunk_size: vocabulary rows compared at once.
        order: precedence of the groups (default: sink, dead, others as given).

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=2)
        >>> probe = AnchorGroups({"sink": [5], "dead": [6]}, k=3)
        >>> rows = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))["tokens"]
        >>> sorted(set(rows["group"])) <= ["alive", "dead", "sink"], probe.result()["n_visual_tokens"]
        (True, 32)
    """

    name = "anchor_groups"
    example_params = {"anchors": {"sink": [5], "dead": [6, 7]}}

    @records_given
    def __init__(
        self,
        anchors: dict[str, list[int]],
        k: int = 3,
        matrix: Literal["input", "output"] = "input",
        chunk_size: int = 4096,
        order: list[str] | None = None,
    ):
        if not anchors:
            raise PlanError("anchor_groups.anchors: give at least one group with anchor ids, e.g. {dead: [30296]}")
        self.anchors, self.k, self.matrix, self.chunk_size, self.order = anchors, k, matrix, chunk_size, order
        self._build(anchors=anchors, k=k, matrix=matrix, chunk_size=chunk_size, order=order)


@probes.register("token_partition")
class TokenPartition(_PartitionProbe):
    """Label every visual token sink / dead / alive by the rules selected, with precedence and overlaps.

    Rules: anchor ids (given, and/or discovered from the data with
    ``discover: true``), ViT high-norm tokens, LLM massive activations and
    flat vocabulary similarities (entropy). Each rule sends tokens to a
    group; precedence decides between groups; the table keeps every rule's
    verdict per token.

    In a plan there is one partition: a plan with a ``partition:`` block
    labels with it (this probe then takes no parameters), and a plan without
    one takes this probe's parameters as its partition, so the probe, the
    other probes' groups, the conditions' selections and the figures can
    never disagree.

    Args:
        anchors: group name -> anchor vocabulary ids.
        discover: find sink/dead anchors from the data in a first pass (see `anchor_discovery`);
            default: only when no anchors are given.
        discover_min_images: share of images a discovered anchor must be the nearest id of some token in.
        discover_max_dispersion: a dead anchor's tokens spread at most this share of the other tokens'.
        discover_sink_fraction: share of an id's tokens that must be outliers for a sink anchor.
        discover_max_anchors: anchors kept per group.
        k: neighbours compared with the anchors.
        matrix: "input" or "output" embeddings for the neighbours.
        vit_norm: group for ViT high-norm tokens ("sink"), or None to skip the rule.
        vit_layer: vision layer of the norm test (-2: LLaVA's feature layer).
        vit_sigma: norm > mean + vit_sigma * std over the image.
        vit_threshold: absolute norm threshold instead.
        vit_ratio: and at least this many times the image's median norm.
        massive: group for tokens with a massive activation ("sink"), or None.
        massive_layers: LLM layers searched (default all).
        massive_threshold: |a| above this ...
        massive_ratio: ... and above this many times the median |a|.
        entropy: group for flat-similarity tokens ("dead"), or None.
        entropy_threshold: normalised entropy (0..1) above which the rule fires.
        temperature: softmax temperature over cosine similarities.
        order: precedence (default sink, dead, then the others).
        chunk_size: vocabulary rows compared at once.
        search: "exact" or "approximate" vocabulary search.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=1)
        >>> probe = TokenPartition(anchors={"dead": [6]}, vit_norm="sink", entropy="dead")
        >>> rows = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))["tokens"]
        >>> sorted(c for c in rows if c.startswith(("anchors", "vit", "entropy")))
        ['anchors_dead', 'entropy', 'vit_norm']
    """

    name = "token_partition"

    @records_given
    def __init__(
        self,
        anchors: dict[str, list[int]] = {},  # noqa: B006 - never mutated
        discover: bool | None = None,
        discover_min_images: float = AnchorRule.min_image_fraction,
        discover_max_dispersion: float = AnchorRule.max_dispersion,
        discover_sink_fraction: float = AnchorRule.sink_fraction,
        discover_max_anchors: int = AnchorRule.max_anchors,
        k: int = 3,
        matrix: Literal["input", "output"] = "input",
        vit_norm: str | None = None,
        vit_layer: int = -2,
        vit_sigma: float = 2.0,
        vit_threshold: float | None = None,
        vit_ratio: float = 2.0,
        massive: str | None = None,
        massive_layers: list[int] | None = None,
        massive_threshold: float = 100.0,
        massive_ratio: float = 1000.0,
        entropy: str | None = None,
        entropy_threshold: float = 0.9,
        temperature: float = 0.05,
        order: list[str] | None = None,
        chunk_size: int = 4096,
        search: Literal["exact", "approximate"] = "exact",
    ):
        params = dict(
            anchors=anchors, discover=(not anchors) if discover is None else discover,
            discover_min_images=discover_min_images, discover_max_dispersion=discover_max_dispersion,
            discover_sink_fraction=discover_sink_fraction, discover_max_anchors=discover_max_anchors, k=k, matrix=matrix, vit_norm=vit_norm, vit_layer=vit_layer,
            vit_sigma=vit_sigma, vit_threshold=vit_threshold, vit_ratio=vit_ratio, massive=massive, massive_layers=massive_layers,
            massive_threshold=massive_threshold, massive_ratio=massive_ratio, entropy=entropy,
            entropy_threshold=entropy_threshold, temperature=temperature, order=order, chunk_size=chunk_size, search=search,
        )
        self.__dict__.update(params)
        self._build(**params)
