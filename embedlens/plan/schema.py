"""The plan schema: what a YAML analysis plan may contain.

Unknown keys are errors. Plugin parameters are checked against each plugin's
declared constructor signature by `embedlens.plan.loader`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


class OutputSpec(_Strict):
    dir: str = Field("runs/plan", description="output folder; relative to the working directory")
    figures: bool = True


class Plan(_Strict):
    """A whole analysis plan."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    probes: list[ProbeSpec] = Field(..., min_length=1)
    output: OutputSpec = Field(default_factory=OutputSpec)
    batch_size: int = Field(4, ge=1)
    seed: int = 0
