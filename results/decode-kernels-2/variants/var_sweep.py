# ad hoc: microseconds per Llama-7B FFN layer (whole routed FFN) for variants given as JSON, on the modeling file in cwd
import json, sys, torch
sys.path.insert(0, ".")
from benchmarks import decode as d
import modeling_routed_llama as mrl
out = sys.argv[1]
variants = json.loads(sys.argv[2])
args = d.parse_args(["--out", "/tmp/x", "--shapes", "llama7b"])
rows = []
for ratio in (0.5, 0.25):
    _, _, routed = d.ffn_layers("llama7b", args, ratio)
    for mode, tokens in (("gemv1", 1), ("dot", 4)):
        x = torch.randn(tokens, routed[0].hidden_size, device="cuda", dtype=torch.bfloat16)
        for rep in range(2):  # two passes: drift shows as a difference between passes
            for v in variants:
                variant = {"mode": mode, **mrl.TRITON_TILES[mode], **v}
                try:
                    fn = d.cycle([d.kernel_call(m, variant) for m in routed], x)
                    us = min(d.time_us(fn, 100, torch.device("cuda"), True) / len(routed) for _ in range(3))
                    row = {"ratio": ratio, "tokens": tokens, "pass": rep, **variant, "us": round(us, 2)}
                except Exception as e:
                    row = {"ratio": ratio, "tokens": tokens, "pass": rep, **variant, "error": str(e)[:300]}
                print(row, flush=True)
                rows.append(row)
    del routed
    torch.cuda.empty_cache()
json.dump(rows, open(out, "w"), indent=1)
