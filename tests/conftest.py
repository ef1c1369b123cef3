"""Shared fixtures: an isolated MLflow store per test, a tiny random Llama, MiniLM, small datasets."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id must fail fast, never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The MLflow servers the tests start (outage, team server, UI) need no job runner: it is MLflow's GenAI evaluation
# queue, seven more processes per server that textclf never uses.
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"

REPO = Path(__file__).resolve().parent.parent
SST2 = REPO / "data" / "datasets" / "sst2" / "data"


# Tests are marked `slow` by what they do (train a model, start subprocesses or servers, wait), where they are
# defined; `make test-fast` runs the rest, under 3 minutes.

# `make test` runs the files on two workers (pytest-xdist, one file per worker at a time): the longest files start
# first, so that no long file is left running alone at the end (measured: docs/benchmarks.md, "The test suite").
LONGEST_FIRST = ["test_deepspeed.py", "test_gpu_check.py", "test_search.py", "test_server.py", "test_ui_check.py",
                 "test_outage.py", "test_reliability.py", "test_mlproject.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@contextlib.contextmanager
def tracking_store(folder: Path) -> Iterator[str]:
    """Make ``folder`` the working folder and the home of a real MLflow store (sqlite + artifacts) until the block
    ends; everything set is put back then, MLflow's own current URIs included."""
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    if not (folder / "mlflow.db").exists():
        new_store(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        # set_*_uri also write MLFLOW_*_URI into os.environ: through the patch, so they do not leak into later
        # tests' subprocesses (a leaked registry URI sent a later test's versions to this test's store).
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        # MLflow remembers the active experiment id across stores: a test that set one must not send the next
        # test's runs to an id its new store does not have.
        mlflow.set_experiment(experiment_id="0")
        try:
            yield uri
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])


_TEMPLATE: dict[str, Path] = {}


def new_store(folder: Path) -> None:
    """An empty MLflow sqlite store in ``folder``, copied from one this process created: creating one (MLflow's
    migrations) takes a second or more, a copy milliseconds. Its Default experiment's artifacts go to ``folder``."""
    import sqlite3

    import mlflow

    if "db" not in _TEMPLATE:
        import tempfile

        template = Path(tempfile.mkdtemp(prefix="mlflow-store-template-")) / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments(max_results=1)
        _TEMPLATE["db"] = template
    shutil.copy(_TEMPLATE["db"], folder / "mlflow.db")
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (str(folder / "mlruns" / "0"),))


@pytest.fixture
def mlflow_store(tmp_path):
    """A real MLflow store (sqlite + artifacts) in a temp folder, which is also the working folder."""
    with tracking_store(tmp_path) as uri:
        yield uri


def copy_of_store(source: Path, target: Path) -> Path:
    """A copy of a folder that holds a store and the outputs of its runs, for a test that changes them. The
    store's artifacts stay where they were logged (MLflow records absolute artifact locations): a test adds
    runs of its own there, under new ids, and reads the others'."""
    shutil.copytree(source, target, symlinks=True)
    return target


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
    from textclf.components.base_models import minilm_path

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


def write_tiny_dataset(parent: Path) -> Path:
    """train/dev/test JSON Lines with integer labels 0/1 in ``parent/tinysent`` (the dataset 'tinysent')."""
    folder = parent / "tinysent"
    write_jsonl(folder / "train.jsonl", sentiment_rows(48))
    write_jsonl(folder / "dev.jsonl", sentiment_rows(16, 1000))
    write_jsonl(folder / "test.jsonl", sentiment_rows(16, 2000))
    return folder


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path)
