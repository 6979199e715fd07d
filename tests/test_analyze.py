"""finetune/analysis: the statistics on hand-made routings, the recording hooks, the command line.

Everything runs on tiny random models (a 3-layer Llama converted in the test) and a small GLUE-format folder written
here, so nothing is skipped without the shared data; one test also reads the real GLUE copy when it is there.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from finetune.analysis import FORMAT_VERSION, AnalysisError, AnalyzeSettings, analyze, cli
from finetune.analysis import record as R
from finetune.analysis import statistics as S

from test_runner import char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Statistics on hand-made selections
# ---------------------------------------------------------------------------------------------------------------

# 4 tokens, N = 4 clusters, k = 2: cluster 0 is kept by every token, 1 by two, 2 and 3 by one each.
SEL = np.array([[0, 1], [0, 2], [1, 0], [3, 0]])


def test_load_entropy_busiest_by_hand():
    np.testing.assert_array_equal(S.selection_counts(SEL, 4), [4, 2, 1, 1])
    np.testing.assert_allclose(S.cluster_load(SEL, 4), [0.5, 0.25, 0.125, 0.125])
    # H = 0.5*1 + 0.25*2 + 2 * 0.125*3 bits = 1.75 bits; log2 4 = 2 bits
    assert S.normalised_entropy(S.cluster_load(SEL, 4)) == pytest.approx(0.875, abs=1e-12)
    assert S.busiest_share(SEL, 4) == (0, 1.0)
    assert S.busiest_share(np.array([[1, 2], [2, 3], [0, 1]]), 4) == (1, pytest.approx(2 / 3))  # tie 1/2: lowest id
    s = S.layer_summary(SEL, 4)
    assert s["token_share"] == pytest.approx([1.0, 0.5, 0.25, 0.25])
    assert s["entropy_floor"] == pytest.approx(0.5)  # log 2 / log 4
    assert (s["busiest_cluster"], s["least_used_cluster"], s["unused_clusters"]) == (0, 2, 0)
    assert s["max_load_over_uniform"] == pytest.approx(2.0)
    assert (s["clusters_kept_by_over_90pct"], s["clusters_kept_by_under_10pct"]) == (1, 0)
    # batch of 2: (1 + (1 - 0.5^2) + 2 (1 - 0.75^2)) / 4; uniform 1 - (1 - 2/4)^2
    assert s["batch_union"]["2"] == pytest.approx((1 + 0.75 + 2 * 0.4375) / 4)
    assert s["batch_union"]["1"] == pytest.approx(0.5) and s["batch_union_uniform"]["2"] == pytest.approx(0.75)


def test_batch_union_equals_sampled_batches():
    """batch_union is the mean union of B tokens drawn with replacement: checked against 20,000 drawn batches."""
    rng = np.random.default_rng(0)
    sel = np.stack([rng.choice(8, size=3, replace=False, p=[0.3, 0.3, 0.1, 0.1, 0.1, 0.04, 0.03, 0.03])
                    for _ in range(400)])  # fmt: skip
    share = S.cluster_load(sel, 8) * 3
    for b in (2, 4):
        draws = sel[rng.integers(0, len(sel), size=(20000, b))]  # (draws, B, k)
        kept = np.zeros((20000, 8), dtype=bool)
        np.put_along_axis(kept, draws.reshape(20000, -1), True, axis=1)
        assert S.batch_union(share, b) == pytest.approx(kept.mean(), abs=0.005)


def test_entropy_extremes():
    assert S.normalised_entropy(np.full(8, 1 / 8)) == pytest.approx(1.0)
    always_same = np.tile([3, 5], (10, 1))  # every token keeps clusters 3 and 5 of 8: the floor log 2 / log 8
    assert S.normalised_entropy(S.cluster_load(always_same, 8)) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        S.normalised_entropy([0.5, 0.6])


def test_coselection_by_hand():
    c = S.coselection_counts(SEL, 4)
    expected = np.array(
        [
            [4, 2, 1, 1],
            [2, 2, 0, 0],
            [1, 0, 1, 0],
            [1, 0, 0, 1],
        ]
    )
    np.testing.assert_array_equal(c, expected)
    lift = S.coselection_lift(c, 4)
    # P(0 and 1) = 2/4, P(0) = 1, P(1) = 1/2 -> lift 1; P(1 and 2) = 0 -> lift 0
    assert lift[0, 1] == pytest.approx(1.0) and lift[1, 2] == 0.0 and lift[2, 2] == pytest.approx(4.0)
    never = S.coselection_lift(S.coselection_counts(np.array([[0, 1]]), 3), 1)
    assert np.isnan(never[2, 2]) and np.isnan(never[0, 2])


def test_coselection_correlation_is_the_phi_of_the_keep_indicators():
    sel = np.array([[0, 1], [0, 2], [1, 2], [1, 3]])
    corr = S.coselection_correlation(S.coselection_counts(sel, 4), 4)
    # P(0) = .5, P(1) = .75, P(0 and 1) = .25: (.25 - .375) / sqrt(.25 * .1875)
    assert corr[0, 1] == pytest.approx(-0.125 / math.sqrt(0.25 * 0.1875))
    onehot = np.zeros((4, 4))
    np.put_along_axis(onehot, sel, 1, axis=1)
    np.testing.assert_allclose(corr, np.corrcoef(onehot.T), atol=1e-12)
    assert np.isnan(S.coselection_correlation(S.coselection_counts(SEL, 4), 4)[0, 1])  # cluster 0: every token


def test_selection_checks():
    with pytest.raises(ValueError, match="twice"):
        S.cluster_load(np.array([[1, 1]]), 4)
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        S.cluster_load(np.array([[0, 4]]), 4)
    with pytest.raises(ValueError):
        S.cluster_load(np.array([0, 1]), 4)  # not (tokens, k)


def test_example_and_group_counts_by_hand():
    ex = S.example_counts(SEL, [0, 0, 1, 1], 3, 4)  # example 2 has no token
    np.testing.assert_array_equal(ex, [[2, 1, 1, 0], [2, 1, 0, 1], [0, 0, 0, 0]])
    g = S.group_counts(ex[:, None, :], [1, 0, 1], 2)  # (G, L=1, N)
    np.testing.assert_array_equal(g[:, 0], [[2, 1, 0, 1], [2, 1, 1, 0]])


def test_usage_distance_by_hand():
    g = np.array([[2, 2, 0, 0], [0, 1, 1, 2]])  # loads (.5,.5,0,0) and (0,.25,.25,.5)
    assert S.usage_distance(g, "tv")[0] == pytest.approx(0.75)
    # expected counts: rows total 4 and 4, columns 2, 3, 1, 2 of 8 -> (1, 1.5, .5, 1) in both rows
    assert S.usage_distance(g, "chi2")[0] == pytest.approx(2 * (1 + 0.25 / 1.5 + 0.25 / 0.5) + 1 + 1)
    from scipy.stats import chi2_contingency

    assert S.usage_distance(g, "chi2")[0] == pytest.approx(chi2_contingency(g, correction=False)[0])
    three = np.array([[1, 0], [0, 1], [1, 1]])  # TVs: (a,b) 1, (a,c) .5, (b,c) .5 -> mean 2/3
    assert S.usage_distance(three, "tv")[0] == pytest.approx(2 / 3)
    assert S.usage_distance(np.stack([g, g[::-1]], axis=1), "tv") == pytest.approx([0.75, 0.75])  # per layer


def _counts_from_clusters(cluster_sets, n_experts, n_layers=2, tokens=3):
    """(E, L, N): every example keeps `cluster_sets[e]` on each of its tokens in every layer."""
    out = np.zeros((len(cluster_sets), n_layers, n_experts))
    for e, cs in enumerate(cluster_sets):
        out[e, :, list(cs)] = tokens
    return out


def test_permutation_disjoint_groups_give_smallest_p():
    counts = _counts_from_clusters([(0, 1)] * 20 + [(2, 3)] * 20, 4)
    groups = np.repeat([0, 1], 20)
    res = S.permutation_test(counts, groups, n_permutations=199, seed=0)
    assert res.observed == pytest.approx(2.0)  # TV 1 in each of the two layers
    assert res.observed_per_layer == pytest.approx([1.0, 1.0])
    assert res.p_value == 1 / 200
    assert res.null.max() < 2.0
    # every cluster moves by its whole load (0.5) between the groups; corrected p is as small as it can be
    assert res.effect[0] == pytest.approx(np.full((2, 4), 0.5))
    assert (res.p_cluster_adjusted == 1 / 200).all()


def test_permutation_identical_groups_give_p_one():
    counts = _counts_from_clusters([(0, 2)] * 30, 4)
    res = S.permutation_test(counts, np.repeat([0, 1, 2], 10), n_permutations=99, seed=1)
    assert res.observed == 0.0 and res.p_value == 1.0


def test_permutation_random_groups_are_not_significant_and_seeded():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(60, 3, 8)).astype(float)
    groups = rng.integers(0, 2, 60)
    a = S.permutation_test(counts, groups, n_permutations=300, seed=5)
    b = S.permutation_test(counts, groups, n_permutations=300, seed=5)
    assert a.p_value == b.p_value and np.array_equal(a.null, b.null)
    assert a.p_value > 0.05
    chi = S.permutation_test(counts, groups, n_permutations=300, seed=5, statistic="chi2")
    assert chi.statistic == "chi2" and chi.p_value > 0.05


def test_permutation_strata_separate_label_from_task():
    # routing depends only on the task; label 1 is mostly in task 1: labels look different unless compared within tasks
    tasks = np.repeat([0, 1], 20)
    labels = np.array([0] * 16 + [1] * 4 + [0] * 4 + [1] * 16)
    counts = _counts_from_clusters([(0, 1)] * 20 + [(2, 3)] * 20, 4)
    naive = S.permutation_test(counts, labels, n_permutations=199, seed=0)
    within = S.permutation_test(counts, labels, n_permutations=199, seed=0, strata=tasks)
    assert naive.p_value == 1 / 200
    assert within.observed == 0.0 and within.p_value == 1.0
    assert within.tested_strata == [0, 1]
    # shuffles stay inside a stratum: task 0 holds only label 0 (its routing varies), task 1 both labels (its routing
    # does not), so no within-task regrouping can ever show a difference; a shuffle across tasks would
    counts = _counts_from_clusters([(0, 1), (2, 3)] * 10 + [(0, 1)] * 20, 4)
    labels = np.array([0] * 20 + [0, 1] * 10)
    res = S.permutation_test(counts, labels, n_permutations=99, seed=0, strata=tasks)
    assert res.tested_strata == [1] and res.observed == 0.0
    assert (res.null == 0).all() and res.p_value == 1.0


def test_permutation_needs_two_groups():
    with pytest.raises(ValueError, match="two groups"):
        S.permutation_test(np.ones((4, 1, 3)), np.zeros(4, dtype=int))


def test_paired_change_by_hand():
    base = _counts_from_clusters([(0, 1)] * 20, 4, n_layers=1, tokens=1)
    same = S.paired_change_test(base, base, n_permutations=99)
    assert same["tv"] == 0.0 and same["p_value"] == 1.0
    moved = base.copy()
    moved[:5, 0] = 0
    moved[:5, 0, [0, 2]] = 1  # 5 of 20 tokens swap cluster 1 for cluster 2: loads (.5,.5,0,0) -> (.5,.375,.125,0)
    ch = S.paired_change_test(base, moved, n_permutations=3999, seed=0)
    np.testing.assert_allclose(ch["delta_load"][0], [0, -0.125, 0.125, 0])
    assert ch["tv"] == pytest.approx(0.125)
    # only the 5 changed examples matter: a sign flip reaches the observed TV iff all 5 signs agree, p = 2 / 2**5
    assert ch["p_value"] == pytest.approx(1 / 16, abs=0.01)
    all_moved = _counts_from_clusters([(2, 3)] * 20, 4, n_layers=1, tokens=1)
    assert S.paired_change_test(base, all_moved, n_permutations=199)["p_value"] == 1 / 200
    with pytest.raises(ValueError, match="same tokens"):
        S.paired_change_test(base, base * 2)
    assert S.kept_overlap(SEL, SEL[:, ::-1], 4) == 1.0
    assert S.kept_overlap(SEL, np.array([[0, 3], [0, 2], [2, 3], [1, 2]]), 4) == pytest.approx((1 + 2 + 0 + 0) / 8)


def test_permutation_test_agrees_with_scipy_exact_enumeration():
    # scipy.stats.permutation_test enumerates all C(10, 5) = 252 regroupings; ours samples 4999 with its own seeded
    # stream (and also needs strata and per-cluster max-T, which scipy does not offer), so only the p-values agree
    from scipy.stats import permutation_test as scipy_permutation_test

    rng = np.random.default_rng(3)
    counts = rng.poisson(4.0, size=(10, 2, 5)).astype(float)
    counts[:5, :, 0] += 1.5  # a weak difference between the two groups
    groups = np.repeat([0, 1], 5)

    def tv(a, b):  # a, b: example indices of the two groups
        return S.usage_distance(np.stack([counts[a].sum(0), counts[b].sum(0)]), "tv").sum()

    exact = scipy_permutation_test(
        (np.arange(5), np.arange(5, 10)), tv, permutation_type="independent", n_resamples=np.inf, alternative="greater"
    )
    ours = S.permutation_test(counts, groups, n_permutations=4999, seed=0)
    assert ours.observed == pytest.approx(exact.statistic)
    assert 0.05 < exact.pvalue < 0.95 and ours.p_value == pytest.approx(exact.pvalue, abs=0.02)


def test_paired_change_test_agrees_with_scipy_exact_enumeration():
    # paired: scipy swaps the two models within each example, all 2**8 ways; ours flips signs at random
    from scipy.stats import permutation_test as scipy_permutation_test

    rng = np.random.default_rng(4)
    base = rng.poisson(3.0, size=(8, 1, 4)).astype(float)
    new = base.copy()
    for e in range(8):  # each example moves one selection between clusters, mostly from cluster 0 to cluster 1
        src, dst = (0, 1) if e % 4 else (1, 0)
        if new[e, 0, src] > 0:
            new[e, 0, src] -= 1
            new[e, 0, dst] += 1
    both = np.concatenate([base, new])  # index e: base of example e, 8 + e: new of example e

    def tv(a, b):
        delta = (both[b].sum(0) - both[a].sum(0)) / base.sum(axis=(0, 2))[:, None]
        return 0.5 * np.abs(delta).sum()

    exact = scipy_permutation_test(
        (np.arange(8), np.arange(8, 16)), tv, permutation_type="samples", n_resamples=np.inf, alternative="greater"
    )
    ours = S.paired_change_test(base, new, n_permutations=3999, seed=0)
    assert ours["tv"] == pytest.approx(exact.statistic)
    assert 0.05 < exact.pvalue < 0.95 and ours["p_value"] == pytest.approx(exact.pvalue, abs=0.02)


def test_settings_are_checked_on_construction_without_touching_files(tmp_path):
    s = AnalyzeSettings(out=str(tmp_path / "o"), checkpoint=str(tmp_path / "missing"), tasks=("rte", "sst-2"))
    assert s.tasks == ["rte", "sst-2"] and s.options.n_permutations == 1000 and not (tmp_path / "o").exists()
    for kwargs, message in (
        ({"statistic": "gini"}, "--statistic must be one of tv, chi2"),
        ({"split": "test"}, "--split must be one of validation, train"),
        ({"tasks": ["sst2", "sst-2"]}, "lists a task twice"),
        ({"tasks": []}, "selects no task"),
        ({"n_permutations": -1}, "--n-permutations must be >= 0"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"max_examples": 0}, "--max-examples must be >= 1"),
    ):
        with pytest.raises(AnalysisError, match=message):
            AnalyzeSettings(out="o", **kwargs)
    from routed_llama.cli import parse_settings
    from routed_llama.errors import UserError

    assert issubclass(AnalysisError, UserError)
    parsed = parse_settings(AnalyzeSettings, ["--out", "o", "--coselection-layers", "1", "2", "--no-progress"])
    assert parsed.coselection_layers == [1, 2] and parsed.progress is False and parsed.tasks == ["rte", "sst2", "cola"]


# ---------------------------------------------------------------------------------------------------------------
# Recording on a synthetic router whose choices are known by construction
# ---------------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, router=None):
        super().__init__()
        self.mlp = nn.Module()
        if router is not None:
            self.mlp.router = router


class _Synthetic(nn.Module):
    """Layer 2 of 3 routes with centroids = identity, so a token x keeps the k largest coordinates of x."""

    def __init__(self, k=2, n=4):
        super().__init__()
        from configuration_routed_llama import RoutedLlamaConfig
        from modeling_routed_llama import RoutedLlamaRouter

        cfg = RoutedLlamaConfig(
            hidden_size=n,
            intermediate_size=2 * n,
            num_hidden_layers=3,
            num_attention_heads=1,
            num_key_value_heads=1,
            num_experts=n,
            num_experts_per_tok=k,
            vocab_size=8,
        )
        self.config = cfg
        router = RoutedLlamaRouter(cfg, 2)
        router.centroids.copy_(torch.eye(n))
        self.layers = nn.ModuleList([_Block(), _Block(), _Block(router)])

    def forward(self, x):  # x (B, T, n)
        self.layers[2].mlp.router(x.reshape(-1, x.shape[-1]))
        return x * 2


def test_recorder_on_synthetic_router():
    model = _Synthetic()
    model.config.routing_impl = "auto"
    # batch of 2 x 3 tokens; the last token of the second sequence is padding (it would keep 2 and 3)
    x = torch.tensor(
        [
            [[4.0, 3, 0, 0], [0, 5, 6, 0], [1, 0, 0, 2]],
            [[0, 0, 9, 8], [7, 0, 0, 1], [0, 0, 5, 5.5]],
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with R.RoutingRecorder(model) as rec:
        assert model.config.routing_impl == "mask"
        rec.set_attention_mask(mask)
        y = model(x)
        rec.check_batch()
    assert model.config.routing_impl == "auto"
    assert not model.layers[2].mlp.router._forward_hooks
    assert torch.equal(y, x * 2)
    sel = rec.result()[2]
    assert list(rec.result()) == [2]
    np.testing.assert_array_equal(np.sort(sel, axis=1), [[0, 1], [1, 2], [0, 3], [2, 3], [0, 3]])
    np.testing.assert_allclose(S.cluster_load(sel, 4), [3 / 10, 2 / 10, 2 / 10, 3 / 10])
    assert S.busiest_share(sel, 4) == (0, 0.6)
    np.testing.assert_array_equal(S.coselection_counts(sel, 4)[0], [3, 1, 0, 2])
    # a forward without set_attention_mask calls the router once more: check_batch notices a double call
    with R.RoutingRecorder(model) as rec:
        rec.set_attention_mask(mask)
        model(x)
        model(x)
        with pytest.raises(RuntimeError, match="called"):
            rec.check_batch()
    with R.RoutingRecorder(model) as rec:
        rec.set_attention_mask(torch.ones(1, 2))  # wrong size for 6 tokens
        with pytest.raises(RuntimeError, match="attention mask"):
            model(x)
    assert not model.layers[2].mlp.router._forward_hooks  # removed after the exception too


def test_recorder_refuses_a_model_without_routers():
    with pytest.raises(AnalysisError, match="no RoutedLlamaRouter"):
        R.RoutingRecorder(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------------------
# A tiny converted checkpoint, a GLUE-format folder, the command line
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Paths of a tiny dense Llama (with a character tokenizer) and of its routed conversion (N=5, k=2, layers 1-2)."""
    from transformers import LlamaForCausalLM

    import convert
    from conftest import tiny_llama_config

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config())
    dense.save_pretrained(root / "dense")
    char_tokenizer().save_pretrained(root / "dense")
    settings = convert.ConvertSettings(
        model=str(root / "dense"), out_dir=str(root / "routed"), num_clusters=5, top_k=2, layers="1-2", progress=False
    )
    convert.convert(settings, log=lambda *a, **k: None)
    return {"dense": root / "dense", "routed": root / "routed", "root": root}


SENTENCES = [
    ("the cat sat on the mat .", 1),
    ("a dull , lifeless film .", 0),
    ("bright and warm and funny", 1),
    ("nothing works here at all", 0),
    ("I loved every minute", 1),
    ("bad acting , worse script", 0),
    ("the book the man read", 1),
    ("read man the book the", 0),
    ("she is tall", 1),
    ("tall is she the", 0),
]


@pytest.fixture(scope="module")
def glue(tiny):
    """A GLUE folder in the standard layout with a few dev rows of RTE, SST-2 and CoLA, and an empty MRPC."""
    d = tiny["root"] / "glue"
    for sub in ("RTE", "SST-2", "CoLA", "MRPC"):
        (d / sub).mkdir(parents=True)
    rte = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\t{a}\t{b}\t{'entailment' if la else 'not_entailment'}"
        for i, ((a, la), (b, _)) in enumerate(zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1]))
    ]
    (d / "RTE" / "dev.tsv").write_text("\n".join(rte) + "\n")
    (d / "SST-2" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s} \t{la}\n" for s, la in SENTENCES))
    (d / "CoLA" / "dev.tsv").write_text("".join(f"src\t{la}\t\t{s}\n" for s, la in SENTENCES))
    (d / "MRPC" / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")  # header only
    return d


def _items(glue_dir, tasks=("rte", "sst2", "cola"), n=10):
    return R.load_items(list(tasks), glue_dir, "validation", n, 0)


def test_recording_never_changes_outputs_and_matches_the_router(tiny, glue):
    model, tok, _ = R.load_model(str(tiny["routed"]), None, None)
    assert model.config.routing_impl == "auto"
    items = _items(glue)[:6]
    enc = tok([it.text for it in items], padding=True, return_tensors="pt")
    # an independent view of the routing: capture each routed FFN's input and route it here
    seen = {}
    mlps = model.model.routed_mlps()
    handles = [
        m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
        for i, m in mlps.items()
    ]  # noqa: E501
    with torch.inference_mode():
        plain = model(**enc).logits
        with R.RoutingRecorder(model) as rec:
            rec.set_attention_mask(enc["attention_mask"])
            hooked = model(**enc).logits
            rec.check_batch()
        after = model(**enc).logits
    for h in handles:
        h.remove()
    assert torch.equal(plain, hooked) and torch.equal(plain, after)
    assert model.config.routing_impl == "auto"
    assert all(not m.router._forward_hooks for m in mlps.values())
    keep = enc["attention_mask"].reshape(-1).bool()
    assert sorted(rec.result()) == [1, 2]
    for i, sel in rec.result().items():
        x = seen[i].reshape(-1, seen[i].shape[-1])
        expected = (x.float() @ mlps[i].router.centroids.float().T).topk(2, dim=-1).indices[keep]
        np.testing.assert_array_equal(sel, expected.numpy())
        assert sel.shape == (int(keep.sum()), 2)


def test_record_routing_drops_padding_and_batching_does_not_matter(tiny, glue):
    model, tok, _ = R.load_model(str(tiny["routed"]), None, None)
    items = _items(glue)
    one = R.record_routing(model, tok, items, batch_size=1)
    many = R.record_routing(model, tok, items, batch_size=7)
    lengths = [len(tok(it.text)["input_ids"]) for it in items]
    assert one.token_example.size == sum(lengths) == many.token_example.size
    assert np.bincount(many.token_example, minlength=len(items)).tolist() == lengths
    for i in (1, 2):
        for e in range(len(items)):  # same tokens, same choices, whichever batch (and padding) they ran in
            np.testing.assert_array_equal(
                one.selections[i][one.token_example == e], many.selections[i][many.token_example == e]
            )
    # "text" tokens are the GLUE texts, not the field names: for a CoLA row "Sentence: " is 10 characters
    e = next(j for j, it in enumerate(items) if it.task == "cola")
    flags = many.token_is_text[many.token_example == e]
    assert not flags[:10].any() and flags[10:].all()
    assert many.n_truncated == 0
    short = R.record_routing(model, tok, items, batch_size=4, max_length=20)
    assert short.n_truncated == sum(n > 20 for n in lengths)


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_writes_the_report(tiny, glue, tmp_path, capsys):
    out_dir = tmp_path / "res"
    rc, out, err = _run(
        [
            "--checkpoint",
            tiny["routed"],
            "--tasks",
            "rte",
            "sst2",
            "cola",
            "--data-dir",
            glue,
            "--max-examples",
            8,
            "--n-permutations",
            50,
            "--out",
            out_dir,
            "--no-progress",
            "--save-selections",
        ],
        capsys,
    )
    assert rc == 0, err
    assert "wrote" in out
    r = json.loads((out_dir / "routing.json").read_text())
    assert r["format_version"] == FORMAT_VERSION
    assert r["checkpoint"]["num_experts"] == 5 and r["checkpoint"]["top_k"] == 2
    assert r["checkpoint"]["routed_layers"] == [1, 2] and r["adapter"] is None
    assert r["n_examples"] == 24 and {t: v["examples"] for t, v in r["tasks"].items()} == {
        "rte": 8,
        "sst2": 8,
        "cola": 8,
    }
    assert r["n_tokens"] == sum(v["tokens"] for v in r["tasks"].values()) > r["n_text_tokens"] > 0
    assert r["command"].startswith("python -m finetune.analysis --checkpoint")
    assert r["date"] and r["hardware"]["cpu_cores"] >= 1 and r["hardware"]["device"] == "cpu"
    for i in ("1", "2"):
        s = r["layers"][i]
        assert sum(s["load"]) == pytest.approx(1.0) and s["tokens"] == r["n_tokens"]
        assert s["entropy_floor"] - 1e-9 <= s["normalised_entropy"] <= 1.0
    assert sorted(r["coselection"]) == ["1", "2"]  # first and last routed layer
    c = np.array(r["coselection"]["1"]["counts"])
    np.testing.assert_allclose(np.diag(c), np.array(r["layers"]["1"]["token_share"]) * r["n_tokens"], rtol=1e-5)
    assert c.sum() == r["n_tokens"] * 2 * 2  # each token contributes k*k cells
    for scope in ("all", "text"):
        spec = r["specialisation"][scope]
        assert 1 / 51 <= spec["by_task"]["p_value"] <= 1 and spec["by_task"]["groups"] == ["rte", "sst2", "cola"]
        assert spec["by_label"]["tasks"] == ["rte", "sst2", "cola"] and spec["by_label"]["top_clusters"]
        per = spec["by_label"]["per_task"]
        assert sorted(per) == ["cola", "rte", "sst2"] and 1 / 51 <= per["sst2"]["p_value"] <= 1
        assert sum(per["sst2"]["examples_per_label"].values()) == 8
    row = r["specialisation"]["all"]["by_label"]["top_clusters"][0]
    assert set(row["token_share"]) <= {
        "entailment",
        "not_entailment",
        "negative",
        "positive",
        "unacceptable",
        "acceptable",
    }
    summary = (out_dir / "summary.md").read_text()
    for name in r["figures"].values():
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 5000
        assert f"]({name})" in summary
    assert r["command"] in summary
    sel = np.load(out_dir / "selections.npz")
    assert sel["layer_1"].shape == (r["n_tokens"], 2)
    # a second run into the same folder needs --overwrite
    rc, _, err = _run(["--checkpoint", tiny["routed"], "--tasks", "rte", "--data-dir", glue, "--out", out_dir], capsys)
    assert rc != 0 and "--overwrite" in err


def test_cli_with_adapter_reports_the_change(tiny, glue, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from finetune import adapters, models

    ckpt = str(tiny["routed"])
    tok = models.load_tokenizer(ckpt)
    base = models.load_classifier(ckpt, 2, tok)
    info = {"base": ckpt, "base_fingerprint": models.base_fingerprint(base), "num_labels": 2, "task": "sst2"}
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="SEQ_CLS")
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # a trained-looking adapter that moves the hidden states
    adapters.save_adapter(peft_model, tmp_path / "adapter", info)

    common = [
        "--tasks",
        "sst2",
        "cola",
        "--data-dir",
        glue,
        "--max-examples",
        10,
        "--n-permutations",
        50,
        "--no-progress",
    ]
    rc, _, err = _run(["--adapter", tmp_path / "adapter", "--out", tmp_path / "ft", *common], capsys)
    assert rc == 0, err
    rc, _, err = _run(["--checkpoint", ckpt, "--out", tmp_path / "conv", *common], capsys)
    assert rc == 0, err
    ft = json.loads((tmp_path / "ft" / "routing.json").read_text())
    conv = json.loads((tmp_path / "conv" / "routing.json").read_text())
    assert ft["adapter"]["info"]["task"] == "sst2" and ft["checkpoint"]["path"] == ckpt
    ch = ft["change"]
    # the converted model's side of the comparison is exactly what analysing the checkpoint alone gives
    for i in ("1", "2"):
        assert ch["base_layers"][i]["load"] == conv["layers"][i]["load"]
        assert ft["layers"][i]["load"] != conv["layers"][i]["load"]
        delta = np.array(ft["layers"][i]["load"]) - np.array(conv["layers"][i]["load"])
        np.testing.assert_allclose(ch["delta_load"][int(i) - 1], delta, atol=1e-5)
        assert 0 <= ch["kept_overlap"][i] < 1
    assert ch["tv_total"] > 0 and 0 < ch["p_value"] <= 1
    assert ch["gained"] and ch["lost"] and all(g["delta_load"] > 0 for g in ch["gained"])
    assert (tmp_path / "ft" / "load_change.png").is_file()
    # ... and so are its specialisation tests, beside the fine-tuned model's (which differ)
    for scope in ("all", "text"):
        for test in ("by_task", "by_label"):
            before = ft["specialisation_converted"][scope][test]
            assert before["observed"] == conv["specialisation"][scope][test]["observed"]
            assert before["p_value"] == conv["specialisation"][scope][test]["p_value"]
    assert ft["specialisation"]["all"]["by_task"]["observed"] != conv["specialisation"]["all"]["by_task"]["observed"]
    assert "specialisation_converted" not in conv
    summary = (tmp_path / "ft" / "summary.md").read_text()
    assert "## Change from the converted model" in summary
    lines = summary.splitlines()
    header = lines.index("| test | scope | converted | fine-tuned | ratio |")
    row = next(line for line in lines[header:] if line.startswith("| by task | all |"))
    conv_task, ft_task = conv["specialisation"]["all"]["by_task"], ft["specialisation"]["all"]["by_task"]
    assert f"{conv_task['observed']:.4f}" in row and f"{ft_task['observed']:.4f}" in row


def _bad_inputs(tiny, glue, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "routing.json").write_text("{}")
    ok = ["--checkpoint", tiny["routed"], "--data-dir", glue, "--out", tmp_path / "o"]
    return {
        "plain llama folder": (
            ["--checkpoint", tiny["dense"], "--data-dir", glue, "--out", tmp_path / "o"],
            "'llama' checkpoint, not a routed one",
        ),
        "stand-in reference": (
            ["--checkpoint", "stand-in", "--data-dir", glue, "--out", tmp_path / "o"],
            "convert it first",
        ),
        "missing folder": (["--checkpoint", tmp_path / "nope", "--out", tmp_path / "o"], "no routed checkpoint folder"),
        "unknown task": ([*ok, "--tasks", "rte", "imdb"], "unknown task 'imdb'; known tasks: rte, mrpc, cola, sst2"),
        "zero examples": ([*ok, "--max-examples", 0], "--max-examples must be >= 1"),
        "empty selection": ([*ok, "--tasks", "mrpc"], "mrpc validation has no rows"),
        "layer not routed": ([*ok, "--coselection-layers", 0], "not routed layers"),
        "k = N": ([*ok, "--top-k", 5], "no routing to analyze"),
        "existing output": (["--checkpoint", tiny["routed"], "--data-dir", glue, "--out", existing], "--overwrite"),
        "not an adapter": (["--adapter", tmp_path, "--out", tmp_path / "o"], "not a routed-llama adapter folder"),
        "no checkpoint": (["--out", tmp_path / "o"], "pass --checkpoint"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "plain llama folder",
        "stand-in reference",
        "missing folder",
        "unknown task",
        "zero examples",
        "empty selection",
        "layer not routed",
        "k = N",
        "existing output",
        "not an adapter",
        "no checkpoint",
    ],
)
def test_bad_input_is_one_clear_line_before_loading(case, tiny, glue, tmp_path, capsys, monkeypatch):
    def no_heavy_work(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(R, "load_model", no_heavy_work)
    argv, message = _bad_inputs(tiny, glue, tmp_path)[case]
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"{cli.PROG}: error: ") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_module_entry_point_fails_cleanly(tiny, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.analysis", "--checkpoint", str(tiny["dense"]), "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a routed one" in proc.stderr and "Traceback" not in proc.stderr


def test_settings_can_be_wired_into_another_cli(tiny, glue, tmp_path, capsys):
    from routed_llama.cli import parse_settings

    settings = parse_settings(
        AnalyzeSettings,
        [
            "--checkpoint",
            str(tiny["routed"]),
            "--tasks",
            "sst2",
            "cola",
            "--data-dir",
            str(glue),
            "--max-examples",
            "4",
            "--n-permutations",
            "0",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ],
        prog="python -m finetune analyze",
    )
    report = analyze(settings, log=lambda line: None)
    r = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert r == report
    assert r["specialisation"]["all"]["by_task"]["p_value"] is None  # no permutations asked for
    assert r["n_examples"] == 8


def test_a_run_that_fails_while_writing_keeps_the_old_report(tiny, glue, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    argv = ["--checkpoint", tiny["routed"], "--tasks", "sst2", "cola", "--data-dir", glue, "--max-examples", 3]
    rc, _, err = _run([*argv, "--n-permutations", 0, "--out", out, "--no-progress"], capsys)
    assert rc == 0, err
    before = (out / "routing.json").read_text()
    assert "NaN" not in before and "Infinity" not in before  # strict JSON

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "summary_markdown", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main([str(a) for a in [*argv, "--n-permutations", 5, "--out", out, "--no-progress", "--overwrite"]])
    assert (out / "routing.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary folder left beside it


def test_real_glue_rows_are_read_through_finetune_tasks(glue_dir):
    items = R.load_items(["rte", "sst2", "cola"], glue_dir, "validation", 5, 0)
    assert [it.task for it in items] == ["rte"] * 5 + ["sst2"] * 5 + ["cola"] * 5
    for it in items:
        assert it.text_spans is not None
        assert all(0 < a < b <= len(it.text) for a, b in it.text_spans)
    assert {it.label for it in items} <= {0, 1}
    assert items[0].text.startswith("Premise: ") and "\nHypothesis: " in items[0].text


def test_unavailable_device_is_refused_before_loading(tiny, glue, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(R, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["--checkpoint", tiny["routed"], "--data-dir", glue, "--out", tmp_path / "o"]
    rc, _, err = _run([*argv, "--device", "cuda"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no CUDA device" in err
    rc, _, err = _run([*argv, "--device", "gpu0"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "not a torch device" in err


def test_the_finetune_command_line_offers_analyze(tiny, tmp_path, capsys):
    finetune_cli = pytest.importorskip("finetune.cli")
    try:
        rc = finetune_cli.main(["analyze", "--help"])
    except SystemExit as exc:  # argparse exits after printing the help
        rc = exc.code
    assert rc == 0 and "--coselection-layers" in capsys.readouterr().out
    rc = finetune_cli.main(["analyze", "--checkpoint", str(tiny["dense"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not a routed one" in err
