"""A word-level tokenizer built in memory, for the embedded models' tiny T5 encoders (no hub access)."""

from __future__ import annotations


def word_tokenizer(vocabulary: list[str], max_length: int = 512):
    """A `PreTrainedTokenizerFast` over `vocabulary` (which must hold `<pad>`, `</s>` and `<unk>`).

    T5-style, every prompt ends with `</s>`, so even the empty (unconditional) prompt is one real token.

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
