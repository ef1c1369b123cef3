"""Prompt encoding with a slow (python) tokenizer, and how a base model name is resolved."""

from __future__ import annotations

import pytest

from textclf.components.encoding import PromptEncoder, format_prompt
from textclf.config import DEFAULT_PROMPT_TEMPLATE
from textclf.errors import TextclfError

NAMES = ["Negative", "Positive"]


def bert_wordpiece(folder):
    """A slow WordPiece BERT tokenizer with the template's words in its vocab (transformers 5 keeps it as legacy)."""
    import re

    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    words = set(re.findall(r"\w+|[^\w\s]", format_prompt(DEFAULT_PROMPT_TEMPLATE, "", NAMES).lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "word", "short", *sorted(words)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerLegacy(str(folder / "vocab.txt")), 64


def byte_level(folder):
    """ByT5's tokenizer: pure python, one token per byte, needs no files."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(), 256


@pytest.mark.parametrize("build", [bert_wordpiece, byte_level])
def test_slow_tokenizer_truncation_cuts_the_text_not_the_template(tmp_path, build):
    tokenizer, max_length = build(tmp_path)
    assert not tokenizer.is_fast  # no offsets: the text is cut by tokens instead
    encoder = PromptEncoder(tokenizer, DEFAULT_PROMPT_TEMPLATE, NAMES, max_length=max_length)
    encoded = encoder.encode(["word " * 500, "short"])
    assert encoded.truncated == 1
    assert max(encoded.lengths) <= max_length
    template_end = tokenizer(format_prompt(DEFAULT_PROMPT_TEMPLATE, "", NAMES))["input_ids"][-8:]
    assert encoded.input_ids[0][-8:] == template_end  # ends with "answer:" and the tokenizer's end token
    assert encoded.input_ids[1][-8:] == template_end


def test_hub_ids_without_a_slash_are_hub_ids():
    from textclf.components.model import load_tokenizer, resolve_model_path

    assert resolve_model_path("gpt2") == "gpt2"
    assert resolve_model_path("distilbert-base-uncased") == "distilbert-base-uncased"
    for missing in ("./missing", "ckpt/missing", "/nowhere/missing", "~/missing"):
        with pytest.raises(TextclfError, match="base model folder does not exist"):
            resolve_model_path(missing)
    # Offline (conftest sets HF_HUB_OFFLINE=1), an uncached hub id fails on loading, with one clear line.
    with pytest.raises(TextclfError) as error:
        load_tokenizer(resolve_model_path("textclf-no-such-model"))
    assert str(error.value).startswith("textclf-no-such-model: cannot load a tokenizer")
    assert "\n" not in str(error.value)
