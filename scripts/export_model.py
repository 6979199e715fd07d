"""Save a dense base model (a Hub id, a .gguf file, a GGUF folder or "stand-in") as a plain Hugging Face folder in
fp32, so that many later runs load safetensors instead of fetching or dequantising it each time.

    python scripts/export_model.py stand-in outputs/standin-hf     # SmolLM2-135M-Instruct, dequantised from Q4_1

The folder is written beside OUT_DIR under a temporary name and moved into place when complete.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from routed_llama.cli import run_cli
from routed_llama.io import atomic_output
from routed_llama.source import load_dense, quiet, resolve_source


@dataclass
class ExportSettings:
    """Settings of scripts/export_model.py."""

    model: str = field(metadata={"positional": True, "help": 'Hub id, local folder, .gguf file or "stand-in"'})
    out_dir: str = field(metadata={"positional": True, "help": "folder to write the plain HF checkpoint to"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside MODEL (a folder or Hub id)"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT_DIR if it exists"})


def export(settings: ExportSettings) -> None:
    """Load MODEL once as a causal LM in fp32 and save it (weights, config, tokenizer) to OUT_DIR."""
    source = resolve_source(settings.model, settings.gguf_file)
    with quiet():
        model, tokenizer = load_dense(source, "causal-lm", num_labels=2, seed=0)
    with atomic_output(settings.out_dir, settings.overwrite) as tmp, quiet():  # no progress bars while saving
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(f"exported {source.display} to {settings.out_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(export, ExportSettings, prog="export_model.py", description=__doc__))
