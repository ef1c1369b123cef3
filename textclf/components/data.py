"""From files on disk to labeled splits: format, column and label detection, the fixed validation split.

Supported files: JSON Lines, JSON arrays, Parquet and CSV. Splits are found by file name (``train``,
``dev``/``val``/``validation``, ``test``; shards like ``train-00000-of-00001.parquet`` are joined).
Text and label columns are detected by name unless the config names them. Labels may be integers
or strings. Label names come, in this order, from the Parquet Hugging Face metadata, from the
preset of a known dataset, or from the sorted union of the labels seen.
Every problem raises :class:`TextclfError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from textclf.config import DataConfig
from textclf.errors import TextclfError

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("dev", "val", "valid", "validation"),
    "test": ("test", "testing"),
}
# Read as the validation split only in a folder without one of the names above (train/eval/test): a file such as
# test_eval.jsonl stays the test split, and eval_results.json beside dev.jsonl is not joined to it.
VALIDATION_FALLBACK_ALIASES = ("eval", "evaluation")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "body", "question", "input")
LABEL_COLUMNS = ("label", "labels", "category", "class", "target", "y", "output")
PRESET_LABEL_NAMES = {
    "sst2": ["Negative", "Positive"],
    "r8": ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"],
}


@dataclass
class LabeledSplits:
    """Train/validation/test frames with columns ``text`` (str) and ``label`` (int id)."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame | None
    label_names: list[str]
    label_source: str
    files: dict[str, list[Path]]
    notes: list[str] = field(default_factory=list)  # what was done to the data, for the log and MLflow

    dataset_digest: str = ""  # the data folder's content and label names, before any cap or carved split

    def digests(self) -> dict[str, str]:
        """A content hash per split as trained on (after caps and the carved validation split)."""
        frames = {"train": self.train, "validation": self.validation, "test": self.test}
        return {name: frame_digest(frame) for name, frame in frames.items() if frame is not None}

    def summary(self) -> dict[str, int]:
        sizes = {"train": len(self.train), "validation": len(self.validation)}
        if self.test is not None:
            sizes["test"] = len(self.test)
        return sizes


def frame_digest(frame: pd.DataFrame) -> str:
    """A short content hash of a frame's rows, in order."""
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values).hexdigest()[:16]


def name_tokens(path: Path) -> set[str]:
    """The words of a file name, as split names are matched: ``Train-00000-of-00002.parquet`` -> train, of."""
    return set(re.split(r"[^a-z]+", path.stem.lower()))


def find_split_files(folder: Path, require_train: bool = True) -> dict[str, list[Path]]:
    """Map split name -> files, by file name. Raises TextclfError when there is no train split."""
    if not folder.exists():
        raise TextclfError(f"{folder}: data folder does not exist")
    if not folder.is_dir():
        raise TextclfError(f"{folder}: not a folder (pass the folder holding the train/dev/test files)")
    splits: dict[str, list[Path]] = {}
    unsupported: list[str] = []
    unnamed: list[Path] = []  # data files whose name says no split
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        split = next((name for name, aliases in SPLIT_ALIASES.items() if name_tokens(path) & set(aliases)), None)
        if split is None:
            if path.suffix.lower() in FORMATS:
                unnamed.append(path)
            continue
        if path.suffix.lower() not in FORMATS:
            unsupported.append(path.name)
            continue
        splits.setdefault(split, []).append(path)
    if "validation" not in splits:
        evaluation = [path for path in unnamed if name_tokens(path) & set(VALIDATION_FALLBACK_ALIASES)]
        if evaluation:
            splits["validation"] = evaluation
    ignored = [p.name for p in unnamed if p not in splits.get("validation", [])]
    if unsupported and not splits:
        raise TextclfError(
            f"{folder}: unsupported file format ({', '.join(unsupported)}); "
            f"use one of {', '.join(FORMATS)}"
        )
    if ignored:
        log.warning("%s: ignored %s: not named like a split (train, dev/validation, test; eval without dev)", folder,
                    ", ".join(ignored))
    if require_train and "train" not in splits:
        found = ", ".join(p.name for p in folder.iterdir()) or "nothing"
        raise TextclfError(f"{folder}: no train split (expected a file named like train.jsonl; found {found})")
    return splits


def read_table(path: Path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Read one file into a frame; also return label names declared in its metadata (Parquet only)."""
    if path.stat().st_size == 0:
        raise TextclfError(f"{path}: file is empty")
    kind = FORMATS[path.suffix.lower()]
    if kind == "parquet":
        return _read_parquet(path)
    try:
        if kind == "csv":
            try:
                return pd.read_csv(path, keep_default_na=False, na_values=[""], encoding="utf-8"), {}
            except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
                raise TextclfError(f"{path}: not a valid CSV file ({_first_line(exc)})") from None
        return _read_json(path), {}
    except UnicodeDecodeError as exc:
        raise TextclfError(_not_utf8(path, exc)) from None


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> str:
    """Where a text file stops being UTF-8: the line, the column and the byte, found in the file itself (the
    decoder's offset may count from a chunk of it)."""
    raw, offset = path.read_bytes(), exc.start
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as whole:
        offset = whole.start
    line_start = raw.rfind(b"\n", 0, offset) + 1
    line = raw.count(b"\n", 0, offset) + 1
    return (f"{path}: not UTF-8 text: byte 0x{raw[offset]:02x} on line {line}, "
            f"column {offset - line_start + 1} ({exc.reason}); save the file as UTF-8 (it may be Latin-1 or "
            "Windows-1252 text)")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _read_json(path: Path) -> pd.DataFrame:
    # Parsed line by line by hand (not pd.read_json) so that a broken line is reported by number.
    text = path.read_text(encoding="utf-8", errors="strict")
    if not text.strip():
        raise TextclfError(f"{path}: file is empty")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TextclfError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TextclfError(f"{path}: invalid JSON on line {number}: {exc.msg}") from None
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise TextclfError(f"{path}: expected JSON objects with a text and a label field")
    return pd.DataFrame(rows)


def _read_parquet(path: Path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise TextclfError(f"{path}: not a valid Parquet file ({_first_line(exc)})") from None
    names: dict[str, list[str]] = {}
    metadata = (table.schema.metadata or {}).get(b"huggingface")
    if metadata:
        try:
            features = json.loads(metadata).get("info", {}).get("features", {})
        except json.JSONDecodeError:
            features = {}
        for column, feature in features.items():
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
                names[column] = list(feature["names"])
    return table.to_pandas(), names


def pick_column(frame: pd.DataFrame, candidates: tuple[str, ...], what: str, path: Path) -> str:
    by_lower = {str(c).lower(): c for c in frame.columns}
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    raise TextclfError(
        f"{path}: no {what} column (looked for {', '.join(candidates)}; found {', '.join(map(str, frame.columns))})"
    )


def named_column(frame: pd.DataFrame, name: str, what: str, path: Path) -> str:
    """The column the user named (exact name first, then ignoring case). Raises TextclfError if absent."""
    if name in frame.columns:
        return name
    by_lower = {str(c).lower(): c for c in frame.columns}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    raise TextclfError(
        f"{path}: no column {name!r} (given as the {what} column; found {', '.join(map(str, frame.columns))})"
    )


def _column(frame: pd.DataFrame, name: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    # A column the user named must be there; guessing another one would train on the wrong data.
    if name:
        return named_column(frame, name, what, path)
    return pick_column(frame, candidates, what, path)


def load_split(
    paths: list[Path], text_column: str | None = None, label_column: str | None = None
) -> tuple[pd.DataFrame, DeclaredNames | None]:
    """Read and join the files of one split; return a frame with ``text`` and raw ``label`` columns, and the label
    names its files declare (Parquet ``ClassLabel`` metadata), if any.

    ``text_column``/``label_column`` name the columns; None detects them. Raises TextclfError, also when two
    files of the split declare different label names.
    """
    frames, declared = [], None
    for path in paths:
        frame, names = read_table(path)
        if frame.empty:
            raise TextclfError(f"{path}: file has no rows")
        text_col = _column(frame, text_column, TEXT_COLUMNS, "text", path)
        label_col = _column(frame, label_column, LABEL_COLUMNS, "label", path)
        texts = frame[text_col]
        bad = texts.isna() | ~texts.map(lambda t: isinstance(t, str)) | (texts.astype(str).str.strip() == "")
        if bad.any():
            first = int(bad.to_numpy().nonzero()[0][0])
            raise TextclfError(f"{path}: {int(bad.sum())} rows have an empty or non-string text (first: row {first + 1})")
        labels = frame[label_col]
        if labels.isna().any():
            first = int(labels.isna().to_numpy().nonzero()[0][0])
            raise TextclfError(f"{path}: {int(labels.isna().sum())} rows have no label (first: row {first + 1})")
        if label_col in names:
            declared = agreeing(declared, DeclaredNames(names[label_col], path))
        frames.append(pd.DataFrame({"text": texts.astype(str).to_numpy(), "label": labels.to_numpy()}))
    return pd.concat(frames, ignore_index=True), declared


@dataclass(frozen=True)
class DeclaredNames:
    """Label names a file declares for its integer labels (label i is ``names[i]``)."""

    names: list[str]
    path: Path


def agreeing(first: DeclaredNames | None, other: DeclaredNames) -> DeclaredNames:
    """``first`` (or ``other`` when there is none yet). Raises TextclfError when the two declare different
    names: label 0 would mean one class in one file and another in the other."""
    if first is not None and first.names != other.names:
        raise TextclfError(f"{other.path}: declares label names {other.names}, but {first.path} declares "
                           f"{first.names}; every file must give its integer labels the same names")
    return first or other


def _is_integer(labels: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(labels) or all(isinstance(v, int) and not isinstance(v, bool) for v in labels)


def resolve_label_names(
    raw: dict[str, pd.DataFrame], declared: list[str] | None, dataset_name: str, files: dict[str, list[Path]],
    shipped: bool = False,
) -> tuple[list[str], str]:
    """Decide the ordered label names. Returns (names, where they came from).

    Integer labels take the preset names of a shipped dataset only from its own files (``shipped``): another
    folder that happens to be called sst2 or r8 may number its classes otherwise, and a name given by position
    to the wrong class would mislabel every prediction without a word."""
    values = pd.concat([frame["label"] for frame in raw.values()], ignore_index=True)
    if _is_integer(values):
        if declared:
            return list(declared), "parquet metadata"
        if shipped and dataset_name in PRESET_LABEL_NAMES:
            return list(PRESET_LABEL_NAMES[dataset_name]), f"preset for {dataset_name}"
        return [str(v) for v in sorted(set(int(v) for v in values))], "sorted integer labels"
    if not all(isinstance(v, str) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise TextclfError(f"{files['train'][0]}: labels must be all integers or all strings (found {', '.join(kinds)})")
    seen = set(values)
    preset = PRESET_LABEL_NAMES.get(dataset_name)
    if preset and seen <= set(preset):
        return list(preset), f"preset for {dataset_name}"
    return sorted(seen), "sorted string labels"


def _to_ids(frame: pd.DataFrame, names: list[str], path: Path, own: DeclaredNames | None = None,
            names_declared: bool = False) -> pd.DataFrame:
    """Replace raw labels by their index in ``names``. Raises TextclfError naming unknown labels.

    Integer labels of a file that declares its own label names (``own``) are read as those names, then found
    by name in ``names``: a file may order its classes differently from the model. Other integer labels are
    indices into ``names``, except when the names are themselves integers that nobody declared
    (``names_declared`` False; labels 3 and 7 named "3" and "7"): then a label is looked up by value. Names
    declared by Parquet metadata are always indexed, even when they are digits (stars "1".."5" stored as 0..4),
    or a rating would shift by one.
    """
    labels = frame["label"]
    if _is_integer(labels) and own is not None:
        unknown = sorted(set(own.names) - set(names))
        if unknown:
            raise TextclfError(f"{path}: declares label names unknown to the {len(names)} label names {names}: "
                               f"{', '.join(unknown[:10])}")
        by_name = {name: i for i, name in enumerate(names)}
        ids = labels.map(lambda v: by_name[own.names[int(v)]] if 0 <= int(v) < len(own.names) else None)
    elif _is_integer(labels):
        if not names_declared and all(name.lstrip("-").isdigit() for name in names):
            mapping = {int(name): i for i, name in enumerate(names)}
            ids = labels.map(lambda v: mapping.get(int(v)))
        else:
            ids = labels.map(lambda v: int(v) if 0 <= int(v) < len(names) else None)
    else:
        mapping = {name: i for i, name in enumerate(names)}
        ids = labels.map(lambda v: mapping.get(str(v)))
    if ids.isna().any():
        outside = sorted({str(v) for v in labels[ids.isna()]})
        raise TextclfError(f"{path}: labels outside the {len(names)} label names {names}: {', '.join(outside[:10])}")
    return pd.DataFrame({"text": frame["text"], "label": ids.astype("int64")})


def carve_validation(
    train: pd.DataFrame, fraction: float, split_seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Hold out ``fraction`` of train with a fixed seed, stratified when the data allows it.

    Returns (train, validation, how it was split). Stratifying needs two rows of every class and
    at least one row per class on each side; a tiny set with many classes cannot give that, and
    is split at random rather than refused.
    """
    counts = train["label"].value_counts()
    held_out_rows = math.ceil(fraction * len(train))  # how scikit-learn rounds a fractional test_size
    if counts.min() < 2:
        stratify, how = None, "not stratified: a class has a single row"
    elif min(held_out_rows, len(train) - held_out_rows) < len(counts):
        stratify, how = None, f"not stratified: too few rows on one side for {len(counts)} classes"
    else:
        stratify, how = train["label"], "stratified"
    fit, held_out = train_test_split(train, test_size=fraction, random_state=split_seed, stratify=stratify)
    return fit.reset_index(drop=True), held_out.reset_index(drop=True), how


def load_splits(config: DataConfig) -> LabeledSplits:
    """Load, label and split the dataset described by ``config``. Raises TextclfError on bad data."""
    folder = config.resolved_path()
    files = find_split_files(folder)
    raw: dict[str, pd.DataFrame] = {}
    own: dict[str, DeclaredNames | None] = {}
    declared: DeclaredNames | None = None
    for split, paths in files.items():
        raw[split], own[split] = load_split(paths, config.text_column, config.label_column)
        if own[split] is not None:
            declared = agreeing(declared, own[split])
    shipped = folder.resolve() == DataConfig(dataset=config.name).resolved_path().resolve()
    names, source = resolve_label_names(raw, declared.names if declared else None, config.name, files, shipped)
    frames = {split: _to_ids(frame, names, files[split][0], own[split], names_declared=declared is not None)
              for split, frame in raw.items()}
    # What the data is, whatever part of it a run trains on: two folders of one name are two datasets.
    dataset_digest = hashlib.sha256(json.dumps(
        [names, *(f"{split}:{frame_digest(frames[split])}" for split in sorted(frames))]).encode()).hexdigest()[:16]
    notes: list[str] = []

    train_labels = set(frames["train"]["label"])
    if len(train_labels) < 2:
        raise TextclfError(f"{files['train'][0]}: the train split has a single class ({names[next(iter(train_labels))]})")
    for split in ("validation", "test"):
        if split in frames:
            unseen = sorted(set(frames[split]["label"]) - train_labels)
            if unseen:
                raise TextclfError(
                    f"{files[split][0]}: labels not present in the train split: {', '.join(names[i] for i in unseen)}"
                )

    train = frames["train"]
    if "validation" in frames:
        validation = frames["validation"]
    else:
        train, validation, how = carve_validation(train, config.validation_fraction, config.split_seed)
        notes.append(
            f"no dev split: held out {len(validation)} of {len(frames['train'])} train rows "
            f"({config.validation_fraction:.0%}, {how}, split seed {config.split_seed}) as validation"
        )
    if config.max_samples and config.max_samples < len(train):
        notes.append(f"max_samples: train capped to {config.max_samples} of {len(train)} rows")
        train = _sample(train, config.max_samples, config.split_seed)
    if config.max_eval_samples and config.max_eval_samples < len(validation):
        notes.append(f"max_eval_samples: validation capped to {config.max_eval_samples} of {len(validation)} rows")
        validation = _sample(validation, config.max_eval_samples, config.split_seed)
    test = frames.get("test")
    if test is not None and config.max_test_samples and config.max_test_samples < len(test):
        notes.append(f"max_test_samples: test capped to {config.max_test_samples} of {len(test)} rows")
        test = _sample(test, config.max_test_samples, config.split_seed)
    if test is None:
        notes.append("no test split: test metrics are not computed")
    for note in notes:
        log.info(note)
    return LabeledSplits(train, validation, test, names, source, files, notes, dataset_digest)


def load_test_split(
    path: Path,
    label_names: list[str],
    max_test_samples: int | None = None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
) -> pd.DataFrame:
    """Load the test split of a data folder (or one file), labelled with a trained model's ``label_names``.

    Labels are matched by name: strings, and integers of a file that declares their names (Parquet
    ``ClassLabel``), whatever order it lists them in. ``text_column``/``label_column`` name the columns; None
    detects them. Raises TextclfError when there is no test file, a named column is missing or a label is
    unknown to the model.
    """
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise TextclfError(f"{path}: unsupported file format; use one of {', '.join(FORMATS)}")
        files = [path]
    else:
        files = find_split_files(path, require_train=False).get("test")
        if not files:
            raise TextclfError(f"{path}: no test split (expected a file named like test.jsonl)")
    frame, declared = load_split(files, text_column, label_column)
    frame = _to_ids(frame, label_names, files[0], declared)
    if max_test_samples and max_test_samples < len(frame):
        frame = _sample(frame, max_test_samples, DataConfig.split_seed)
    return frame


def _sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return frame.sample(n=n, random_state=seed).reset_index(drop=True)
