"""GLUE tasks: where the rows come from (the Hub through `datasets`, or a local GLUE folder of TSVs) and how they
are scored.

A task yields `Example`s (text, optional text pair, label). Labels follow the Hugging Face `nyu-mll/glue` encoding
in both sources, so a model fine-tuned on one is scored identically on the other.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from routed_llama.errors import UserError


@dataclass(frozen=True)
class Task:
    name: str  # our name, as on the command line
    hub_config: str  # nyu-mll/glue config name
    folder: str  # folder in a local GLUE directory
    text_fields: tuple[str, ...]  # Hub column names of the one or two texts
    field_names: tuple[str, ...]  # how the texts are labelled in the model input
    num_labels: int  # 1 = regression
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]  # the first is the headline
    train_rows: int | None  # rows in the local train.tsv (None: not in the local copy)
    dev_rows: int

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def primary(self) -> str:
        return self.metrics[0]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("rte", "rte", "RTE", ("sentence1", "sentence2"), ("Premise", "Hypothesis"), 2,
             ("entailment", "not_entailment"), ("accuracy",), 2490, 277),
        Task("mrpc", "mrpc", "MRPC", ("sentence1", "sentence2"), ("Sentence 1", "Sentence 2"), 2,
             ("not_equivalent", "equivalent"), ("f1", "accuracy"), 3668, 408),
        Task("cola", "cola", "CoLA", ("sentence",), ("Sentence",), 2,
             ("unacceptable", "acceptable"), ("matthews_correlation", "accuracy"), 8551, 1043),
        Task("sst2", "sst2", "SST-2", ("sentence",), ("Review",), 2,
             ("negative", "positive"), ("accuracy",), 67349, 872),
        Task("stsb", "stsb", "STS-B", ("sentence1", "sentence2"), ("Sentence 1", "Sentence 2"), 1,
             ("score",), ("pearson", "spearmanr"), 5749, 1500),
        Task("wnli", "wnli", "WNLI", ("sentence1", "sentence2"), ("Sentence 1", "Sentence 2"), 2,
             ("not_entailment", "entailment"), ("accuracy",), 635, 71),
        Task("qnli", "qnli", "QNLI", ("question", "sentence"), ("Question", "Sentence"), 2,
             ("entailment", "not_entailment"), ("accuracy",), None, 5463),
    ]  # fmt: skip
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}


class TaskError(UserError):
    """Bad task or data input; the command line prints it as one line."""


def get_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


@dataclass
class Example:
    texts: tuple[str, ...]
    label: float | int
    idx: int


# --- local GLUE folder (the standard download_glue_data.py layout) -------------------------------------------------

# For each task: (has header, text column(s), label column, label parser). Column names are those of the header,
# indices for the header-less CoLA files.
_LOCAL = {
    "rte": (True, ("sentence1", "sentence2"), "label", {"entailment": 0, "not_entailment": 1}.__getitem__),
    "mrpc": (True, ("#1 String", "#2 String"), "Quality", int),
    "cola": (False, (3,), 1, int),
    "sst2": (True, ("sentence",), "label", int),
    "stsb": (True, ("sentence1", "sentence2"), "score", float),
    "wnli": (True, ("sentence1", "sentence2"), "label", int),
    "qnli": (True, ("question", "sentence"), "label", {"entailment": 0, "not_entailment": 1}.__getitem__),
}
_SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}


def read_tsv(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """(header, rows) with QUOTE_NONE: GLUE TSVs use no quoting, and many fields begin with a quote character."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:  # an empty file: no header either
        return None, []
    return rows[0], rows[1:]


def load_local(task: Task, split: str, data_dir: str | Path) -> list[Example]:
    folder = Path(data_dir) / task.folder
    if not folder.is_dir():
        raise TaskError(f"no {task.folder}/ folder in the GLUE directory {data_dir}")
    path = folder / _SPLIT_FILES[split]
    if not path.is_file():
        raise TaskError(f"missing data file {path} ({task.name} {split} split)")
    has_header, text_cols, label_col, parse = _LOCAL[task.name]
    header, rows = read_tsv(path)
    if header is None:
        return []  # load_split reports the empty split
    if not has_header:
        rows = [header, *rows]
        pos = {c: c for c in (*text_cols, label_col)}
    else:
        names = [h.lstrip("\ufeff") for h in header]  # MRPC's header starts with a byte-order mark
        try:
            pos = {c: names.index(c) for c in (*text_cols, label_col)}
        except ValueError as exc:
            raise TaskError(f"{path} does not have the expected columns {text_cols + (label_col,)}: {names}") from exc
    out = []
    for i, row in enumerate(rows):
        try:
            label = parse(row[pos[label_col]])
            texts = tuple(row[pos[c]] for c in text_cols)
        except (IndexError, KeyError, ValueError) as exc:
            raise TaskError(f"{path}: row {i + 1} cannot be read ({exc!r})") from exc
        out.append(Example(texts, label, i))
    return out


def load_hub(task: Task, split: str) -> list[Example]:
    try:
        import datasets
    except ImportError as exc:
        raise TaskError("loading GLUE from the Hub needs the `datasets` package (or pass --data-dir)") from exc
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task.hub_config, split=split)
    except Exception as exc:  # offline, gated, renamed: one clear line
        raise TaskError(f"cannot load nyu-mll/glue {task.hub_config} {split} from the Hub: {exc}") from exc
    return [Example(tuple(row[c] for c in task.text_fields), row["label"], i) for i, row in enumerate(ds)]


def load_split(task: Task, split: str, data_dir: str | Path | None = None, max_samples: int | None = None,
               seed: int = 0) -> list[Example]:  # fmt: skip
    """Rows of one split ("train" or "validation"); `max_samples` keeps a seeded random subset in file order."""
    if split not in _SPLIT_FILES:
        raise TaskError(f"split must be 'train' or 'validation', got {split!r}")
    rows = load_local(task, split, data_dir) if data_dir is not None else load_hub(task, split)
    if not rows:
        raise TaskError(f"{task.name} {split} has no rows")
    check_labels(task, rows)
    if max_samples is not None and max_samples < len(rows):
        if max_samples < 1:
            raise TaskError(f"max samples must be >= 1, got {max_samples}")
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_samples, replace=False))
        rows = [rows[i] for i in keep]
    return rows


def check_labels(task: Task, rows: list[Example], num_labels: int | None = None):
    """The labels must fit the task's (or the model's) label set: classes 0..L-1, or finite floats."""
    n = task.num_labels if num_labels is None else num_labels
    if task.is_regression:
        if n != 1:
            raise TaskError(f"{task.name} is a regression task: num_labels must be 1, got {n}")
        bad = [r.label for r in rows if not isinstance(r.label, (int, float)) or not math.isfinite(r.label)]
    else:
        bad = sorted({r.label for r in rows if not (isinstance(r.label, int) and 0 <= r.label < n)})
    if bad:
        raise TaskError(f"{task.name}: labels {bad[:5]} do not match num_labels={n}")


def format_example(task: Task, ex: Example) -> str:
    """The model input: each text on its own line, named ("Premise: ...\\nHypothesis: ...")."""
    return "\n".join(f"{name}: {text}" for name, text in zip(task.field_names, ex.texts))


# --- metrics --------------------------------------------------------------------------------------------------------


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's GLUE metrics from predicted classes (or scores, for STS-B) and gold labels, as percentages."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    out = {}
    for m in task.metrics:
        if m == "accuracy":
            out[m] = accuracy_score(labels, predictions)
        elif m == "f1":
            out[m] = f1_score(labels, predictions)
        elif m == "matthews_correlation":
            out[m] = matthews_corrcoef(labels, predictions)
        elif m == "pearson":
            out[m] = float(pearsonr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
        elif m == "spearmanr":
            out[m] = float(spearmanr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
    return {k: round(100.0 * float(v), 4) for k, v in out.items()}


def per_example_correct(task: Task, predictions, labels) -> np.ndarray | None:
    """1/0 per example for classification tasks (the input of McNemar's test); None for regression."""
    if task.is_regression:
        return None
    return (np.asarray(predictions) == np.asarray(labels)).astype(np.int8)
