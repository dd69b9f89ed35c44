"""The plan schema: what a YAML analysis plan may contain.

Unknown keys are errors. Plugin parameters are checked against each plugin's
declared constructor signature by `embedlens.plan.loader`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Which model to load and how."""

    source: str = Field("tiny:llava-clip", description="folder, hub id, or tiny:NAME for a built-in tiny model")
    adapter: str | None = Field(None, description="force an adapter by name instead of auto-selection")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = "cpu"
    attn_implementation: str | None = None


class DataSpec(_Strict):
    """Images and prompts: a JSONL file, one sample per line."""

    prompts: str = Field(..., description="JSONL file; paths relative to the plan file")
    images: str | None = Field(None, description="folder image paths are relative to (default: the JSONL's folder)")
    padding_side: Literal["left", "right"] = "right"
    limit: int | None = Field(None, ge=1, description="use only the first N samples")


class ProbeSpec(_Strict):
    """One probe: a registered name and its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class InterventionSpec(_Strict):
    """One intervention of a condition: a registered name and its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class MetricSpec(_Strict):
    """One effect metric: a registered name and its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class PartitionSpec(_Strict):
    """Token groups (sink / dead / alive) for the whole run: selections name them, probes report per group.

    The fields are those of `embedlens.groups.Partition`; at least one rule is needed.
    """

    anchors: dict[str, list[int]] = Field(default_factory=dict, description="group name -> anchor vocabulary ids")
    discover: bool = Field(False, description="discover sink/dead anchor ids from the data first")
    k: int = Field(3, ge=1, description="a token is in a group if any of its top-k neighbours is an anchor")
    matrix: Literal["input", "output"] = "input"
    vit_norm: str | None = Field(None, description="group for ViT high-norm tokens (e.g. sink)")
    vit_layer: int = -2
    vit_sigma: float = Field(2.0, gt=0)
    vit_threshold: float | None = None
    massive: str | None = Field(None, description="group for tokens with a massive activation (e.g. sink)")
    massive_layers: list[int] | None = None
    massive_threshold: float = 100.0
    massive_ratio: float = 1000.0
    entropy: str | None = Field(None, description="group for tokens with flat vocabulary similarities (e.g. dead)")
    entropy_threshold: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(0.05, gt=0)
    order: list[str] | None = Field(None, description="precedence (default: sink, dead, others)")
    chunk_size: int = Field(8192, ge=1)


class OutputSpec(_Strict):
    dir: str = Field("runs/plan", description="output folder; relative to the working directory")
    figures: bool = True


class Plan(_Strict):
    """A whole analysis plan."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    probes: list[ProbeSpec] = Field(default_factory=list)
    conditions: dict[str, list[InterventionSpec]] = Field(
        default_factory=dict, description="named lists of interventions, each compared with the baseline"
    )
    metrics: list[MetricSpec] = Field(default_factory=list)
    partition: PartitionSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    batch_size: int = Field(4, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _something_to_do(self) -> "Plan":
        if not self.probes and not self.conditions:
            raise ValueError("a plan needs at least one probe or one condition")
        if self.conditions and not self.metrics:
            raise ValueError("conditions need at least one metric to compare them with the baseline")
        if "baseline" in self.conditions:
            raise ValueError("'baseline' is the unmodified run every condition is compared with; name conditions otherwise")
        return self
