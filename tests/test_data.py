"""The loader: every supported file shape, label detection, the fixed validation split, bad data."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, write_jsonl
from textclf.components.data import load_splits, load_test_split
from textclf.config import DataConfig
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


def _dataset_digests(run_id: str) -> dict[str, str]:
    """Context ("training", "validation", "test") -> digest of the dataset MLflow recorded for the run."""
    from mlflow import MlflowClient

    digests = {}
    for dataset_input in MlflowClient().get_run(run_id).inputs.dataset_inputs:
        context = {tag.key: tag.value for tag in dataset_input.tags}.get("mlflow.data.context")
        digests[context] = dataset_input.dataset.digest
    return digests


@pytest.mark.slow
def test_validation_split_does_not_depend_on_training_seed(tmp_path, mlflow_store, tiny_llama):
    # Without a dev split, validation is carved from train; it must be the same rows for every
    # training seed, or seeds would be compared (and promoted) on different data.
    import mlflow
    from click.testing import CliRunner

    from conftest import sentiment_rows
    from entrypoints.train import train

    folder = tmp_path / "nodev"
    write_jsonl(folder / "train.jsonl", sentiment_rows(40))
    write_jsonl(folder / "test.jsonl", sentiment_rows(8, 1000))
    tiny = ["--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
            "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128", "--precision", "fp32",
            "--register", "false", "--base_model", tiny_llama, "--data_path", str(folder)]
    digests = {}
    for seed in ("0", "42"):
        result = CliRunner().invoke(train, [*tiny, "--seed", seed], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        run = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.seed = '{seed}'",
                                 output_format="list")[0]
        digests[seed] = _dataset_digests(run.info.run_id)
    assert digests["0"]["validation"] == digests["42"]["validation"]
    assert digests["0"]["training"] == digests["42"]["training"]

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
    ("latin1_jsonl", "train.jsonl: not UTF-8 text: byte 0xe9 on line 2, column 14"),
    ("latin1_csv", "train.csv: not UTF-8 text: byte 0xe9 on line 3, column 4"),
    ("splits_declare_other_names", "declares label names ['y', 'x'], but"),
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
    elif case == "latin1_jsonl":  # a café in Latin-1: byte 0xe9 is no UTF-8
        folder.mkdir(parents=True)
        (folder / "train.jsonl").write_bytes('{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n'
                                             .encode("latin-1"))
    elif case == "latin1_csv":
        folder.mkdir(parents=True)
        (folder / "train.csv").write_bytes("text,label\nok,a\ncaf\xe9 noir,b\n".encode("latin-1"))
    elif case == "splits_declare_other_names":  # label 0 would be x in one file and y in the other
        folder.mkdir(parents=True)
        _class_label_parquet(folder / "train.parquet", ["x", "y"], [0, 1] * 5)
        _class_label_parquet(folder / "validation.parquet", ["y", "x"], [0, 1] * 2)
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


def _class_label_parquet(path, names, labels):
    """A Parquet file as the datasets library writes it: integer labels with ClassLabel names in its metadata."""
    table = pa.table({"text": [f"text {i}" for i in range(len(labels))], "label": labels})
    meta = {"info": {"features": {"text": {"dtype": "string", "_type": "Value"},
                                  "label": {"_type": "ClassLabel", "names": list(names)}}}}
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), path)


def test_a_test_file_declaring_its_own_label_order_is_mapped_by_name(tmp_path):
    # The model says ["neg", "pos"]; the file stores pos as 0 and neg as 1 and says so.
    _class_label_parquet(tmp_path / "test.parquet", ["pos", "neg"], [0, 1, 1, 0])
    test = load_test_split(tmp_path / "test.parquet", ["neg", "pos"])
    assert test["label"].tolist() == [1, 0, 0, 1]
    _class_label_parquet(tmp_path / "other.parquet", ["pos", "meh"], [0, 1])
    with pytest.raises(TextclfError, match="declares label names unknown to the 2 label names .*: meh"):
        load_test_split(tmp_path / "other.parquet", ["neg", "pos"])


# --- label names declared by metadata, chosen columns, tiny stratified splits ----------------------

def test_numeric_class_label_names_in_parquet_metadata_stay_names(tmp_path):
    # A star rating: ClassLabel names "1".."5" stored as ids 0..4. Id 0 never occurs here, so
    # reading the names as the label values would shift every label by one.
    folder = tmp_path / "stars"
    folder.mkdir()
    labels = [1 + i % 4 for i in range(40)]
    table = pa.table({"text": [f"review {i}" for i in range(40)], "label": labels})
    meta = {"info": {"features": {"text": {"dtype": "string", "_type": "Value"},
                                  "label": {"_type": "ClassLabel", "names": ["1", "2", "3", "4", "5"]}}}}
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), folder / "train.parquet")
    splits = load_splits(DataConfig(data_path=str(folder)))
    assert splits.label_names == ["1", "2", "3", "4", "5"]
    assert splits.label_source == "parquet metadata"
    loaded = pd.concat([splits.train, splits.validation]).set_index("text")["label"]
    assert all(loaded[f"review {i}"] == labels[i] for i in range(40))  # id 1 is the name "2"
    assert splits.label_names[loaded["review 0"]] == "2"


def test_integer_labels_without_metadata_are_their_own_names(tmp_path):
    folder = tmp_path / "ints123"
    write_jsonl(folder / "train.jsonl", [{"text": f"t{i}", "label": 1 + i % 3} for i in range(30)])
    splits = load_splits(DataConfig(data_path=str(folder)))
    assert splits.label_names == ["1", "2", "3"]
    loaded = pd.concat([splits.train, splits.validation]).set_index("text")["label"]
    assert all(loaded[f"t{i}"] == i % 3 for i in range(30))


@pytest.mark.parametrize("name, classes", [("sst2", 2), ("R8", 8)])
def test_a_folder_named_like_a_shipped_dataset_keeps_its_own_integer_labels(tmp_path, name, classes):
    """The shipped names go with the shipped files only: a user's 'r8' folder may number its classes otherwise."""
    folder = tmp_path / name
    write_jsonl(folder / "train.jsonl", [{"text": f"t{i}", "label": i % classes} for i in range(10 * classes)])
    splits = load_splits(DataConfig(data_path=str(folder)))
    assert splits.label_names == [str(i) for i in range(classes)]
    assert splits.label_source == "sorted integer labels"
    shipped = load_splits(DataConfig(data_path=str(REPO / "data/datasets/sst2/data")))  # the shipped files, by path
    assert shipped.label_names == ["Negative", "Positive"]


def test_an_eval_file_is_the_validation_split_and_unnamed_data_files_are_reported(tmp_path, caplog):
    folder = tmp_path / "reviews"
    write_jsonl(folder / "train.jsonl", rows(40))
    write_jsonl(folder / "eval.jsonl", rows(6, offset=100))
    write_jsonl(folder / "test.jsonl", rows(6, offset=200))
    write_jsonl(folder / "extra_rows.jsonl", rows(6, offset=300))
    (folder / "README.md").write_text("not data")
    with caplog.at_level("WARNING", logger="textclf.components.data"):
        splits = load_splits(DataConfig(data_path=str(folder)))
    assert splits.summary() == {"train": 40, "validation": 6, "test": 6}  # eval.jsonl, not 15% of train
    assert sorted(splits.validation["text"]) == sorted(row["text"] for row in rows(6, offset=100))
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warnings) == 1 and "extra_rows.jsonl" in warnings[0] and "README" not in warnings[0]


def test_eval_is_the_validation_split_only_where_no_file_is_named_dev(tmp_path, caplog):
    folder = tmp_path / "reviews"
    write_jsonl(folder / "train.jsonl", rows(40))
    write_jsonl(folder / "dev.jsonl", rows(6, offset=100))
    write_jsonl(folder / "test_eval.jsonl", rows(8, offset=200))  # the test split, whatever else its name says
    write_jsonl(folder / "eval_results.jsonl", rows(4, offset=300))
    with caplog.at_level("WARNING", logger="textclf.components.data"):
        splits = load_splits(DataConfig(data_path=str(folder)))
    assert splits.summary() == {"train": 40, "validation": 6, "test": 8}
    assert any("ignored eval_results.jsonl" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fmt, stars", [("csv", [1, 5]), ("jsonl", ["1", "5"])])
def test_text_and_label_columns_can_be_named(tmp_path, fmt, stars):
    folder = tmp_path / "reviews"
    folder.mkdir()
    for split, n in (("train", 20), ("test", 6)):
        frame = pd.DataFrame({"review": [f"{split} review {i}" for i in range(n)],
                              "stars": [stars[i % 2] for i in range(n)]})
        if fmt == "csv":
            frame.to_csv(folder / f"{split}.csv", index=False)
        else:
            write_jsonl(folder / f"{split}.jsonl", frame.to_dict("records"))
    with pytest.raises(TextclfError, match="no label column"):  # "stars" is not a name detection knows
        load_splits(DataConfig(data_path=str(folder)))
    splits = load_splits(DataConfig(data_path=str(folder), text_column="review", label_column="stars"))
    assert splits.label_names == ["1", "5"]
    assert splits.summary() == {"train": 17, "validation": 3, "test": 6}
    test = load_test_split(folder, ["1", "5"], text_column="review", label_column="stars")
    assert test["label"].tolist() == [0, 1] * 3
    assert test["text"].tolist()[0] == "test review 0"


def test_a_named_column_missing_from_a_file_is_refused_clearly(tmp_path):
    folder = tmp_path / "reviews"
    write_jsonl(folder / "train.jsonl", [{"review": f"r{i}", "stars": i % 2} for i in range(10)])
    write_jsonl(folder / "test.jsonl", [{"review": f"r{i}", "rating": i % 2} for i in range(4)])
    with pytest.raises(TextclfError) as error:
        load_splits(DataConfig(data_path=str(folder), text_column="review", label_column="stars"))
    message = str(error.value)
    assert str(folder / "test.jsonl") in message
    assert "stars" in message and "found review, rating" in message
    assert "\n" not in message
    with pytest.raises(TextclfError, match="body"):
        load_test_split(folder, ["0", "1"], text_column="body")


def test_stratified_validation_with_more_classes_than_held_out_rows_falls_back(tmp_path):
    # 10 classes x 2 rows, 15% held out = 3 rows: too few to hold one of each class.
    folder = tmp_path / "manyclasses"
    write_jsonl(folder / "train.jsonl", [{"text": f"t{i}", "label": f"c{i % 10}"} for i in range(20)])
    splits = load_splits(DataConfig(data_path=str(folder)))
    assert len(splits.validation) == 3 and len(splits.train) == 17
    note = next(note for note in splits.notes if "no dev split" in note)
    assert "not stratified" in note
    again = load_splits(DataConfig(data_path=str(folder)))
    assert again.validation.equals(splits.validation)  # still the fixed split seed


def test_a_custom_data_run_does_not_record_a_shipped_dataset(tmp_path):
    """MLproject always passes dataset=sst2; with data_path the run must not log that it used SST-2."""
    from textclf.config import build_config, flatten

    config = build_config("lora", dataset="sst2", data_path=str(tmp_path / "reviews"))
    assert config.data.dataset is None and config.dataset_name == "reviews"
    assert flatten(config)["data.dataset"] == "None"
    assert build_config("lora", dataset="r8").dataset_name == "r8"
