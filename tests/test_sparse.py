"""The sparse implementations compute what the "mask" reference computes: grouped PyTorch (`forward_sparse`), at the
FFN and the model level, and the Triton kernels under Triton's CPU interpreter (every multiply mode, both routers,
both reductions, fp32 and bf16, uneven clusters, N not a power of two, 1-8 tokens). Also: which implementation
"auto" and "sparse" pick, and `fast_generate` against `generate`."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, STANDIN_K, STANDIN_N, TINY_N, tiny_llama_config
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


def test_mask_broadcast_for_equal_clusters_is_bit_exact():
    """With equal clusters forward_mask multiplies per cluster by broadcasting instead of building an (M, I) mask:
    outputs and gradients are bit for bit those of the general path."""
    mlp = routed_ffn("centroid", 2, offsets=[0, 25, 50, 75, 100])
    assert mlp.cluster_size == 25 and routed_ffn("centroid", 2).cluster_size is None
    x, grad_out = torch.randn(12, H), torch.randn(12, H)
    fast, fast_grads = run_with_grads(mlp, "forward_mask", x, grad_out)
    mlp.cluster_size = None
    general, general_grads = run_with_grads(mlp, "forward_mask", x, grad_out)
    assert torch.equal(fast, general)
    assert all(torch.equal(fast_grads[k], general_grads[k]) for k in general_grads)


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
# Triton kernels under the CPU interpreter (a subprocess: TRITON_INTERPRET must be set before triton loads)
# ---------------------------------------------------------------------------------------------------------------

# Tolerances, as max |out - ref| / max |ref|. fp32: the kernels sum in another order than cuBLAS/CPU matmuls. bf16: the
# kernels keep h and the sums in fp32 and round once, against an fp32 reference on the same bf16-rounded weights.
TRITON_TOL = {"float32": 1e-5, "bfloat16": 1e-2}

TRITON_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import torch
    import modeling_routed_llama as mrl
    from test_sparse import routed_ffn

    assert mrl.triton is not None and mrl.TRITON_INTERPRET
    # several tiles with masked edges (H = 48, I = 100), and a split of down over column tiles
    small = dict(BLOCK_R=32, BLOCK_K=32, BLOCK_H=32, BLOCK_C=32, SPLIT=2)
    # (mode, tokens, reduce, k): every mode, 1-8 tokens, every reduction
    cases = [("gemv1", 1, "split", 3), ("gemv1", 1, "atomic", 1), ("gemv", 2, "split", 3), ("gemv", 4, "atomic", 3),
             ("dot", 5, "split", 3), ("dot", 8, "atomic", 3), ("dot", 8, "split", 1), ("gemv1", 1, "last", 3),
             ("gemv", 3, "last", 1), ("dot", 6, "last", 3)]
    # and the shipped default tiles of the two modes "auto" runs (TRITON_TILES, tuned on the H200)
    defaults = [("gemv1", 1, "default", 3), ("dot", 4, "default", 3)]
    results = []
    for router in ("centroid", "activation"):
        for dtype in (torch.float32, torch.bfloat16):
            mlp = routed_ffn(router, 3).to(dtype)  # N = 6 uneven clusters
            ref_mlp = routed_ffn(router, 3).to(dtype).float()  # the same rounded weights, computed in fp32
            for mode, m, reduce, k in cases + defaults:
                tiles = {"mode": mode} if reduce == "default" else {**small, "mode": mode, "reduce": reduce}
                for layer in (mlp, ref_mlp):
                    layer.router.top_k = k
                x = torch.randn(m, 48).to(dtype)  # (M, H)
                kw = dict(w_gate=mlp.gate_proj.weight, w_up=mlp.up_proj.weight, w_down=mlp.down_proj.weight,
                          row_cluster=mlp.router.row_cluster(100), top_k=k, offsets=mlp.router.expert_offsets,
                          centroids=mlp.router.centroids if router == "centroid" else None)
                with torch.no_grad():
                    ref = ref_mlp.forward_mask(x.float())
                    out = mrl.triton_routed_ffn(x, **kw, tiles=tiles)
                    # "last" gives the bits of "split" (the same sums in the same order, in down's last program)
                    plain = mrl.triton_routed_ffn(x, **kw, tiles={**tiles, "reduce": "split"})
                counters = mrl._COUNTERS.get(x.device)
                results.append(dict(router=router, dtype=str(dtype).split(".")[1], mode=mode, m=m, k=k, reduce=reduce,
                                    shape=list(out.shape), out_dtype=str(out.dtype),
                                    err=((out.float() - ref).abs().max() / ref.abs().max()).item(),
                                    same_as_plain=torch.equal(out, plain),
                                    counters_zero=counters is None or not counters.any().item()))
    print("KERNELS " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Runs TRITON_SCRIPT then MODEL_SCRIPT with TRITON_INTERPRET=1 in one fresh interpreter (it must be set before
    triton loads); returns the JSON each printed, under "KERNELS" and "MODEL"."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    tmp = tmp_path_factory.mktemp("triton")
    path = tmp / "triton_check.py"
    path.write_text(TRITON_SCRIPT + MODEL_SCRIPT)
    proc = subprocess.run([sys.executable, str(path), str(ROOT), str(ROOT / "tests")], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {}
    for line in proc.stdout.splitlines():
        label, _, payload = line.partition(" ")
        if label in ("KERNELS", "MODEL"):
            found[label] = json.loads(payload)
    return found


def test_triton_kernels_equal_forward_mask_in_interpreter(interpreted):
    """triton_routed_ffn equals forward_mask for N = 6 uneven clusters (sizes 1 to 25), H = 48 and I = 100 (not
    multiples of the tiles), both routers, fp32 and bf16, every multiply mode with 1-8 tokens, both reductions and
    k in {1, 3}, and the default tiles of "gemv1" and "dot"; tolerances in TRITON_TOL. The reduction "last" (the
    default) gives the same bits as "split" and leaves its arrival counters zeroed."""
    results = interpreted["KERNELS"]
    assert len(results) == 2 * 2 * (10 + 2)
    for r in results:
        assert r["shape"] == [r["m"], 48] and r["out_dtype"] == f"torch.{r['dtype']}"
        assert r["err"] <= TRITON_TOL[r["dtype"]], r
        assert r["counters_zero"], r
        assert r["same_as_plain"] or r["reduce"] == "atomic", r


MODEL_SCRIPT = textwrap.dedent(
    """
    from conftest import routing_spec, tiny_llama_config
    from routed_llama.surgery import route_dense_model
    from transformers import LlamaForCausalLM
    import modeling_routed_llama as mrl

    for tiles in mrl.TRITON_TILES.values():  # fewer, larger tiles: the interpreter's cost is per program
        tiles.update(BLOCK_R=32, BLOCK_K=64, BLOCK_H=64, BLOCK_C=128)
    calls = []
    original = mrl.triton_routed_ffn
    mrl.triton_routed_ffn = lambda x, **kw: calls.append(x.shape[0]) or original(x, **kw)
    results = []
    for router in ("centroid",):  # the kernels' activation-router path is compared with the reference above
        torch.manual_seed(0)
        dense = LlamaForCausalLM(tiny_llama_config(initializer_range=0.1, intermediate_size=100)).eval()
        model = route_dense_model(dense, routing_spec(dense, 7, 3, router=router), progress=False)[0].eval()
        ids = torch.randint(1, 128, (2, 5))  # (B, T)
        out = {}
        for impl in ("mask", "sparse"):
            model.config.routing_impl = impl
            calls.clear()
            out[impl] = model.fast_generate(ids, max_new_tokens=4, eos_token_id=[]).tolist()
            out[impl + "_calls"] = list(calls)
        # compile=True: the decode step traced whole (fullgraph: no graph break), the kernels as the custom op;
        # aot_eager runs the traced graph without code generation (no C++ compiler needed)
        compile_ = torch.compile
        torch.compile = lambda m, **kw: compile_(m, backend="aot_eager", fullgraph=True, dynamic=False)
        calls.clear()
        out["compiled"] = model.fast_generate(ids, max_new_tokens=4, eos_token_id=[], compile=True).tolist()
        out["compiled_calls"] = list(calls)
        torch.compile = compile_
        results.append(dict(router=router, **out))
    print("MODEL " + json.dumps(results))
    """
)


def test_triton_path_generates_mask_tokens_in_interpreter(interpreted):
    """A tiny routed model (3 layers, N = 7 clusters of I = 100, k = 3) decodes the same greedy tokens with
    routing_impl 'mask' and 'sparse' (whose Triton kernels run the 10-token prefill and the 2-token decode steps),
    with the centroid router."""
    results = interpreted["MODEL"]
    assert [r["router"] for r in results] == ["centroid"]
    for r in results:
        assert r["mask_calls"] == []
        assert r["sparse_calls"] == [10] * 3 + [2] * 3 * 3  # 3 routed layers: prefill (B * T), then 3 decode steps
        assert r["sparse"] == r["mask"], r["router"]
        assert len(r["mask"]) == 2 and len(r["mask"][0]) == 5 + 4


def test_compiled_decode_step_runs_the_kernels_as_one_op_in_interpreter(interpreted):
    """`fast_generate(compile=True)`: the decode step compiles as one graph (fullgraph, no break) in which the Triton
    FFN is the custom op `routed_llama::routed_ffn`; it runs the kernels for every decode step and gives the mask
    path's tokens (the prefill stays eager)."""
    for r in interpreted["MODEL"]:
        assert r["compiled_calls"] == [10] * 3 + [2] * 3 * 3
        assert r["compiled"] == r["mask"]


# ---------------------------------------------------------------------------------------------------------------
# Which implementation runs, and the decode helper
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "impl, tokens, interpret, grad, bias, expected",
    [
        ("auto", 1, False, False, False, "mask"),  # CPU: auto never leaves the reference
        ("auto", 1, True, False, False, "mask"),  # not even where the interpreter could run the kernels
        ("sparse", 1, False, False, False, "sparse"),  # CPU without the interpreter: grouped PyTorch
        ("sparse", 8, True, False, False, "triton"),
        ("sparse", 16, True, False, False, "triton"),
        ("sparse", 17, True, False, False, "prefill"),  # more than TRITON_MAX_TOKENS: the prefill path
        ("sparse", 512, True, False, False, "prefill"),
        ("sparse", 512, False, False, False, "sparse"),  # CPU without the interpreter: grouped PyTorch
        ("sparse", 512, True, True, False, "sparse"),  # gradients (training): grouped PyTorch
        ("sparse", 4, True, True, False, "sparse"),  # gradients: the kernels have no backward
        ("auto", 512, True, False, False, "mask"),  # CPU: no prefill path either (capable GPUs: test_prefill.py)
        ("mask", 512, True, False, False, "mask"),
        ("sparse", 4, True, False, True, "sparse"),  # mlp_bias: the kernels have no bias terms
        ("mask", 1, True, False, False, "mask"),
    ],
)
def test_pick_impl(impl, tokens, interpret, grad, bias, expected, monkeypatch):
    """pick_impl follows its documented rules for routing_impl, token count, gradients and bias."""
    monkeypatch.setattr(mrl, "TRITON_INTERPRET", interpret)
    if mrl.triton is None and expected == "triton":
        pytest.skip("triton is not installed")
    mlp = routed_ffn("centroid", 3, bias=bias)
    mlp.config.routing_impl = impl
    x = torch.randn(tokens, H)
    with torch.set_grad_enabled(grad):
        assert mlp.pick_impl(x) == expected


def test_auto_uses_triton_only_on_cuda():
    """auto_uses_triton is False for CPU tensors of any size (the CUDA rules are checked by benchmarks/check_gpu.py)."""
    assert not mrl.auto_uses_triton(torch.zeros(1, H))
    assert not mrl.auto_uses_triton(torch.zeros(mrl.AUTO_TRITON_MAX_TOKENS + 1, H))


def test_last_reduction_counters_are_made_outside_captures_only(monkeypatch):
    """The "last" reduction's counters: made zeroed on first use and then reused; never made while a CUDA graph is
    captured (the memory would be the graph's): there `_counters` gives None and down takes "split" (same bits)."""
    monkeypatch.setattr(mrl, "_COUNTERS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert mrl._counters(torch.device("cuda", 0)) is None and mrl._COUNTERS == {}
    cpu = mrl._counters(torch.device("cpu"))  # the interpreter's device: no capture there
    assert cpu.dtype == torch.int32 and not cpu.any() and mrl._counters(torch.device("cpu")) is cpu


@pytest.fixture(scope="module")
def tiny_routed_lm():
    """A tiny routed causal LM (3 layers, N = 5, k = 2) built from a random dense Llama, mask path."""
    from routed_llama.surgery import route_dense_model
    from conftest import routing_spec

    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config(initializer_range=0.1)).eval()
    model = route_dense_model(dense, routing_spec(dense, 5, 2), progress=False)[0].eval()
    model.config.routing_impl = "mask"
    return model


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_generate_equals_generate(tiny_routed_lm, batch):
    """fast_generate gives generate's greedy tokens: without EOS, and with an EOS that one row produces early (that row
    continues with the pad token; decoding stops when every row has finished). A second call reuses the step."""
    model = tiny_routed_lm
    ids = torch.randint(1, 128, (batch, 6))
    with torch.no_grad():
        plain = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(model.fast_generate(ids, 12, eos_token_id=[]), plain)
    step = model._greedy_step
    eos = int(plain[0, 6 + 3])  # row 0's 4th new token
    with torch.no_grad():
        stopped = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    model.generation_config.pad_token_id = 0
    assert torch.equal(model.fast_generate(ids, 12, eos_token_id=eos), stopped)
    assert model._greedy_step is step  # same batch and cache length: the cached step was reset and reused
    model.model.set_top_k(3)  # k is part of what the cached step was built for
    with torch.no_grad():
        k3 = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(model.fast_generate(ids, 12, eos_token_id=[]), k3)
    assert model._greedy_step is not step
    model.model.set_top_k(2)


def test_fast_generate_refuses_bad_arguments(tiny_routed_lm):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        tiny_routed_lm.fast_generate(torch.ones(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
        tiny_routed_lm.fast_generate(torch.ones(3, dtype=torch.long), 4)


# ---------------------------------------------------------------------------------------------------------------
# The GPU scripts' CPU-side logic: benchmarks/decode.py and benchmarks/check_gpu.py
# ---------------------------------------------------------------------------------------------------------------


def load_script(name: str):
    """A benchmark script as a module; its folder goes on sys.path as when it runs (check_gpu imports decode)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_benchmark_rows_and_a_failing_arm(tmp_path, monkeypatch):
    """benchmarks/decode.py on the CPU (tiny shape) writes decode.json with every phase and the documented row
    fields, and a PNG; a routed arm that raises is recorded in its row and the run continues."""
    decode = load_script("decode")
    original = decode.DecodeArm.tok_s

    def flaky(self, steps):
        if self.top_k is not None and self.top_k < self.model.config.num_experts:
            raise RuntimeError("boom")
        return original(self, steps)

    monkeypatch.setattr(decode.DecodeArm, "tok_s", flaky)
    argv = ["--device", "cpu", "--shapes", "tiny", "--steps", "2", "--repeats", "2", "--prefill", "8", "--batches", "1",
            "--ratios", "0.5", "1.0", "--ffn-tokens", "1", "--ffn-reps", "1", "--out", str(tmp_path)]  # fmt: skip
    assert decode.main(argv) == 0
    doc = json.loads((tmp_path / "decode.json").read_text())
    assert {"hardware", "date", "command", "rows"} <= doc.keys() and doc["hardware"]["device"] == "cpu"
    rows = doc["rows"]
    assert {r["phase"] for r in rows} == {"ffn", "decode", "prefill", "generate"}
    for r in rows:
        unit = "us" if r["phase"] == "ffn" else "tok_s"
        assert {"model", "batch", "k_over_n", "phase", "impl", "compiled", f"dense_{unit}", f"ideal_{unit}",
                f"routed_{unit}", "speedup", "repeats"} <= r.keys(), r  # fmt: skip
    decode_rows = {r["k_over_n"]: r for r in rows if r["phase"] == "decode"}
    assert decode_rows[0.5]["errors"] == {"routed": "RuntimeError: boom"} and decode_rows[0.5]["speedup"] is None
    assert decode_rows[0.5]["dense_tok_s"] > 0 and decode_rows[0.5]["ideal_tok_s"] > 0  # the other arms still ran
    ok = decode_rows[1.0]
    assert ok["impl"] == "dense (k = N)" and ok["repeats"] == 2 and ok["min"] <= ok["median"] <= ok["max"]
    assert ok["speedup"] == pytest.approx(ok["routed_tok_s"] / ok["dense_tok_s"], rel=1e-2)  # of rounded medians
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_decode_benchmark_keeps_the_rows_of_a_run_stopped_midway(tmp_path, monkeypatch):
    """A run stopped during a model's rows (as by a timeout: here the prefill rows raise out of the process) leaves
    decode.json holding that model's finished rows under "rows_in_progress"."""
    decode = load_script("decode")

    def stop(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(decode, "prefill_rows", stop)
    argv = ["--device", "cpu", "--shapes", "tiny", "--steps", "2", "--repeats", "1", "--prefill", "8", "--batches", "1",
            "--ratios", "0.5", "1.0", "--ffn-tokens", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        decode.main(argv)
    decode.ON_ROW = None
    doc = json.loads((tmp_path / "decode.json").read_text())
    assert doc["rows"] == []
    assert [(r["phase"], r["k_over_n"]) for r in doc["rows_in_progress"]] == [("decode", 0.5), ("decode", 1.0)]


def test_step_peak_counts_what_a_training_step_holds():
    """saved_activations.peak_bytes: the peak of one training step grows with the batch, and exceeds what autograd
    saves for the backward (the step also holds transients and the gradients)."""
    from transformers import LlamaForSequenceClassification

    bench = load_script("saved_activations")
    torch.manual_seed(0)
    model = bench.peft_classifier(LlamaForSequenceClassification(tiny_llama_config(num_labels=2)))
    small, large = torch.randint(3, 128, (2, 8)), torch.randint(3, 128, (8, 32))
    peak_small, peak_large = bench.peak_bytes(model, small), bench.peak_bytes(model, large)
    assert 0 < peak_small < peak_large
    assert peak_large > bench.saved_bytes(model, large)[0]


def test_decode_benchmark_row_arithmetic():
    """make_row: medians per arm, speedup = routed / dense for tok/s and dense / routed for microseconds."""
    decode = load_script("decode")
    values = {"dense": [2.0, 4.0, 6.0], "ideal": [5.0, 5.0, 5.0], "routed": [3.0, 3.0, 9.0]}
    row = decode.make_row({"phase": "decode"}, values)
    assert (row["dense_tok_s"], row["routed_tok_s"], row["speedup"], row["ideal_speedup"]) == (4.0, 3.0, 0.75, 1.25)
    assert (row["min"], row["median"], row["max"], row["repeats"]) == (3.0, 3.0, 9.0, 3)
    values = {"dense": [80.0], "x": [40.0]}
    us = decode.make_row({"phase": "ffn"}, values, routed="x", larger_is_faster=False, unit="us")
    assert us["speedup"] == 2.0 and us["routed_us"] == 40.0 and us["ideal_us"] is None


def test_check_gpu_compare_excludes_near_ties_and_sees_errors():
    check = load_script("check_gpu")
    ref = torch.randn(3, 8)
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 0.5, 0.0], [4.0, 1.0, 2.0, 3.0]])  # row 1: tie at k = 1
    assert check.compare(ref.clone(), ref, scores, k=1) == (0.0, 1)
    bad = ref.clone()
    bad[2] += 1.0
    err, ties = check.compare(bad, ref, scores, k=1)
    assert err > 0.1 and ties == 1
    bad_tie_row = ref.clone()
    bad_tie_row[1] += 1.0  # a token at a near tie may route differently: not counted
    assert check.compare(bad_tie_row, ref, scores, k=1)[0] == 0.0


def test_check_gpu_on_cpu_records_and_fails_on_a_raising_check(tmp_path, monkeypatch):
    """check_gpu.py --device cpu --quick writes its report (kernel and graph checks skipped without CUDA) and exits 0;
    a check that raises is recorded as failed and the exit status is 1."""
    check = load_script("check_gpu")
    out = tmp_path / "check.json"
    monkeypatch.setattr(check.mrl, "TRITON_INTERPRET", False)
    assert check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    kinds = {r["check"]: r for r in doc["records"]}
    assert kinds["kernel"]["ok"] is None and "skipped" in kinds["kernel"]
    assert all(r["ok"] for r in doc["records"] if r["check"] in ("auto", "generate"))
    assert doc["failed"] == 0 and doc["passed"] == 4 + 2

    def broken(record, *a):
        raise RuntimeError("kaput")

    monkeypatch.setattr(check, "one_generate", broken)
    assert check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 1
    doc = json.loads(out.read_text())
    failed = [r for r in doc["records"] if r["ok"] is False]
    assert len(failed) == 2 and failed[0]["error"] == "RuntimeError: kaput" and doc["failed"] == 2


def test_decode_benchmark_loads_a_routed_checkpoint_as_the_standin(tiny_converted_dir):
    """--standin with a routed checkpoint: the dense arm shares its weights and, with routing off (k = N), both arms
    give the same logits."""
    decode = load_script("decode")
    name, dense, routed = decode.load_standin(str(tiny_converted_dir), torch.device("cpu"), torch.float32, 32)
    assert "k-means clusters" in name and type(dense).__name__ == "LlamaForCausalLM"
    assert routed.config.routing_impl == "auto" and routed.config.num_experts == TINY_N
    routed.model.set_top_k(TINY_N)
    ids = torch.randint(1, 128, (2, 7))
    with torch.no_grad():
        assert max_diff(dense(ids).logits, routed(ids).logits) <= 1e-5


COMPILE_FOR_HOPPER = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import modeling_routed_llama as mrl

def build(fn, sig, consts):
    full = {**sig, **{k: "constexpr" for k in consts}}
    src = ASTSource(fn=fn, signature=full, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    if ("griddepcontrol" in ptx) != bool(consts.get("PDL")):  # PDL=True waits/triggers, PDL=False does not
        raise AssertionError(f"griddepcontrol in the PTX: {'griddepcontrol' in ptx}")

cases = []
for dt, dot_fp32 in (("bf16", False), ("fp32", True)):
    for mode, bm in ((0, 1), (1, 4), (2, 16)):
        gu = {"x_ptr": "*" + dt, "wg_ptr": "*" + dt, "wu_ptr": "*" + dt, "rc_ptr": "*i32", "s_ptr": "*fp32",
              "h_ptr": "*fp32", **{n: "i32" for n in ("M", "H", "I", "N", "top_k")}}
        down = {"h_ptr": "*fp32", "wd_ptr": "*" + dt, "part_ptr": "*fp32", "out_ptr": "*" + dt, "cnt_ptr": "*i32",
                **{n: "i32" for n in ("M", "H", "I", "n_col_tiles", "split")}}
        pdls = (False, True) if dt == "bf16" else (False,)  # programmatic dependent launch: griddepcontrol (sm_90)
        cases += [(mrl._gate_up_kernel, gu, dict(ROUTE=route, MODE=mode, DOT_FP32=dot_fp32, BLOCK_M=bm, BLOCK_N=32,
                                                 BLOCK_R=64, BLOCK_K=128, PDL=pdl)) for route in (True, False)
                  for pdl in pdls]
        cases += [(mrl._down_kernel, down, dict(MODE=mode, DOT_FP32=dot_fp32, REDUCE=reduce, BLOCK_M=bm, BLOCK_H=64,
                                                BLOCK_C=128, PDL=pdl)) for reduce in (0, 1, 2) for pdl in pdls]
    scores = {"x_ptr": "*" + dt, "c_ptr": "*" + dt, "s_ptr": "*fp32", "H": "i32", "N": "i32"}
    cases += [(mrl._centroid_scores_kernel, scores, dict(BLOCK_H=4096, PDL=pdl)) for pdl in (False, True)]
    # the prefill path: the routing kernel (with and without the activation; h in the weights' dtype) and the RMS
    # scores of such an h (activation router)
    rows = {"g_ptr": "*" + dt, "u_ptr": "*" + dt, "rc_ptr": "*i32", "s_ptr": "*fp32", "h_ptr": "*" + dt,
            **{n: "i32" for n in ("M", "I", "N", "top_k", "rows_per_program")}}
    t = mrl.PREFILL_TILES
    cases += [(mrl._route_rows_kernel, rows, dict(ACT=act, INTERPRETED=False, KEEP_BITS=bits, BLOCK_M=t["BLOCK_M"],
                                                  BLOCK_N=32, BLOCK_R=t["BLOCK_R"]))
              for act in (True, False) for bits in (True, False)]
    rms = {"h_ptr": "*" + dt, "off_ptr": "*i64", "s_ptr": "*fp32", "I": "i32", "N": "i32"}
    cases += [(mrl._cluster_rms_kernel, rms, dict(BLOCK_C=256))]
failed = []
for fn, sig, consts in cases:
    try:
        build(fn, sig, consts)
    except Exception as exc:
        failed.append(f"{fn.__name__} {sig['h_ptr']} {consts}: {str(exc).splitlines()[-1][:200]}")
print(f"compiled {len(cases) - len(failed)} of {len(cases)} variants")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs what the compiler may refuse (on the H200, 2026-11-29, the one-token gate/up kernel failed
    to compile: two `return`s of different shapes). Triton compiles to sm_90 machine code without a GPU, so every
    kernel variant the decode path and the prefill path can launch is compiled here, in a process without
    TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
