"""The plan schema: what a YAML analysis plan may contain.

Unknown keys are errors. Plugin parameters are checked against each plugin's
declared constructor signature by `embedlens.plan.loader`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # NaN and infinities are never a usable setting; refused here rather than written into results
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _setting(value: Any) -> Any:
    """One processor setting: a plain value (which settings a family takes, and their types: at model load)."""
    if not isinstance(value, (bool, int, float, str)) or isinstance(value, float) and value != value:
        raise ValueError(f"expected a number, a string or true/false; got {value!r}")
    return value


class ModelSpec(_Strict):
    """Which model to load and how."""

    source: str = Field("zoo:tiny-llava-clip", description="folder, hub id, zoo:NAME (trained, shipped) or tiny:NAME (random)")
    adapter: str | None = Field(None, description="force an adapter by name instead of auto-selection")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = Field("float32", description="weights and activations; passed to from_pretrained")
    device: str = Field("cpu", description="one device for the whole model: cpu, cuda or cuda:N")
    attn_implementation: str | None = Field(None, description="eager, sdpa, ...; passed to from_pretrained (default: the model's own)")
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str] | None = Field(
        None, description="spread the model over devices (accelerate): auto, balanced, or module path -> device "
        "(GPU index, cuda:N, cpu, or disk: offloaded into the run folder's offload/); replaces device"
    )
    max_memory: dict[int | str, int | str] | None = Field(
        None, description="with device_map: memory per device, e.g. {0: 20GiB, 1: 20GiB, cpu: 60GiB}"
    )
    quantization: dict[str, Any] | None = Field(
        None, description="BitsAndBytesConfig arguments, e.g. {load_in_4bit: true, bnb_4bit_compute_dtype: bfloat16}"
    )
    remote: bool = Field(False, description="run probe passes on NDIF through nnsight (hub ids only; interventions run locally)")
    processor_kwargs: dict[str, Annotated[bool | int | float | str, BeforeValidator(_setting)]] = Field(
        default_factory=dict, description="image processor settings the family declares, e.g. Qwen-VL's {min_pixels: 3136, "
        "max_pixels: 802816} or InternVL's {max_dynamic_patch: 6}: they cap the visual tokens per image"
    )

    @model_validator(mode="after")
    def _placement(self) -> "ModelSpec":
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("max_memory: needs device_map (e.g. device_map: auto)")
        if self.device_map is not None and "device" in self.model_fields_set:
            raise ValueError("device: give either device (one) or device_map (several), not both")
        if self.remote and (self.device_map is not None or self.quantization is not None):
            raise ValueError("remote: a remote model is placed by NDIF; drop device_map / quantization")
        return self


class SyntheticDataSpec(_Strict):
    """The built-in synthetic data set (`embedlens.synthetic`): shapes, words and per-patch ground truth."""

    n: int = Field(64, ge=1, le=1_000_000, description="number of images (one question each)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the images and questions (the same seed, the same data set)")
    size: int = Field(64, ge=16, le=1024, description="image side in pixels")
    grid: int = Field(3, ge=1, le=6, description="objects sit in a grid x grid layout")
    background: float = Field(0.4, ge=0.0, lt=1.0, description="target share of background patches (0.4 ~ natural images, 0.85 sparse)")
    texture: float = Field(0.08, ge=0.0, le=1.0, description="amplitude of the background's light texture")
    word_rate: float = Field(0.3, ge=0.0, le=1.0, description="share of images with a rendered word (in one free cell)")
    patch_grid: int | Literal["auto"] = Field("auto", description="ground-truth patches per side; auto = the vision encoder's")
    question_types: list[Literal["colour", "shape", "position", "word", "count"]] = Field(
        default_factory=lambda: ["colour", "shape", "position", "word", "count"],
        description="questions asked, cycled through the images",
    )


class SyntheticVideoDataSpec(_Strict):
    """The built-in synthetic video set (`embedlens.synthetic_video`): shapes that move or stay still, with per-patch, per-frame ground truth."""

    n: int = Field(16, ge=1, le=100_000, description="number of videos (one question each)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the videos and questions (the same seed, the same data set)")
    size: int = Field(64, ge=16, le=1024, description="frame side in pixels")
    frames: int = Field(8, ge=1, le=256, description="frames per video (data.video.num_frames then keeps at most that many)")
    objects: int = Field(2, ge=1, le=4, description="shapes per video, of distinct colours")
    object_size: float = Field(0.25, ge=0.05, le=0.5, description="an object's box side as a share of the frame side")
    speed: int = Field(4, ge=0, le=1024, description="pixels a moving object travels per frame (its path stays inside the frame)")
    still_rate: float = Field(0.25, ge=0.0, le=1.0, description="share of objects that stay still (static content across frames)")
    texture: float = Field(0.08, ge=0.0, le=1.0, description="amplitude of the static background's light texture")
    patch_grid: int = Field(8, ge=1, le=1024, description="ground-truth patches per side of a frame (match the model's token grid of a frame)")
    question_types: list[Literal["direction", "colour", "count"]] = Field(
        default_factory=lambda: ["direction", "colour", "count"],
        min_length=1,
        description="questions asked, cycled through the videos",
    )


class VideoSpec(_Strict):
    """Which frames of each video sample are kept (`embedlens.video.VideoOptions`)."""

    fps: float | None = Field(None, gt=0, le=1000, description="sample a video file at this many frames per second (default: every frame; a list of frames is taken as already sampled)")
    num_frames: int | None = Field(8, ge=1, le=4096, description="then keep at most this many frames, evenly spread, first and last included (null: all)")
    max_pixels: int = Field(28 * 28 * 768, ge=1, le=2**31, description="each frame is downscaled to at most this many pixels when read (16x larger are refused)")

    def options(self):
        from embedlens.video import VideoOptions

        return VideoOptions(fps=self.fps, num_frames=self.num_frames, max_pixels=self.max_pixels)


class DataSpec(_Strict):
    """Where samples come from: exactly one of `prompts`, `dataset`, `synthetic` or `synthetic_video`."""

    prompts: str | None = Field(None, description="JSONL or CSV file of samples; paths relative to the plan file")
    images: str | None = Field(None, description="folder image paths are relative to (default: the prompts file's folder)")
    dataset: str | None = Field(None, description="a Hugging Face datasets folder (save_to_disk or data files), read locally")
    split: str | None = Field(None, description="split of `dataset` to read")
    columns: dict[str, str] = Field(default_factory=dict, description="embedlens field -> data set column (image, question, answer, ...)")
    synthetic: SyntheticDataSpec | None = Field(None, description="the built-in synthetic data set")
    synthetic_video: SyntheticVideoDataSpec | None = Field(None, description="the built-in synthetic video set (docs/video.md)")
    padding_side: Literal["left", "right"] = Field("right", description="side the tokenizer pads the prompts of a batch on")
    limit: int | None = Field(None, ge=1, description="use only the first N samples")
    max_pixels: int = Field(4096 * 4096, ge=1, le=2**31, description="larger images are downscaled when read (16x larger are refused)")
    video: VideoSpec = Field(default_factory=VideoSpec, description="frames kept from each video sample (a record's `video` key)")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        given = [k for k in ("prompts", "dataset", "synthetic", "synthetic_video") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one data source: prompts (JSONL/CSV), dataset (a local Hugging Face data set), synthetic or synthetic_video"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if self.columns and self.dataset is None:
            raise ValueError("columns maps the columns of a Hugging Face data set; it needs data.dataset")
        return self


class ProbeSpec(_Strict):
    """One probe: a registered name and its parameters."""

    name: str = Field(description="a registered probe (embedlens list)")
    label: str | None = Field(None, description="names its tables and figures (default: the probe name)")
    params: dict[str, Any] = Field(default_factory=dict, description="the probe's parameters (embedlens list shows each with its default)")


class InterventionSpec(_Strict):
    """One intervention of a condition: a registered name and its parameters."""

    name: str = Field(description="a registered intervention (embedlens list)")
    params: dict[str, Any] = Field(default_factory=dict, description="the intervention's parameters (embedlens list shows each with its default)")


class MetricSpec(_Strict):
    """One effect metric: a registered name and its parameters."""

    name: str = Field(description="a registered metric (embedlens list)")
    params: dict[str, Any] = Field(default_factory=dict, description="the metric's parameters (embedlens list shows each with its default)")


class PartitionSpec(_Strict):
    """Token groups (sink / dead / alive) for the whole run: selections name them, probes report per group.

    The fields are those of `embedlens.groups.Partition`; at least one rule is needed.
    """

    anchors: dict[str, list[int]] = Field(default_factory=dict, description="group name -> anchor vocabulary ids")
    discover: bool = Field(False, description="discover sink/dead anchor ids from the data first")
    discover_min_images: float = Field(0.3, gt=0, le=1, description="share of images a discovered anchor must be some token's nearest id in (and two at least)")
    discover_max_dispersion: float = Field(0.2, gt=0, le=1, description="a dead anchor's tokens spread at most this share of the other tokens' (they collapse)")
    discover_sink_fraction: float = Field(0.5, gt=0, le=1, description="share of an id's tokens that must be ViT-norm / massive outliers for a sink anchor")
    discover_max_anchors: int = Field(10, ge=1, description="anchors kept per group, most tokens first")
    k: int = Field(3, ge=1, description="a token is in a group if any of its top-k neighbours is an anchor")
    matrix: Literal["input", "output"] = Field("input", description="neighbours among the input embeddings (EmbedLens) or the output unembedding")
    vit_norm: str | None = Field(None, description="group for ViT high-norm tokens (e.g. sink)")
    vit_layer: int = Field(-2, description="vision layer of the ViT-norm test (-2: LLaVA's feature layer)")
    vit_sigma: float = Field(2.0, gt=0, description="a ViT high-norm token is above mean + vit_sigma x std of its image's patch norms")
    vit_threshold: float | None = Field(None, description="an absolute norm threshold instead of the sigma and ratio rule")
    vit_ratio: float = Field(2.0, ge=0, description="a ViT high-norm token is also at least this many times the image's median norm")
    massive: str | None = Field(None, description="group for tokens with a massive activation (e.g. sink)")
    massive_layers: list[int] | None = Field(None, description="LLM layers (outputs) searched for massive activations (default: all)")
    massive_threshold: float = Field(100.0, description="a massive activation has |a| above this ...")
    massive_ratio: float = Field(1000.0, description="... and above this many times the median |a| of its sample")
    entropy: str | None = Field(None, description="group for tokens with flat vocabulary similarities (e.g. dead)")
    entropy_threshold: float = Field(0.9, gt=0, le=1, description="normalised entropy (entropy / log vocab) above which the entropy rule fires")
    temperature: float = Field(0.05, gt=0, description="softmax temperature over cosine similarities for the entropy rule")
    order: list[str] | None = Field(None, description="precedence (default: sink, dead, others)")
    chunk_size: int = Field(4096, ge=1, description="vocabulary rows compared at once (extra memory: tokens x chunk_size)")
    search: Literal["exact", "approximate"] = Field("exact", description="vocabulary search: exact, or approximate (FAISS IVF + exact re-rank; pip install embedlens[fast])")


class OutputSpec(_Strict):
    """Where results go and in which formats."""

    dir: str = Field("runs/plan", description="output folder; relative to the plan file's folder (the command line's --output: to the working directory)")
    formats: list[Literal["parquet", "csv"]] = Field(
        default_factory=lambda: ["parquet", "csv"], min_length=1, description="table formats"
    )
    figures: bool = Field(True, description="draw each probe's figures into figures/")
    figure_formats: list[Literal["png", "svg", "pdf"]] = Field(
        default_factory=lambda: ["png"], description="PNG is always written (the report shows it); svg/pdf add vector copies"
    )
    report: bool = Field(True, description="write report.html (self-contained) next to the tables")


class ReportSpec(_Strict):
    """The report's statistics (`embedlens.stats`, `embedlens.plan.conclusions`): what accuracies are broken down by and how."""

    breakdown: list[str] | None = Field(
        None, description="sample fields to break accuracies down by (e.g. [type]); default: the data's type (or qtype) field where it has one"
    )
    resamples: int = Field(10_000, ge=100, le=1_000_000, description="bootstrap resamples (BCa intervals) and random sign patterns of sampled permutation tests")
    confidence: float = Field(0.95, ge=0.5, lt=1.0, description="level of the bootstrap intervals")
    min_effect: float = Field(
        0.1, gt=0.0, le=1.0, description="the smallest accuracy change the question needs to detect: the report warns when the "
        "run's n cannot (its minimum detectable effect, at power 0.8 and level 1 - confidence, is larger)"
    )
    token_map_samples: int = Field(4, ge=1, le=16, description="samples drawn side by side in each token-map figure")


class Plan(_Strict):
    """A whole analysis plan."""

    model: ModelSpec | None = None
    models: dict[str, ModelSpec] | None = Field(
        None, description="several models by name (e.g. clip, siglip): the plan runs on each, then they are compared"
    )
    data: DataSpec
    probes: list[ProbeSpec] = Field(default_factory=list)
    conditions: dict[str, list[InterventionSpec]] = Field(
        default_factory=dict, description="named lists of interventions, each compared with the baseline"
    )
    metrics: list[MetricSpec] = Field(default_factory=list)
    partition: PartitionSpec | None = None
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="TARGET.PARAM: [values] - TARGET a condition, an intervention, a probe name or label, or * (every "
        "condition with an intervention taking PARAM, e.g. *.keep: the same budgets for every method); "
        "each value gives its own condition/probe (several keys on one target: every combination)",
    )
    output: OutputSpec = Field(default_factory=OutputSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    batch_size: int = Field(4, ge=1, le=65536)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds every random draw of the run")

    @model_validator(mode="after")
    def _something_to_do(self) -> "Plan":
        if self.model is not None and self.models is not None:
            raise ValueError("models: give either model (one) or models (several by name), not both")
        if self.model is None and self.models is None:
            self.model = ModelSpec()
        if self.models is not None and not self.models:
            raise ValueError("models: is empty; give at least one model")
        if not self.probes and not self.conditions:
            raise ValueError("probes: a plan needs at least one probe or one condition")
        if self.conditions and not self.metrics:
            raise ValueError("metrics: conditions need at least one metric to compare them with the baseline")
        if "baseline" in self.conditions:
            raise ValueError("conditions.baseline: 'baseline' is the unmodified run every condition is compared with; name conditions otherwise")
        for name, items in self.conditions.items():
            if not items:
                raise ValueError(f"conditions.{name}: condition {name!r} has no interventions")
        return self

    def model_specs(self) -> dict[str, ModelSpec]:
        """The models to run, by name (a single `model` is named ``model``)."""
        return dict(self.models) if self.models is not None else {"model": self.model or ModelSpec()}
