"""Correctness of the routed decode path on a CUDA GPU; writes a JSON report and exits 1 if any check fails.

    python benchmarks/check_gpu.py --out results/decode/check_gpu.json --checkpoint CKPT   # on the GPU
    python benchmarks/check_gpu.py --device cpu --quick --out /tmp/check.json              # the CPU-side logic only

Checks (one record each: {check, ..., ok, and the measured error or the error message}):
- "kernel": `triton_routed_ffn` against the mask reference (`forward_mask`), for fp32, bf16 and fp16, both routers,
  cluster layouts that are uneven and have N not a power of two, 1-8 and 16 tokens, every multiply mode and the
  reductions of down's partial sums in --reduces ("last" must also give the bits of "split": `same_as_split`);
  17 and 512 tokens through the prefill path, whose reference is the mask path in the same dtype.
  Half-precision outputs are compared with an fp32 reference computed on the same rounded weights.
  Metric: max |out - ref| / max |ref| over the tokens whose k-th and (k+1)-th reference scores are not a near tie
  (relative gap >= 1e-5; such tokens may legitimately route differently and are counted in `near_ties`).
  Tolerances: TOL.
- "graph": the same comparison for a call captured in a CUDA graph and replayed on new inputs; for "last", 20
  replays must each give the bits of "split" called eagerly on those inputs (`replays_same_as_split`: a race
  between down's programs, or counters not left at zero, would show there).
- "autocast": fp32 weights under a bf16 autocast (how the finetune harness evaluates), 512 tokens, both routers:
  the module's own path ("auto": the prefill path on a capable GPU) against the mask path under the same autocast
  (metric and tolerance as "kernel"), and the module under torch.compile against the eager module (`equal`: the
  fraction of bit-identical outputs; must be 1: the compiled custom op re-enters the caller's autocast).
- "auto": routing_impl "auto" picks "triton" for 1..AUTO_TRITON_MAX_TOKENS tokens on this GPU and the prefill
  path ("prefill") above (or "mask" where AUTO_PREFILL is off).
- "decode_step": a `GreedyDecodeStep` captured in a CUDA graph where gradients are enabled (as a caller may leave
  them; parameters require grad) runs the Triton kernels in every routed layer, batch 1 and 4, with the multiply
  mode `triton_mode` gives ("gemv1", "dot"); recorded from the layers' `pick_impl` during the capture.
- "mask_graph": a training step of the mask path (forward and backward through routed layers) captured in a CUDA
  graph: capture fails on any host sync, and the replayed loss and gradients must equal the eager ones.
- "generate": on --checkpoint (a routed checkpoint folder; default: a random 4-layer routed model), greedy
  `generate` with routing_impl "mask" vs "auto", `fast_generate` vs `generate` (both "auto"; three calls, so that on
  CUDA the prefill runs eagerly, is captured, then replayed from its graph), and on CUDA
  `fast_generate(compile=True)` vs `fast_generate` (the first COMPILED_PREFIX tokens), batch 1 and 4:
  in fp32 the tokens must be equal; in bf16 the count of equal leading tokens is reported, not checked (bf16
  rounding differs between the paths, so greedy choices may part after a near tie).
A check that raises is recorded as failed with its error; the other checks still run. The report is rewritten after
each group of checks, so a run cut short leaves the groups it finished (with "complete": false).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import modeling_routed_llama as mrl  # the project installed (pip install -e .): no path games
from configuration_routed_llama import RoutedLlamaConfig
from decode import Ran, error_text, kernel_call  # benchmarks/ is this script's folder

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
NEAR_TIE = 1e-5
COMPILED_PREFIX = 8  # greedy tokens a compiled fast_generate must share with the eager one in fp32 ("generate")
# (hidden, intermediate, N, k, uneven): the stand-in, TinyLlama and Llama-7B shapes, and small uneven layouts
CASES = [(256, 1000, 7, 3, True), (512, 1030, 24, 12, True), (576, 1536, 32, 16, False), (2048, 5632, 32, 8, False),
         (4096, 11008, 32, 16, False)]  # fmt: skip
QUICK_CASES = [(48, 100, 6, 3, True)]


def uneven_offsets(inter: int, n: int, seed: int) -> list[int]:
    """N + 1 strictly increasing cluster bounds of random sizes (between 1 and about 3x the mean)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.rand(n, generator=g) * 2.9 + 0.1
    sizes = (sizes / sizes.sum() * (inter - n)).floor().long() + 1
    sizes[-1] += inter - int(sizes.sum())
    return [0] + torch.cumsum(sizes, 0).tolist()


def routed_mlp(case, router: str, dtype, device, seed=0):
    hidden, inter, n, k, uneven = case
    offsets = uneven_offsets(inter, n, seed) if uneven else None
    cfg = RoutedLlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=4,
                            num_experts=n, num_experts_per_tok=k, router=router,
                            expert_offsets=None if offsets is None else [offsets])  # fmt: skip
    torch.manual_seed(seed)
    mlp = mrl.RoutedLlamaMLP(cfg, 0).to(device)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(std=p.shape[-1] ** -0.5)
    mlp.refresh_router()
    return mlp.to(dtype).eval()


def compare(out: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[float, int]:
    """(max relative error over tokens without a near tie at the k-th score, number of near-tie tokens).
    out, ref (M, H); scores (M, N) the reference's fp32 router scores."""
    top = scores.float().topk(min(k + 1, scores.shape[1]), dim=-1).values  # (M, k + 1)
    scale = scores.float().abs().amax(-1).clamp_min(1e-30)
    tie = (top[:, k - 1] - top[:, -1]) / scale < NEAR_TIE if k < scores.shape[1] else torch.zeros_like(scale).bool()
    keep = ~tie
    if not bool(keep.any()):
        return 0.0, int(tie.sum())
    o, r = out[keep].float(), ref[keep].float()
    return ((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item(), int(tie.sum())


def reference(ref_mlp, x, mlp=None, variant=None):
    """(reference output, its router scores) for x: the mask path in fp32 on the same rounded weights; for the
    prefill path, the mask path in x's own dtype (`mlp`), whose rounding it reproduces (in bf16 the activation
    router scores bf16 activations in both, which an fp32 reference would rank differently)."""
    if variant is not None and variant.get("mode") == "prefill":
        with torch.no_grad():
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            return mlp.forward_mask(x), mlp.router.scores(x, h)
    with torch.no_grad():
        xf = x.float()
        h = ref_mlp.act_fn(ref_mlp.gate_proj(xf)) * ref_mlp.up_proj(xf)
        return ref_mlp.forward_mask(xf), ref_mlp.router.scores(xf, h)


def variants(tokens: int, args) -> list[dict]:
    if tokens > mrl.TRITON_MAX_TOKENS:  # the prefill path: one variant (cuBLAS GEMMs, one routing kernel)
        return [{"mode": "prefill"}]
    if args.quick:
        return [{"mode": mrl.triton_mode(tokens), "reduce": mrl.TRITON_OPTIONS["reduce"]}]
    modes = ["gemv1"] if tokens == 1 else ["gemv", "dot"]
    return [{"mode": m, "reduce": red} for m in modes for red in args.reduces]


def kernel_checks(args) -> list[dict]:
    records = []
    device = torch.device(args.device)
    if not (device.type == "cuda" or mrl.TRITON_INTERPRET) or mrl.triton is None:
        return [{"check": "kernel", "ok": None, "skipped": "the Triton kernels need CUDA (or TRITON_INTERPRET=1)"}]
    dtypes = [torch.float32, torch.bfloat16] + ([] if args.quick else [torch.float16])
    for case in QUICK_CASES if args.quick else CASES:
        for router in ("centroid", "activation"):
            for dtype in dtypes:
                records += case_checks(case, router, dtype, args)
    return records


def case_checks(case, router, dtype, args) -> list[dict]:
    device = torch.device(args.device)
    mlp = routed_mlp(case, router, dtype, device)
    ref_mlp = routed_mlp(case, router, dtype, device).float()  # same seed: the same rounded weights, in fp32
    records = []
    # decode kernels up to TRITON_MAX_TOKENS (16), the prefill path above it (17: a partial token tile; 512: prefill)
    for tokens in (1, 3, 8, 17) if args.quick else (1, 2, 4, 8, 16, 17, 512):
        for variant in variants(tokens, args):
            base = {"hidden": case[0], "intermediate": case[1], "N": case[2], "k": case[3], "uneven": case[4],
                    "router": router, "dtype": str(dtype).split(".")[1], "tokens": tokens, **variant}  # fmt: skip
            x = torch.randn(tokens, case[0], device=device).to(dtype)
            records.append(guard({"check": "kernel", **base}, one_kernel, mlp, ref_mlp, x, variant, dtype))
            if device.type == "cuda":
                records.append(guard({"check": "graph", **base}, one_graph, mlp, ref_mlp, x, variant, dtype))
    return records


def split_bits(mlp, x, variant) -> torch.Tensor:
    """The same call with the "split" reduction, whose bits "last" must give."""
    with torch.no_grad():
        return kernel_call(mlp, {**variant, "reduce": "split"})(x)


def one_kernel(record, mlp, ref_mlp, x, variant, dtype):
    with torch.no_grad():
        out = kernel_call(mlp, variant)(x)
    ref, scores = reference(ref_mlp, x, mlp, variant)
    record["rel_err"], record["near_ties"] = compare(out, ref, scores, mlp.router.top_k)
    record["ok"] = out.dtype == dtype and out.shape == x.shape and record["rel_err"] <= TOL[dtype]
    if variant.get("reduce") == "last":
        record["same_as_split"] = torch.equal(out, split_bits(mlp, x, variant))
        record["ok"] = record["ok"] and record["same_as_split"]


def one_graph(record, mlp, ref_mlp, x, variant, dtype):
    call = kernel_call(mlp, variant)
    xs = x.clone()
    with torch.no_grad():
        graph, ys = mrl.capture_cuda_graph(lambda: call(xs))  # compiles and caches in the warm-up, not the capture
        xs.copy_(torch.randn_like(xs.float()).to(dtype))
        graph.replay()
    torch.cuda.synchronize()
    ref, scores = reference(ref_mlp, xs, mlp, variant)
    record["rel_err"], record["near_ties"] = compare(ys, ref, scores, mlp.router.top_k)
    record["ok"] = record["rel_err"] <= TOL[dtype]
    if variant.get("reduce") == "last":
        same = 0
        for _ in range(20):
            xs.copy_(torch.randn_like(xs.float()).to(dtype))
            graph.replay()
            same += torch.equal(ys, split_bits(mlp, xs, variant))
        record["replays_same_as_split"] = f"{same}/20"
        record["ok"] = record["ok"] and same == 20


def auto_checks(args) -> list[dict]:
    device = torch.device(args.device)
    mlp = routed_mlp(QUICK_CASES[0], "centroid", torch.bfloat16, device)
    mlp.config.routing_impl = "auto"
    on_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) >= mrl.AUTO_MIN_CAPABILITY
    records = []
    for tokens in (1, mrl.AUTO_TRITON_MAX_TOKENS, mrl.AUTO_TRITON_MAX_TOKENS + 1, 512):
        if not on_gpu or mrl.triton is None:
            expected = "mask"
        elif tokens <= mrl.AUTO_TRITON_MAX_TOKENS:
            expected = "triton"
        else:
            expected = "prefill" if mrl.AUTO_PREFILL else "mask"
        record = {"check": "auto", "tokens": tokens, "expected": expected,
                  "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None}

        def pick(rec, tokens=tokens):
            with torch.no_grad():
                rec["picked"] = mlp.pick_impl(torch.zeros(tokens, mlp.hidden_size, device=device, dtype=torch.bfloat16))
            rec["ok"] = rec["picked"] == rec["expected"]

        records.append(guard(record, pick))
    return records


def autocast_checks(args) -> list[dict]:
    device = torch.device(args.device)
    if device.type != "cuda" or mrl.triton is None:
        return [{"check": "autocast", "ok": None, "skipped": "the Triton paths under a CUDA autocast need CUDA"}]
    records = []
    for case in QUICK_CASES if args.quick else CASES[2:3] + CASES[-1:]:  # the stand-in's and Llama-7B's FFN
        for router in ("centroid", "activation"):
            record = {"check": "autocast", "hidden": case[0], "intermediate": case[1], "N": case[2], "k": case[3],
                      "router": router, "tokens": 512}  # fmt: skip

            def run(rec, case=case, router=router):
                torch._dynamo.reset()
                mlp = routed_mlp(case, router, torch.float32, device)
                mlp.config.routing_impl = "auto"
                x = torch.randn(512, case[0], device=device)  # (M, H) fp32, as the residual stream under autocast
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    rec["ran"] = mlp.pick_impl(x)
                    out = mlp(x)
                    ref, scores = reference(None, x, mlp, {"mode": "prefill"})  # the mask path under the autocast
                    compiled = torch.compile(mlp, fullgraph=True)(x)
                rec["rel_err"], rec["near_ties"] = compare(out, ref, scores, case[3])
                rec["compiled_equal"] = (compiled.float() == out.float()).float().mean().item()
                rec["ok"] = rec["rel_err"] <= TOL[torch.bfloat16] and rec["compiled_equal"] == 1.0

            records.append(guard(record, run))
    return records


def decode_step_checks(args) -> list[dict]:
    """What a decode step captured with gradients enabled runs in its routed layers (expected: the kernels)."""
    device = torch.device(args.device)
    if device.type != "cuda":
        return [{"check": "decode_step", "ok": None, "skipped": "needs CUDA"}]
    on_gpu = torch.cuda.get_device_capability(device) >= mrl.AUTO_MIN_CAPABILITY and mrl.triton is not None
    model = tiny_model(args.device, torch.bfloat16, layers=2).eval()
    model.config.routing_impl = "auto"
    records = []
    for batch in (1, 4):
        expected = f"triton/{mrl.triton_mode(batch)}" if on_gpu else "mask"

        def capture(rec, batch=batch):
            with Ran(model) as ran, torch.enable_grad():
                mrl.GreedyDecodeStep(model, batch, 64, cuda_graph=True)
            rec["ran"] = sorted(ran.seen)
            rec["ok"] = rec["ran"] == [rec["expected"]]

        records.append(guard({"check": "decode_step", "batch": batch, "expected": expected}, capture))
    return records


def mask_graph_check(args) -> list[dict]:
    """A training step of the mask path captured in a CUDA graph (fails on any host sync) equals the eager one."""
    if torch.device(args.device).type != "cuda":
        return [{"check": "mask_graph", "ok": None, "skipped": "needs CUDA"}]

    def step(record):
        model = tiny_model(args.device, torch.float32, layers=2).train()
        model.config.routing_impl = "auto"
        ids = torch.randint(0, model.config.vocab_size, (4, 32), device=args.device)

        def loss_and_grads():
            model.zero_grad(set_to_none=False)
            logits = model(input_ids=ids).logits  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            return loss

        eager = loss_and_grads().detach().clone()
        grads = [p.grad.clone() for p in model.parameters()]
        graph, static_loss = mrl.capture_cuda_graph(loss_and_grads)  # warm-up on a side stream: a backward needs it
        graph.replay()
        torch.cuda.synchronize()
        record["loss_diff"] = (static_loss - eager).abs().item()
        record["grad_diff"] = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), grads))
        record["ok"] = record["loss_diff"] <= 1e-5 and record["grad_diff"] <= 1e-5

    return [guard({"check": "mask_graph"}, step)]


def tiny_model(device, dtype, layers=4):
    cfg = RoutedLlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=1000, num_experts=16, num_experts_per_tok=8,
                            max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return mrl.RoutedLlamaForCausalLM(cfg).to(dtype)


def load_model(args, dtype):
    if args.checkpoint:
        return mrl.RoutedLlamaForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(args.device).eval()
    return tiny_model(args.device, dtype).eval()


def generate_checks(args) -> list[dict]:
    records = []
    new = 4 if args.quick else 32
    for dtype in (torch.float32,) if args.quick else (torch.float32, torch.bfloat16):
        model = load_model(args, dtype)
        for batch in (1, 4):
            ids = torch.randint(3, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
            ids = ids.to(args.device)
            record = {"check": "generate", "dtype": str(dtype).split(".")[1], "batch": batch, "new_tokens": new,
                      "checkpoint": args.checkpoint or "random 4-layer routed model",
                      "k": model.config.top_k_experts, "N": model.config.num_experts}  # fmt: skip
            records.append(guard(record, one_generate, model, ids, new, dtype))
        del model
    return records


def one_generate(record, model, ids, new, dtype):
    out = {}
    with torch.no_grad():
        for impl in ("mask", "auto"):
            model.config.routing_impl = impl
            out[impl] = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new)
    # eager prefill, then (on CUDA) the prompt length's prefill captured, then replayed: every call must match
    fast_calls = [model.fast_generate(ids, new) for _ in range(3)]
    fast = fast_calls[-1]
    model.clear_fast_generate()
    compiled = None
    if ids.is_cuda:  # compiled decode steps: their routed layers once took cluster ids one too high (inductor)
        compiled = model.fast_generate(ids, new, compile=True)
        model.clear_fast_generate()
    plen = ids.shape[1]

    def same_prefix(a, b):
        n = min(a.shape[1], b.shape[1]) - plen
        diff = (a[:, plen : plen + n] != b[:, plen : plen + n]).any(0).nonzero()
        return int(diff[0]) if len(diff) else n

    record["auto_equal_prefix"] = same_prefix(out["mask"], out["auto"])
    record["fast_equal_prefix"] = min(same_prefix(out["auto"], f) for f in fast_calls)
    record["auto_equal"] = torch.equal(out["mask"], out["auto"])
    record["fast_equal"] = all(torch.equal(out["auto"], f) for f in fast_calls)
    checked = [record["auto_equal"], record["fast_equal"]]
    if compiled is not None:
        # inductor sums some reductions in another order, which may flip a late near-tie even in fp32; wrong routing
        # (as with the cluster ids inductor once got wrong) parts the tokens at once: the first COMPILED_PREFIX match
        record["compiled_equal_prefix"] = same_prefix(fast, compiled)
        record["compiled_equal"] = torch.equal(fast, compiled)
        checked.append(record["compiled_equal_prefix"] >= min(COMPILED_PREFIX, new))
    record["ok"] = all(checked) if dtype == torch.float32 else None


def guard(record: dict, fn, *a) -> dict:
    """fn(record, *a) fills `record`; an exception marks it failed with the error instead of ending the run."""
    try:
        fn(record, *a)
    except Exception as exc:
        record["ok"] = False
        record["error"] = error_text(exc)
    return show(record)


def show(record: dict) -> dict:
    status = {True: "ok  ", False: "FAIL", None: "info"}[record.get("ok")]
    print(status, {k: v for k, v in record.items() if k != "ok"}, flush=True)
    return record


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON report to write")
    p.add_argument("--checkpoint", default=None, help="a routed checkpoint folder for the generate check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one small shape, fewer variants (CPU smoke runs)")
    p.add_argument("--checks", nargs="+", choices=sorted(GROUPS), default=sorted(GROUPS),
                   help="which groups of checks to run (default: all)")
    p.add_argument("--reduces", nargs="+", choices=sorted(mrl._REDUCE), default=sorted(mrl._REDUCE),
                   help="the reductions of down's partial sums the kernel and graph checks run (default: all)")
    return p.parse_args(argv)


# the groups of checks, in the order they run
GROUPS = {"autocast": autocast_checks, "auto": auto_checks, "decode_step": decode_step_checks,
          "mask_graph": mask_graph_check, "generate": generate_checks, "kernel": kernel_checks}  # fmt: skip


def main(argv=None) -> int:
    from routed_llama.hardware import hardware
    from routed_llama.io import command_line, write_json

    args = parse_args(argv)
    t0 = time.time()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = hardware(args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    records = []

    def report(complete: bool) -> dict:
        doc = {
            "hardware": machine,
            "date": date,
            "command": command_line(argv),
            "complete": complete,
            "tolerances": {str(k).split(".")[1]: v for k, v in TOL.items()},
            "near_tie": NEAR_TIE,
            "passed": sum(r.get("ok") is True for r in records),
            "failed": sum(r.get("ok") is False for r in records),
            "skipped_or_info": sum(r.get("ok") is None for r in records),
            "wall_seconds": round(time.time() - t0, 1),
            "records": records,
        }
        write_json(args.out, doc)
        return doc

    for checks in [fn for name, fn in GROUPS.items() if name in args.checks]:
        try:
            records += checks(args)
        except Exception as exc:  # a whole group that cannot start (e.g. the checkpoint does not load)
            records.append(show({"check": checks.__name__, "ok": False, "error": error_text(exc)}))
        report(complete=False)
    doc = report(complete=True)
    print(f"{doc['passed']} passed, {doc['failed']} failed, {doc['skipped_or_info']} skipped or informational")
    return 1 if doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
