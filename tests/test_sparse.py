"""The sparse implementations compute what the "mask" reference computes: grouped PyTorch (`forward_sparse`), at the
FFN and the model level, and the Triton kernels under Triton's CPU interpreter."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, STANDIN_K, STANDIN_N, tiny_llama_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import modeling_routed_llama as mrl
from configuration_routed_llama import RoutedLlamaConfig

TOL = 1e-5
H = 48  # hidden size; the intermediate size is OFFSETS[-1] = 100
OFFSETS = [0, 7, 30, 31, 55, 80, 100]  # N = 6 uneven clusters: 7, 23, 1, 24, 25, 20 neurons
SHAPES = [(1, 1), (1, 7), (2, 5), (3, 1), (4, 3), (5, 16), (6, 4), (7, 2), (8, 1), (8, 9)]  # (batch, sequence length)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def routed_ffn(router, k, bias=False, offsets=OFFSETS, seed=0):
    """One RoutedLlamaMLP with random weights of trained-like scale and centroids refreshed from them."""
    n = len(offsets) - 1
    cfg = RoutedLlamaConfig(hidden_size=H, intermediate_size=offsets[-1], num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=32, num_experts=n, num_experts_per_tok=k,
                            expert_offsets=[offsets], router=router, mlp_bias=bias)  # fmt: skip
    mlp = mrl.RoutedLlamaMLP(cfg, 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mlp.named_parameters():
            fan_in = p.shape[-1] if p.dim() == 2 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    mlp.refresh_router()
    return mlp


def run_with_grads(mlp, path, x, grad_out):
    """Output and gradients (input, gate, up, down, and biases) of one path for the upstream gradient grad_out."""
    mlp.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = getattr(mlp, path)(x)  # (M, H)
    (out * grad_out).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad.clone() for n, p in mlp.named_parameters()})
    return out.detach(), grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("router", ["centroid", "activation"])
def test_forward_sparse_equals_forward_mask(router, k, bias, monkeypatch):
    """forward_sparse gives forward_mask's outputs and gradients (w.r.t. the input and every weight) within 1e-5, for
    uneven clusters, batch sizes 1-8 and several sequence lengths."""
    mlp = routed_ffn(router, k, bias)
    for b, t in SHAPES:
        x = torch.randn(b, t, H).reshape(-1, H)  # (B, T, H) -> (M, H), M = B * T as in RoutedLlamaMLP.forward
        grad_out = torch.randn(b * t, H)
        ref, ref_grads = run_with_grads(mlp, "forward_mask", x, grad_out)
        with monkeypatch.context() as mp:  # the sparse path must not fall back to the reference
            mp.setattr(mlp, "forward_mask", lambda *_: pytest.fail("forward_sparse fell back to forward_mask"))
            out, grads = run_with_grads(mlp, "forward_sparse", x, grad_out)
        assert max_diff(out, ref) <= TOL, (b, t)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:  # weight gradients sum over up to 80 tokens: 1e-5 absolute plus 1e-5 relative
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=TOL, atol=TOL, msg=f"{(b, t, name)}")
    # the gradients are not trivially zero: dropped clusters get none, kept ones do
    assert ref_grads["gate_proj.weight"].abs().sum() > 0 and ref_grads["x"].abs().sum() > 0


def test_forward_sparse_differs_from_dense_ffn():
    """Negative control for the comparison above: with k < N both paths are far from the dense FFN."""
    mlp = routed_ffn("centroid", 2)
    x = torch.randn(12, H)
    with torch.no_grad():
        dense = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert max_diff(mlp.forward_sparse(x), dense) > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Model level: prefill and cached decode, "mask" vs "sparse"
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def count_sparse_calls(monkeypatch):
    """Counts RoutedLlamaMLP.forward_sparse calls (of the repository's class), so a test can show which path ran."""
    calls = []
    original = mrl.RoutedLlamaMLP.forward_sparse

    def spy(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(mrl.RoutedLlamaMLP, "forward_sparse", spy)
    return calls


def prefill_and_decode(model, ids, next_tokens):
    """Logits of a prefill of ids (B, T) with the KV cache, then one cached decode step per column of next_tokens."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits = [out.logits]  # (B, T, V)
        for j in range(next_tokens.shape[1]):
            out = model(next_tokens[:, j : j + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)  # (B, 1, V)
    return logits


@pytest.mark.parametrize("router", ["centroid", "activation"])
def test_model_prefill_and_cached_decode_sparse_equals_mask(router, route_dense, count_sparse_calls):
    """A routed model gives the same logits with routing_impl 'sparse' and 'mask', in prefill and in cached decode
    steps; the config field is read at every forward."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config(initializer_range=0.1)).eval()
    model = route_dense(dense, 5, 2, router=router)
    ids = torch.randint(1, 128, (3, 9))  # (B, T)
    next_tokens = torch.randint(1, 128, (3, 4))  # teacher-forced decode inputs, (B, steps)

    model.config.routing_impl = "mask"
    ref = prefill_and_decode(model, ids, next_tokens)
    assert count_sparse_calls == []
    model.config.routing_impl = "sparse"
    out = prefill_and_decode(model, ids, next_tokens)
    assert count_sparse_calls[:3] == [27, 27, 27]  # prefill: M = B * T in each of the 3 layers
    assert count_sparse_calls[3:] == [3] * 3 * 4  # decode: M = B

    for step, (a, b) in enumerate(zip(out, ref)):
        assert max_diff(a, b) <= TOL, step
    with torch.no_grad():
        assert max_diff(ref[0], dense(ids).logits) > 1e-2  # routing is on


@pytest.mark.slow
def test_standin_generate_mask_and_sparse_same_tokens(standin_converted, count_sparse_calls):
    """On the converted stand-in (N = 32, k = 16) greedy generate() gives identical tokens with 'mask' and 'sparse'."""
    model = AutoModelForCausalLM.from_pretrained(standin_converted, trust_remote_code=True, dtype=torch.float32).eval()
    assert model.config.num_experts_per_tok == STANDIN_K < STANDIN_N
    tok = AutoTokenizer.from_pretrained(standin_converted, trust_remote_code=True)
    chat = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    # the remote-code class is a copy of the repository's; count its sparse calls the same way
    remote_cls = type(model.model.layers[0].mlp)
    calls = []
    original = remote_cls.forward_sparse

    def spy(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    remote_cls.forward_sparse = spy
    try:
        out = {}
        for impl in ("mask", "sparse"):
            model.config.routing_impl = impl
            with torch.no_grad():
                out[impl] = model.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16)
            assert (len(calls) > 0) == (impl == "sparse")
    finally:
        remote_cls.forward_sparse = original
    assert out["mask"].shape[1] == ids.shape[1] + 16
    assert torch.equal(out["sparse"], out["mask"])
    assert len(calls) == 30 * 16  # 30 routed layers, prefill + 15 cached decode steps
    assert all(m == 1 for m in calls[30:])  # decode steps route one token at a time


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels under the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import torch
    import modeling_routed_llama as mrl
    from test_sparse import routed_ffn

    assert mrl.triton is not None
    tiles = dict(BLOCK_R=16, BLOCK_K=32, BLOCK_H=16, BLOCK_C=16, SPLIT=3, warps_gu=4, warps_d=4)
    results = []
    for offsets in ([0, 7, 30, 31, 55, 80, 100], [0, 24, 48, 72, 96]):  # uneven N = 6, even N = 4
        n = len(offsets) - 1
        for k in sorted({1, 3, n}):
            mlp = routed_ffn("centroid", k, offsets=offsets, seed=k)
            for m in (1, 3, 8, 16):
                x = torch.randn(m, 48)  # (M, H) on the CPU: only the interpreter can run these kernels
                with torch.no_grad():
                    ref = mlp.forward_mask(x)
                    out = mrl.triton_routed_ffn(
                        x, mlp.router.centroids, mlp.router.expert_offsets, mlp.gate_proj.weight, mlp.up_proj.weight,
                        mlp.down_proj.weight, k, mlp._max_cluster_size, tiles=tiles,
                    )
                results.append(dict(n=n, k=k, m=m, shape=list(out.shape), dtype=str(out.dtype),
                                    diff=(out - ref).abs().max().item(), ref_scale=ref.abs().max().item()))
    print("RESULTS " + json.dumps(results))
    """
)


def test_triton_kernels_equal_forward_mask_in_interpreter(tmp_path):
    """triton_routed_ffn (fp32, Triton CPU interpreter) equals forward_mask within 1e-5 for uneven and even clusters,
    k in {1, 3, N} and M in {1, 3, 8, 16}. Runs in a subprocess: TRITON_INTERPRET must be set before triton loads."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    script = tmp_path / "triton_check.py"
    script.write_text(TRITON_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(ROOT), str(ROOT / "tests")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS ") :])
    assert len(results) == 2 * 3 * 4  # N = 6: k in {1, 3, 6}; N = 4: k in {1, 3, 4}; 4 values of M each
    for r in results:
        assert r["shape"] == [r["m"], 48] and r["dtype"] == "torch.float32"
        assert r["ref_scale"] > 0.1
        assert r["diff"] <= TOL, r
