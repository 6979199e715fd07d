"""Decode and prefill speed of routed vs dense Llama, and the FFN alone (prints a table; writes JSON and a PNG).

For each model shape: stock dense Llama, the "ideal" model whose FFN is k/N as wide (what perfect skipping would
give), and RoutedLlama with every layer routed at several k/N. Every arm runs the same hand-written decode loop:
a prefill, then one CUDA graph per decode step captured over a StaticCache and replayed (`--no-graph` runs it
eagerly). Weights are random (speed does not depend on them); the routed model's clusters are equal splits.

    python benchmarks/decode.py --out results/decode                 # on the GPU: the full table
    python benchmarks/decode.py --device cpu --shapes tiny --steps 4 --no-graph   # a smoke run of the code path
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import modeling_routed_llama as mrl  # noqa: E402
from configuration_routed_llama import RoutedLlamaConfig  # noqa: E402

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "tinyllama": (2048, 5632, 22, 32, 4, 32000),
    "llama7b": (4096, 11008, 32, 32, 32, 32000),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "tiny": (64, 192, 2, 4, 2, 256),
}


def llama_config(shape: str, intermediate: int | None = None):
    from transformers import LlamaConfig

    h, i, n, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=h, intermediate_size=intermediate or i, num_hidden_layers=n,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip


def build_dense(shape, device, dtype, intermediate=None, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape, intermediate)).to(dtype)
    return model.eval()


def build_routed(dense, num_experts: int, top_k: int, impl: str):
    """A RoutedLlama holding the dense model's weights (equal clusters), every layer routed."""
    from transformers.initialization import no_init_weights

    cfg = RoutedLlamaConfig(**{k: v for k, v in dense.config.to_dict().items()
                               if k not in ("model_type", "architectures", "transformers_version", "dtype")},
                            num_experts=num_experts, num_experts_per_tok=top_k, routing_impl=impl)  # fmt: skip
    device, dtype = dense.device, dense.dtype
    with no_init_weights(), torch.device(device):
        routed = mrl.RoutedLlamaForCausalLM(cfg).to(dtype)
    routed.load_state_dict(dense.state_dict(), strict=False)
    for mlp in routed.model.routed_mlps().values():  # the offsets are built from the config; centroids need weights
        mlp.refresh_router()
    return routed.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def capture(fn):
    """One CUDA graph of `fn` (warmed up on a side stream first, as graph capture requires); returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # allocations, cuBLAS handles, Triton compilation happen here, outside the graph
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def seconds_per_call(run, reps: int, device) -> float:
    """Wall seconds per call of `run`, after one untimed call, synchronising the device around the loop."""
    run()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    _sync(device)
    return (time.perf_counter() - t0) / reps


@torch.no_grad()
def decode_tok_s(model, batch: int, prompt: int, steps: int, graph: bool) -> float:
    """Tokens per second of greedy-free decoding (fixed input tokens): prefill `prompt`, then `steps` steps."""
    from transformers import StaticCache

    device = model.device
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    step_ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)  # (B, 1) static input buffer

    def step():
        return model(input_ids=step_ids, past_key_values=cache, use_cache=True).logits

    if graph and device.type == "cuda":
        try:
            run = capture(step)
        except RuntimeError as exc:  # something in the step syncs with the host: time it eagerly and say so
            print(f"  CUDA graph capture failed ({str(exc)[:100]}); timing eagerly", flush=True)
            torch.cuda.synchronize()
            return decode_tok_s(model, batch, prompt, steps, graph=False)
        n_time = steps - 4  # warm-up and capture wrote two steps into the cache; the timed steps follow
    else:
        run = step
        n_time = steps - 2
        step()
    return batch / seconds_per_call(run, n_time, device)


@torch.no_grad()
def prefill_tok_s(model, tokens: int, repeats: int, trials: int = 5) -> float:
    """Prefill tokens per second: the median of `trials` timings of `repeats` forwards, after three warm-ups (a
    single warm-up left the first arm timed visibly cold in the first recorded run)."""
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    for _ in range(3):
        model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(trials):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, use_cache=False)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return tokens * repeats / sorted(times)[len(times) // 2]


@torch.no_grad()
def ffn_us(mlps: list, x: torch.Tensor, reps: int, graph: bool) -> float:
    """Microseconds per FFN call, cycling over several layers' weights so that L2 holds none of them."""

    def body():
        y = x
        for m in mlps:
            y = m(x)
        return y

    run = capture(body) if graph and x.device.type == "cuda" else body
    return seconds_per_call(run, reps, x.device) / len(mlps) * 1e6


def ffn_rows(shape, device, dtype, ratios, num_experts, graph, reps, tile_grid):
    """Dense FFN vs ideal (k/N as wide) vs routed (Triton), M = 1 token, at the given shape."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    rows = []
    n_layers = 6
    cfg = llama_config(shape)
    torch.manual_seed(0)
    x = torch.randn(1, cfg.hidden_size, device=device, dtype=dtype)
    with torch.device(device):
        dense = [LlamaMLP(cfg).to(dtype).eval() for _ in range(n_layers)]
    t_dense = ffn_us(dense, x, reps, graph)
    for r in ratios:
        k = max(1, round(r * num_experts))
        rcfg = RoutedLlamaConfig(**{kk: v for kk, v in cfg.to_dict().items() if kk not in ("model_type", "dtype")},
                                 num_experts=num_experts, num_experts_per_tok=k, routing_impl="auto")  # fmt: skip
        with torch.device(device):
            icfg = llama_config(shape, int(cfg.intermediate_size * k / num_experts))
            ideal = [LlamaMLP(icfg).to(dtype).eval() for _ in range(n_layers)]
            routed = []
            for d in dense:
                m = mrl.RoutedLlamaMLP(rcfg, 0).to(dtype).eval()
                m.load_state_dict(d.state_dict(), strict=False)
                m.refresh_router()
                routed.append(m)
        t_ideal = ffn_us(ideal, x, reps, graph)
        best = None
        for tiles in tile_grid:
            mrl.TRITON_TILES.update(tiles)
            try:
                t = ffn_us(routed, x, reps, graph)
            except Exception as exc:  # a tile config that does not compile on this device
                print(f"  tiles {tiles} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            if best is None or t < best[0]:
                best = (t, dict(tiles))
        if best is None:
            raise RuntimeError("no Triton tile configuration ran")
        mrl.TRITON_TILES.update(best[1])
        rows.append({"model": shape, "batch": 1, "k_over_n": k / num_experts, "phase": "ffn",
                     "dense_us": round(t_dense, 2), "ideal_us": round(t_ideal, 2), "routed_us": round(best[0], 2),
                     "speedup": round(t_dense / best[0], 3), "ideal_speedup": round(t_dense / t_ideal, 3),
                     "tiles": best[1]})  # fmt: skip
        print(f"ffn {shape} k/N={k / num_experts:.3g}: dense {t_dense:.1f} us, ideal {t_ideal:.1f} us, routed "
              f"{best[0]:.1f} us ({t_dense / best[0]:.2f}x), tiles {best[1]}", flush=True)  # fmt: skip
    return rows


def tile_grid(quick: bool):
    base = dict(mrl.TRITON_TILES)
    if quick:
        return [base]
    grid = []
    for br in (16, 32, 64):
        for bk in (128, 256):
            for split in (4, 8):
                for wg in (4,):
                    grid.append({**base, "BLOCK_R": br, "BLOCK_K": bk, "SPLIT": split, "warps_gu": wg,
                                 "BLOCK_H": 32 if br == 16 else 64, "BLOCK_C": 64})  # fmt: skip
    return grid


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["tinyllama", "llama7b"])
    p.add_argument("--standin", default=None, help="also benchmark the stand-in: a GGUF file or HF folder")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prefill-repeats", type=int, default=10)
    p.add_argument("--ffn-reps", type=int, default=200)
    p.add_argument("--tune", action="store_true", help="sweep Triton tile sizes in the FFN benchmark")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--out", default=None, help="write decode.json and speedup.png here")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    graph = not args.no_graph
    rows = []
    t_start = time.time()
    if args.shapes:
        ffn_shape = "llama7b" if "llama7b" in args.shapes else args.shapes[0]
        rows += ffn_rows(ffn_shape, device, dtype, [r for r in args.ratios if r < 1], args.num_experts, graph,
                         args.ffn_reps, tile_grid(not args.tune))  # fmt: skip
    for shape in args.shapes + (["standin"] if args.standin else []):
        rows += model_rows(shape, args, device, dtype, graph)
        if args.out:
            write(args, rows, t_start)
    print_table(rows)
    if args.out:
        write(args, rows, t_start)


def load_standin(path, device, dtype):
    from transformers import AutoModelForCausalLM

    p = Path(path)
    kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(p.parent if kw else p, dtype=torch.float32, **kw)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.to(device=device, dtype=dtype).eval()


def model_rows(shape, args, device, dtype, graph):
    rows = []
    dense = load_standin(args.standin, device, dtype) if shape == "standin" else build_dense(shape, device, dtype)
    name = "smollm2-135m" if shape == "standin" else shape
    inter = dense.config.intermediate_size
    results = {}
    for b in args.batches:
        results[("decode", b)] = decode_tok_s(dense, b, args.prompt, args.steps, graph)
    results[("prefill", 1)] = prefill_tok_s(dense, args.prefill, args.prefill_repeats)
    for r in args.ratios:
        k = max(1, round(r * args.num_experts))
        kn = k / args.num_experts
        # the ideal model: the same shape with an FFN k/N as wide (random weights: speed does not depend on them)
        ideal = dense if k == args.num_experts else build_dense(name, device, dtype, intermediate=int(inter * kn))
        routed = build_routed(dense, args.num_experts, k, "auto")
        for phase, b in [("decode", b) for b in args.batches] + [("prefill", 1)]:
            t_sparse = None
            if phase == "decode":
                t_ideal = decode_tok_s(ideal, b, args.prompt, args.steps, graph)
                t_routed = decode_tok_s(routed, b, args.prompt, args.steps, graph)
                if k < args.num_experts:  # the fused kernels, which "auto" does not pick (they lose on the H200)
                    routed.config.routing_impl = "sparse"
                    t_sparse = decode_tok_s(routed, b, args.prompt, args.steps, graph)
                    routed.config.routing_impl = "auto"
            else:
                t_ideal = prefill_tok_s(ideal, args.prefill, args.prefill_repeats)
                t_routed = prefill_tok_s(routed, args.prefill, args.prefill_repeats)
            t_dense = results[(phase, b)]
            with torch.no_grad():  # the timed calls run without grad; outside it the Triton path is refused
                x = torch.zeros(b if phase == "decode" else args.prefill, dense.config.hidden_size, device=device,
                                dtype=dtype)  # fmt: skip
                impl = "dense (k = N)" if k == args.num_experts else routed.model.layers[0].mlp.pick_impl(x)
            row = {"model": name, "batch": b, "k_over_n": kn, "phase": phase, "tokens": args.prefill if phase == "prefill" else 1,
                   "dense_tok_s": round(t_dense, 1), "ideal_tok_s": round(t_ideal, 1), "routed_tok_s": round(t_routed, 1),
                   "speedup": round(t_routed / t_dense, 3), "ideal_speedup": round(t_ideal / t_dense, 3),
                   "routed_impl": impl, "routed_sparse_tok_s": None if t_sparse is None else round(t_sparse, 1),
                   "sparse_speedup": None if t_sparse is None else round(t_sparse / t_dense, 3)}  # fmt: skip
            rows.append(row)
            print(f"{name:13s} {phase:7s} b={b} k/N={kn:.3g}: dense {t_dense:9.1f} ideal {t_ideal:9.1f} routed "
                  f"{t_routed:9.1f} tok/s  speedup {t_routed / t_dense:.3f} (ideal {t_ideal / t_dense:.3f}) [{impl}]",
                  flush=True)  # fmt: skip
        del routed
        if ideal is not dense:
            del ideal
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del dense
    return rows


def print_table(rows):
    print("\n| model | phase | batch | k/N | dense tok/s | ideal tok/s | routed tok/s | speedup | ideal speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["phase"] == "ffn":
            print(f"| {r['model']} FFN only | ffn | 1 | {r['k_over_n']:.3g} | {r['dense_us']} us | {r['ideal_us']} us | "
                  f"{r['routed_us']} us | {r['speedup']:.3f} | {r['ideal_speedup']:.3f} |")  # fmt: skip
        else:
            print(f"| {r['model']} | {r['phase']} | {r['batch']} | {r['k_over_n']:.3g} | {r['dense_tok_s']} | "
                  f"{r['ideal_tok_s']} | {r['routed_tok_s']} | {r['speedup']:.3f} | {r['ideal_speedup']:.3f} |")  # fmt: skip


def hardware(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}"


def write(args, rows, t_start):
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    doc = {
        "format_version": 1,
        "hardware": hardware(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix().split("/routed-llama/")[-1], *sys.argv[1:]]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
        "cuda_graphs": not args.no_graph,
        "num_experts": args.num_experts,
        "prompt_tokens": args.prompt,
        "decode_steps": args.steps,
        "wall_seconds": round(time.time() - t_start, 1),
        "rows": rows,
    }
    tmp = out / "decode.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out / "decode.json")
    plot(rows, out / "speedup.png", doc)


def plot(rows, path, doc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["phase"], r["batch"]) for r in rows if r["phase"] != "ffn"})
    if not groups:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    for g in groups:
        rs = sorted((r for r in rows if (r["model"], r["phase"], r["batch"]) == g), key=lambda r: r["k_over_n"])
        x = [r["k_over_n"] for r in rs]
        line = ax.plot(x, [r["speedup"] for r in rs], marker="o", label=f"{g[0]} {g[1]} b={g[2]}")[0]
        ax.plot(x, [r["ideal_speedup"] for r in rs], ls=":", color=line.get_color())
    for r in rows:
        if r["phase"] == "ffn":
            ax.scatter([r["k_over_n"]], [r["speedup"]], marker="*", s=90, color="k", zorder=5)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("k / N (fraction of FFN clusters kept)")
    ax.set_ylabel("speedup over dense (routed / dense tok/s)")
    ax.set_title(f"{doc['hardware']}, {doc['dtype']}: solid = routed, dotted = ideal; * = 7B FFN alone", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
