"""Base class of probes: read sites over batches and aggregate a result."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from embedlens.state import Stateful

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch
    from embedlens.sites import Site

Table = dict[str, list[Any]]


class Tensors(dict):
    """What `Probe.update` returns under a name to have tensors saved rather than a table.

    The runner writes each batch's tensors to ``tensors/NAME/BATCH.safetensors``
    (keys -> tensors, moved to the CPU).
    """


class Probe(Stateful, ABC):
    """A probe names the sites it reads, consumes each batch's activations, and
    returns tables (streamed to disk by the runner) and a summary.

    Subclasses take parameters as explicit typed constructor arguments and
    register with ``@probes.register("name")``. A run's checkpoint saves each
    probe's `state_dict()` (by default its attributes, which must be plain
    data: tensors, arrays, numbers, strings, containers of them, or objects
    with `state_dict` themselves) and loads it into a probe built from the
    plan on resume; a probe keeping other Python state overrides
    `state_dict` / `load_state_dict` (see `embedlens.state`).
    """

    def check(self, adapter: "Adapter") -> None:
        """Validate parameters against the loaded model (before the first batch).

        Raise `embedlens.errors.EmbedLensError` subclasses naming the parameter.
        """
        self.sites(adapter)

    @abstractmethod
    def sites(self, adapter: "Adapter") -> list["Site"]:
        """The sites this probe reads, resolved for `adapter`."""

    @abstractmethod
    def update(self, adapter: "Adapter", batch: "Batch", acts: dict["Site", torch.Tensor]) -> dict[str, Table]:
        """Consume one batch; return rows to append, by table name."""

    @abstractmethod
    def result(self) -> dict[str, Any]:
        """A JSON-serialisable summary of everything seen so far."""

    example_params: ClassVar[dict[str, Any]] = {}
    """Parameters for the conformance suite when the probe has required ones."""

    needs_fit: bool = False
    """True when the probe needs a pass over the data before the first `update` (see `fit`)."""

    def fit(self, adapter: "Adapter", batches: Iterable["Batch"]) -> None:
        """A first pass over the data (e.g. discovering anchors); only called when `needs_fit`."""

    def final_tables(self) -> dict[str, Table]:
        """Tables known only at the end of the run (e.g. a ranking over the data set)."""
        return {}

    def artifacts(self, out_dir: Path) -> list[Path]:
        """Write fitted state worth reusing (e.g. tuned-lens translators) to `out_dir`; return the paths."""
        return []

    def figures(self, out_dir: Path) -> list[Path]:
        """Write figures to `out_dir`; return their paths."""
        return []
