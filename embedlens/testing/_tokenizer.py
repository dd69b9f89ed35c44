"""Moved to `embedlens.tokenizer` (the zoo's models use it too); this name stays for old imports."""

from embedlens.tokenizer import (  # noqa: F401
    CHARS,
    IMAGE_TOKEN,
    LATER_WORDS,
    LLAVA_CHAT_TEMPLATE,
    PUNCTUATION,
    SPECIAL_TOKENS,
    WORDS,
    build_tokenizer,
)
