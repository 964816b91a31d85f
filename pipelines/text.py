"""A word-level tokenizer built in memory, for the embedded models' tiny T5 encoders (no hub access)."""

from __future__ import annotations

import re
import unicodedata

# A word: letters and digits, and the combining marks after them (NFKC leaves those that have no precomposed letter,
# e.g. q + U+0301, which is not a word character); everything else (spaces, punctuation, symbols) separates words.
_WORD = re.compile(r"[^\W_](?:[^\W_]|[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f])*")


def prompt_words(prompt: str) -> list[str]:
    """The words a word-level prompt is read as, lowercased: "A red circle, moving left." -> a, red, circle, ...
    Unicode-normalised (NFKC) first, so a letter written with a combining accent stays one (unknown) word.

    Example:
        >>> prompt_words("A red circle, moving left.")
        ['a', 'red', 'circle', 'moving', 'left']
    """
    return _WORD.findall(unicodedata.normalize("NFKC", prompt).lower())


def clean_prompt(prompt: str) -> str:
    """`prompt` as the word-level tokenizer should see it: its `prompt_words` joined by single spaces.

    The tokenizer splits on whitespace only, so "left." would be one unknown word; cleaning first keeps punctuation
    from turning words into `<unk>`. A prompt of words and whitespace alone tokenizes exactly as before; one of
    punctuation, symbols or emoji alone cleans to "", the empty prompt (the testbed's `encode_prompts` logs that).

    Example:
        >>> clean_prompt("a red circle, moving LEFT.")
        'a red circle moving left'
        >>> clean_prompt("🔴 …")
        ''
    """
    return " ".join(prompt_words(prompt))


def word_tokenizer(vocabulary: list[str], max_length: int = 512):
    """A `PreTrainedTokenizerFast` over `vocabulary` (which must hold `<pad>`, `</s>` and `<unk>`).

    T5-style, every prompt ends with `</s>`, so even the empty (unconditional) prompt is one real token. It splits
    on whitespace only: give it `clean_prompt(text)` (the testbed's `encode_prompts` does).

    Example:
        >>> tokenizer = word_tokenizer(["<pad>", "</s>", "<unk>", "a", "red", "circle"], max_length=8)
        >>> tokenizer("a red circle").input_ids
        [3, 4, 5, 1]
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    ids = {word: i for i, word in enumerate(vocabulary)}
    backend = Tokenizer(WordLevel(ids, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", ids["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )
