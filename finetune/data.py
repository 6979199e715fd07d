"""Examples -> token ids -> batches. One home for the train/evaluation split, tokenisation and batching of both engines.

The fast engine pads every batch to one of a few bucket lengths and fills a short last batch with weight-0 copies,
so that a run sees a handful of shapes (one CUDA graph each) instead of one shape per padded length. Padding never
truncates (the largest bucket is >= max_length, checked by RunConfig) and never reorders what is recorded:
evaluation predictions are mapped back to file order by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import tasks
from .config import RunConfig

# Sort by length within windows of 50 batches. transformers' LengthGroupedSampler uses min(n // (4 * batch), 50)
# batches (38 for RTE at batch 16) and also moves the epoch's longest example first; given the same shuffle the two
# orders are otherwise the same (tests/test_trainer_match.py). Kept as it is: every committed fast-engine result was
# trained in this order, and on the same batches the two engines compute the same steps.
MEGABATCH = 50


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def encode(task: tasks.Task, rows: list[tasks.Example], tokenizer, max_length: int) -> ListDataset:
    texts = [tasks.format_example(task, r) for r in rows]
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    items = []
    for i, r in enumerate(rows):
        label = float(r.label) if task.is_regression else int(r.label)
        items.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": label})
    return ListDataset(items)


def by_length(ds: ListDataset) -> tuple[ListDataset, np.ndarray]:
    """(the items sorted longest first, order) so that evaluation batches carry little padding; item j of the
    sorted set is row order[j] of the original."""
    order = np.argsort([-len(it["input_ids"]) for it in ds.items], kind="stable")
    return ListDataset([ds.items[i] for i in order]), order


def split_rows(cfg: RunConfig, task: tasks.Task):
    """(train rows, evaluation rows): dev for real runs, a seeded held-out slice of train for lr selection."""
    train = tasks.load_split(task, "train", cfg.data_dir, cfg.max_train_samples, seed=0)  # same subset for every seed
    if cfg.holdout_fraction is None:
        dev = tasks.load_split(task, "validation", cfg.data_dir, cfg.max_eval_samples, seed=0)
        return train, dev
    order = np.random.default_rng(12345).permutation(len(train))  # fixed: every arm and lr sees the same slice
    n_hold = max(1, int(round(cfg.holdout_fraction * len(train))))
    hold = set(order[:n_hold].tolist())
    return [r for i, r in enumerate(train) if i not in hold], [r for i, r in enumerate(train) if i in hold]


def bucket_of(length: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"a sequence of {length} tokens is longer than the largest bucket {buckets[-1]}")


def train_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Batches of example indices for one epoch: a seeded shuffle, then sorted by length (longest first) within
    windows of MEGABATCH batches, so that each batch holds similar lengths. A function of (seed, epoch) alone."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    window = MEGABATCH * batch_size
    ordered = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        ordered.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
    flat = np.concatenate(ordered) if ordered else perm
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def eval_order(n: int, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches in dataset order (the caller sorted it by length)."""
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@dataclass
class Batch:
    """A padded batch of fixed shape: `batch_size` rows of `length` tokens. Rows past the real examples copy the
    first example and carry weight 0, so they change neither the loss nor the gradients (an all-padding row would
    make attention produce NaN)."""

    input_ids: torch.Tensor  # (B, L) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, L) long, 1 on real tokens
    labels: torch.Tensor  # (B,) long (classes) or float (regression)
    weight: torch.Tensor  # (B,) float, 1 for real examples, 0 for fillers
    n_real: int

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def pin_all(batches: list[Batch]) -> list[Batch]:
    """The same batches in page-locked CPU memory (so that copying one into a graph's inputs does not block the
    host), pinned one stacked tensor per field and length rather than batch by batch: a pack's plan is thousands of
    batches, and each separate pin is a page-locked allocation of its own."""
    by_length: dict[int, list[int]] = {}
    for i, b in enumerate(batches):
        by_length.setdefault(b.length, []).append(i)
    out: list[Batch | None] = [None] * len(batches)
    for idx in by_length.values():
        group = [batches[i] for i in idx]
        ids, mask, labels, weight = (torch.stack([getattr(b, f) for b in group]).pin_memory()
                                     for f in ("input_ids", "attention_mask", "labels", "weight"))  # (n, ...) each
        for j, i in enumerate(idx):
            out[i] = Batch(ids[j], mask[j], labels[j], weight[j], group[j].n_real)
    return out


def collate(items: list[dict], indices: np.ndarray, batch_size: int, buckets: list[int], pad_id: int,
            regression: bool) -> Batch:  # fmt: skip
    """Pad the examples `indices` of `items` to (batch_size, bucket) tensors on the CPU."""
    rows = [items[i] for i in indices]
    length = bucket_of(max(len(r["input_ids"]) for r in rows), buckets)
    # filled in numpy, one tensor each at the end: a pack's plan is thousands of batches, built before training
    ids = np.full((batch_size, length), pad_id, dtype=np.int64)  # (B, L)
    mask = np.zeros((batch_size, length), dtype=np.int64)  # (B, L)
    filled = rows + [rows[0]] * (batch_size - len(rows))  # weight-0 copies of the first row fill a short batch
    for j, r in enumerate(filled):
        n = len(r["input_ids"])
        ids[j, :n] = r["input_ids"]
        mask[j, :n] = 1
    labels = torch.tensor([r["labels"] for r in filled], dtype=torch.float32 if regression else torch.long)  # (B,)
    weight = torch.zeros(batch_size, dtype=torch.float32)  # (B,)
    weight[: len(rows)] = 1.0
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), labels, weight, len(rows))


def concat(batches: list[Batch], pad_id: int) -> Batch:
    """Batches stacked row-wise into one (the runs of a pack: run j's rows at [j*B, (j+1)*B)), each right-padded
    to the longest of them (a real token's result does not depend on padding to its right)."""
    if len(batches) == 1:
        return batches[0]
    length = max(b.length for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)  # (B, L) -> (B, length)

    return Batch(torch.cat([pad(b.input_ids, pad_id) for b in batches]),  # (K*B, length)
                 torch.cat([pad(b.attention_mask, 0) for b in batches]),  # (K*B, length)
                 torch.cat([b.labels for b in batches]), torch.cat([b.weight for b in batches]),  # (K*B,)
                 sum(b.n_real for b in batches))  # fmt: skip
