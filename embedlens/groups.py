"""Token groups for selections: EmbedLens's anchor rule.

A visual token belongs to a group when any of its top-k nearest input-embedding
rows (cosine, at the LLM input) is one of the group's anchor ids. Groups are
tried in the order given (sink before dead by default), so a token in two
groups goes to the first; tokens in no group are ``alive``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from embedlens.errors import InterventionError

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter
    from embedlens.roles import TokenRoles


@dataclass
class AnchorPartition:
    """Sink / dead / alive (or any named groups) by anchor vocabulary ids.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.interventions import Engine
        >>> adapter, batch = tiny_batch("llava-clip", n=1)
        >>> part = AnchorPartition({"sink": [5], "dead": [6, 7]}, k=3)
        >>> masks = part.masks(adapter, Engine(adapter).embed(batch), batch.roles)
        >>> sorted(masks)
        ['alive', 'dead', 'sink']
        >>> int(sum(m.sum() for m in masks.values())) == int(batch.roles.visual.sum())
        True
    """

    anchors: dict[str, list[int]]
    k: int = 3
    matrix: str = "input"
    chunk_size: int = 8192
    last_overlap: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if "alive" in self.anchors:
            raise InterventionError("partition.anchors: 'alive' is what no group claims; it cannot have anchors")
        if self.matrix not in ("input", "output"):
            raise InterventionError(f"partition.matrix: must be 'input' or 'output'; got {self.matrix!r}")
        if self.k < 1:
            raise InterventionError(f"partition.k: must be >= 1; got {self.k}")

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.anchors, "alive")

    def check(self, adapter: "Adapter") -> None:
        vocab = adapter.input_embeddings().shape[0]
        for g, ids in self.anchors.items():
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InterventionError(f"partition.anchors.{g}: ids {bad} are outside the vocabulary (0..{vocab - 1})")

    @torch.no_grad()
    def masks(self, adapter: "Adapter", embeds: torch.Tensor, roles: "TokenRoles") -> dict[str, torch.Tensor]:
        """`{group: [batch, seq] bool}` for the visual tokens of a batch, plus ``alive``.

        Overlaps (tokens several groups claim, before precedence) are counted in
        `last_overlap` as ``"a&b": n``.
        """
        from embedlens.probes.embedding_lens import nearest_vocab

        vis = roles.visual.to(embeds.device)
        vocab = adapter.input_embeddings() if self.matrix == "input" else adapter.output_embeddings()
        _, ids = nearest_vocab(embeds[vis].float(), vocab.float(), self.k, self.chunk_size)
        hits = {g: torch.isin(ids, torch.tensor(a, dtype=ids.dtype, device=ids.device)).any(-1) for g, a in self.anchors.items()}
        names = list(self.anchors)
        self.last_overlap = {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                n = int((hits[a] & hits[b]).sum())
                if n:
                    self.last_overlap[f"{a}&{b}"] = n
        taken = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        out = {}
        for g in names:
            mine = hits[g] & ~taken
            taken |= mine
            full = torch.zeros_like(vis)
            full[vis] = mine
            out[g] = full
        alive = torch.zeros_like(vis)
        alive[vis] = ~taken
        out["alive"] = alive
        return out
