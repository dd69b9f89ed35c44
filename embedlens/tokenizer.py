"""The word-level tokenizer of embedlens's own models, built offline with the `tokenizers` library.

The zoo's trained models (`embedlens.zoo`) and the tiny random ones
(`embedlens.testing.tiny`) both need a real Hugging Face tokenizer (so
processors, chat templates and `decode` behave as they do for released
checkpoints) without downloading one; a zoo checkpoint's vocabulary is this one.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, "<video>")

# Words the demo prompts and the synthetic data use; every lower-case letter
# and digit is there too so unknown words are rare in examples.
WORDS = (
    "user assistant system what which where how many is are the a an of in on at to and or "
    "there this that image picture photo colour color shape object word text left right top "
    "bottom middle centre center corner describe answer question yes no one two three four "
    "five six seven eight nine ten zero red green blue yellow orange purple pink brown black "
    "white gray grey cyan magenta circle square triangle star cross ring diamond heart line "
    "dot background empty big small large tiny dog cat car tree house sky sun moon water "
    "grass road sign stop cup book person man woman child bird fish ball box table chair "
    "please briefly see you can do does it its with without from for by near far above below "
    "behind front inside outside up down number count letter read say name called sink dead "
    "alive token visual vision model lens"
).split()
PUNCTUATION = tuple(".,:;?!'\"-()[]/\n")
CHARS = tuple("abcdefghijklmnopqrstuvwxyz0123456789")
# Words added later go last, so that every id above keeps its value.
LATER_WORDS = ("shapes", "written")

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(
    chat_template: str | None = LLAVA_CHAT_TEMPLATE, extra_special_tokens: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer shared by the zoo and the tiny models.

    Args:
        chat_template: the Jinja chat template.
        extra_special_tokens: more named special tokens (`name: token`), each added to the
            vocabulary after every other id and readable as ``tokenizer.name`` / ``tokenizer.name_id``
            (InternVL's processor reads ``start_image_token`` and friends).

    Returns:
        A `PreTrainedTokenizerFast` whose special tokens include `<image>`, with
        `<s>` as BOS, `</s>` as EOS and `<pad>` as padding.
    """
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *WORDS, *PUNCTUATION, *CHARS, *LATER_WORDS):
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Newlines are tokens (LLaVA's template puts one after the image); other
    # white space only separates words.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\w+|\n|[^\w\s]"), behavior="isolated"),
        ]
    )
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, **(extra_special_tokens or {})},
        chat_template=chat_template,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, "<video>"]})
    if extra_special_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special_tokens.values())}, replace_extra_special_tokens=False)
    return fast
