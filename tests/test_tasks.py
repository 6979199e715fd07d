"""finetune/tasks.py: the local GLUE loaders, label checks, metrics.

The loaders are tested on tiny GLUE folders written here (every task's file layout), and against the counts in
shared/data/README.md on the verified GLUE copies ($ROUTED_LLAMA_SHARED/data/glue), which skip where those are absent.
"""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from finetune import tasks
from finetune.tasks import Example, TaskError

# (task, split) -> (rows, {label: count}) from shared/data/README.md; RTE/QNLI: entailment = 0, not_entailment = 1
EXPECTED = {
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "validation"): (277, {0: 146, 1: 131}),
    ("mrpc", "train"): (3668, {1: 2474, 0: 1194}),
    ("mrpc", "validation"): (408, {1: 279, 0: 129}),
    ("cola", "train"): (8551, {1: 6023, 0: 2528}),
    ("cola", "validation"): (1043, {1: 721, 0: 322}),
    ("sst2", "train"): (67349, {1: 37569, 0: 29780}),
    ("sst2", "validation"): (872, {1: 444, 0: 428}),
    ("stsb", "train"): (5749, None),
    ("stsb", "validation"): (1500, None),
    ("wnli", "train"): (635, {0: 323, 1: 312}),
    ("wnli", "validation"): (71, {0: 40, 1: 31}),
    ("qnli", "validation"): (5463, {0: 2702, 1: 2761}),
}


@pytest.mark.parametrize("task_name,split", list(EXPECTED), ids=[f"{t}-{s}" for t, s in EXPECTED])
def test_local_split_counts(glue_dir, task_name, split):
    task = tasks.get_task(task_name)
    rows = tasks.load_split(task, split, glue_dir)
    n, labels = EXPECTED[task_name, split]
    assert len(rows) == n
    assert (task.train_rows if split == "train" else task.dev_rows) == n  # the Task table agrees with the README
    assert [r.idx for r in rows] == list(range(n))
    assert all(len(r.texts) == len(task.text_fields) and all(isinstance(t, str) and t for t in r.texts) for r in rows)
    assert not any("\t" in t or "\n" in t for r in rows for t in r.texts)  # no two rows merged into one
    if labels is None:  # STS-B: float similarity scores in [0, 5]
        scores = np.array([r.label for r in rows])
        assert all(isinstance(r.label, float) for r in rows)
        assert scores.min() >= 0.0 and scores.max() <= 5.0
        assert scores.min() == 0.0 and scores.max() == 5.0  # both ends of the scale occur
        assert len(np.unique(scores)) > 50  # not truncated to integers
    else:
        assert dict(Counter(r.label for r in rows)) == labels
        assert all(type(r.label) is int for r in rows)


def test_qnli_train_is_missing(glue_dir):
    with pytest.raises(TaskError, match=r"missing data file .*QNLI/train\.tsv"):
        tasks.load_split(tasks.get_task("qnli"), "train", glue_dir)


def test_rows_read_verbatim(glue_dir):
    rte = tasks.load_split(tasks.get_task("rte"), "train", glue_dir)
    # row 50 begins with a quote character: with CSV quoting it would swallow the following rows
    assert rte[50].texts[0].startswith('"Instead of action on crime, we got the federal long gun registry')
    dev = tasks.load_split(tasks.get_task("rte"), "validation", glue_dir)
    premise = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
               "according to the Christopher Reeve Foundation.")
    assert dev[0].texts == (premise, "Christopher Reeve had an accident.")
    assert dev[0].label == 1  # not_entailment
    cola = tasks.load_split(tasks.get_task("cola"), "validation", glue_dir)  # no header: row 1 is data
    assert cola[0].texts == ("The sailors rode the breeze clear of the rocks.",) and cola[0].label == 1
    stsb = tasks.load_split(tasks.get_task("stsb"), "validation", glue_dir)
    assert stsb[0].texts == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.")
    assert stsb[0].label == 5.0
    task = tasks.get_task("rte")
    assert tasks.format_example(task, dev[0]).splitlines()[1] == "Hypothesis: Christopher Reeve had an accident."


def test_max_samples_is_a_seeded_subset_in_file_order(glue_dir):
    task = tasks.get_task("rte")
    full = tasks.load_split(task, "validation", glue_dir)
    a = tasks.load_split(task, "validation", glue_dir, max_samples=32, seed=0)
    b = tasks.load_split(task, "validation", glue_dir, max_samples=32, seed=0)
    c = tasks.load_split(task, "validation", glue_dir, max_samples=32, seed=1)
    assert len(a) == 32 and [r.idx for r in a] == [r.idx for r in b]
    assert [r.idx for r in a] == sorted(r.idx for r in a)
    assert [r.idx for r in a] != [r.idx for r in c]
    assert all(full[r.idx] == r for r in a)
    assert len(tasks.load_split(task, "validation", glue_dir, max_samples=10_000)) == 277
    with pytest.raises(TaskError, match="split must be"):
        tasks.load_split(task, "test", glue_dir)


# --- tiny GLUE folders in each task's layout (no ../shared needed) -------------------------------------------------

TINY = {  # folder/file -> text, in the layouts of the GLUE download (MRPC: a byte-order mark; CoLA: no header)
    "RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\t\"Quoted\" start, no closing\tit rains\tentailment\n"
                     "1\tA dog.\tA cat.\tnot_entailment\n",
    "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tP\tH\tnot_entailment\n",
    "MRPC/train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tShe left .\tShe went away .\n",
    "CoLA/train.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tThe more.\n",
    "SST-2/train.tsv": "sentence\tlabel\nit 's a charming journey \t1\n",
    "STS-B/train.tsv": "index\tgenre\tsentence1\tsentence2\tscore\n0\tmain\tA man.\tA person.\t3.800\n",
    "WNLI/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin.\tThe pin had a hole.\t0\n",
    "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhen?\tThen.\tnot_entailment\n",
}


@pytest.fixture
def tiny_glue(tmp_path):
    for name, text in TINY.items():
        _write(tmp_path / Path(name).parent, Path(name).name, text)
    return tmp_path


def test_tiny_folders_read_verbatim(tiny_glue):
    def split(task, name="train"):
        return tasks.load_split(tasks.get_task(task), name, tiny_glue)

    rte = split("rte")
    assert [r.texts for r in rte] == [('"Quoted" start, no closing', "it rains"), ("A dog.", "A cat.")]
    assert [r.label for r in rte] == [0, 1] and [r.idx for r in rte] == [0, 1]  # the quote swallowed nothing
    assert split("rte", "validation")[0].label == 1
    mrpc = split("mrpc")[0]
    assert (mrpc.texts, mrpc.label) == (("She left .", "She went away ."), 1)
    cola = split("cola")  # no header: the first line is a row
    assert [(r.texts, r.label) for r in cola] == [(("The sailors rode the breeze clear of the rocks.",), 1),
                                                  (("The more.",), 0)]  # fmt: skip
    assert split("sst2")[0].texts == ("it 's a charming journey ",)  # kept as written, trailing space included
    stsb = split("stsb")[0]
    assert stsb.label == 3.8 and isinstance(stsb.label, float)
    assert split("wnli")[0].label == 0
    assert split("qnli", "validation")[0].label == 1
    with pytest.raises(TaskError, match=r"missing data file .*QNLI/train\.tsv \(qnli train split\)"):
        split("qnli")
    task = tasks.get_task("rte")
    assert tasks.format_example(task, rte[1]) == "Premise: A dog.\nHypothesis: A cat."


def test_tiny_max_samples_is_a_seeded_subset_in_file_order(tmp_path):
    rows = "".join(f"{i}\tp{i}\th{i}\t{'entailment' if i % 3 else 'not_entailment'}\n" for i in range(40))
    _write(tmp_path / "RTE", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n" + rows)
    task = tasks.get_task("rte")
    full = tasks.load_split(task, "validation", tmp_path)
    a, b = (tasks.load_split(task, "validation", tmp_path, max_samples=8, seed=0) for _ in range(2))
    c = tasks.load_split(task, "validation", tmp_path, max_samples=8, seed=1)
    assert len(a) == 8 and [r.idx for r in a] == [r.idx for r in b] == sorted(r.idx for r in a)
    assert [r.idx for r in a] != [r.idx for r in c]
    assert all(full[r.idx] == r for r in a)
    assert len(tasks.load_split(task, "validation", tmp_path, max_samples=10_000)) == 40
    with pytest.raises(TaskError, match="max samples must be >= 1"):
        tasks.load_split(task, "validation", tmp_path, max_samples=0)


def test_get_task_names_and_errors():
    assert tasks.get_task("SST-2").name == "sst2" and tasks.get_task("sts-b").name == "stsb"
    assert tasks.get_task("RTE").label_names[0] == "entailment"
    assert tasks.get_task("qnli").label_names[0] == "entailment"
    with pytest.raises(TaskError) as err:
        tasks.get_task("mnli-mm")
    msg = str(err.value)
    assert "'mnli-mm'" in msg and all(name in msg for name in tasks.TASKS)


def _write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")


def test_local_folder_errors(tmp_path):
    rte = tasks.get_task("rte")
    with pytest.raises(TaskError, match="no RTE/ folder"):
        tasks.load_split(rte, "train", tmp_path)
    _write(tmp_path / "RTE", "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(TaskError, match="row 1 cannot be read"):
        tasks.load_split(rte, "train", tmp_path)
    _write(tmp_path / "RTE", "train.tsv", "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(TaskError, match="expected columns"):
        tasks.load_split(rte, "train", tmp_path)
    _write(tmp_path / "RTE", "train.tsv", "")
    with pytest.raises(TaskError, match="no rows"):
        tasks.load_split(rte, "train", tmp_path)
    _write(tmp_path / "SST-2", "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\nodd\t2\n")
    with pytest.raises(TaskError, match=r"labels \[2\] do not match num_labels=2"):
        tasks.load_split(tasks.get_task("sst2"), "train", tmp_path)
    _write(tmp_path / "STS-B", "train.tsv", "sentence1\tsentence2\tscore\na\tb\t1.5\nc\td\tnan\n")
    with pytest.raises(TaskError, match="nan"):
        tasks.load_split(tasks.get_task("stsb"), "train", tmp_path)


def test_check_labels():
    rte, stsb = tasks.get_task("rte"), tasks.get_task("stsb")
    ok = [Example(("a", "b"), 0, 0), Example(("c", "d"), 1, 1)]
    tasks.check_labels(rte, ok)  # no error
    with pytest.raises(TaskError, match=r"labels \[1\] do not match num_labels=1"):
        tasks.check_labels(rte, ok, num_labels=1)
    for bad in (2, -1, 0.5, "entailment"):
        with pytest.raises(TaskError, match="do not match num_labels=2"):
            tasks.check_labels(rte, [*ok, Example(("e", "f"), bad, 2)])
    tasks.check_labels(tasks.get_task("mrpc"), ok, num_labels=3)  # a wider head accepts these labels
    scores = [Example(("a", "b"), 4.2, 0), Example(("c", "d"), 0, 1)]
    tasks.check_labels(stsb, scores)
    with pytest.raises(TaskError, match="regression task: num_labels must be 1, got 2"):
        tasks.check_labels(stsb, scores, num_labels=2)
    with pytest.raises(TaskError, match="do not match"):
        tasks.check_labels(stsb, [*scores, Example(("e", "f"), math.inf, 2)])


# --- metrics against sklearn / scipy --------------------------------------------------------------------------------

PRED = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
GOLD = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0])  # tp 4, tn 3, fp 2, fn 1


def test_accuracy_by_hand_and_sklearn():
    from sklearn.metrics import accuracy_score

    m = tasks.compute_metrics(tasks.get_task("rte"), PRED, GOLD)
    assert m == {"accuracy": 70.0}
    assert m["accuracy"] == pytest.approx(100 * accuracy_score(GOLD, PRED))


def test_f1_mrpc():
    from sklearn.metrics import f1_score

    m = tasks.compute_metrics(tasks.get_task("mrpc"), PRED, GOLD)
    assert list(m) == ["f1", "accuracy"]  # the headline first
    assert m["f1"] == pytest.approx(100 * 2 * 4 / (2 * 4 + 2 + 1), abs=1e-4)  # 2tp / (2tp + fp + fn) = 8/11
    assert m["f1"] == pytest.approx(100 * f1_score(GOLD, PRED), abs=1e-4)
    assert m["accuracy"] == 70.0


def test_matthews_cola():
    from sklearn.metrics import matthews_corrcoef

    m = tasks.compute_metrics(tasks.get_task("cola"), PRED, GOLD)
    tp, tn, fp, fn = 4, 3, 2, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["matthews_correlation"] == pytest.approx(100 * mcc, abs=1e-4)
    assert m["matthews_correlation"] == pytest.approx(100 * matthews_corrcoef(GOLD, PRED), abs=1e-4)
    assert tasks.compute_metrics(tasks.get_task("cola"), np.ones(10, int), GOLD)["matthews_correlation"] == 0.0


def test_pearson_spearman_stsb():
    from scipy.stats import pearsonr, spearmanr

    gold = np.array([0.0, 1.2, 2.5, 3.1, 4.8, 5.0, 2.2])
    pred = np.array([0.3, 1.0, 2.9, 2.7, 4.1, 4.9, 3.5])
    m = tasks.compute_metrics(tasks.get_task("stsb"), pred, gold)
    assert list(m) == ["pearson", "spearmanr"]
    assert m["pearson"] == pytest.approx(100 * pearsonr(pred, gold)[0], abs=1e-4)
    assert m["spearmanr"] == pytest.approx(100 * spearmanr(pred, gold)[0], abs=1e-4)
    assert m["pearson"] != m["spearmanr"]
    # ranks of pred 1 2 4 3 6 7 5 vs gold 1 2 4 5 6 7 3: d^2 = 0+0+0+4+0+0+4 -> 1 - 6*8 / (7*48)
    assert m["spearmanr"] == pytest.approx(100 * (1 - 6 * 8 / (7 * 48)), abs=1e-4)
    constant = tasks.compute_metrics(tasks.get_task("stsb"), np.full(7, 2.0), gold)
    assert constant == {"pearson": 0.0, "spearmanr": 0.0}  # a constant prediction scores 0, not NaN


def test_per_example_correct():
    correct = tasks.per_example_correct(tasks.get_task("rte"), PRED, GOLD)
    np.testing.assert_array_equal(correct, (PRED == GOLD).astype(int))
    assert tasks.per_example_correct(tasks.get_task("stsb"), [1.0], [1.0]) is None
