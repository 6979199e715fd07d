"""Which routed-FFN implementation and Triton multiply mode decoding runs, on the CPU (no kernel executes here).

The H200 run of 2026-11-29 18:24 showed two dispatch faults that the kernel tests could not see:
- the benchmark's decode loop captured its CUDA graphs with gradients enabled, so `_triton_ok` refused the kernels
  (parameters require grad) and the graph replayed the mask path: the routed arm ran at the same speed for k/N 1/2
  and 1/4, and the row was labelled "triton" by a separate check made without gradients;
- 2-4 tokens ran the "gemv" multiply mode, measured 0.22x dense for the Llama-7B FFN against 0.83x for "dot", which
  made `fast_generate` at batch 4 0.46x dense.
Here the GPU is emulated where it decides anything: `auto_uses_triton` answers as on an H200, `TRITON_INTERPRET` lets
`_triton_ok` accept CPU tensors, and either the Triton launches or `triton_routed_ffn` itself are replaced by
recorders; CUDA streams and graphs are stand-ins that run the captured Python once and replay nothing.
"""

import contextlib
import importlib.util
import json
import sys

import pytest
import torch
from conftest import ROOT, routing_spec, tiny_llama_config
from transformers import LlamaForCausalLM

import modeling_routed_llama as mrl

needs_triton = pytest.mark.skipif(mrl.triton is None, reason="triton is not installed")


def as_on_h200(monkeypatch):
    """`routing_impl="auto"` decides for CPU tensors as it does on an H200 (capability 9.0): kernels for at most
    AUTO_TRITON_MAX_TOKENS tokens."""
    monkeypatch.setattr(mrl, "TRITON_INTERPRET", True)
    monkeypatch.setattr(mrl, "auto_uses_triton", lambda x: x.shape[0] <= mrl.AUTO_TRITON_MAX_TOKENS)


class FakeGraph:
    def replay(self):
        pass


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """torch.cuda's stream and graph calls as no-ops, so `GreedyDecodeStep._capture` runs its Python on the CPU."""
    made = []  # every stream created, in order

    class FakeStream:
        def __init__(self, *a, **k):
            made.append(self)

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    default = type("DefaultStream", (), {"wait_stream": lambda self, other: None})()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: default)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    capturing = []

    @contextlib.contextmanager
    def graph(g, **k):  # the capture runs its Python (eagerly here), and says that it is capturing
        capturing.append(g)
        try:
            yield
        finally:
            capturing.pop()

    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: bool(capturing))
    monkeypatch.setattr(mrl, "_SIDE_STREAMS", {})
    return made


@pytest.fixture
def kernel_calls(monkeypatch):
    """Replaces `triton_routed_ffn` by a recorder of token counts that returns zeros."""
    calls = []

    def record(x, **kw):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    monkeypatch.setattr(mrl, "triton_routed_ffn", record)
    return calls


@pytest.fixture
def launches(monkeypatch):
    """Replaces every Triton kernel by a recorder of (kernel name, MODE) per launch; nothing is computed."""
    log = []

    class Launcher:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: log.append((self.name, kw.get("MODE")))

    for name in ("_centroid_scores_kernel", "_gate_up_kernel", "_cluster_rms_kernel", "_mask_rows_kernel",
                 "_down_kernel", "_sum_splits_kernel"):  # fmt: skip
        monkeypatch.setattr(mrl, name, Launcher(name))
    return log


def tiny_routed_lm(impl="auto"):
    """3 routed layers, N = 5, k = 2, parameters requiring grad (as a loaded model's do)."""
    from routed_llama.surgery import route_dense_model

    dense = LlamaForCausalLM(tiny_llama_config(initializer_range=0.1)).eval()
    model = route_dense_model(dense, routing_spec(dense, 5, 2), progress=False)[0].eval()
    model.config.routing_impl = impl
    assert all(p.requires_grad for p in model.parameters())
    return model


def test_captures_share_one_warm_up_stream(fake_cuda_graphs, monkeypatch):
    """Every capture of the process warms up on the same side stream: cuBLAS keeps a workspace per stream it ran on
    for the life of the process, and a fresh stream per capture grew the default pool by ~0.3 GiB per training run on
    an H200 (results/train-speed-one-stream/). The graph's pool is passed through; fn runs twice, then once captured."""
    pools = []
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None, **k: pools.append(pool) or contextlib.nullcontext())
    calls = []
    for i in range(3):
        graph, out = mrl.capture_cuda_graph(lambda i=i: calls.append(i) or i * 10, pool=("pool", i))
        assert isinstance(graph, FakeGraph) and out == i * 10
    assert len(fake_cuda_graphs) == 1 and calls == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert pools == [("pool", 0), ("pool", 1), ("pool", 2)]


# ---------------------------------------------------------------------------------------------------------------
# The multiply mode per token count
# ---------------------------------------------------------------------------------------------------------------


def test_triton_mode_by_token_count():
    """One token: "gemv1"; 2-16 tokens: "dot" (the modes measured fastest); an explicit mode still overrides."""
    assert mrl.triton_mode(1) == "gemv1"
    assert {mrl.triton_mode(m) for m in range(2, mrl.TRITON_MAX_TOKENS + 1)} == {"dot"}
    assert mrl.triton_mode(4, {"mode": "gemv"}) == "gemv"


@needs_triton
@pytest.mark.parametrize("impl", ["auto", "sparse"])
@pytest.mark.parametrize("tokens, mode", [(1, "gemv1"), (2, "dot"), (4, "dot"), (8, "dot")])
def test_routed_ffn_launches_the_measured_mode(impl, tokens, mode, launches, monkeypatch):
    """A routed FFN called on `tokens` tokens launches gate/up and down in `mode` (not "gemv" for 2-4 tokens)."""
    as_on_h200(monkeypatch)
    cfg = mrl.RoutedLlamaConfig(hidden_size=64, intermediate_size=150, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=32, num_experts=5, num_experts_per_tok=2,
                                routing_impl=impl)  # fmt: skip
    mlp = mrl.RoutedLlamaMLP(cfg, 0).eval()
    with torch.no_grad():
        mlp(torch.randn(1, tokens, 64))
    modes = {m for name, m in launches if name in ("_gate_up_kernel", "_down_kernel")}
    assert modes == {mrl._MODES[mode]}, launches


def test_pdl_only_on_nvidia_capability_9(monkeypatch):
    """Programmatic dependent launch (griddepcontrol) exists from compute capability 9.0 on NVIDIA GPUs only; the
    option is off where the tiles do not ask for it."""
    monkeypatch.setattr(mrl, "_CAPABILITY", {0: (9, 0), 1: (8, 9)})
    monkeypatch.setattr(mrl, "_PDL_TRITON", True)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert mrl._pdl(cuda0, {"pdl": True}) and not mrl._pdl(cuda1, {"pdl": True})
    assert not mrl._pdl(cuda0, {"pdl": False}) and not mrl._pdl(cuda0, {})
    assert not mrl._pdl(torch.device("cpu"), {"pdl": True})
    monkeypatch.setattr(mrl, "_PDL_TRITON", False)  # a Triton without gdc_wait
    assert not mrl._pdl(cuda0, {"pdl": True})
    monkeypatch.setattr(mrl, "_PDL_TRITON", True)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm reports its own "capability" numbers
    assert not mrl._pdl(cuda0, {"pdl": True})


@needs_triton
@pytest.mark.parametrize("tokens", [1, 4])
def test_pdl_launches_as_the_tiles_say(tokens, monkeypatch):
    """Where PDL is available, one token ("gemv1", measured faster with it) launches gate/up and down with
    launch_pdl and their kernels wait (PDL=True), and the scores kernel lets them start; 4 tokens ("dot", measured
    slower with it) launch none of it."""
    as_on_h200(monkeypatch)
    monkeypatch.setattr(mrl, "_pdl", lambda device, t: bool(t.get("pdl")))  # as on an H200
    log = []

    class Launcher:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: log.append((self.name, kw.get("PDL"), kw.get("launch_pdl", False)))

    for name in ("_centroid_scores_kernel", "_gate_up_kernel", "_down_kernel", "_sum_splits_kernel"):
        monkeypatch.setattr(mrl, name, Launcher(name))
    x = torch.randn(tokens, 64)
    w = torch.randn(150, 64)
    mrl.triton_routed_ffn(x, w_gate=w, w_up=w, w_down=torch.randn(64, 150), top_k=2, centroids=torch.randn(5, 64),
                          row_cluster=torch.arange(150, dtype=torch.int32) // 30, tiles={"reduce": "split"})  # fmt: skip
    on = tokens == 1
    assert log == [("_centroid_scores_kernel", on, False), ("_gate_up_kernel", on, on), ("_down_kernel", on, on),
                   ("_sum_splits_kernel", None, False)]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The decode step runs the kernels whatever the caller's grad mode
# ---------------------------------------------------------------------------------------------------------------


def test_captured_decode_step_runs_kernels_with_gradients_on(fake_cuda_graphs, kernel_calls, monkeypatch):
    """A GreedyDecodeStep built (and so captured) where gradients are enabled, as the benchmark's decode loop built
    it, still runs the Triton kernels: the two warm-up steps and the captured one each call them in every routed
    layer."""
    as_on_h200(monkeypatch)
    model = tiny_routed_lm("auto")
    with torch.enable_grad():
        step = mrl.GreedyDecodeStep(model, batch=2, max_cache_len=32, cuda_graph=True)
    assert kernel_calls == [2] * 3 * 3  # 3 routed layers, 2 warm-ups and the capture, 2 tokens each
    assert isinstance(step.graph, FakeGraph)


def test_prefill_graph_per_prompt_length(fake_cuda_graphs):
    """With graphs, a prompt length's first prefill runs eagerly, its second captures (two warm-ups, each on an
    emptied cache, then the capture), later ones only replay with the new ids copied into the graph's input; only the
    last PREFILL_GRAPHS lengths are kept (none: every prefill eager). Without graphs every prefill is eager."""
    model = tiny_routed_lm("mask")
    step = mrl.GreedyDecodeStep(model, batch=1, max_cache_len=32, cuda_graph=True)
    seen = []  # (ids passed, cache length before the call) per forward
    forward = step.forward
    step.forward = lambda ids, m=None: seen.append((ids, int(step.cache.get_seq_length()))) or forward(ids, m)
    a, b = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 5))
    step.prefill(a)
    assert len(seen) == 1 and seen[0][0] is a
    seen.clear()
    step.reset()
    captured = step.prefill(a)
    assert len(seen) == 3 and all(torch.equal(ids, a) for ids, _ in seen)
    assert [before for _, before in seen[:2]] == [0, 0]  # each warm-up on an emptied cache
    assert int(step.cache.get_seq_length()) == 0  # emptied again for the replay
    seen.clear()
    step.reset()
    assert step.prefill(b) is captured and seen == []  # replayed: no Python forward
    graph, ids, logits = step.prefills[5]
    assert torch.equal(ids, b) and logits is captured
    for length in range(6, 6 + step.PREFILL_GRAPHS):
        step.prefill(torch.randint(1, 128, (1, length)))
    assert 5 not in step.prefills and len(step.prefills) == step.PREFILL_GRAPHS
    step.PREFILL_GRAPHS = 0  # none kept: every prefill eager
    seen.clear()
    for _ in range(3):
        step.reset()
        step.prefill(a)
    assert len(seen) == 3 and step.prefills == {}
    eager = mrl.GreedyDecodeStep(model, batch=1, max_cache_len=32, cuda_graph=False)
    for _ in range(3):
        eager.reset()
        eager.prefill(a)
    assert eager.prefills == {}


def test_eager_decode_step_runs_kernels_with_gradients_on(kernel_calls, monkeypatch):
    """Without a graph, prefill (5 tokens, within AUTO_TRITON_MAX_TOKENS here) and a step run the kernels too."""
    as_on_h200(monkeypatch)
    model = tiny_routed_lm("auto")
    with torch.enable_grad():
        step = mrl.GreedyDecodeStep(model, batch=1, max_cache_len=32, cuda_graph=False)
        first = step.forward(torch.randint(1, 128, (1, 5))).argmax(-1)
        step(first)
    assert kernel_calls == [5] * 3 + [1] * 3


# ---------------------------------------------------------------------------------------------------------------
# The benchmark's rows say what ran
# ---------------------------------------------------------------------------------------------------------------


def load_decode_benchmark():
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_decode_dispatch", ROOT / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_triton
def test_decode_benchmark_routed_arm_runs_and_records_the_kernels(tmp_path, fake_cuda_graphs, kernel_calls,
                                                                   monkeypatch):  # fmt: skip
    """benchmarks/decode.py with emulated graphs and H200 dispatch: the routed arm's captured decode steps call the
    kernels (batch 1: "triton/gemv1", batch 4: "triton/dot"), the row's `impl` is what was recorded during capture,
    and k = N runs no routed layer. fast_generate records its mask prefill (16 tokens) and kernel steps."""
    as_on_h200(monkeypatch)
    decode = load_decode_benchmark()
    monkeypatch.setattr(decode, "cuda_graphs", lambda device: True)
    argv = ["--device", "cpu", "--shapes", "tiny", "--steps", "2", "--repeats", "1", "--prefill", "0", "--prompt", "16",
            "--batches", "1", "4", "--ratios", "0.5", "0.25", "1.0", "--ffn-tokens", "--out", str(tmp_path)]  # fmt: skip
    assert decode.main(argv) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    impl = {(r["batch"], r["k_over_n"]): r["impl"] for r in rows if r["phase"] == "decode"}
    assert impl == {(1, 0.5): "triton/gemv1", (1, 0.25): "triton/gemv1", (1, 1.0): "dense (k = N)",
                    (4, 0.5): "triton/dot", (4, 0.25): "triton/dot", (4, 1.0): "dense (k = N)"}  # fmt: skip
    assert {r["routing_impl"] for r in rows if r["phase"] == "decode"} == {"auto"}
    ran = {r["batch"]: r["ran"] for r in rows if r["phase"] == "generate"}
    assert ran == {1: ["mask", "triton/gemv1"], 4: ["mask", "triton/dot"]}
    assert 1 in kernel_calls and 4 in kernel_calls


def test_tuning_starts_from_the_tiles_the_model_runs():
    """`decode.py --tune` starts each mode's search from what `triton_routed_ffn` would run: the mode's own entries
    (gemv1's programs per SM and PDL) win over TRITON_OPTIONS', as there; only the reduction is "split"."""
    decode = load_decode_benchmark()
    for mode in ("gemv1", "dot"):
        start = decode.tune_start(mode)
        runs = {**mrl.TRITON_OPTIONS, **mrl.TRITON_TILES[mode]}
        assert start == {"mode": mode, **runs, "reduce": "split"}
    assert decode.tune_start("gemv1")["pdl"] is True and decode.tune_start("dot")["pdl"] is False
