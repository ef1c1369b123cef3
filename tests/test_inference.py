"""Predictor returns results in input order, whatever the length sorting, batch size and chunking.

A batch-vs-single comparison cannot see a scatter bug (both go through the same scatter), so the fake
model here answers with each text's own token count: row i must carry text i's length.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from textclf.components.encoding import format_prompt
from textclf.serving.inference import Predictor

TEMPLATE = "Review: {text} Classes: {class_labels} answer:"
NAMES = ["Long", "Short"]


class LengthModel(nn.Module):
    """Logits ``[n, -n]`` where n is the number of real (unpadded) tokens of each row."""

    def __init__(self, max_length: int = 512):
        super().__init__()
        self.spec = SimpleNamespace(label_names=NAMES, prompt_template=TEMPLATE, max_length=max_length)
        self.anchor = nn.Parameter(torch.zeros(1))  # Predictor reads the device from the parameters

    def forward(self, input_ids, attention_mask):
        real = attention_mask.sum(dim=1).float()
        return SimpleNamespace(logits=torch.stack([real, -real], dim=1) + self.anchor)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def shuffled_texts(count: int, seed: int = 0) -> list[str]:
    words = ["a", "gem", "of", "film", "dull", "mess", "moving", "story"]
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(1 + i % 60)) for i in range(count)]
    rng.shuffle(texts)
    return texts


def own_length(tokenizer, text: str) -> int:
    """The token count of one text's prompt, encoded alone: independent of batching."""
    return len(tokenizer(format_prompt(TEMPLATE, text, NAMES))["input_ids"])


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_each_row_is_its_own_texts_result(tokenizer, batch_size):
    texts = shuffled_texts(50)
    expected = np.array([own_length(tokenizer, t) for t in texts], dtype=np.float32)
    assert len(set(expected)) > 30 and not np.all(np.diff(expected) <= 0)  # many lengths, not already sorted
    predictor = Predictor(LengthModel(), tokenizer, batch_size=batch_size)
    logits = predictor.logits(texts)
    np.testing.assert_array_equal(logits[:, 0], expected)
    np.testing.assert_array_equal(logits[:, 1], -expected)
    probabilities = predictor.predict_proba(texts)
    assert probabilities.shape == (50, 2) and np.allclose(probabilities.sum(axis=1), 1)
    np.testing.assert_allclose(probabilities[:, 0], torch.sigmoid(torch.from_numpy(2 * expected)).numpy(), rtol=1e-5)


def test_order_holds_across_chunks(tokenizer):
    """More texts than one encoding chunk (4096): the second chunk's results go after the first's."""
    texts = shuffled_texts(4200, seed=1)
    lengths = {text: own_length(tokenizer, text) for text in set(texts)}
    expected = np.array([lengths[t] for t in texts], dtype=np.float32)
    logits = Predictor(LengthModel(), tokenizer, batch_size=256).logits(texts)
    np.testing.assert_array_equal(logits[:, 0], expected)


def test_empty_input_gives_no_rows(tokenizer):
    assert Predictor(LengthModel(), tokenizer).logits([]).shape == (0, 2)
