"""Which layer of a frozen base model separates a dataset's classes best: a linear probe per layer.

    python scripts/probe_layers.py [--base_model ckpt/SmolLM2-135M-Instruct] [--dataset sst2] [--train_rows 2000]

Each training prompt (the accuracy recipe's short template) goes once through the frozen model; its pooled features
(last token for decoders, mean for encoders, as textclf pools them) after every layer feed a logistic regression
(scikit-learn, standardized features), scored on the whole validation split. A layer below the last that scores
higher is a candidate for ``base_layers``: the classifier would read those features at a fraction of the compute.
It measures linear separability before any training, not what fine-tuning reaches; `docs/benchmarks.md` has both.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from textclf.components.data import load_splits
from textclf.components.encoding import PromptEncoder, batches_by_length, pad_batch
from textclf.components.model import default_pooling, load_backbone, load_tokenizer, pool, resolve_model_path
from textclf.config import DEFAULT_BASE_MODEL, DataConfig
from textclf.distributed.threads import configure_threads
from textclf.recipes.bench_accuracy import SHORT_TEMPLATE


@torch.no_grad()
def layer_features(model, tokenizer, encoder: PromptEncoder, texts: list[str], pooling: str) -> np.ndarray:
    """rows x (layers + 1) x hidden: the pooled embeddings' output, then each layer's, as the head would see it
    with ``base_layers`` set there (a decoder's final norm applied)."""
    ids = encoder.encode(texts).input_ids
    features = [None] * len(ids)
    for batch in batches_by_length([len(row) for row in ids], 32):
        inputs = pad_batch(tokenizer, [ids[i] for i in batch])
        hidden = list(model(**inputs, output_hidden_states=True).hidden_states)
        final_norm = getattr(model, "norm", None)  # a decoder's last norm, which base_layers=N applies to layer N
        if final_norm is not None:
            hidden[:-1] = [final_norm(h) for h in hidden[:-1]]  # the last one has it already
        pooled = torch.stack([pool(h, inputs["attention_mask"], pooling) for h in hidden], dim=1)
        for row, index in enumerate(batch):
            features[index] = pooled[row].float().numpy()
    return np.stack(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--train_rows", type=int, default=2000)
    parser.add_argument("--max_length", type=int, default=128)
    args = parser.parse_args()
    configure_threads()
    splits = load_splits(DataConfig(dataset=args.dataset))
    path = resolve_model_path(args.base_model)
    tokenizer, model = load_tokenizer(path), load_backbone(path).eval()
    pooling = default_pooling(model.config.model_type)
    encoder = PromptEncoder(tokenizer, SHORT_TEMPLATE, splits.label_names, args.max_length)
    train = splits.train.iloc[: args.train_rows]
    train_x = layer_features(model, tokenizer, encoder, list(train.text), pooling)
    valid_x = layer_features(model, tokenizer, encoder, list(splits.validation.text), pooling)
    scores = {}
    for layer in range(train_x.shape[1]):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
        probe.fit(train_x[:, layer], train.label)
        scores[layer] = round(100 * probe.score(valid_x[:, layer], splits.validation.label), 1)
    print(json.dumps({"base_model": args.base_model, "dataset": args.dataset, "train_rows": len(train),
                      "validation_rows": len(splits.validation), "pooling": pooling,
                      "validation_accuracy_by_layer": scores}))


if __name__ == "__main__":
    main()
