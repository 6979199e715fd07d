"""The converter's pure partition functions: balanced sizes, balanced k-means, permutations, and FFN permutation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from routed_llama import partition
from configuration_routed_llama import RoutedLlamaConfig


def partition_of(labels):
    """The partition as a set of frozensets of item indices (independent of how clusters are numbered)."""
    labels = np.asarray(labels)
    return {frozenset(np.flatnonzero(labels == e).tolist()) for e in np.unique(labels)}


@pytest.mark.parametrize("n_items, n_clusters", [(10, 4), (150, 4), (150, 7), (1536, 32), (5, 5), (7, 1)])
def test_balanced_sizes(n_items, n_clusters):
    """Sizes sum to I, differ by at most one, the larger ones come first, and match the config's default split."""
    sizes = partition.balanced_sizes(n_items, n_clusters)
    assert len(sizes) == n_clusters and sum(sizes) == n_items
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    assert sizes == [len(a) for a in np.array_split(np.arange(n_items), n_clusters)]
    cfg = RoutedLlamaConfig(intermediate_size=n_items, num_experts=n_clusters, num_hidden_layers=1,
                            hidden_size=8, num_attention_heads=1)  # fmt: skip
    assert cfg.offsets_for_layer(0) == [0, *np.cumsum(sizes).tolist()]


def test_balanced_sizes_by_hand():
    assert partition.balanced_sizes(10, 4) == [3, 3, 2, 2]
    assert partition.balanced_sizes(150, 7) == [22, 22, 22, 21, 21, 21, 21]


@pytest.mark.parametrize("n_items, n_clusters", [(120, 4), (150, 7), (103, 10)])
def test_kmeans_partition_is_exactly_balanced(n_items, n_clusters):
    """Cluster e of the balanced k-means gets exactly balanced_sizes(I, N)[e] rows, also where N does not divide I."""
    keys = np.random.default_rng(0).normal(size=(n_items, 16)).astype(np.float32)
    labels = partition.kmeans_partition(keys, n_clusters, seed=0)
    assert labels.shape == (n_items,) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=n_clusters).tolist() == partition.balanced_sizes(n_items, n_clusters)


def test_kmeans_partition_seeded():
    """The same seed gives the same labels; other seeds give other partitions on data without a clear structure."""
    keys = np.random.default_rng(1).normal(size=(150, 16)).astype(np.float32)
    a = partition.kmeans_partition(keys, 5, seed=0)
    np.testing.assert_array_equal(a, partition.kmeans_partition(keys, 5, seed=0))
    others = [partition_of(partition.kmeans_partition(keys, 5, seed=s)) for s in (1, 2, 3)]
    assert any(p != partition_of(a) for p in others)


def planted_keys(n_clusters=6, size=20, hidden=32, noise=0.15, seed=0):
    """Rows around n_clusters random directions (equal sizes), shuffled: (keys (I, H), true labels (I,))."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, hidden))
    true = rng.permutation(np.repeat(np.arange(n_clusters), size))  # (I,)
    keys = centers[true] + noise * rng.normal(size=(len(true), hidden)) * np.linalg.norm(
        centers, axis=1
    ).mean() / np.sqrt(hidden)
    keys *= rng.uniform(0.2, 5.0, size=(len(true), 1))  # row norms must not matter: k-means runs on directions
    return keys.astype(np.float32), true


def test_kmeans_recovers_planted_clusters():
    """On keys drawn around planted directions k-means finds exactly the planted clusters, with a far higher mean
    intra-cluster cosine than a random partition of the same sizes."""
    keys, true = planted_keys()
    labels = partition.kmeans_partition(keys, 6, seed=0)
    assert partition_of(labels) == partition_of(true)
    cos_km = partition.intra_cluster_cosine(keys, labels, 6)
    cos_rand = partition.intra_cluster_cosine(keys, partition.random_partition(len(keys), 6, seed=0), 6)
    assert cos_km > 0.9
    assert cos_km > cos_rand + 0.5


def test_random_partition_balanced_and_seeded():
    """random_partition has balanced sizes, is reproducible for a seed and differs across seeds."""
    a = partition.random_partition(103, 10, seed=0)
    assert np.bincount(a).tolist() == partition.balanced_sizes(103, 10)
    np.testing.assert_array_equal(a, partition.random_partition(103, 10, seed=0))
    assert not np.array_equal(a, partition.random_partition(103, 10, seed=1))


def test_intra_cluster_cosine_by_hand():
    """Mean over clusters of the mean cosine over distinct pairs; singleton clusters are skipped."""
    keys = np.array(
        [
            [1.0, 0.0],  # cluster 0
            [0.0, 3.0],  # cluster 0
            [2.0, 2.0],  # cluster 0
            [0.0, 2.0],  # cluster 1
            [0.0, -5.0],  # cluster 1
            [4.0, 1.0],  # cluster 2: a singleton, no pair
        ]
    )
    labels = np.array([0, 0, 0, 1, 1, 2])
    r = 1 / np.sqrt(2)
    cluster0 = (0.0 + r + r) / 3  # pairs (a,b): 0, (a,c): 1/sqrt2, (b,c): 1/sqrt2
    cluster1 = -1.0  # opposite directions
    expected = (cluster0 + cluster1) / 2
    assert partition.intra_cluster_cosine(keys, labels, 3) == pytest.approx(expected, abs=1e-6)


def test_permutation_from_labels_makes_clusters_contiguous():
    """perm puts every cluster in one contiguous block [offsets[e], offsets[e+1]), in label order, keeping the
    original neuron order inside a block; inverse_permutation undoes it exactly."""
    labels = np.random.default_rng(0).integers(0, 7, size=103)
    labels[:7] = np.arange(7)  # no empty cluster
    perm, offsets = partition.permutation_from_labels(labels, 7)
    assert sorted(perm.tolist()) == list(range(103))  # a permutation
    assert offsets == [0, *np.cumsum(np.bincount(labels, minlength=7)).tolist()]
    for e in range(7):
        block = perm[offsets[e] : offsets[e + 1]]
        assert (labels[block] == e).all()
        assert (np.diff(block) > 0).all()  # stable inside the cluster
    inv = partition.inverse_permutation(perm)
    np.testing.assert_array_equal(perm[inv], np.arange(103))
    np.testing.assert_array_equal(inv[perm], np.arange(103))
    x = np.random.default_rng(1).normal(size=103)
    np.testing.assert_array_equal(x[perm][inv], x)


def test_permutation_from_labels_rejects_empty_cluster():
    with pytest.raises(ValueError, match=r"clusters \[2\] are empty"):
        partition.permutation_from_labels(np.array([0, 1, 3, 3, 0]), 4)


def random_ffn(hidden=24, inter=37, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {  # scaled like a trained layer (outputs of order one), so that 1e-5 is a meaningful fp32 tolerance
        "gate": torch.randn(inter, hidden, generator=g) / hidden**0.5,
        "up": torch.randn(inter, hidden, generator=g) / hidden**0.5,
        "down": torch.randn(hidden, inter, generator=g) / inter**0.5,
    }
    if bias:
        w["gate_bias"] = torch.randn(inter, generator=g)
        w["up_bias"] = torch.randn(inter, generator=g)
    return w


def swiglu(w, x, down_bias=None):
    """Llama's FFN: down(silu(gate(x)) * up(x)). x (M, H) -> (M, H)."""
    h = F.silu(F.linear(x, w["gate"], w.get("gate_bias"))) * F.linear(x, w["up"], w.get("up_bias"))  # (M, I)
    return F.linear(h, w["down"], down_bias)


@pytest.mark.parametrize("bias", [False, True])
def test_permute_mlp_roundtrip_is_bit_exact(bias):
    """Permuting, then permuting with the inverse, returns the original tensors bit for bit (biases too)."""
    w = random_ffn(bias=bias)
    perm = np.random.default_rng(3).permutation(37)
    p = partition.permute_mlp(w["gate"], w["up"], w["down"], perm, w.get("gate_bias"), w.get("up_bias"))
    assert not torch.equal(p["gate"], w["gate"])  # it did move rows
    back = partition.permute_mlp(p["gate"], p["up"], p["down"], partition.inverse_permutation(perm),
                               p.get("gate_bias"), p.get("up_bias"))  # fmt: skip
    assert set(back) == set(w)
    for key in w:
        assert torch.equal(back[key], w[key]), key
    # gate/up rows and down columns moved together
    assert torch.equal(p["gate"][5], w["gate"][perm[5]])
    assert torch.equal(p["down"][:, 5], w["down"][:, perm[5]])


@pytest.mark.parametrize("bias", [False, True])
def test_permuted_ffn_computes_the_same_function(bias):
    """The FFN with permuted weights gives the original output (fp32, max |diff| <= 1e-5)."""
    w = random_ffn(bias=bias)
    down_bias = torch.randn(24) if bias else None
    perm = np.random.default_rng(4).permutation(37)
    p = partition.permute_mlp(w["gate"], w["up"], w["down"], perm, w.get("gate_bias"), w.get("up_bias"))
    x = torch.randn(9, 24)
    ref, out = swiglu(w, x, down_bias), swiglu(p, x, down_bias)
    assert (out - ref).abs().max().item() <= 1e-5
    # negative control: permuting only gate/up, not down, changes the function
    broken = dict(p, down=w["down"])
    assert (swiglu(broken, x, down_bias) - ref).abs().max().item() > 1e-2
