"""The built-in model families: importing this module registers their adapters (the adapter registry's built-ins).

Each family module imports its transformers model class, which takes seconds; `embedlens.adapters` imports
this module only when an adapter is looked up, so plan checks that need no model stay fast.
"""

from embedlens.adapters import (  # noqa: F401 - each import registers its family's adapters
    gemma3,
    gemma4,
    glm4v,
    idefics3,
    internvl,
    llama4,
    llava,
    llava_next,
    llava_next_video,
    llava_onevision,
    llava_onevision1_5,
    llava_pixtral,
    mistral3,
    molmo2,
    paligemma,
    qwen2_vl,
    qwen3_5,
    qwen3_vl_moe,
)
