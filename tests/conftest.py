"""Shared fixtures: an isolated MLflow store per test, a tiny random Llama, MiniLM, small datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id must fail fast, never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SST2 = REPO / "data" / "datasets" / "sst2" / "data"


# Tests that train a model (they ask for a dataset to train on) take seconds to minutes each: `slow`, so
# that `make test-fast` (everything else) stays under 3 minutes. Other long tests are marked where they are.
TRAINING_FIXTURES = {"tiny_dataset", "named_dataset", "swept", "trained"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A real MLflow store (sqlite + artifacts) in a temp folder, which is also the working folder."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    # set_*_uri also write MLFLOW_*_URI into os.environ: through monkeypatch, so they do not leak into later
    # tests' subprocesses (a leaked registry URI sent a later test's versions to this test's store).
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # MLflow remembers the active experiment id across stores: a test that set one must not send the next
    # test's runs to an id its new store does not have.
    mlflow.set_experiment(experiment_id="0")
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def build_tiny_llama(folder: Path, with_pad_token: bool = True) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained on SST-2 sentences."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (SST2 / "train.json").read_text().splitlines()[:2000]]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>"] + (["<pad>"] if with_pad_token else [])
    tokenizer.train_from_iterator(
        texts + ['Please carefully read the following reference text:"", answer: ["Negative", "Positive"]'],
        trainers.BpeTrainer(vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    kwargs = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if with_pad_token:
        kwargs["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_llama_no_pad(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-nopad"), with_pad_token=False))


@pytest.fixture(scope="session")
def minilm() -> str:
    from textclf.base_models import minilm_path

    return minilm_path()


def wait_until_answers(url: str, process, timeout: float = 120, what: str = "the server") -> None:
    """Poll ``url`` until it answers; fail if ``process`` (the server) exits or ``timeout`` passes."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert process.poll() is None, f"{what} exited ({process.returncode})"
            assert time.time() < deadline, f"{what} did not answer {url} within {timeout:.0f} s"
            time.sleep(0.5)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sentiment_rows(n: int, offset: int = 0) -> list[dict]:
    """Easy, separable rows: the tiny models learn them in a few steps."""
    good = ["a wonderful , moving film", "great acting and a gem of a story", "brilliant and funny", "a joy to watch"]
    bad = ["a dull , boring mess", "terrible acting and an awful plot", "tedious and flat", "a waste of time"]
    rows = []
    for i in range(offset, offset + n):
        label = i % 2
        rows.append({"text": (good if label else bad)[i % 4] + f" number {i}", "label": label})
    return rows


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """train/dev/test JSON Lines with integer labels 0/1 named by the folder 'tinysent'."""
    folder = tmp_path / "tinysent"
    write_jsonl(folder / "train.jsonl", sentiment_rows(48))
    write_jsonl(folder / "dev.jsonl", sentiment_rows(16, 1000))
    write_jsonl(folder / "test.jsonl", sentiment_rows(16, 2000))
    return folder
