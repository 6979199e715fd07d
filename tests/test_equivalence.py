"""k = N computes exactly what the dense model computes: routed logits equal stock Llama's (fp32, max |diff| <= 1e-5
on tiny models; see `assert_standin_equal` for the 30-layer stand-in)."""

import copy

import pytest
import torch
from conftest import STANDIN_N, tiny_llama_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from transformers.initialization import no_init_weights

from convert import ConvertSettings, convert
from modeling_routed_llama import RoutedLlamaForCausalLM, RoutedLlamaForSequenceClassification, RoutedLlamaMLP

TOL = 1e-5
# initializer_range 0.1 (not 0.02) so that the FFNs move the residual stream and a wrong FFN shows in the logits
CASES = {
    "gqa-N4-uneven": (dict(initializer_range=0.1), 4),  # 150 = 38 + 38 + 37 + 37
    "tied-embeddings": (dict(initializer_range=0.1, tie_word_embeddings=True), 5),
    "mha-N7-uneven": (dict(initializer_range=0.1, num_key_value_heads=4), 7),
    "mlp-and-attention-bias": (dict(initializer_range=0.1, mlp_bias=True, attention_bias=True), 6),
    "single-cluster": (dict(initializer_range=0.1), 1),
}


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def token_batch(vocab, batch=3, length=11, seed=0):
    """Random ids avoiding the pad id 0, (B, T), and a right-padded attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    ids[1, -4:] = 0  # row 1 is 4 tokens shorter, padded with pad_token_id = 0
    mask[1, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_causal_lm_k_equals_n_matches_stock_llama(case, route_dense):
    """RoutedLlamaForCausalLM (k = N) built by route_dense_model gives stock LlamaForCausalLM's logits."""
    overrides, n = CASES[case]
    dense = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    routed = route_dense(dense, n)  # k = N
    assert isinstance(routed, RoutedLlamaForCausalLM)
    assert routed.config.num_experts_per_tok == n and len(routed.model.routed_mlps()) == 3
    ids, mask = token_batch(dense.config.vocab_size)
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        out = routed(input_ids=ids, attention_mask=mask).logits
        assert max_diff(out, ref) <= TOL
        if n > 1:  # negative control: the same routed model with k = 1 is measurably different
            routed.model.set_top_k(1)
            assert max_diff(routed(input_ids=ids, attention_mask=mask).logits, ref) > 1e-3
    if dense.config.tie_word_embeddings:
        assert routed.lm_head.weight.data_ptr() == routed.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_classification_k_equals_n_matches_stock_llama(case, route_dense):
    """RoutedLlamaForSequenceClassification (k = N) gives stock LlamaForSequenceClassification's logits (same score)."""
    overrides, n = CASES[case]
    dense = LlamaForSequenceClassification(tiny_llama_config(num_labels=3, **overrides)).eval()
    routed = route_dense(dense, n, head="sequence-classification", num_labels=3)
    assert isinstance(routed, RoutedLlamaForSequenceClassification)
    assert torch.equal(routed.score.weight, dense.score.weight)
    ids, mask = token_batch(dense.config.vocab_size)
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=mask).logits  # (B, 3): pooled at each row's last real token
        out = routed(input_ids=ids, attention_mask=mask).logits
    assert out.shape == ref.shape == (3, 3)
    assert max_diff(out, ref) <= TOL


@pytest.mark.parametrize("router", ["centroid", "activation"])
def test_forced_mask_and_sparse_paths_with_k_equal_n_match_dense_ffn(router, route_dense):
    """With k = N, forward_mask and forward_sparse (called directly, bypassing the k = N shortcut) equal the dense FFN
    of the original, unpermuted weights."""
    dense = LlamaForCausalLM(tiny_llama_config(initializer_range=0.1)).eval()
    routed = route_dense(dense, 4, router=router)
    x = torch.randn(2, 9, 64)  # (B, T, H)
    flat = x.reshape(-1, 64)  # (M, H), M = B * T
    with torch.no_grad():
        for i, mlp in routed.model.routed_mlps().items():
            assert isinstance(mlp, RoutedLlamaMLP) and mlp.router.top_k == 4
            ref = dense.model.layers[i].mlp(x).reshape(-1, 64)  # (M, H)
            assert max_diff(mlp.forward_mask(flat), ref) <= TOL
            assert max_diff(mlp.forward_sparse(flat), ref) <= TOL


def test_tied_checkpoint_through_converter_files(tmp_path):
    """`convert` on a saved tied-embedding Llama, loaded back with num_experts_per_tok = N, keeps the tie and
    gives the stock logits."""
    dense = LlamaForCausalLM(tiny_llama_config(initializer_range=0.1, tie_word_embeddings=True)).eval()
    dense.save_pretrained(tmp_path / "dense")
    settings = ConvertSettings(str(tmp_path / "dense"), tmp_path / "routed", num_clusters=6, top_k=3, progress=False)
    out = convert(settings)
    routed = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, num_experts_per_tok=6).eval()
    assert routed.lm_head.weight.data_ptr() == routed.model.embed_tokens.weight.data_ptr()
    ids, mask = token_batch(dense.config.vocab_size)
    with torch.no_grad():
        assert (
            max_diff(
                routed(input_ids=ids, attention_mask=mask).logits, dense(input_ids=ids, attention_mask=mask).logits
            )
            <= TOL
        )


# ---------------------------------------------------------------------------------------------------------------
# The real stand-in (SmolLM2-135M-Instruct, 30 layers, I = 1536, N = 32)
# ---------------------------------------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Mixture-of-experts models route each token to a few experts, which"]


@pytest.fixture(scope="module")
def standin_batch(standin_converted):
    """Two real prompts, right-padded, from the converted folder's tokenizer: (ids (2, T), mask (2, T))."""
    tok = AutoTokenizer.from_pretrained(standin_converted, trust_remote_code=True)
    tok.padding_side = "right"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert enc["attention_mask"][0].sum() < enc["attention_mask"][1].sum()  # one row really is padded
    return enc["input_ids"], enc["attention_mask"]


def assert_standin_equal(out32, ref32, out64, ref64):
    """fp64: equal within 1e-5 (in practice exactly). fp32: a 30-layer model with logits up to ~40 has rounding noise
    above 1e-5 from summation order alone (reordering the stock model's FFN neurons at random, with no routing at all,
    moves its fp32 logits by ~6e-5), so fp32 is held to 1e-5 relative to the largest logit."""
    assert max_diff(out64, ref64) <= TOL
    assert max_diff(out32, ref32) <= TOL * ref32.abs().max().item()


@pytest.mark.slow
def test_standin_causal_lm_k_equals_n_matches_stock_gguf(standin_converted, standin_dense, standin_batch):
    """The converted stand-in loaded with num_experts_per_tok = N gives the stock GGUF model's logits (fp32, fp64)."""
    ids, mask = standin_batch
    routed = AutoModelForCausalLM.from_pretrained(
        standin_converted, trust_remote_code=True, num_experts_per_tok=STANDIN_N, dtype=torch.float32
    ).eval()
    assert routed.config.num_experts_per_tok == STANDIN_N and len(routed.model.routed_mlps()) == 30
    stock = copy.deepcopy(standin_dense)  # the session's model stays fp32
    with torch.no_grad():
        ref32 = stock(input_ids=ids, attention_mask=mask).logits  # (2, T, V)
        out32 = routed(input_ids=ids, attention_mask=mask).logits
        ref64 = stock.double()(input_ids=ids, attention_mask=mask).logits
        out64 = routed.double()(input_ids=ids, attention_mask=mask).logits
    assert_standin_equal(out32, ref32, out64, ref64)
    # negative control: routed (k = N/2) the logits do move
    routed.float().model.set_top_k(STANDIN_N // 2)
    with torch.no_grad():
        assert max_diff(routed(input_ids=ids, attention_mask=mask).logits, ref32) > 1e-2


@pytest.mark.slow
def test_standin_sequence_classification_k_equals_n_matches_stock(standin_converted, standin_dense, standin_batch):
    """The converted stand-in as a sequence classifier (k = N) gives stock LlamaForSequenceClassification's logits
    when both carry the same `score` weights (fp32 and fp64)."""
    ids, mask = standin_batch
    cfg = standin_dense.config.to_dict()
    cfg.update(num_labels=3, architectures=None)
    cfg.pop("quantization_config", None)
    stock_cfg = type(standin_dense.config).from_dict(cfg)
    with no_init_weights():  # every weight but `score` is loaded below; skip initialising 135M parameters
        stock = LlamaForSequenceClassification(stock_cfg).eval()
    torch.nn.init.normal_(stock.score.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    missing, unexpected = stock.load_state_dict(standin_dense.state_dict(), strict=False)
    assert missing == ["score.weight"] and unexpected == ["lm_head.weight"]
    routed = AutoModelForSequenceClassification.from_pretrained(
        standin_converted, trust_remote_code=True, num_experts_per_tok=STANDIN_N, num_labels=3, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        routed.score.weight.copy_(stock.score.weight)
        ref32 = stock(input_ids=ids, attention_mask=mask).logits  # (2, 3)
        out32 = routed(input_ids=ids, attention_mask=mask).logits
        ref64 = stock.double()(input_ids=ids, attention_mask=mask).logits
        out64 = routed.double()(input_ids=ids, attention_mask=mask).logits
    assert out32.shape == (2, 3)
    assert_standin_equal(out32, ref32, out64, ref64)
