"""The prefill path (`triton_prefill_ffn`: cuBLAS-style GEMMs and one Triton routing kernel, for more tokens than the
decode kernels take) computes what the "mask" reference computes, under Triton's CPU interpreter: both routers, fp32
and bf16, uneven and equal clusters, N not a power of two, k = 1 and k = N - 1, token counts that are not multiples of
the tiles; through `RoutedLlamaMLP.forward` and through the compiled custom op. Also: which implementation runs for
long inputs, how many launches each path makes per layer, and benchmarks/prefill_profile.py's CPU smoke run."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT
from test_sparse import H, load_script, routed_ffn
from transformers.models.llama.modeling_llama import LlamaMLP

import modeling_routed_llama as mrl

# Tolerances, as max |out - ref| / max |ref| against forward_mask in the same dtype. fp32: the kernel's silu
# (x / (1 + exp(-x)) with its own exp) differs from PyTorch's in the last bits. bf16: one bf16 step (2^-8 of the
# largest output); h is rounded as the reference rounds it, so nearly every element is bit-identical (`min_equal`).
PREFILL_TOL = {"float32": 1e-5, "bfloat16": 1e-2}
MIN_EQUAL = {"float32": 0.0, "bfloat16": 0.99}
OFFSETS = {"uneven6": [0, 7, 30, 31, 55, 80, 100], "equal5": [0, 20, 40, 60, 80, 100]}  # I = 100 (N 6 and 5)
SMALL = dict(BLOCK_M=16, BLOCK_R=32, ROWS=64)  # several row chunks per token tile, masked edges at I = 100
GATHER = dict(SMALL, keep_bits=False)  # the path for N > 64: each row's score gathered, not a bit mask

PREFILL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import torch
    import modeling_routed_llama as mrl
    from test_prefill import GATHER, OFFSETS, SMALL
    from test_sparse import routed_ffn

    assert mrl.triton is not None and mrl.TRITON_INTERPRET


    def compare(out, ref):
        return dict(shape=list(out.shape), out_dtype=str(out.dtype).split(".")[1],
                    err=((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item(),
                    equal=(out == ref).float().mean().item())


    results = []
    torch.manual_seed(0)
    # the kernel path: triton_routed_ffn picks the prefill path above TRITON_MAX_TOKENS (9 tokens: forced, as "auto"
    # runs it for 9-16); default tiles and small ones
    for router in ("centroid", "activation"):
        for dtype in (torch.float32, torch.bfloat16):
            for name, offsets in OFFSETS.items():
                n = len(offsets) - 1
                for k in (1, n - 1):
                    mlp = routed_ffn(router, k, offsets=offsets).to(dtype).eval()
                    for m, tiles in ((17, None), (40, SMALL), (40, GATHER), (100, None), (9, {"mode": "prefill"})):
                        x = torch.randn(m, 48).to(dtype)  # (M, H)
                        with torch.no_grad():
                            ref = mlp.forward_mask(x)
                            out = mrl.triton_routed_ffn(
                                x, w_gate=mlp.gate_proj.weight, w_up=mlp.up_proj.weight, w_down=mlp.down_proj.weight,
                                row_cluster=mlp.router.row_cluster(100), top_k=k, offsets=mlp.router.expert_offsets,
                                centroids=mlp.router.centroids if router == "centroid" else None, tiles=tiles)
                        results.append(dict(router=router, dtype=str(dtype).split(".")[1], offsets=name, k=k, m=m,
                                            tiles=tiles, **compare(out, ref)))
    print("KERNEL " + json.dumps(results))

    # the module: routing_impl "sparse" without gradients takes the prefill path above 16 tokens (bf16, centroids
    # cast to fp32 once and cached)
    spy = []
    original = mrl.triton_prefill_ffn
    mrl.triton_prefill_ffn = lambda x, **kw: spy.append(x.shape[0]) or original(x, **kw)
    module = []
    for router in ("centroid", "activation"):
        mlp = routed_ffn(router, 2).to(torch.bfloat16).eval()
        mlp.config.routing_impl = "sparse"
        x = torch.randn(2, 20, 48).to(torch.bfloat16)  # (B, T, H): 40 tokens
        with torch.no_grad():
            picked = mlp.pick_impl(x.reshape(-1, 48))
            out, again = mlp(x), mlp(x)
            ref = mlp.forward_mask(x.reshape(-1, 48)).view(x.shape)
        cache = mlp.router._centroids_fp32
        module.append(dict(router=router, picked=picked, same=torch.equal(out, again),
                           cached=cache is not None and cache[2].dtype == torch.float32, **compare(out, ref)))
    module.append(dict(calls=list(spy)))
    print("MODULE " + json.dumps(module))

    # torch.compile: the prefill path is the custom op routed_llama::routed_ffn in the traced graph ("sparse" at 20
    # tokens, "auto" at 12 tokens as on a capable GPU)
    compiled = []
    for impl, tokens in (("sparse", 20), ("auto", 12)):
        torch._dynamo.reset()
        mlp = routed_ffn("centroid", 2).eval()
        mlp.config.routing_impl = impl
        mrl._auto_device = lambda x: True
        graphs = []

        def backend(gm, example_inputs):
            graphs.append([(str(n.target), n.kwargs.get("mode")) for n in gm.graph.nodes if n.op == "call_function"])
            return gm.forward

        spy.clear()
        x = torch.randn(tokens, 48)
        with torch.no_grad():
            out = torch.compile(mlp, backend=backend, fullgraph=True)(x)
            ref = mlp.forward_mask(x)
        ops = [(t, mode) for g in graphs for t, mode in g if "routed_ffn" in t]
        compiled.append(dict(impl=impl, tokens=tokens, ops=ops, calls=list(spy), **compare(out, ref)))
    print("COMPILED " + json.dumps(compiled))

    # under a bf16 autocast (fp32 weights, as the fast engine evaluates): the compiled op computes what the eager
    # module computes (aot_eager: AOTAutograd, which runs a custom op's body without the caller's autocast)
    autocast = []
    for router in ("centroid", "activation"):
        torch._dynamo.reset()
        mlp = routed_ffn(router, 2).eval()
        mlp.config.routing_impl = "sparse"
        x = torch.randn(40, 48)  # (M, H) fp32
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            eager = mlp(x)
            out = torch.compile(mlp, backend="aot_eager", fullgraph=True)(x)
            ref = mlp.forward_mask(x)
        autocast.append(dict(router=router, eager_dtype=str(eager.dtype), compiled_dtype=str(out.dtype),
                             same=torch.equal(out.float(), eager.float()), **compare(out, ref)))
    print("AUTOCAST " + json.dumps(autocast))
    """
)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Runs PREFILL_SCRIPT with TRITON_INTERPRET=1 in a fresh interpreter (it must be set before triton loads);
    returns the JSON each section printed, by label."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    path = tmp_path_factory.mktemp("prefill") / "prefill_check.py"
    path.write_text(PREFILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(path), str(ROOT), str(ROOT / "tests")], env=env, cwd=path.parent,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {}
    for line in proc.stdout.splitlines():
        label, _, payload = line.partition(" ")
        if label in ("KERNEL", "MODULE", "COMPILED", "AUTOCAST"):
            found[label] = json.loads(payload)
    return found


def test_prefill_path_equals_forward_mask_in_interpreter(interpreted):
    """triton_routed_ffn above TRITON_MAX_TOKENS (17 and 100 tokens with the default tiles, 40 with small ones: three
    token tiles, two row chunks, masked edges; each kept set as a bit mask, and at 40 also by the gather of each row's
    score that N > 64 takes) and forced to the prefill path (9 tokens) equals forward_mask in the same
    dtype: N = 6 uneven clusters (sizes 1 to 25) and N = 5 equal ones (the reference's broadcast path), both routers,
    k = 1 and k = N - 1; tolerances in PREFILL_TOL, and in bf16 at least 99% of the outputs bit-identical (h rounded as
    PyTorch rounds act(g) * u; all of them here)."""
    results = interpreted["KERNEL"]
    assert len(results) == 2 * 2 * 2 * 2 * 5
    assert sum(r["tiles"] == GATHER for r in results) == 2 * 2 * 2 * 2
    for r in results:
        assert r["shape"] == [r["m"], 48] and r["out_dtype"] == r["dtype"]
        assert r["err"] <= PREFILL_TOL[r["dtype"]], r
        assert r["equal"] >= MIN_EQUAL[r["dtype"]], r


def test_module_runs_the_prefill_path_above_the_decode_kernels(interpreted):
    """RoutedLlamaMLP with routing_impl "sparse" and no gradients routes 40 tokens (B 2 x T 20, bf16) through the
    prefill path, gives the mask path's outputs, and keeps the fp32 centroids between calls."""
    *routers, calls = interpreted["MODULE"]
    assert calls == {"calls": [40] * 4}  # 2 routers x 2 calls, 40 tokens each
    for r in routers:
        assert r["picked"] == "prefill" and r["same"] and r["shape"] == [2, 20, 48], r
        assert r["err"] <= PREFILL_TOL["bfloat16"] and r["equal"] >= MIN_EQUAL["bfloat16"], r
        assert r["cached"] == (r["router"] == "centroid")


def test_compiled_prefill_path_is_the_custom_op(interpreted):
    """Under torch.compile (fullgraph) the prefill path is the custom op routed_llama::routed_ffn with mode "prefill"
    ("sparse" at 20 tokens; "auto" at 12 tokens as on a capable GPU, where the op alone would pick the "dot" decode
    kernels): it runs the prefill path and gives the mask path's outputs (fp32)."""
    by_impl = {r["impl"]: r for r in interpreted["COMPILED"]}
    for impl, r in by_impl.items():
        assert [mode for _, mode in r["ops"]] == ["prefill"], r  # one call of the op in the graph
        assert all(target.startswith("routed_llama.routed_ffn") for target, _ in r["ops"]), r
        assert r["calls"] == [r["tokens"]], r
        assert r["err"] <= PREFILL_TOL["float32"], r


# ---------------------------------------------------------------------------------------------------------------
# Which implementation runs, and what it launches (no kernel executes here)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "impl, tokens, grad, bias, prefill_on, expected",
    [
        ("auto", 1, False, False, True, "triton"),
        ("auto", 8, False, False, True, "triton"),  # AUTO_TRITON_MAX_TOKENS
        ("auto", 9, False, False, True, "prefill"),  # 9-16: the prefill path, not the "dot" decode kernels
        ("auto", 16, False, False, True, "prefill"),
        ("auto", 17, False, False, True, "prefill"),
        ("auto", 512, False, False, True, "prefill"),
        ("auto", 512, True, False, True, "mask"),  # gradients (training): the reference
        ("auto", 512, False, True, True, "mask"),  # mlp_bias: the Triton paths have no bias terms
        ("auto", 512, False, False, False, "mask"),  # AUTO_PREFILL off
        ("auto", 4, False, False, False, "triton"),  # ... leaves the decode kernels on
        ("sparse", 16, False, False, True, "triton"),  # TRITON_MAX_TOKENS
        ("sparse", 17, False, False, True, "prefill"),
        ("sparse", 512, True, False, True, "sparse"),  # gradients: the grouped path
        ("mask", 512, False, False, True, "mask"),
    ],
)
def test_pick_impl_as_on_a_capable_gpu(impl, tokens, grad, bias, prefill_on, expected, monkeypatch):
    """pick_impl's choices where `_auto_device` holds (as on an H200) and the interpreter lets `_triton_ok` accept CPU
    tensors: decode kernels up to AUTO_TRITON_MAX_TOKENS ("auto") / TRITON_MAX_TOKENS ("sparse"), the prefill path
    above, mask or the grouped path where gradients are needed."""
    if mrl.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(mrl, "TRITON_INTERPRET", True)
    monkeypatch.setattr(mrl, "_auto_device", lambda x: True)
    monkeypatch.setattr(mrl, "AUTO_PREFILL", prefill_on)
    mlp = routed_ffn("centroid", 3, bias=bias)
    mlp.config.routing_impl = impl
    with torch.set_grad_enabled(grad):
        assert mlp.pick_impl(torch.randn(tokens, H)) == expected


class _Launches(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every ATen op that launches device work (views, `empty` and `_unsafe_view` launch nothing)."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not func.is_view and not name.startswith(("aten.empty", "aten._unsafe_view")):
            self.log.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "router, offsets, impl, expected",
    [
        ("centroid", "equal5", "mask", 12),
        ("centroid", "uneven6", "mask", 13),  # + the (M, I) mask: index_select by the cached cluster ids
        ("centroid", "equal5", "prefill", 6),  # gate, up, x.float(), scores, routing kernel, down
        ("activation", "equal5", "mask", 17),
        ("activation", "equal5", "prefill", 7),  # gate, up, silu_, mul_, RMS kernel, routing kernel, down
    ],
)
def test_launches_per_layer(router, offsets, impl, expected, monkeypatch):
    """Launches per routed FFN call (40 bf16 tokens; ATen ops that launch device work plus Triton launches, counted
    on the CPU with the Triton kernels replaced by recorders): LlamaMLP makes 5; the prefill path 6 (centroid; its
    bf16 centroids are cast once and cached) or 7 (activation), the mask path 12-17. In eager prefill every launch
    is host time in every layer."""
    if mrl.triton is None:
        pytest.skip("triton is not installed")
    log = []

    class Launcher:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: log.append(self.name)

    for name in ("_route_rows_kernel", "_cluster_rms_kernel"):
        monkeypatch.setattr(mrl, name, Launcher(name))
    monkeypatch.setattr(mrl, "TRITON_INTERPRET", True)
    mlp = routed_ffn(router, 2, offsets=OFFSETS[offsets]).to(torch.bfloat16).eval()
    mlp.config.routing_impl = "sparse" if impl == "prefill" else "mask"
    x = torch.randn(1, 40, H).to(torch.bfloat16)
    with torch.no_grad():
        mlp(x)  # first call: caches (row clusters, fp32 centroids)
        log.clear()
        with _Launches(log):
            mlp(x)
        assert len(log) == expected, log
        dense = LlamaMLP(mlp.config).to(torch.bfloat16)
        log.clear()
        with _Launches(log):
            dense(x)
        assert len(log) == 5, log


def test_fp32_centroids_follow_the_buffer():
    """The cached fp32 centroids are reused while the buffer is unchanged, and recomputed after an in-place update
    (refresh_router) or a replacement (`.to`)."""
    mlp = routed_ffn("centroid", 2).to(torch.bfloat16)
    first = mlp.router.centroids_fp32()
    assert first.dtype == torch.float32 and mlp.router.centroids_fp32() is first
    with torch.no_grad():
        mlp.gate_proj.weight.mul_(2)
    mlp.refresh_router()
    second = mlp.router.centroids_fp32()
    assert second is not first and torch.equal(second, mlp.router.centroids.float())
    mlp.to(torch.float16)
    assert torch.equal(mlp.router.centroids_fp32(), mlp.router.centroids.float())
    fp32 = routed_ffn("centroid", 2)
    assert fp32.router.centroids_fp32() is fp32.router.centroids  # fp32 buffers: nothing to cast or cache


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/prefill_profile.py on the CPU
# ---------------------------------------------------------------------------------------------------------------


def test_prefill_profile_smoke(tmp_path):
    """benchmarks/prefill_profile.py --device cpu (tiny shape) writes prefill_profile.json with every arm's host and
    wall time per forward, what its routed layers ran, and its top ops; the per-call FFN host times; no device time
    on the CPU."""
    profile = load_script("prefill_profile")
    argv = ["--device", "cpu", "--shapes", "tiny", "--tokens", "16", "--forwards", "2", "--warmup", "1",
            "--ffn-calls", "5", "--out", str(tmp_path)]  # fmt: skip
    assert profile.main(argv) == 0
    doc = json.loads((tmp_path / "prefill_profile.json").read_text())
    assert {"hardware", "date", "command", "models", "ffn_host"} <= doc.keys()
    (model,) = doc["models"]
    assert model["model"] == "tiny" and model["tokens"] == 16
    arms = model["arms"]
    assert set(arms) == {"dense", "mask", "auto"}
    assert arms["dense"]["ran"] == "dense" and arms["mask"]["ran"] == "mask" and arms["auto"]["ran"] == "mask"
    for arm in arms.values():
        assert arm["wall_ms"] > 0 and 0 < arm["host_ms"] <= arm["wall_ms"] * 1.5, arm
        assert arm["device_ms"] is None and arm["top_ops"] and arm["aten_ops_per_forward"] > 0
    assert arms["mask"]["aten_ops_per_forward"] > arms["dense"]["aten_ops_per_forward"]
    assert arms["mask"]["ffn_host_ms"] > 0
    host = {r["impl"]: r for r in doc["ffn_host"]}
    assert host["dense"]["us_per_call"] > 0 and host["mask"]["us_per_call"] > 0
    assert host["prefill"]["us_per_call"] is None and "CUDA" in host["prefill"]["skipped"]


def test_compiled_op_keeps_the_callers_autocast(interpreted):
    """Once compiled, a custom op's body runs without the caller's autocast (eagerly it runs with it), so the op gets
    the autocast dtype as an argument. Under a bf16 autocast with fp32 weights (how the fast engine evaluates) the
    compiled module equals the eager one exactly, in the same dtype, both routers, and both equal the mask reference
    as the prefill path does. (Before, the compiled prefill path computed in fp32, unlike the bf16 router scores the
    model was trained with.)"""
    for r in interpreted["AUTOCAST"]:
        assert r["same"], r
        assert r["eager_dtype"] == r["compiled_dtype"] == "torch.bfloat16", r  # the prefill path ran under it
        assert r["err"] <= PREFILL_TOL["bfloat16"] and r["equal"] >= MIN_EQUAL["bfloat16"], r
