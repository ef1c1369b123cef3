"""The loader: every supported file shape, label detection, the fixed validation split, bad data."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, write_jsonl
from textclf.config import DataConfig
from textclf.data import load_splits, load_test_split
from textclf.errors import TextclfError


def rows(n, labels=("neg", "pos"), offset=0):
    return [{"text": f"text number {i}", "label": labels[i % len(labels)]} for i in range(offset, offset + n)]


def test_shipped_sst2_uses_dev_split_and_preset_names():
    splits = load_splits(DataConfig(dataset="sst2"))
    assert splits.label_names == ["Negative", "Positive"]
    assert splits.summary() == {"train": 6920, "validation": 872, "test": 1821}


def test_shipped_r8_carves_validation_and_reads_parquet_metadata():
    splits = load_splits(DataConfig(dataset="r8"))
    assert splits.label_names == ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]
    assert splits.label_source == "parquet metadata"
    assert len(splits.validation) == round(5485 * 0.15)
    assert len(splits.train) + len(splits.validation) == 5485
    assert len(splits.test) == 2189  # never truncated silently
    # stratified: every class keeps roughly its share in validation
    share = splits.validation["label"].value_counts(normalize=True)
    full = pd.concat([splits.train, splits.validation])["label"].value_counts(normalize=True)
    assert (share - full).abs().max() < 0.01


def test_validation_split_does_not_depend_on_training_seed():
    from textclf.config import build_config

    a = load_splits(build_config(dataset="r8", seed=0).data)
    b = load_splits(build_config(dataset="r8", seed=123).data)
    assert a.validation.equals(b.validation)
    assert a.train.equals(b.train)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_format_with_string_labels(tmp_path, fmt):
    folder = tmp_path / "mydata"
    folder.mkdir()
    frames = {"train": pd.DataFrame(rows(40)), "validation": pd.DataFrame(rows(10, offset=40)),
              "test": pd.DataFrame(rows(10, offset=50))}
    names = {"train": "train", "validation": "validation", "test": "test"}
    for split, frame in frames.items():
        path = folder / f"{names[split]}.{fmt}"
        if fmt == "jsonl":
            write_jsonl(path, frame.to_dict("records"))
        elif fmt == "json":
            path.write_text(json.dumps(frame.to_dict("records")))
        elif fmt == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path)
    splits = load_splits(DataConfig(data_path=str(folder)))
    assert splits.label_names == ["neg", "pos"]
    assert splits.label_source == "sorted string labels"
    assert splits.summary() == {"train": 40, "validation": 10, "test": 10}
    assert splits.train["label"].tolist()[:2] == [0, 1]


def test_other_column_names_and_sharded_files(tmp_path):
    folder = tmp_path / "news"
    for shard in range(2):
        write_jsonl(folder / f"train-0000{shard}-of-00002.jsonl",
                    [{"sentence": r["text"], "category": r["label"]} for r in rows(20, ("b", "a", "c"), shard * 20)])
    splits = load_splits(DataConfig(data_path=str(folder)))
    assert splits.label_names == ["a", "b", "c"]
    assert len(splits.train) + len(splits.validation) == 40
    assert splits.test is None
    assert any("no test split" in note for note in splits.notes)


def test_integer_labels_without_names_get_their_numbers(tmp_path):
    folder = tmp_path / "ints"
    write_jsonl(folder / "train.jsonl", [{"text": f"t{i}", "label": [3, 7][i % 2]} for i in range(20)])
    splits = load_splits(DataConfig(data_path=str(folder)))
    assert splits.label_names == ["3", "7"]
    assert set(splits.train["label"]) | set(splits.validation["label"]) == {0, 1}


def test_max_samples_caps_train_only_and_says_so():
    splits = load_splits(DataConfig(dataset="sst2", max_samples=100))
    assert len(splits.train) == 100 and len(splits.validation) == 872 and len(splits.test) == 1821
    assert any("train capped to 100 of 6920" in note for note in splits.notes)


def test_load_test_split_uses_model_label_names():
    test = load_test_split(REPO / "data/datasets/r8/data",
                           ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"])
    assert len(test) == 2189 and test["label"].max() == 7


# --- bad input: one clear error naming the file and the problem ------------------------------------

def _write(folder, name, content):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(content)


@pytest.mark.parametrize("case, expected", [
    ("missing_folder", "data folder does not exist"),
    ("no_train", "no train split"),
    ("unknown_format", "unsupported file format"),
    ("corrupt_json_line", "invalid JSON on line 3"),
    ("corrupt_parquet", "not a valid Parquet file"),
    ("missing_text_column", "no text column (looked for text"),
    ("missing_label_column", "found text, stars"),
    ("empty_texts", "rows have an empty or non-string text (first: row 2)"),
    ("label_outside_names", "labels outside the 2 label names"),
    ("single_class", "single class"),
    ("empty_file", "file is empty"),
    ("unseen_test_labels", "labels not present in the train split: c"),
])
def test_bad_data_is_refused_clearly(tmp_path, case, expected):
    folder = tmp_path / "bad"
    good = "".join(json.dumps(r) + "\n" for r in rows(10))
    if case == "no_train":
        _write(folder, "test.jsonl", good)
    elif case == "unknown_format":
        _write(folder, "train.txt", "pos\tgreat\n")
    elif case == "corrupt_json_line":
        lines = good.splitlines()
        lines[2] = '{"text": "broken", "label": '
        _write(folder, "train.jsonl", "\n".join(lines))
    elif case == "corrupt_parquet":
        _write(folder, "train.parquet", "PAR1 this is not parquet")
    elif case == "missing_text_column":
        _write(folder, "train.jsonl", '{"body_text": "x", "label": "a"}\n')
    elif case == "missing_label_column":
        _write(folder, "train.jsonl", '{"text": "x", "stars": 5}\n')
    elif case == "empty_texts":
        _write(folder, "train.jsonl", '{"text": "ok", "label": "a"}\n{"text": "  ", "label": "b"}\n')
    elif case == "label_outside_names":
        table = pa.table({"text": ["a", "b", "c"], "label": [0, 1, 5]})
        meta = {"info": {"features": {"label": {"_type": "ClassLabel", "names": ["x", "y"]}}}}
        folder.mkdir(parents=True)
        pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), folder / "train.parquet")
    elif case == "single_class":
        _write(folder, "train.jsonl", "".join(json.dumps({"text": f"t{i}", "label": "a"}) + "\n" for i in range(5)))
    elif case == "empty_file":
        _write(folder, "train.jsonl", "")
    elif case == "unseen_test_labels":
        _write(folder, "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows(10, ("a", "b"))))
        _write(folder, "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows(6, ("a", "b", "c"))))
    path = folder if case != "missing_folder" else tmp_path / "nowhere"
    with pytest.raises(TextclfError) as error:
        load_splits(DataConfig(data_path=str(path)))
    message = str(error.value)
    assert expected in message
    assert str(path) in message  # names the folder or a file inside it
    assert "\n" not in message
