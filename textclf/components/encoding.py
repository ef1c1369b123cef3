"""From text to model inputs: the classification prompt, tokenization and per-batch padding.

The same :class:`PromptEncoder` is used in training, evaluation and serving (it is saved with the
model), so a text is always wrapped, truncated and tokenized the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from textclf.errors import TextclfError


def format_prompt(template: str, text: str, label_names: Sequence[str]) -> str:
    """Wrap ``text`` in ``template``; ``{class_labels}`` becomes the JSON list of class names.

    ``str.replace`` rather than ``str.format``: texts may contain braces.
    """
    class_labels = json.dumps(list(label_names), ensure_ascii=False)
    return template.replace("{class_labels}", class_labels).replace("{text}", text)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Right padding and a pad token (eos, then unk, when the tokenizer has none).

    Pooling reads the attention mask, never the pad id, so reusing eos as pad is safe.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


@dataclass
class EncodedTexts:
    input_ids: list[list[int]]
    truncated: int  # how many texts were cut to fit max_length

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


class PromptEncoder:
    """Turns raw texts into token ids of the classification prompt, at most ``max_length`` long.

    When a prompt is too long, the text inside it is cut (by the tokenizer's offsets, or by its tokens
    for a slow tokenizer), never the template around it: the decoder pools the last token, which
    must stay the end of ``answer:``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str, label_names: Sequence[str], max_length: int):
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.template = template
        self.label_names = list(label_names)
        self.max_length = max_length
        empty = self.tokenizer(format_prompt(template, "", self.label_names))["input_ids"]
        # A few tokens of slack: merges across the text/template boundary can add one or two.
        self.text_budget = max_length - len(empty) - 4
        if self.text_budget < 8:
            raise TextclfError(f"max_length {max_length} leaves no room for text after the {len(empty)}-token prompt")

    def encode(self, texts: Sequence[str]) -> EncodedTexts:
        texts = list(texts)
        cut = self._cut_by_offsets if self.tokenizer.is_fast else self._cut_by_tokens
        kept = cut(texts)
        truncated = sum(short != text for short, text in zip(kept, texts))
        prompts = [format_prompt(self.template, text, self.label_names) for text in kept]
        # The texts already fit; truncation only guards max_length against a rare merge at the boundary.
        encoded = self.tokenizer(prompts, truncation=True, max_length=self.max_length)
        return EncodedTexts(encoded["input_ids"], truncated)

    def _cut_by_offsets(self, texts: list[str]) -> list[str]:
        """Fast tokenizers: cut each text after its ``text_budget``-th token, at that token's end offset."""
        pieces = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            text[: offsets[self.text_budget - 1][1]] if len(offsets) > self.text_budget else text
            for text, offsets in zip(texts, pieces["offset_mapping"])
        ]

    def _cut_by_tokens(self, texts: list[str]) -> list[str]:
        """Slow tokenizers have no offsets: keep the first ``text_budget`` tokens and decode them back.

        Truncating the whole prompt instead would cut the template's end (``answer:``) off.
        """
        pieces = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        budget = self.text_budget
        return [
            self.tokenizer.decode(ids[:budget], skip_special_tokens=True) if len(ids) > budget else text
            for text, ids in zip(texts, pieces)
        ]

    def dataset(self, texts: Sequence[str], labels: Sequence[int] | None = None) -> tuple[Dataset, EncodedTexts]:
        """A ``datasets.Dataset`` with input_ids, attention_mask and labels, in the order of ``texts``.

        No length column: the Trainer drops the columns its model's forward does not take before it builds
        its length-grouped sampler, which then measures ``input_ids`` itself."""
        encoded = self.encode(texts)
        columns = {
            "input_ids": encoded.input_ids,
            "attention_mask": [[1] * n for n in encoded.lengths],
        }
        if labels is not None:
            columns["labels"] = [int(label) for label in labels]
        return Dataset.from_dict(columns), encoded


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices from the longest to the shortest; equal lengths keep their order (a stable sort)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), for fast prediction.

    Callers must scatter results back with these indices: sorted order is not input order.
    """
    order = longest_first(lengths)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def pad_batch(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    return tokenizer.pad({"input_ids": [list(ids) for ids in input_ids]}, padding="longest", return_tensors="pt")
