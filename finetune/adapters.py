"""Saving and reloading LoRA adapters together with the base they belong to, and merging them."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import convert

from . import models

RUN_FILE = "routed_llama_adapter.json"


class AdapterError(ValueError):
    """Bad adapter input; the command line prints it as one line."""


def save_adapter(peft_model, out_dir: Path, info: dict):
    """PEFT's adapter files plus `routed_llama_adapter.json`: base reference, base fingerprint, task, labels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    (out_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_info(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / RUN_FILE
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} is not a routed-llama adapter folder (no {RUN_FILE})")
    return json.loads(path.read_text())


def load_finetuned(adapter_dir: str | Path, base: str | None = None, top_k: int | None = None,
                   routing_impl: str | None = None):  # fmt: skip
    """(model, tokenizer, info): the base the adapter was trained on (or `base`), checked by fingerprint, with the
    adapter applied, in eval mode on the CPU. `top_k` overrides k of a routed base (k = N: routing off)."""
    from peft import PeftModel

    info = read_info(adapter_dir)
    ref = base if base is not None else info["base"]
    tokenizer = models.load_tokenizer(ref)
    model = models.load_classifier(ref, info["num_labels"], tokenizer, top_k=top_k, routing_impl=routing_impl)
    found = models.base_fingerprint(model)
    if found != info["base_fingerprint"]:
        raise AdapterError(
            f"the adapter in {adapter_dir} was trained on a different base ({info['base']}, fingerprint "
            f"{info['base_fingerprint']}); {ref} has fingerprint {found}"
        )
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval(), tokenizer, info


def merge(adapter_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a standalone checkpoint (base with the adapter merged in) to `out_dir`, via a temporary folder."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise AdapterError(f"{out} exists and is not empty; pass --overwrite to replace it")
    model, tokenizer, info = load_finetuned(adapter_dir)
    # The router's centroids stay those of the base even if the adapter changed gate_proj: they are what the
    # unmerged model routes with, so the merged checkpoint computes the same function.
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if models.is_routed_checkpoint(info["base"]):
            for name in ("configuration_routed_llama.py", "modeling_routed_llama.py"):
                if not (tmp / name).exists():
                    shutil.copy2(Path(info["base"]) / name, tmp / name)
        (tmp / "merged_from.json").write_text(json.dumps({"adapter": str(adapter_dir), **info}, indent=2) + "\n")
        convert.publish_permissions(tmp)
        convert.move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
