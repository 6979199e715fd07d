"""Saving and reloading LoRA adapters together with the base they belong to, and merging them.

Reloading refuses, in one line, an adapter whose files are absent or unreadable, whose base changed (fingerprint),
or whose weights do not fit the model its config describes (missing, unexpected or mis-shaped tensors).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from routed_llama import io
from routed_llama.errors import UserError, first_line

from . import models

RUN_FILE = "routed_llama_adapter.json"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
INFO_KEYS = ("base", "base_fingerprint", "task", "num_labels")  # what reloading needs from RUN_FILE


class AdapterError(UserError):
    """Bad adapter input; the command line prints it as one line."""


def save_adapter(peft_model, out_dir: Path, info: dict):
    """PEFT's adapter files plus `routed_llama_adapter.json`: base reference, base fingerprint, task, labels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    io.write_json(out_dir / RUN_FILE, info)


def read_info(adapter_dir: str | Path) -> dict:
    """The adapter's `routed_llama_adapter.json`, checked to hold what reloading needs."""
    path = Path(adapter_dir) / RUN_FILE
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} is not a routed-llama adapter folder (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {first_line(exc)}") from None
    missing = [k for k in INFO_KEYS if not isinstance(info, dict) or k not in info]
    if missing:
        raise AdapterError(f"{path} lacks {', '.join(missing)}")
    return info


def _read_peft(adapter_dir: Path):
    """(PEFT config, adapter tensors) from the folder, each file checked to exist and to be readable."""
    from peft import PeftConfig, load_peft_weights
    from safetensors import SafetensorError

    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise AdapterError(f"{adapter_dir} has no {name}")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as exc:  # not JSON, unknown fields or values
        raise AdapterError(f"cannot read {adapter_dir / PEFT_CONFIG}: {first_line(exc)}") from None
    try:
        weights = load_peft_weights(str(adapter_dir), device="cpu")
    except (OSError, SafetensorError, EOFError) as exc:  # a truncated or corrupt file
        raise AdapterError(f"cannot read {adapter_dir / PEFT_WEIGHTS}: {first_line(exc)}") from None
    return config, weights


def apply_adapter(model, adapter_dir: str | Path):
    """The PEFT model of `model` with the adapter's weights loaded, for inference. Every tensor PEFT would save for
    this model must be in the file with the same shape, and the file must hold nothing else."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    config, weights = _read_peft(adapter_dir)
    config.inference_mode = True
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules the model does not have
        raise AdapterError(f"the adapter in {adapter_dir} does not fit its base: {first_line(exc)}") from None
    wanted = get_peft_model_state_dict(peft_model)  # names and shapes as they are saved
    missing = sorted(set(wanted) - set(weights))
    unexpected = sorted(set(weights) - set(wanted))
    shapes = sorted(k for k in set(wanted) & set(weights) if wanted[k].shape != weights[k].shape)
    for what, names in (("lacks", missing), ("has unexpected", unexpected), ("has mis-shaped", shapes)):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            detail = f" ({list(weights[names[0]].shape)} in the file, {list(wanted[names[0]].shape)} expected)" if what == "has mis-shaped" else ""  # fmt: skip
            raise AdapterError(f"{adapter_dir / PEFT_WEIGHTS} {what} weights: {names[0]}{detail}{more}")
    set_peft_model_state_dict(peft_model, weights)
    return peft_model


def load_finetuned(adapter_dir: str | Path, base: str | None = None, top_k: int | None = None,
                   routing_impl: str | None = None):  # fmt: skip
    """(model, tokenizer, info): the base the adapter was trained on (or `base`), checked by fingerprint, with the
    adapter applied, in eval mode on the CPU. `top_k` overrides k of a routed base (k = N: routing off)."""
    info = read_info(adapter_dir)
    _read_peft(Path(adapter_dir))  # unreadable adapter files: said before the base loads
    ref = base if base is not None else info["base"]
    tokenizer = models.load_tokenizer(ref)
    model = models.load_classifier(ref, info["num_labels"], tokenizer, top_k=top_k, routing_impl=routing_impl)
    found = models.base_fingerprint(model)
    if found != info["base_fingerprint"]:
        raise AdapterError(
            f"the adapter in {adapter_dir} was trained on a different base ({info['base']}, fingerprint "
            f"{info['base_fingerprint']}); {ref} has fingerprint {found}"
        )
    return apply_adapter(model, adapter_dir).eval(), tokenizer, info


@dataclass
class MergeSettings:
    """Settings of `finetune merge`."""

    adapter: str = field(metadata={"positional": True, "help": "an adapter folder (a run's OUTPUT_DIR/adapter)"})
    out_dir: str = field(metadata={"positional": True, "help": "where the standalone checkpoint goes"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty OUT_DIR"})


def merge(settings: MergeSettings) -> Path:
    """Write a standalone checkpoint (base with the adapter merged in) to `out_dir`, via a temporary folder that is
    moved into place only when complete."""
    out = Path(settings.out_dir)
    io.check_output(out, settings.overwrite)  # before minutes of loading
    model, tokenizer, info = load_finetuned(settings.adapter)
    # The router's centroids stay those of the base even if the adapter changed gate_proj: they are what the
    # unmerged model routes with, so the merged checkpoint computes the same function.
    merged = model.merge_and_unload()
    with io.atomic_output(out, settings.overwrite) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if models.is_routed_checkpoint(info["base"]):
            for name in ("configuration_routed_llama.py", "modeling_routed_llama.py"):
                if not (tmp / name).exists():
                    shutil.copy2(Path(info["base"]) / name, tmp / name)
        io.write_json(tmp / "merged_from.json", {"adapter": str(settings.adapter), **info})
    return out
