"""Partitioning one FFN's neurons into balanced clusters, and the permutation that makes each cluster contiguous.

Pure functions on numpy arrays (and `permute_mlp` on torch tensors). The keys are the rows of `gate_proj`, (I, H).
"""

from __future__ import annotations

import time

import numpy as np


def balanced_sizes(n_items: int, n_clusters: int) -> list[int]:
    """Cluster sizes as equal as possible: the first `n_items % n_clusters` clusters get one more."""
    base, extra = divmod(n_items, n_clusters)
    return [base + (1 if e < extra else 0) for e in range(n_clusters)]


def normalise_rows(keys: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    keys = np.asarray(keys, dtype=np.float32)
    return keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)


def kmeans_partition(keys: np.ndarray, n_clusters: int, seed: int, n_init: int = 1) -> np.ndarray:
    """Balanced k-means labels (I,) of the rows of `keys` (I, H).

    k-means (k-means++ init, `n_init` restarts) on L2-normalised rows gives centroids; then every row is assigned to
    a cluster of prescribed size (`balanced_sizes`) by an exact minimum-cost assignment on squared distances
    (Hungarian / Jonker-Volgenant on the cost matrix with each cluster's column repeated `size` times). A greedy
    pass can strand rows far from their centroid; this cannot, and every cluster gets exactly its size.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    x = normalise_rows(keys)
    n_items = x.shape[0]
    if not 1 <= n_clusters <= n_items:
        raise ValueError(f"need 1 <= n_clusters <= {n_items}, got {n_clusters}")
    if n_clusters == 1:
        return np.zeros(n_items, dtype=np.int64)
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(x)
    centers = km.cluster_centers_.astype(np.float64)
    # squared distance to each centre, (I, N); float64 so that the assignment is reproducible across BLAS builds
    xd = x.astype(np.float64)
    cost = (xd**2).sum(1)[:, None] - 2.0 * xd @ centers.T + (centers**2).sum(1)[None, :]
    sizes = balanced_sizes(n_items, n_clusters)
    slot_cluster = np.repeat(np.arange(n_clusters), sizes)  # (I,) the cluster of each of the I slots
    rows, slots = linear_sum_assignment(cost[:, slot_cluster])  # (I,), (I,): an exact min-cost matching
    labels = np.empty(n_items, dtype=np.int64)
    labels[rows] = slot_cluster[slots]
    return labels


def random_partition(n_items: int, n_clusters: int, seed: int) -> np.ndarray:
    """Labels (I,) of a uniformly random partition with `balanced_sizes` cluster sizes."""
    sizes = balanced_sizes(n_items, n_clusters)
    labels = np.repeat(np.arange(n_clusters), sizes)
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


def permutation_from_labels(labels: np.ndarray, n_clusters: int) -> tuple[np.ndarray, list[int]]:
    """(perm, offsets): new position j holds old neuron perm[j]; cluster e occupies [offsets[e], offsets[e+1]).

    Clusters keep their label order and neurons keep their original order inside a cluster, so the permutation is
    a deterministic function of the labels.
    """
    labels = np.asarray(labels)
    perm = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=n_clusters)
    if (counts == 0).any():
        raise ValueError(f"clusters {np.flatnonzero(counts == 0).tolist()} are empty")
    offsets = [0, *np.cumsum(counts).tolist()]
    return perm, offsets


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """inv with inv[perm[j]] = j."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def intra_cluster_cosine(keys: np.ndarray, labels: np.ndarray, n_clusters: int) -> float:
    """Mean over clusters of the mean pairwise cosine similarity of distinct rows in the cluster; NaN when no
    cluster holds two rows (the statistic is undefined)."""
    x = normalise_rows(keys).astype(np.float64)
    means = []
    for e in range(n_clusters):
        xe = x[labels == e]
        s = len(xe)
        if s < 2:
            continue
        total = xe.sum(0)
        means.append((total @ total - s) / (s * (s - 1)))  # sum over i != j of cos(x_i, x_j), averaged
    return float(np.mean(means)) if means else float("nan")


def permute_mlp(gate, up, down, perm, gate_bias=None, up_bias=None):
    """Permuted copies of one FFN's weights (torch tensors): rows of gate/up (and their biases), columns of down.

    `down_proj`'s bias is per output feature and does not move.
    """
    import torch

    idx = torch.as_tensor(perm, dtype=torch.long)
    out = {"gate": gate.index_select(0, idx), "up": up.index_select(0, idx), "down": down.index_select(1, idx)}
    if gate_bias is not None:
        out["gate_bias"] = gate_bias.index_select(0, idx)
        out["up_bias"] = up_bias.index_select(0, idx)
    return out


UNDEFINED_COSINE = "undefined: every cluster holds a single neuron"


def partition_layer(gate_weight, num_clusters: int, method: str, seed: int, n_init: int = 1) -> dict:
    """Cluster one layer's keys; returns labels, the permutation, offsets and the clustering-quality record (an
    undefined cosine is None with the reason in `note`)."""
    t0 = time.perf_counter()
    keys = gate_weight.detach().float().cpu().numpy()
    if method == "kmeans":
        labels = kmeans_partition(keys, num_clusters, seed=seed, n_init=n_init)
    else:
        labels = random_partition(len(keys), num_clusters, seed=seed)
    seconds = time.perf_counter() - t0
    perm, offsets = permutation_from_labels(labels, num_clusters)
    baseline = random_partition(len(keys), num_clusters, seed=seed + 1)
    record = {
        "intra_cosine": intra_cluster_cosine(keys, labels, num_clusters),
        "intra_cosine_random": intra_cluster_cosine(keys, baseline, num_clusters),
        "cluster_sizes": np.diff(offsets).tolist(),
        "seconds": round(seconds, 4),
    }
    if np.isnan(record["intra_cosine"]):
        record.update(intra_cosine=None, intra_cosine_random=None, note=UNDEFINED_COSINE)
    return {"labels": labels, "perm": perm, "offsets": offsets, "record": record}
