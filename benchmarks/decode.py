"""Decode, prefill and FFN speed of routed vs dense Llama, and the user's decode helper, in one command.

    python benchmarks/decode.py --out results/decode --standin CKPT     # on the GPU (about 2-4 minutes on an H200)
    python benchmarks/decode.py --device cpu --shapes tiny --steps 4 --repeats 1 --prefill 16 --out /tmp/d  # smoke

Rows (written to OUT/decode.json after every model, with a PNG OUT/speedup.png):
- phase "decode": greedy decode steps through `GreedyDecodeStep` (the modeling file's StaticCache step, one CUDA
  graph per step on CUDA) for three arms: the dense Llama, the "ideal" dense Llama whose FFN is k/N as wide (what
  perfect skipping would give), and the routed model (every layer routed, `routing_impl` "auto", or "mask" with
  --mask-rows). All arms run the same loop with the same treatment (`compiled` true: torch.compile'd, with
  --compile). tok/s = batch * steps / seconds. `impl` is what the routed arm's decode steps ran, recorded from
  its layers' `pick_impl` while the step ran its Python (the graph capture on CUDA): e.g. "triton/gemv1", "mask".
- phase "prefill": one forward over --prefill tokens (batch 1, eager), tok/s = tokens / seconds. `impl` is what the
  routed layers ran, recorded from their `pick_impl` during a warm-up forward ("prefill" for the prefill path, "mask",
  or "dense (k = N)"); with --mask-rows a second routed row runs routing_impl "mask". With --prefill-graph (CUDA)
  each row is timed again with every arm's forward captured in a CUDA graph (`cuda_graph` true): no Python or launch
  time, so the ratio is the GPU's work alone, where eager prefill of one prompt is bound by the host.
- phase "generate": the user's path, `model.fast_generate(prompt, max_new_tokens=steps)`, routed at k vs the same
  model at k = N (dense compute), the third call of each (steady state: the first call of a shape captures the decode
  step, the second the prompt length's prefill); `ran` is what its routed layers ran (prefill and decode steps),
  recorded as above; `loop_speedup` is the decode row's speedup for the same model, batch and k/N, and
  `fraction_of_loop_gain` (speedup - 1) / (loop_speedup - 1) where the loop gained (loop_speedup > 1).
- phase "ffn": one FFN layer alone (cycling over 6 layers' weights so no cache holds them): dense (cuBLAS), ideal,
  the mask path, each Triton decode variant (multiply mode x reduction, up to TRITON_MAX_TOKENS tokens) and the
  prefill path ("prefill": `triton_prefill_ffn`, above AUTO_TRITON_MAX_TOKENS tokens; "prefill/gather": the same
  with the routing kernel's per-row score gather, which N > 64 clusters take, instead of a bit mask); `bytes_read`
  is what the decode kernels read (the weight tiles of kept clusters, rounded out to the tiles, plus the
  centroids) and `gb_s` = bytes_read / time.
Each arm is timed --repeats times, interleaved with the other arms of its row; `*_tok_s` (or `*_us`) are medians and
`min`/`median`/`max` give the spread of the routed arm (dense and ideal spreads are in `spread`). A variant that
fails is recorded with its error and the run goes on. Weights are random (speed does not depend on them) and the
routed model's clusters are equal splits, except for the stand-in row (--standin: a routed checkpoint folder, whose
k-means clusters are used, or a dense folder / GGUF file, split equally).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

import modeling_routed_llama as mrl  # the project installed (pip install -e .): no path games
from configuration_routed_llama import RoutedLlamaConfig

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "llama7b": (4096, 11008, 32, 32, 32, 32000),
    "tinyllama": (2048, 5632, 22, 32, 4, 32000),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "tiny": (64, 192, 2, 4, 2, 256),
}
LLAMA_KEYS = ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "auto_map")


def add_device_args(p: argparse.ArgumentParser):
    """--device and --dtype, as every decode-family benchmark takes them (defaults: the GPU if there is one, bf16)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for decode.json and speedup.png (created)")
    p.add_argument("--shapes", nargs="*", default=["llama7b", "tinyllama"], choices=sorted(SHAPES))
    p.add_argument("--standin", default=None, help="real-weights row: a routed checkpoint folder, or a dense one/GGUF")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 1.0], help="k/N values")
    p.add_argument("--num-clusters", type=int, default=32, help="N for the random-weight shapes")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens (0: no prefill rows)")
    p.add_argument("--ffn-tokens", type=int, nargs="*", default=[1, 4], help="token counts of the FFN-alone rows")
    p.add_argument("--ffn-reps", type=int, default=100)
    p.add_argument("--compile", action="store_true",
                   help="also time the decode and fast_generate rows with every arm's decode step torch.compile'd")
    p.add_argument("--compile-batches", type=int, nargs="*", default=None,
                   help="batches of the compiled rows (default: --batches); each compiled arm costs a compilation")
    p.add_argument("--compile-ratios", type=float, nargs="*", default=None, help="k/N of the compiled rows "
                   "(default: --ratios)")  # fmt: skip
    p.add_argument("--mask-rows", action="store_true", help="also time the routed arm with routing_impl='mask'")
    p.add_argument("--prefill-graph", action="store_true",
                   help="also time the prefill rows with each arm's forward captured in a CUDA graph (CUDA only)")
    p.add_argument("--tune", action="store_true", help="time alternative Triton tile sizes on the first shape's FFN")
    p.add_argument("--apply-tuning", action="store_true",
                   help="with --tune: the rows after the tuning run with the fastest tiles found (recorded)")
    p.add_argument("--only-ffn", action="store_true", help="only the FFN rows (and --tune): no whole-model rows")
    p.add_argument("--phases", nargs="+", default=["decode", "prefill", "generate"],
                   choices=["decode", "prefill", "generate"], help="whole-model phases to time (default: all)")
    add_device_args(p)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        p.error("--repeats and --steps must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def llama_config(shape: str, intermediate: int | None = None):
    from transformers import LlamaConfig

    h, i, n, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=h, intermediate_size=intermediate or i, num_hidden_layers=n,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip


def build_dense(config, device, dtype, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # built directly in `dtype` on the device: a 7B model initialises in seconds
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def narrower(config, fraction: float):
    """The same Llama config with an FFN `fraction` as wide (the ideal arm)."""
    from transformers import LlamaConfig

    d = {k: v for k, v in config.to_dict().items() if k not in LLAMA_KEYS}
    d["intermediate_size"] = max(1, round(config.intermediate_size * fraction))
    return LlamaConfig(**d)


def routed_from_dense(dense, num_clusters: int):
    """A RoutedLlama sharing the dense model's weight tensors, every layer routed, equal-split clusters."""
    from transformers.initialization import no_init_weights

    fields = {k: v for k, v in dense.config.to_dict().items() if k not in LLAMA_KEYS}
    cfg = RoutedLlamaConfig(**fields, num_experts=num_clusters, num_experts_per_tok=num_clusters, routing_impl="auto")
    with no_init_weights(), torch.device(dense.device):
        routed = mrl.RoutedLlamaForCausalLM(cfg).to(dense.dtype)
    routed.load_state_dict(dense.state_dict(), strict=False, assign=True)
    for mlp in routed.model.routed_mlps().values():
        mlp.refresh_router()
    return routed.eval()


def load_standin(path: str, device, dtype, num_clusters: int):
    """(name, dense, routed) from a routed checkpoint folder (its clusters) or a dense folder / GGUF (equal splits)."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    p = Path(path)
    config_file = p / "config.json"
    if p.is_dir() and config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "routed_llama":
        routed = mrl.RoutedLlamaForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval()
        routed.config.routing_impl = "auto"
        llama_fields = LlamaConfig().to_dict().keys() - set(LLAMA_KEYS)
        fields = {k: v for k, v in routed.config.to_dict().items() if k in llama_fields}
        with torch.device("meta"):
            dense = LlamaForCausalLM(LlamaConfig(**fields))
        state = {k: v for k, v in routed.state_dict().items() if ".router." not in k}
        dense.load_state_dict(state, strict=False, assign=True)
        dense.model.rotary_emb = routed.model.rotary_emb  # a buffer the state dict does not hold
        return f"standin ({p.name}, k-means clusters)", dense.eval(), routed
    from routed_llama.source import quiet, remove_quantization, resolve_source

    source = resolve_source(path)
    with quiet():
        dense = LlamaForCausalLM.from_pretrained(source.path, dtype=torch.float32, **source.kwargs)
    dense = remove_quantization(dense).to(device=device, dtype=dtype).eval()
    return f"standin ({Path(path).name}, equal-split clusters)", dense, routed_from_dense(dense, num_clusters)


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cuda_graphs(device) -> bool:
    """Whether decode steps are captured in CUDA graphs (on CUDA)."""
    return torch.device(device).type == "cuda"


class Ran:
    """What the routed layers of `model` run while this context is active: the set of `pick_impl` answers, with the
    Triton multiply mode ("triton/gemv1", "triton/dot", "mask", ...). On CUDA a decode step's Python runs only while
    its graph is captured, so this is recorded there, not inferred from a separate call. For a compiled step
    (`compiled_for` = (tokens, device)) a spy inside the traced code would be compiled into the step: the layers are
    asked eagerly instead, on exit (`impl_name`)."""

    def __init__(self, model, compiled_for: tuple[int, str] | None = None):
        self.model, self.compiled_for = model, compiled_for
        spied = hasattr(model.model, "routed_mlps") and compiled_for is None
        self.mlps = list(model.model.routed_mlps().values()) if spied else []
        self.seen = set()

    def __enter__(self):
        for mlp in self.mlps:

            def spy(x, pick=mlp.pick_impl):
                impl = pick(x)
                self.seen.add(f"triton/{mrl.triton_mode(x.shape[0])}" if impl == "triton" else impl)
                return impl

            mlp.pick_impl = spy  # an instance attribute over the method, removed on exit
        return self

    def __exit__(self, *exc):
        for mlp in self.mlps:
            del mlp.pick_impl
        if self.compiled_for is not None:
            self.seen.add(impl_name(self.model, *self.compiled_for))


class DecodeArm:
    """One arm of a decode row: a model, the routing it runs with (set before every use: prefill runs eagerly and
    reads it), and its own GreedyDecodeStep (cache + graph). `ran` is what its decode steps' routed layers ran."""

    def __init__(self, model, batch: int, args, top_k=None, impl=None, compiled=False):
        self.model, self.top_k, self.impl, self.batch = model, top_k, impl, batch
        self.apply()
        cache_len = args.prompt + args.steps + 16
        graph = cuda_graphs(args.device)
        self.ran = Ran(model, (batch, args.device) if compiled else None)
        with self.ran:  # the capture (on CUDA) runs the step's Python once
            self.step = mrl.GreedyDecodeStep(model, batch, cache_len, cuda_graph=graph, compile=compiled)
        g = torch.Generator().manual_seed(batch)
        self.prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=g).to(args.device)

    def apply(self):
        if self.top_k is not None:
            self.model.model.set_top_k(self.top_k)
        if self.impl is not None:
            self.model.config.routing_impl = self.impl

    def ran_name(self) -> str:
        """The implementations the decode steps ran, joined by "+"; "dense (k = N)" where no routed layer routes."""
        return "+".join(sorted(self.ran.seen)) or "dense (k = N)"

    @torch.no_grad()
    def start(self, warm_steps: int = 1) -> torch.Tensor:
        """Prefill the prompt into the emptied cache (routing set first) and take `warm_steps` untimed steps, whose
        implementations `ran` records; the tokens to feed next."""
        self.apply()
        self.step.reset()
        tokens = self.step.forward(self.prompt).argmax(-1)  # prefill (not a decode step: not recorded)
        with self.ran:  # untimed steps: eager without a graph, a replay (no Python) with one
            for _ in range(warm_steps):
                tokens = self.step(tokens)
        sync(self.prompt.device)
        return tokens

    @torch.no_grad()
    def tok_s(self, steps: int) -> float:
        tokens = self.start()
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = self.step(tokens)
        sync(self.prompt.device)
        return self.batch * steps / (time.perf_counter() - t0)


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: [value per repeat]}, calling every fn once per repeat in turn; a failing fn gets its error string."""
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if isinstance(out[name], str):
                continue
            try:
                out[name].append(fn())
            except Exception as exc:  # recorded in the row, the run goes on
                out[name] = error_text(exc)
    return out


def error_text(exc: BaseException) -> str:
    traceback.print_exception(exc, limit=-3)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def make_row(base: dict, values: dict, routed: str = "routed", larger_is_faster=True, unit="tok_s") -> dict:
    """A row from per-repeat values of the arms "dense", "ideal" (optional) and `routed`; medians and spreads."""
    row = dict(base)
    errors = {k: v for k, v in values.items() if isinstance(v, str)}
    med = {k: statistics.median(v) for k, v in values.items() if not isinstance(v, str) and v}
    for arm in ("dense", "ideal", "routed"):
        src = routed if arm == "routed" else arm
        row[f"{arm}_{unit}"] = round(med[src], 2) if src in med else None
    d, r, i = med.get("dense"), med.get(routed), med.get("ideal")
    ratio = (lambda a, b: a / b) if larger_is_faster else (lambda a, b: b / a)
    row["speedup"] = round(ratio(r, d), 4) if d and r else None
    row["ideal_speedup"] = round(ratio(i, d), 4) if d and i else None
    row["repeats"] = len(values.get(routed, [])) if not isinstance(values.get(routed), str) else 0
    row.update({k: round(v, 2) for k, v in spread(values[routed]).items()} if routed in med else {})
    row["spread"] = {k: {kk: round(vv, 2) for kk, vv in spread(v).items()} for k, v in values.items() if k in med}
    if errors:
        row["errors"] = errors
    return row


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def impl_name(model, batch: int, device) -> str:
    """What the first routed layer picks for `batch` tokens without gradients ("triton/gemv1", "mask", ...), as the
    prefill and compiled rows run it, or "dense (k = N)" (also for a dense model)."""
    mlps = model.model.routed_mlps() if hasattr(model.model, "routed_mlps") else {}
    mlp = next(iter(mlps.values()), None)
    if mlp is None or mlp.router.top_k >= mlp.router.num_experts:
        return "dense (k = N)"
    with torch.no_grad():
        impl = mlp.pick_impl(torch.zeros(batch, mlp.hidden_size, device=device, dtype=model.dtype))
    return f"triton/{mrl.triton_mode(batch)}" if impl == "triton" else impl


def row_grid(args, compiled) -> tuple[list[int], list[float]]:
    """(batches, k/N ratios) of the decode and generate rows: the compiled ones may be a subset."""
    if not compiled:
        return args.batches, args.ratios
    batches = args.batches if args.compile_batches is None else args.compile_batches
    return batches, args.ratios if args.compile_ratios is None else args.compile_ratios


def decode_rows(name, dense, routed, ideals, args, compiled) -> list[dict]:
    """One decode row per (batch, k/N [, impl]): dense, ideal and routed arms timed in the same loop."""
    n = routed.config.num_experts
    rows = []
    batches, ratios = row_grid(args, compiled)
    for batch in batches:
        for ratio in ratios:
            k = max(1, round(ratio * n))
            for impl in ["auto"] + (["mask"] if args.mask_rows and k < n else []):
                base = {"model": name, "batch": batch, "k_over_n": k / n, "phase": "decode", "compiled": compiled}
                arms, setup = {}, {}
                try:
                    for arm, model, kw in [("dense", dense, {}), ("ideal", ideals.get(ratio) if k < n else None, {}),
                                           ("routed", routed, {"top_k": k, "impl": impl})]:  # fmt: skip
                        if model is None:
                            continue
                        t0 = time.perf_counter()
                        arms[arm] = DecodeArm(model, batch, args, compiled=compiled, **kw)
                        setup[arm] = round(time.perf_counter() - t0, 1)  # capture (and compilation) seconds
                    base["setup_seconds"] = setup
                    values = interleaved({a: (lambda arm=arm: arm.tok_s(args.steps)) for a, arm in arms.items()},
                                         args.repeats)  # fmt: skip
                    base["impl"] = arms["routed"].ran_name()  # what the timed steps ran, as recorded
                    base["routing_impl"] = routed.config.routing_impl
                    row = make_row(base, values)
                except Exception as exc:
                    row = {**base, "error": error_text(exc)}
                rows.append(row)
                print_row(row)
                del arms
                free(args.device)
    return rows


def prefill_rows(name, dense, routed, ideals, args) -> list[dict]:
    """One prefill row per k/N (and, with --mask-rows, one with routing_impl "mask"): one forward of --prefill tokens,
    dense, ideal and routed arms interleaved; `impl` is what the routed layers ran in a warm-up forward."""
    if args.prefill <= 0:
        return []
    n = routed.config.num_experts
    ids = torch.randint(0, dense.config.vocab_size, (1, args.prefill), device=args.device)

    def forward(model):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def timer(model, k=None, impl=None, graph=False):
        captured = []  # the arm's CUDA graph, captured at its first call (with its routing set) and then replayed

        @torch.no_grad()
        def run():
            if k is not None:
                routed.model.set_top_k(k)
                routed.config.routing_impl = impl
            if graph and not captured:
                captured.append(mrl.capture_cuda_graph(lambda: forward(model))[0])
            call = captured[0].replay if graph else lambda: forward(model)
            for _ in range(2):  # warm-up: the first call of a shape allocates and may compile
                call()
            sync(args.device)
            reps = 10 if graph else 3  # a replay has no host time to average out, only short kernels to time
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            sync(args.device)
            return reps * args.prefill / (time.perf_counter() - t0)

        return run

    rows = []
    graphs = [False] + ([True] if args.prefill_graph and cuda_graphs(args.device) else [])
    for ratio, impl, graph in [(r, i, g) for r in args.ratios for i in ["auto", "mask"] for g in graphs]:
        k = max(1, round(ratio * n))
        if impl == "mask" and not (args.mask_rows and k < n):
            continue
        base = {"model": name, "batch": 1, "k_over_n": k / n, "phase": "prefill", "compiled": False,
                "cuda_graph": graph, "tokens": args.prefill, "routing_impl": impl}  # fmt: skip
        fns = {"dense": timer(dense, graph=graph), "routed": timer(routed, k, impl, graph)}
        if k < n and ratio in ideals:
            fns["ideal"] = timer(ideals[ratio], graph=graph)
        routed.model.set_top_k(k)
        routed.config.routing_impl = impl
        try:
            with Ran(routed) as ran, torch.no_grad():  # what the routed layers run, recorded
                forward(routed)
            base["impl"] = "+".join(sorted(ran.seen)) or "dense (k = N)"
            row = make_row(base, interleaved(fns, args.repeats))
        except Exception as exc:
            row = {**base, "error": error_text(exc)}
        rows.append(row)
        print_row(row)
    routed.config.routing_impl = "auto"
    return rows


def generate_rows(name, routed, args, loop_rows, compiled=False) -> list[dict]:
    """The user's path: fast_generate (with compile=`compiled`) at k vs at k = N, same model, same call."""
    n = routed.config.num_experts
    rows = []
    batches, ratios = row_grid(args, compiled)
    for batch in batches:
        for ratio in [r for r in ratios if r < 1][:1]:
            k = max(1, round(ratio * n))
            prompt = torch.randint(0, routed.config.vocab_size, (batch, args.prompt), device=args.device)
            base = {"model": name, "batch": batch, "k_over_n": k / n, "phase": "generate", "compiled": compiled,
                    "impl": "fast_generate", "new_tokens": args.steps}  # fmt: skip

            def generate():
                routed.fast_generate(prompt, args.steps, eos_token_id=[], compile=compiled)

            def timer(top_k):
                def run():
                    routed.model.set_top_k(top_k)
                    # a new k is a new key: the first call captures the decode step (and compiles), the second the
                    # prompt length's prefill; the timed third replays both (fast_generate's steady state)
                    generate()
                    generate()
                    sync(args.device)
                    t0 = time.perf_counter()
                    generate()
                    sync(args.device)
                    return batch * args.steps / (time.perf_counter() - t0)

                return run

            ran = Ran(routed, (batch, args.device) if compiled else None)
            routed.model.set_top_k(k)
            try:
                with ran:  # the first call (untimed in every repeat) captures its graph: record what the steps run
                    generate()
            except Exception as exc:  # recorded in the row, the run goes on
                rows.append({**base, "error": error_text(exc)})
                print_row(rows[-1])
                routed.clear_fast_generate()
                continue
            base["ran"] = sorted(ran.seen)
            row = make_row(base, interleaved({"dense": timer(n), "routed": timer(k)}, args.repeats))
            loop = [r["speedup"] for r in loop_rows if r.get("phase") == "decode" and r.get("batch") == batch
                    and r.get("k_over_n") == k / n and r.get("routing_impl") != "mask"
                    and bool(r.get("compiled")) == compiled and r.get("speedup")]  # fmt: skip
            if loop and row.get("speedup"):
                row["loop_speedup"] = loop[0]
                # the bar: the user's path keeps >= 90% of the loop's gain (a fraction only of a gain)
                row["fraction_of_loop_gain"] = round((row["speedup"] - 1) / (loop[0] - 1), 3) if loop[0] > 1 else None
            rows.append(row)
            print_row(row)
            routed.clear_fast_generate()
    routed.model.set_top_k(n)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The FFN alone
# ---------------------------------------------------------------------------------------------------------------


def ffn_variants(tokens: int) -> list[dict]:
    """Triton variants timed for this many tokens: the mode "auto" would pick first, then the others that apply; per
    mode every reduction of down's partial sums."""
    modes = ["gemv1"] if tokens == 1 else [mrl.triton_mode(tokens), *({"gemv", "dot"} - {mrl.triton_mode(tokens)})]
    return [{"mode": m, "reduce": red} for m in modes for red in ("split", "atomic", "last")]


def variant_name(v: dict) -> str:
    """A Triton variant's row name: "gemv1/split"."""
    return f"{v['mode']}/{v['reduce']}"


def bytes_read(mlp, x, variant: dict) -> tuple[int, int]:
    """(bytes the kernels read for x, bytes of the kept clusters' weights): weight tiles of rows any token keeps,
    rounded out to the kernels' tiles, plus the centroids."""
    t = mrl.resolved_tiles(variant["mode"], variant)
    with torch.no_grad():
        keep = torch.zeros(x.shape[0], mlp.router.num_experts, dtype=torch.bool, device=x.device)
        keep.scatter_(1, mlp.router(x, mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)), True)
    rows = keep.any(0)[mlp.router.expert_of_neuron(mlp.intermediate_size)].cpu()  # (I,) union of kept neurons
    h, e = mlp.hidden_size, mlp.gate_proj.weight.element_size()

    def tiled(size):
        pad = -rows.numel() % size
        return int(torch.cat([rows, rows.new_zeros(pad)]).view(-1, size).any(1).sum()) * size

    gate_up = 2 * min(tiled(t["BLOCK_R"]), rows.numel()) * h * e
    down = min(tiled(t["BLOCK_C"]), rows.numel()) * h * e
    centroids = mlp.router.num_experts * h * e if mlp.router.kind == "centroid" else 0
    return gate_up + down + centroids, 3 * int(rows.sum()) * h * e


def time_us(fn, reps: int, device, graph: bool) -> float:
    """Microseconds per call of fn (a CUDA graph of `reps` calls on CUDA)."""
    if graph:

        def calls():
            for _ in range(reps):
                fn()

        run = mrl.capture_cuda_graph(calls)[0].replay
    else:
        reps = 1

        def run():
            fn()

    run()
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1e6


def ffn_layers(shape: str, args, ratio: float, layers: int = 6):
    """(dense, ideal, routed): `layers` FFN layers of each kind at this shape; routed shares dense's weights."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg, n = llama_config(shape), args.num_clusters
    k = max(1, round(ratio * n))
    rcfg = RoutedLlamaConfig(**{a: b for a, b in cfg.to_dict().items() if a not in LLAMA_KEYS}, num_experts=n,
                             num_experts_per_tok=k)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        dense = [LlamaMLP(cfg).to(dtype).eval() for _ in range(layers)]
        ideal = [LlamaMLP(narrower(cfg, k / n)).to(dtype).eval() for _ in range(layers)]
        routed = [mrl.RoutedLlamaMLP(rcfg, 0).to(dtype).eval() for _ in range(layers)]
    for d, r in zip(dense, routed):
        r.load_state_dict(d.state_dict(), strict=False, assign=True)
        r.refresh_router()
    return dense, ideal, routed


def ffn_rows(shape: str, args) -> list[dict]:
    """One FFN layer alone, M tokens: dense vs ideal vs every Triton variant (and the mask path)."""
    device = torch.device(args.device)
    runs_kernels = device.type == "cuda" or mrl.TRITON_INTERPRET
    graph = device.type == "cuda"
    rows = []
    for ratio in [r for r in args.ratios if r < 1]:
        dense, ideal, routed = ffn_layers(shape, args, ratio)
        n, k = routed[0].router.num_experts, routed[0].router.top_k
        hidden, inter = routed[0].hidden_size, routed[0].intermediate_size
        for tokens in args.ffn_tokens:
            x = torch.randn(tokens, hidden, device=device, dtype=dense[0].gate_proj.weight.dtype)
            fns = {"dense": cycle(dense, x), "ideal": cycle(ideal, x)}
            fns["mask"] = cycle([m.forward_mask for m in routed], x)
            if runs_kernels and tokens <= mrl.TRITON_MAX_TOKENS:  # the decode kernels
                variants = {variant_name(v): v for v in ffn_variants(tokens)}
                for name, v in variants.items():
                    fns[name] = cycle([kernel_call(m, v) for m in routed], x)
            if runs_kernels and tokens > mrl.AUTO_TRITON_MAX_TOKENS:  # the prefill path, as "auto" runs it there
                fns["prefill"] = cycle([kernel_call(m, {"mode": "prefill"}) for m in routed], x)
                # the same with each row's score gathered instead of the kept set's bit mask (what N > 64 runs)
                gather = {"mode": "prefill", "keep_bits": False}
                fns["prefill/gather"] = cycle([kernel_call(m, gather) for m in routed], x)
            n_layers = len(dense)  # each timed call cycles through every layer: report per layer
            per_call = {name: (lambda f=f: time_us(f, args.ffn_reps, device, graph) / n_layers)
                        for name, f in fns.items()}  # fmt: skip
            values = interleaved(per_call, args.repeats)
            for name in [nm for nm in fns if nm not in ("dense", "ideal")]:
                base = {"model": shape, "batch": tokens, "k_over_n": k / n, "phase": "ffn", "compiled": False,
                        "impl": name}  # fmt: skip
                row = make_row(base, {"dense": values["dense"], "ideal": values["ideal"], name: values[name]},
                               routed=name, larger_is_faster=False, unit="us")  # fmt: skip
                if not name.startswith(("mask", "prefill")) and row.get("routed_us"):
                    read, kept = bytes_read(routed[0], x, variants[name])
                    row.update(bytes_read=read, kept_bytes=kept, gb_s=round(read / row["routed_us"] / 1e3, 1))
                if row.get("dense_us"):
                    dense_bytes = 3 * hidden * inter * dense[0].gate_proj.weight.element_size()
                    row["dense_gb_s"] = round(dense_bytes / row["dense_us"] / 1e3, 1)
                rows.append(row)
                print_row(row)
        del dense, ideal, routed
        free(device)
    return rows


def cycle(fns, x):
    """A call of every layer in turn on the same input (so each weight is read from memory, not from cache)."""

    def body():
        for f in fns:
            f(x)

    return body


def kernel_call(mlp, variant: dict):
    """`triton_routed_ffn` with these tiles, called as RoutedLlamaMLP.forward_triton calls it (the prefill path gets
    the cached fp32 centroids)."""
    r = mlp.router
    centroids = None
    if r.kind == "centroid":
        centroids = r.centroids_fp32() if variant.get("mode") == "prefill" else r.centroids
    kw = dict(w_gate=mlp.gate_proj.weight, w_up=mlp.up_proj.weight, w_down=mlp.down_proj.weight, top_k=r.top_k,
              row_cluster=r.row_cluster(mlp.intermediate_size), offsets=r.expert_offsets, centroids=centroids,
              tiles=variant)  # fmt: skip
    return lambda x: mrl.triton_routed_ffn(x, **kw)


# Tile choices timed by --tune, per multiply mode: first the gate/up kernel's (with down's defaults), then down's
# (with the fastest gate/up), a coordinate search rather than the full product.
TUNE_GATE_UP = {
    "gemv1": [dict(BLOCK_R=r, BLOCK_K=kk, warps_gu=w) for r in (2, 4, 8, 16) for kk in (256, 512, 1024)
              for w in (2, 4, 8)],
    "dot": [dict(BLOCK_R=r, BLOCK_K=kk, warps_gu=w) for r in (16, 32, 64) for kk in (64, 128, 256) for w in (4, 8)],
}  # fmt: skip
TUNE_DOWN = {
    "gemv1": [dict(BLOCK_H=bh, BLOCK_C=bc, warps_d=w, ctas_per_sm=c)
              for bh, bc in ((8, 512), (16, 256), (16, 512), (32, 128), (32, 256), (64, 128))
              for w in (2, 4, 8) for c in (4, 8, 16)],
    "dot": [dict(BLOCK_H=bh, BLOCK_C=bc, warps_d=w, ctas_per_sm=c) for bh, bc in ((16, 128), (32, 64), (32, 128),
            (64, 64)) for w in (4, 8) for c in (4, 8, 16)],
}  # fmt: skip


def tune_start(mode: str) -> dict:
    """The search's first point: the tiles and options `triton_routed_ffn` uses for this mode (a mode's own entries,
    e.g. gemv1's ctas_per_sm and pdl, over TRITON_OPTIONS'), with the "split" reduction."""
    return {"mode": mode, **mrl.resolved_tiles(mode), "reduce": "split"}


def tune_rows(shape: str, args) -> list[dict]:
    """Microseconds per FFN layer (k/N = 1/2) for alternative tiles of the 1-token ("gemv1") and 4-token ("dot")
    modes, gate/up's first, then down's; with --apply-tuning the fastest become TRITON_TILES for the rows after."""
    device = torch.device(args.device)
    _, _, routed = ffn_layers(shape, args, 0.5)
    rows = []

    def timed(mode, tokens, variant, stage):
        x = torch.randn(tokens, routed[0].hidden_size, device=device, dtype=routed[0].gate_proj.weight.dtype)
        row = {"tokens": tokens, "stage": stage, **variant}
        try:
            fn = cycle([kernel_call(m, variant) for m in routed], x)
            row["us"] = min(round(time_us(fn, args.ffn_reps, device, device.type == "cuda") / len(routed), 2)
                            for _ in range(2))  # fmt: skip
        except Exception as exc:
            row["error"] = error_text(exc)
        rows.append(row)
        print(row, flush=True)
        return row

    for mode, tokens in (("gemv1", 1), ("dot", 4)):
        best = tune_start(mode)
        for stage, grid in (("gate_up", TUNE_GATE_UP[mode]), ("down", TUNE_DOWN[mode])):
            results = [timed(mode, tokens, {**best, **tiles}, stage) for tiles in grid]
            fastest = min((r for r in results if r.get("us")), key=lambda r: r["us"], default=None)
            if fastest is not None:
                best = {k: fastest[k] for k in best}
        print(f"fastest {mode}: {best}", flush=True)
        if args.apply_tuning:  # a mode's own ctas_per_sm overrides TRITON_OPTIONS' (triton_routed_ffn)
            mrl.TRITON_TILES[mode].update({k: v for k, v in best.items() if k not in ("mode", "reduce")})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Driver and output
# ---------------------------------------------------------------------------------------------------------------


def free(device):
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def model_rows(shape: str, args) -> list[dict]:
    """Decode (eager-graph and, with --compile, compiled), prefill and user's-path rows for one model."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if shape == "standin":
        name, dense, routed = load_standin(args.standin, device, dtype, args.num_clusters)
    else:
        name, dense = shape, build_dense(llama_config(shape), device, dtype)
        routed = routed_from_dense(dense, args.num_clusters)
    n = routed.config.num_experts
    n_routed, n_layers = len(routed.model.routed_mlps()), routed.config.num_hidden_layers
    # the ideal arm narrows every FFN: it is only comparable when every layer routes
    ratios = [r for r in args.ratios if r < 1] if n_routed == n_layers else []
    ideals = {r: build_dense(narrower(dense.config, max(1, round(r * n)) / n), device, dtype) for r in ratios}
    phases = set(args.phases)
    rows = decode_rows(name, dense, routed, ideals, args, compiled=False) if "decode" in phases else []
    rows += prefill_rows(name, dense, routed, ideals, args) if "prefill" in phases else []
    rows += generate_rows(name, routed, args, rows) if "generate" in phases else []
    if args.compile:
        rows += decode_rows(name, dense, routed, ideals, args, compiled=True) if "decode" in phases else []
        rows += generate_rows(name, routed, args, rows, compiled=True) if "generate" in phases else []
    for row in rows:
        row["routed_layers"] = f"{n_routed}/{n_layers}"
    return rows


def guarded(fn, label: str, *a) -> list[dict]:
    """fn(*a), or one error row if it raises (a model that cannot be built must not end the run)."""
    try:
        return fn(*a)
    except Exception as exc:
        return [{"model": label, "phase": "setup", "error": error_text(exc)}]


def run(args, argv=None) -> dict:
    from routed_llama.hardware import hardware
    from routed_llama.io import command_line

    if args.compile:  # every compiled arm (model, batch, k) is one more entry for the same forward code
        cfg = torch._dynamo.config
        setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 64)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "format_version": 2,
        "hardware": hardware(args.device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(argv),
        "dtype": args.dtype,
        "num_clusters": args.num_clusters,
        "prompt_tokens": args.prompt,
        "decode_steps": args.steps,
        "repeats": args.repeats,
        "triton_tiles": mrl.TRITON_TILES,
        "triton_options": mrl.TRITON_OPTIONS,
        "auto_triton_max_tokens": mrl.AUTO_TRITON_MAX_TOKENS,
        "rows": [],
        "rows_in_progress": [],  # the finished rows of the step under way (moved to "rows" when it ends)
    }

    def on_row(row):
        doc["rows_in_progress"].append(row)
        write(doc, out, t0)

    global ON_ROW
    ON_ROW = on_row
    if args.tune and args.shapes:  # first: with --apply-tuning every row below runs the tiles found
        doc["tuning"] = guarded(tune_rows, args.shapes[0], args.shapes[0], args)
        write(doc, out, t0)
    if args.shapes and args.ffn_tokens:
        doc["rows"] += guarded(ffn_rows, args.shapes[0], args.shapes[0], args)
        doc["rows_in_progress"] = []
        write(doc, out, t0)
    for shape in [] if args.only_ffn else args.shapes + (["standin"] if args.standin else []):
        doc["rows"] += guarded(model_rows, shape, shape, args)
        doc["rows_in_progress"] = []
        free(args.device)
        write(doc, out, t0)
    ON_ROW = None
    print_table(doc["rows"])
    return doc


def write(doc: dict, out: Path, t0: float):
    from routed_llama.io import write_json

    doc["wall_seconds"] = round(time.time() - t0, 1)
    write_json(out / "decode.json", doc)
    try:
        plot(doc, out / "speedup.png")
    except Exception as exc:  # a figure must not cost the numbers
        error_text(exc)


# Called with every finished row (set by `run`): the rows of a model in progress are written as they come, so a run
# stopped by a timeout keeps what it measured.
ON_ROW = None


def print_row(r: dict):
    if ON_ROW is not None:
        ON_ROW(r)
    if "error" in r:
        print(f"{r.get('model')} {r.get('phase')} b={r.get('batch')} k/N={r.get('k_over_n')}: ERROR {r['error']}")
        return
    unit = "us" if r["phase"] == "ffn" else "tok_s"
    print(f"{r['model']:12s} {r['phase']:8s} b={r['batch']} k/N={r['k_over_n']:.3g} {r.get('impl', ''):14s} "
          f"dense {r.get('dense_' + unit)} ideal {r.get('ideal_' + unit)} routed {r.get('routed_' + unit)} "
          f"speedup {r.get('speedup')} (ideal {r.get('ideal_speedup')})"
          + (f" {r['gb_s']} GB/s" if r.get("gb_s") else "") + (f" errors {r['errors']}" if r.get("errors") else ""),
          flush=True)  # fmt: skip


def print_table(rows):
    print("\n| model | phase | batch | k/N | impl | compiled | dense | ideal | routed | speedup | ideal speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r.get('model')} | {r.get('phase')} | {r.get('batch')} | {r.get('k_over_n')} | error: "
                  f"{r['error'][:60]} | | | | | | |")  # fmt: skip
            continue
        unit = "us" if r["phase"] == "ffn" else "tok_s"
        print(f"| {r['model']} | {r['phase']} | {r['batch']} | {r['k_over_n']:.3g} | {r.get('impl')} | "
              f"{r.get('compiled')} | {r.get('dense_' + unit)} | {r.get('ideal_' + unit)} | {r.get('routed_' + unit)} "
              f"| {r.get('speedup')} | {r.get('ideal_speedup')} |")  # fmt: skip


def plot(doc: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r.get("speedup") and r["phase"] in ("decode", "generate", "prefill")]
    ffn = [r for r in doc["rows"] if r.get("speedup") and r["phase"] == "ffn"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    def masked(r):  # a decode or prefill row timed with routing_impl "mask" (--mask-rows)
        return r.get("routing_impl", r.get("impl")) == "mask"

    def key(r):
        return r["model"], r["phase"], r["batch"], masked(r), r["compiled"], bool(r.get("cuda_graph"))

    groups = sorted({key(r) for r in rows})
    for g in groups:
        rs = sorted((r for r in rows if key(r) == g), key=lambda r: r["k_over_n"])
        label = (f"{g[0]} {g[1]} b={g[2]}" + (" mask" if g[3] else "") + (" compiled" if g[4] else "")
                 + (" graph" if g[5] and g[1] == "prefill" else ""))  # fmt: skip
        x = [r["k_over_n"] for r in rs]
        line = ax.plot(x, [r["speedup"] for r in rs], marker="o", label=label)[0]
        if any(r.get("ideal_speedup") for r in rs):
            ax.plot(x, [r.get("ideal_speedup") or float("nan") for r in rs], ls=":", color=line.get_color())
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("k / N (fraction of FFN clusters kept)")
    ax.set_ylabel("speedup over dense (median)")
    ax.set_title("decode / prefill / fast_generate: solid = routed, dotted = ideal", fontsize=9)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=6, ncol=2)
    labels = [f"{r['model']} M={r['batch']} k/N={r['k_over_n']:.2g} {r['impl']}" for r in ffn]
    bx.barh(range(len(ffn)), [r["speedup"] for r in ffn], color=["C1" if r["impl"] == "mask" else "C0" for r in ffn])
    for i, r in enumerate(ffn):
        bx.text(r["speedup"], i, f" {r.get('gb_s', '')} GB/s" if r.get("gb_s") else "", va="center", fontsize=6)
    bx.set_yticks(range(len(ffn)), labels, fontsize=6)
    bx.axvline(1.0, color="grey", lw=0.8)
    bx.set_xlabel("FFN alone: speedup over dense (cuBLAS)")
    fig.suptitle(f"{doc['hardware']['name']}, {doc['dtype']}, {doc['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    run(parse_args(argv), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
