"""Batched prediction on raw texts, shared by evaluation, the pyfunc model and ``textclf predict``.

Batches are formed from texts of similar length (little padding) and results are scattered back
to input order; getting that mapping wrong is the classic way to score at chance level.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from textclf.components.calibration import TEMPERATURE_KEY, softmax
from textclf.components.encoding import PromptEncoder, batches_by_length, pad_batch
from textclf.components.model import TextClassifier


class Predictor:
    """Class probabilities for raw texts, in input order, ``batch_size`` texts per forward pass.

    Probabilities are softmax(logits / T) with the temperature T fitted after training and kept in the
    model's spec (``spec.extra["temperature"]``, see textclf.components.calibration); a model without one has T = 1.
    """

    def __init__(self, model: TextClassifier, tokenizer, batch_size: int = 32, progress: bool = False):
        self.model = model.eval()
        self.spec = model.spec
        self.encoder = PromptEncoder(tokenizer, self.spec.prompt_template, self.spec.label_names, self.spec.max_length)
        self.batch_size = batch_size
        self.progress = progress

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def logits(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.spec.label_names)), dtype=np.float32)
        for start in range(0, len(texts), 4096):  # bounded memory: encode and predict chunk by chunk
            chunk = texts[start : start + 4096]
            for indices, logits in self._chunk_logits(chunk, total=len(texts)):
                out[[start + i for i in indices]] = logits
        return out

    def _chunk_logits(self, texts: Sequence[str], total: int) -> Iterator[tuple[list[int], np.ndarray]]:
        encoded = self.encoder.encode(texts)
        batches = batches_by_length(encoded.lengths, self.batch_size)
        for indices in tqdm(batches, desc="predict", disable=not self.progress, unit="batch"):
            batch = pad_batch(self.encoder.tokenizer, [encoded.input_ids[i] for i in indices])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            yield indices, logits.float().cpu().numpy()

    @property
    def temperature(self) -> float:
        return float((getattr(self.spec, "extra", None) or {}).get(TEMPERATURE_KEY, 1.0))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return softmax(self.logits(list(texts)), self.temperature)
