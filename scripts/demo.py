"""Load a converted checkpoint the way users do (trust_remote_code), print a summary and sample generations with
routing on (k < N) and off (k = N, which is exactly the dense model). usage: demo.py CHECKPOINT [PROMPT]"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def generate(model, tok, prompt: str, max_new_tokens: int = 40) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)  # fmt: skip
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main():
    ckpt = Path(sys.argv[1])
    prompt = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France? Answer in one sentence."
    conv = json.loads((ckpt / "conversion.json").read_text())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
    cfg = model.config
    print(f"loaded {ckpt} with trust_remote_code in {time.perf_counter() - t0:.1f} s: {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters (the base's: no new ones)")  # fmt: skip
    print(f"base model     : {cfg.base_model_name_or_path}")
    print(f"routing        : N={cfg.num_experts} clusters per layer, k={cfg.num_experts_per_tok} kept per token, "
          f"router '{cfg.router}', layers {cfg.routed_layers}")  # fmt: skip
    print(f"partition      : {cfg.partition_method} (seed {cfg.partition_seed}); mean intra-cluster cosine of gate rows "
          f"{conv['mean_intra_cosine']:.4f} vs {conv['mean_intra_cosine_random']:.4f} for a random partition; "
          f"{conv['convert_seconds']:.1f} s to convert")  # fmt: skip
    print(f"prompt         : {prompt}")
    with torch.no_grad():
        print(f"routed  (k={cfg.num_experts_per_tok:>2}) : {generate(model, tok, prompt)}")
        k = cfg.num_experts_per_tok
        model.model.set_top_k(cfg.num_experts)
        print(f"dense   (k={cfg.num_experts:>2}) : {generate(model, tok, prompt)}")
        model.model.set_top_k(k)


if __name__ == "__main__":
    main()
