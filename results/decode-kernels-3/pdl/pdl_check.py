# ad hoc: PDL outputs bit-identical to the plain launch (eager and in a CUDA graph, 7B shape, 1 and 4 tokens, centroid
# and activation routers)
import json, sys, torch, triton
sys.path.insert(0, ".")
from benchmarks import decode as d
import modeling_routed_llama as mrl
print("triton", triton.__version__, "torch", torch.__version__, flush=True)
args = d.parse_args(["--out", "/tmp/x", "--shapes", "llama7b"])
res = []
_, _, routed = d.ffn_layers("llama7b", args, 0.5)
routed = routed[:3]
for kind in ("centroid", "activation"):
    if kind == "activation":
        for m in routed:
            m.router.kind = "activation"
    for tokens in (1, 4):
        for reduce in ("last", "split"):
            xs = [torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
            ref = [[d.kernel_call(m, {"reduce": reduce})(x) for m in routed] for x in xs]
            eager = [[d.kernel_call(m, {"reduce": reduce, "pdl": True})(x) for m in routed] for x in xs]
            ok_e = all(torch.equal(a, b) for ra, rb in zip(ref, eager) for a, b in zip(ra, rb))
            xin = xs[0].clone()
            outs = []
            fns = [d.kernel_call(m, {"reduce": reduce, "pdl": True}) for m in routed]
            def body():
                outs.clear()
                outs.extend(f(xin) for f in fns)
            g = mrl.capture_cuda_graph(body)[0]
            ok_g = True
            for rep in range(20):
                i = rep % 3
                xin.copy_(xs[i])
                g.replay()
                torch.cuda.synchronize()
                ok_g &= all(torch.equal(a, b) for a, b in zip(ref[i], outs))
            row = {"router": kind, "tokens": tokens, "reduce": reduce, "eager_equal": ok_e, "graph_equal": ok_g}
            print(row, flush=True)
            res.append(row)
json.dump(res, open(sys.argv[1], "w"), indent=1)
