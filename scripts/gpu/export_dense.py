"""Load a GGUF once (dequantised to fp32) and save it as a plain Hugging Face folder, so that the many fine-tuning
runs load safetensors instead of dequantising the GGUF each time. usage: export_dense.py FILE.gguf OUT_DIR"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import convert  # noqa: E402

src, out = Path(sys.argv[1]), Path(sys.argv[2])
model, tok = convert.load_dense(convert.Source(str(src.parent), src.name), "causal-lm", 2, 0)
model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
model.save_pretrained(out)
tok.save_pretrained(out)
print("exported", out)
