# ad hoc: microseconds per Llama-7B FFN layer (whole routed FFN) for down tile variants, on the modeling file in cwd
import json, sys, torch
sys.path.insert(0, ".")
from benchmarks import decode as d
import modeling_routed_llama as mrl
out = sys.argv[1]
args = d.parse_args(["--out", "/tmp/x", "--shapes", "llama7b"])
rows = []
for ratio in (0.5, 0.25):
    _, _, routed = d.ffn_layers("llama7b", args, ratio)
    grids = [("gemv1", 1, dict(BLOCK_H=bh, BLOCK_C=bc, warps_d=w, ctas_per_sm=c))
             for bh, bc in ((16, 128), (32, 128), (32, 256), (64, 64), (64, 128), (16, 256))
             for w in (2, 4) for c in (4, 8)] if ratio == 0.5 else [("gemv1", 1, {})]
    grids += [("dot", 4, {})]
    for mode, tokens, v in grids:
        x = torch.randn(tokens, routed[0].hidden_size, device="cuda", dtype=torch.bfloat16)
        variant = {"mode": mode, **mrl.TRITON_TILES[mode], **v}
        try:
            fn = d.cycle([d.kernel_call(m, variant) for m in routed], x)
            us = min(d.time_us(fn, 100, torch.device("cuda"), True) / len(routed) for _ in range(3))
            row = {"ratio": ratio, "tokens": tokens, **variant, "us": round(us, 2)}
        except Exception as e:
            row = {"ratio": ratio, "tokens": tokens, **variant, "error": str(e)[:300]}
        print(row, flush=True)
        rows.append(row)
    del routed
    torch.cuda.empty_cache()
json.dump(rows, open(out, "w"), indent=1)
