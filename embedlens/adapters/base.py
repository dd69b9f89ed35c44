"""What every adapter is: module paths for the site vocabulary, plus the few
family-specific functions (prompt format, where the visual tokens sit and
which patch each one is)."""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from embedlens.data import Sample
from embedlens.adapters.capabilities import (
    DEPRECATED_FLAGS, Capability, DeprecatedFlag, Layout, PackedTower, Positions, VisionFeatureLayer, declare,
    parse_capabilities,
)
from embedlens.adapters._remote_code import NO_REMOTE_CODE, refuse_remote_code
from embedlens.adapters._unsupported import unsupported
from embedlens.adapters.loading import DTYPES, check_weights_fit, parse_dtype  # noqa: F401 - DTYPES, parse_dtype: importable from here as before
from embedlens.adapters.placement import Placement, loading_kwargs, module_device, weight
from embedlens.adapters.role_map import PromptText, build_roles, mark_spans
from embedlens.errors import AdapterError, InputError
from embedlens.roles import Role, TokenRoles
from embedlens.sites import Site

if TYPE_CHECKING:  # annotations only: transformers' model classes take seconds to import (see embedlens.adapters)
    from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

@dataclass(frozen=True)
class ModulePaths:
    """Dotted attribute paths, from the top-level model, of the modules behind each site."""

    vision_embed: str = "model.vision_tower.embeddings"
    vision_layers: str = "model.vision_tower.encoder.layers"
    projector: str = "model.multi_modal_projector"
    language_model: str = "model.language_model"
    llm_layers: str = "model.language_model.layers"
    llm_norm: str = "model.language_model.norm"
    unembed: str = "lm_head"
    attn: str = "self_attn"  # inside one LLM layer
    attn_norm: str = "input_layernorm"  # inside one LLM layer: the norm before attention
    mlp: str = "mlp"  # inside one LLM layer
    # Inside one LLM layer: the module whose output is the update added to the residual stream, where a norm follows
    # attention / the MLP (Gemma 2/3's post-norms); empty: `attn` / `mlp` itself. The `llm.layers[i].attn` and `.mlp`
    # sites read these; interventions still hook `attn` / `mlp` (a zeroed output stays zero through an RMSNorm).
    attn_out: str = ""
    mlp_out: str = ""
    # Inside one LLM layer: the module whose output is a third update, added after the MLP's (Gemma 4's per-layer
    # input, ``post_per_layer_input_norm``); empty: none. No site reads it: ``in + attn + mlp + it == out``.
    per_layer_out: str = ""
    # Inside one LLM layer: the mixture-of-experts router, whose output ends with each token's top-k expert ids
    # (the ``llm.layers[i].experts`` site); empty: the model has none.
    router: str = ""
    # Inside one LLM layer of a hybrid model: the linear-attention mixer (Qwen3.5's Gated DeltaNet) of the layers
    # that have no `attn`; it stands in for `attn` there (the `.attn` site, `skip_sublayer`'s attention update).
    linear_attn: str = ""


@dataclass
class Batch:
    """A processed batch: the model's keyword inputs, its token-role map, the samples and (in a run with a partition) token groups."""

    inputs: BatchFeature
    roles: TokenRoles
    samples: list[Sample]
    groups: dict[str, torch.Tensor] | None = None  # `[batch, seq]` masks from the run's partition, when it has one
    # results several probes of one pass would compute alike (the layer-0 vocabulary search of the
    # lens and the partition): `embedlens.vocab.visual_nearest` keeps them here, keyed by what they read
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


def resolve_path(root: Any, path: str) -> Any:
    """Follow a dotted attribute path (`a.b.c`) from `root`."""
    try:
        return operator.attrgetter(path)(root)
    except AttributeError:
        raise AdapterError(
            f"{type(root).__name__} has no module at {path!r}; the adapter's paths do not fit this model"
        ) from None


def mixer_path(layer: Any, paths: ModulePaths) -> str:
    """The path, inside decoder layer `layer`, of its token mixer: `paths.attn`, or `paths.linear_attn` in a
    linear-attention layer of a hybrid model (which has no `attn`)."""
    if getattr(paths, "linear_attn", ""):
        try:
            operator.attrgetter(paths.attn)(layer)
        except AttributeError:
            return paths.linear_attn
    return paths.attn


class Adapter(Layout, Positions, PackedTower, VisionFeatureLayer, ABC):
    """Base class of model-family adapters.

    The required core: `architectures`, `model_class`, `paths` and `image_layouts`; `prompt` / `encode`
    and the role map work for every family from the processor's own output. Anything more a family does
    is a named capability it declares in `capabilities` (`embedlens.adapters.capabilities`: each one, its
    methods, grouped in the `Layout`, `Positions`, `PackedTower` and `VisionFeatureLayer` mixins).
    Variants that differ only in a name are one-line subclasses.
    """

    registered_name: ClassVar[str] = ""  # set by the registry
    architectures: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[type[PreTrainedModel]]
    paths: ClassVar[ModulePaths] = ModulePaths()
    # The capabilities this family has beyond the required core (`embedlens.adapters.capabilities`, which
    # documents each and groups its methods); read them with `has`.
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    # A processor subclass without the video part (which needs torchvision), built when the stock processor
    # cannot be, and the processor_config.json keys it takes (see `load_processor`).
    image_only_processor: ClassVar[type[ProcessorMixin] | None] = None
    image_only_keys: ClassVar[tuple[str, ...]] = ()
    # Where the checkpoint's image processor itself needs torchvision: a port built from its settings instead.
    image_processor_port: ClassVar[type | None] = None
    # What a plan's `model.processor_kwargs` may change: key -> (image processor attribute, ``size.X`` for a key of
    # its `size`; the value's type). See `embedlens.adapters.processor_options`.
    processor_options: ClassVar[dict[str, tuple[str, type]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declare(cls)  # `capabilities` as a frozenset of Capability; old flag names mapped onto it, with a warning

    def has(self, capability: "Capability | str") -> bool:
        """Whether this family declares `capability` (a `Capability` or its name)."""
        return parse_capabilities(f"{self.name}.has()", [capability]) <= self.capabilities

    # Which item of the router's output (`ModulePaths.router`) the ``llm.layers[i].experts`` site reads: its top-k expert
    # ids, the third of (scores, top-k weights, top-k ids) for Gemma 4's, Qwen3-VL-MoE's and GLM-4.5V's routers; a family
    # whose router returns other items (Llama 4's: (scores, logits)) names the one its `site_value` makes the ids from.
    router_output: ClassVar[int] = 2

    # The vision towers (`vision_config.model_type`) the adapter takes, for model classes that build whatever tower
    # the config names (LLaVA's `AutoModel.from_config`); empty: the model class fixes its tower.
    vision_towers: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def mismatch(cls, config: Any) -> str | None:
        """What in `config` this adapter does not serve among the models of its `architectures`, or None.

        The default checks the vision tower against `vision_towers`. Where adapters share an architecture with
        different parts (`LlavaForConditionalGeneration` with a CLIP or SigLIP tower: ``llava``; with Pixtral's:
        ``llava_pixtral``), `load_model` picks the one that fits; a model none fits gets the unsupported-architecture
        error with these reasons, and a forced adapter that does not fit is refused with its reason before any of
        its module paths is looked up."""
        if not cls.vision_towers:
            return None
        tower = getattr(getattr(config, "vision_config", None), "model_type", None)
        if tower in cls.vision_towers:
            return None
        return (f"its vision tower is {tower!r}; adapter {cls.registered_name or cls.__name__!r} takes "
                f"{' or '.join(map(repr, cls.vision_towers))}")

    @classmethod
    def _refuse_unfit(cls, model: PreTrainedModel) -> None:
        reason = cls.mismatch(model.config)
        if reason is not None:
            raise AdapterError(f"adapter {cls.registered_name or cls.__name__!r} does not fit this {type(model).__name__}: {reason}")

    @property
    def name(self) -> str:
        """The adapter's registered name (its key in plans)."""
        return self.registered_name or type(self).__name__

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, source: str | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.source = source or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self._nnsight = None
        #: Run traces on NDIF (`embedlens.adapters.remote`); the model here is then a weightless skeleton.
        self.remote = False
        self._remote_weights: dict[str, torch.Tensor] = {}
        self._refuse_unfit(model)
        for attr in ("vision_embed", "vision_layers", "projector", "language_model", "llm_layers", "llm_norm", "unembed"):
            path = getattr(self.paths, attr)
            try:
                resolve_path(model, path)  # fail at load, not mid-run
            except AdapterError:  # a layout of the family no adapter serves: the unsupported-architecture error
                raise unsupported(type(model).__name__, [f"adapter {self.name!r} reads its {attr} at {path!r}, which this "
                                                         "model lacks"]) from None

    # -- loading -------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        attn_implementation: str | None = None,
        placement: Placement | None = None,
        remote: bool = False,
    ) -> "Adapter":
        """Load model and processor from a local folder or hub id.

        Args:
            path: folder written by `save_pretrained`, or a hub id.
            dtype: one of float32, float16, bfloat16, float64.
            device: torch device string (ignored when `placement` has a device map).
            attn_implementation: `sdpa`, `eager`, ... (None: transformers' default).
            placement: a device map, memory limits, quantisation (`embedlens.adapters.placement`).
            remote: build a weightless skeleton and run traces on NDIF (`embedlens.adapters.remote`).
        """
        refuse_remote_code(path)
        if remote:
            from embedlens.adapters.remote import load_skeleton

            adapter = cls(load_skeleton(cls.model_class, path, parse_dtype(dtype)), cls.load_processor(path), source=str(path))
            adapter.remote = True
            return adapter
        kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), **loading_kwargs(placement)}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        label = f"adapter {cls.registered_name or cls.__name__!r} ({cls.model_class.__name__})"
        try:
            model, info = cls.model_class.from_pretrained(path, output_loading_info=True, **kwargs, **NO_REMOTE_CODE)
        except Exception as e:  # noqa: BLE001 - a checkpoint of another family fails in arbitrary ways
            raise AdapterError(f"{label} cannot load {str(path)!r}: {type(e).__name__}: {e}") from None
        check_weights_fit(label, str(path), model, info)
        cls._refuse_unfit(model)  # before its processor, which may be another family's
        if placement is None or placement.device_map is None:  # a dispatched or quantised model is placed already
            model = model if placement is not None and placement.quantization is not None else model.to(device)
        return cls(model.eval(), cls.load_processor(path), source=str(path))

    @classmethod
    def load_processor(cls, path: str) -> ProcessorMixin:
        """The checkpoint's processor; for a family with `image_only_processor`, that class when the stock one
        cannot be built (its video processor needs torchvision) or degrades to a bare tokenizer, with the
        checkpoint's image processor, or `image_processor_port` built from its settings where that needs torchvision."""
        from transformers import AutoProcessor

        if cls.image_only_processor is None:
            return AutoProcessor.from_pretrained(path, **NO_REMOTE_CODE)
        try:
            processor = AutoProcessor.from_pretrained(path, **NO_REMOTE_CODE)
        except Exception:  # noqa: BLE001 - any failure here has the same remedy
            processor = None
        if hasattr(processor, "image_processor"):
            return processor
        from transformers import AutoImageProcessor, AutoTokenizer

        extra = cls.image_only_processor.get_processor_dict(path, **NO_REMOTE_CODE)[0]
        port = cls.image_processor_port
        if port is None:
            image_processor = AutoImageProcessor.from_pretrained(path, **NO_REMOTE_CODE)
        else:  # the checkpoint's image processor settings (in processor_config.json, or a file of their own)
            settings = extra.get("image_processor") or port.get_image_processor_dict(path, **NO_REMOTE_CODE)[0]
            image_processor = port(**{k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")})
        return cls.image_only_processor(
            image_processor=image_processor,
            tokenizer=AutoTokenizer.from_pretrained(path, **NO_REMOTE_CODE),
            **{k: v for k, v in extra.items() if k in cls.image_only_keys},
        )

    # -- the model's shape -----------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def n_vision_layers(self) -> int:
        return len(resolve_path(self.model, self.paths.vision_layers))

    @property
    def n_llm_layers(self) -> int:
        return len(resolve_path(self.model, self.paths.llm_layers))

    @property
    def expert_layers(self) -> list[int]:
        """The LLM layers that route tokens to experts: those holding the router `paths.router` (every layer of
        Gemma 4; Qwen3-VL-MoE's sparse ones; GLM-4.5V's from ``first_k_dense_replace`` on). Empty without a router."""
        if not self.paths.router:
            return []
        get = operator.attrgetter(self.paths.router)
        found = []
        for i, layer in enumerate(resolve_path(self.model, self.paths.llm_layers)):
            try:
                get(layer)
            except AttributeError:  # a dense layer: a plain MLP, no router
                continue
            found.append(i)
        return found

    @property
    def n_experts(self) -> int:
        """Routed experts per mixture-of-experts layer (0 without a router): the text config's ``num_local_experts``
        (GLM-4.5V's ``n_routed_experts``, Qwen3-VL-MoE's ``num_experts``) or ``num_experts`` (Gemma 4)."""
        if not self.paths.router:
            return 0
        text = self.config.get_text_config()
        return int(getattr(text, "num_local_experts", None) or text.num_experts)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go: the device the input embeddings compute on.

        With a device map the model has no single device; every other module is
        asked for its own (`embedlens.adapters.placement.module_device`).
        """
        import torch

        if self.remote:
            return torch.device("cpu")  # inputs are built here and sent; the activations come back here
        return module_device(self.model.get_input_embeddings())

    def input_embeddings(self) -> torch.Tensor:
        """`[vocab, d_model]` input embedding matrix of the LLM (also when accelerate offloaded it, or NDIF holds it)."""
        return self._weight("input", self.model.get_input_embeddings())

    def output_embeddings(self) -> torch.Tensor:
        """`[vocab, d_model]` unembedding matrix (rows of `lm_head`; also when offloaded or remote)."""
        return self._weight("output", self.model.get_output_embeddings())

    def _weight(self, key: str, module: torch.nn.Module) -> torch.Tensor:
        if self.remote and module.weight.device.type == "meta":
            if key not in self._remote_weights:
                from embedlens.adapters.remote import remote_weight

                self._remote_weights[key] = remote_weight(self, module)
            return self._remote_weights[key]
        return weight(module)

    @property
    def final_logit_softcap(self) -> float | None:
        """The LM's `final_logit_softcapping` (Gemma2-style; None when it has none)."""
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        return float(cap) if cap else None

    def softcap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``tanh(logits / cap) * cap`` as the model applies it after `lm_head`; unchanged without a cap.

        `llm.unembed`, the logit lens and the intervention engine all go
        through this, so their logits are the model's own (``outputs.logits``).
        """
        import torch

        cap = self.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def n_layers(self, component: str) -> int:
        return self.n_vision_layers if component == "vision.layers" else self.n_llm_layers

    def resolve(self, site: "str | Site") -> Site:
        """Parse a site and check its layer index against this model."""
        site = Site.parse(site)
        if site.sub == "experts" and not self.paths.router:
            raise AdapterError(f"Site {site}: {self.name} has no mixture-of-experts router (only such families route tokens to experts)")
        if site.layer is None:
            return site
        resolved = site.resolve(self.n_layers(site.component))
        if resolved.sub == "experts" and resolved.layer not in (routed := self.expert_layers):
            raise AdapterError(f"Site {site}: layer {resolved.layer} of {self.name} is dense (a plain MLP, no router); "
                               f"the .experts site applies to layers {routed}")
        return resolved

    @property
    def feature_select_strategy(self) -> str:
        """How the model picks `vision.features` from the tower's sequence: "default"
        drops its first token (CLIP's CLS), "full" keeps every token.

        Read from the config's `vision_feature_select_strategy` (LLaVA convention);
        a family whose model ignores that option overrides this.
        """
        return getattr(self.config, "vision_feature_select_strategy", None) or "full"

    @property
    def n_prefix_tokens(self) -> int:
        """Tower tokens before the first `vision.features` token: what the model drops.

        `vision.layers[i]` index = `vision.features` index (a token's `feature_col`)
        + this. 1 under the "default" strategy, else 0.
        """
        return 1 if self.feature_select_strategy == "default" else 0

    @property
    def n_cls_tokens(self) -> int:
        """Tokens the vision tower puts before its patches (CLIP's CLS: 1; SigLIP: 0)."""
        emb = resolve_path(self.model, self.paths.vision_embed)
        n_pos, n_patches = getattr(emb, "num_positions", None), getattr(emb, "num_patches", None)
        return int(n_pos - n_patches) if n_pos is not None and n_patches is not None else 0

    @property
    def nnsight(self):
        """The model wrapped in `nnsight.NNsight` (built once)."""
        if self._nnsight is None:
            if self.remote:
                from embedlens.adapters.remote import remote_wrapper

                self._nnsight = remote_wrapper(self)
            else:
                from nnsight import NNsight

                self._nnsight = NNsight(self.model)
        return self._nnsight

    # -- prompts and encoding --------------------------------------------------
    @property
    def image_placeholder(self) -> str:
        return getattr(self.processor, "image_token", None) or "<image>"

    def prompt(self, sample: Sample) -> PromptText:
        """Render a sample's prompt; the default uses the processor's chat template.

        A sample with an explicit `prompt` keeps it verbatim (it must contain
        one image placeholder per image); otherwise `question` is wrapped in the
        chat template with the images before it.
        """
        ph = self.image_placeholder
        if sample.prompt is not None:
            text = sample.prompt
            n = text.count(ph)
            if n != len(sample.images):
                raise InputError(
                    f"sample {sample.id!r}: the prompt has {n} image placeholder(s) {ph!r} but "
                    f"{len(sample.images)} image(s) were given: {text!r}"
                )
            spans: dict[Role, list[tuple[int, int]]] = {}
            if sample.question is not None and sample.question in text:
                start = text.rindex(sample.question)
                spans[Role.QUESTION] = [(start, start + len(sample.question))]
        else:
            text, spans = self._render_question(sample)
        if sample.answer is not None and not self.has(Capability.ANSWER_SUFFIX):
            start = len(text) + 1
            text = f"{text} {sample.answer}"
            spans.setdefault(Role.ANSWER, []).append((start, len(text)))
        return PromptText(text, spans, suffix=sample.answer if self.has(Capability.ANSWER_SUFFIX) else None)

    def _render_question(self, sample: Sample) -> tuple[str, dict[Role, list[tuple[int, int]]]]:
        template = getattr(self.processor, "chat_template", None)
        if not template:
            raise AdapterError(
                f"{self.name}: the processor has no chat template; give each sample a full `prompt` "
                f"with {self.image_placeholder!r} placeholders instead of a `question`"
            )
        sentinel = "\uE000QUESTION\uE000"
        content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sentinel}]
        rendered = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        start = rendered.index(sentinel)
        text = rendered.replace(sentinel, sample.question or "")
        return text, {Role.QUESTION: [(start, start + len(sample.question or ""))]}

    def processor_text(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """The text as the processor rewrites it before expanding image placeholders.

        Returns:
            the rewritten text and its insertions as (offset in the original, length).
        """
        return text, []

    def processor_kwargs(self, samples: Sequence[Sample]) -> dict[str, Any]:
        return {}

    def encode(self, samples: Sequence[Sample], padding_side: str = "right") -> Batch:
        """Process a batch of samples and build its token-role map.

        Args:
            samples: the samples; each needs at least one image.
            padding_side: "left" or "right".

        Raises:
            InputError: a sample without images, too many images for the family,
                or a prompt whose placeholders do not match its images.
        """
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
        if not samples:
            raise InputError("cannot encode an empty batch")
        for s in samples:
            if s.video is not None and not self.has(Capability.VIDEO):
                raise InputError(f"sample {s.id!r} has a video; {self.name} does not take video in embedlens yet")
            if not s.images and s.video is None:
                raise InputError(f"sample {s.id!r} has no image")
            if len(s.images) > 1 and self.has(Capability.SINGLE_IMAGE):
                raise InputError(f"sample {s.id!r} has {len(s.images)} images; {self.name} takes one per prompt")
        prompts = [self.prompt(s) for s in samples]
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = padding_side
        try:
            kwargs: dict[str, Any] = dict(
                images=[list(s.images) for s in samples],
                text=[p.text for p in prompts],
                return_tensors="pt",
                padding=True,
                padding_side=padding_side,  # some processors default to their own side (InternVL: left)
                **self.processor_kwargs(samples),
            )
            if self.has(Capability.ANSWER_SUFFIX) and any(p.suffix is not None for p in prompts):
                if any(p.suffix is None for p in prompts):
                    raise InputError(
                        f"{self.name} passes answers as a separate suffix: in one batch either every "
                        f"sample has an answer or none has (without answer: "
                        f"{[s.id for s, p in zip(samples, prompts) if p.suffix is None]})"
                    )
                kwargs["suffix"] = [p.suffix for p in prompts]
            inputs = self.processor(**kwargs)
        finally:
            tok.padding_side = old_side
        inputs.pop("labels", None)
        roles = self._build_roles(inputs, prompts, samples)
        return Batch(inputs=inputs, roles=roles, samples=list(samples))

    # -- family-specific layout ------------------------------------------------
    @abstractmethod
    def image_layouts(self, inputs: BatchFeature) -> list[torch.Tensor]:
        """For each image of the batch (flattened in order), one row per token it fills.

        Returns:
            list of `[n_tokens, 5]` long tensors: (tile, row, col, feature_row,
            feature_col); a newline token has row = col = feature_col = -1, a
            kept CLS token row = col = -1 and its `vision.features` index.
        """

    def special_token_ids(self) -> set[int]:
        """Ids the role map marks SPECIAL (outside image spans): the tokenizer's special
        tokens, plus marker tokens a family's processor writes (Idefics3's sub-image tags)."""
        return set(self.tokenizer.all_special_ids)

    def placeholder_text(self, inputs: BatchFeature, image: int, n_tokens: int) -> str:
        """The text the processor puts in place of image `image` (counted over the batch),
        which fills `n_tokens` image tokens; families that add marker text around the
        image tokens (Idefics3's sub-image tags) override this."""
        return self.image_placeholder * n_tokens

    def video_placeholder_text(self, video: Any, inputs: BatchFeature, index: int, n_tokens: int) -> str:
        """The text the processor puts in place of video `index` of the batch (an `embedlens.video.Video`),
        which fills `n_tokens` video tokens; families whose processor writes text between the frames (Qwen3-VL's
        timestamps) override this. Only families with `Capability.VIDEO` are asked."""
        return self.video_placeholder * n_tokens

    # -- role map (embedlens.adapters.role_map) ---------------------------------
    def _build_roles(self, inputs: BatchFeature, prompts: list[PromptText], samples: Sequence[Sample]) -> TokenRoles:
        return build_roles(self, inputs, prompts, samples)

    def _mark_spans(self, kind, ids, attn, prompt: PromptText, counts, sample, inputs, b, first_image: int = 0) -> None:
        mark_spans(self, kind, ids, attn, prompt, counts, sample, inputs, b, first_image)

    def _adds_special_tokens(self) -> bool:
        return True

    def continuation_ids(self, sample: Sample, text: str) -> list[int]:
        """Token ids of `text` as it continues the sample's prompt (answer or
        candidate), tokenised as it would be in the full text."""
        import dataclasses

        prompt = self.prompt(dataclasses.replace(sample, answer=None)).text
        tok = self.tokenizer
        ctx = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(f"{prompt} {text}", add_special_tokens=False)["input_ids"]
        if full[: len(ctx)] == ctx:
            return list(full[len(ctx) :])
        return list(tok(f" {text}", add_special_tokens=False)["input_ids"])

    def text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids as the language model embeds them when they are text (decoded tokens): unchanged, except where
        the model embeds a placeholder id it finds outside any image as another token (Gemma 4: padding)."""
        return ids

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward, on the model's device."""
        import torch

        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.inputs.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, vision_layers={self.n_vision_layers}, llm_layers={self.n_llm_layers})"


for _old in DEPRECATED_FLAGS:  # the old flag names still read (with a warning), answered from `capabilities`
    setattr(Adapter, _old, DeprecatedFlag(_old))
