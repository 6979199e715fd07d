"""Loading the two arms' models for sequence classification.

A model reference is what `convert.py` accepts (a Hub id, a local folder, a .gguf file or "stand-in") or a routed
checkpoint folder written by `convert.py` (loaded with `trust_remote_code=True`, as users load it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

import convert


class ModelError(ValueError):
    """Bad model input; the command line prints it as one line."""


def is_routed_checkpoint(ref: str | Path) -> bool:
    config = Path(ref) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "routed_llama"
    except json.JSONDecodeError:
        return False


def _source(ref: str) -> convert.Source:
    try:
        return convert.resolve_source(ref)
    except convert.ConversionError as exc:
        raise ModelError(str(exc)) from None


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    if is_routed_checkpoint(ref):
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=True)
    else:
        src = _source(ref)
        with convert._quiet():
            tok = AutoTokenizer.from_pretrained(src.path, **src.kwargs)
    if tok.pad_token_id is None:  # Llama tokenizers often have none; the classifier finds the last non-pad token
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def saved_num_labels(ref: str | Path) -> int | None:
    """The number of labels of the classification head a local checkpoint folder holds; None if it holds none."""
    path = Path(ref) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not any(str(a).endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return None
    return len(cfg["id2label"]) if cfg.get("id2label") else int(cfg.get("num_labels", 2))


def load_classifier(ref: str, num_labels: int, tokenizer=None, top_k: int | None = None, routing_impl: str | None = None):
    """A `*ForSequenceClassification` in fp32 on the CPU, with `config.pad_token_id` set.

    The `score` head is whatever the checkpoint holds, else freshly initialised; `init_score` makes it a function
    of the seed so that both arms start from the same head.
    """
    from transformers import AutoModelForSequenceClassification

    saved = saved_num_labels(ref)
    if saved is not None and saved != num_labels:  # transformers would fail on the score weight's shape
        raise ModelError(f"{ref} has a classification head with {saved} labels; the task needs num_labels={num_labels}")
    kwargs = {"num_labels": num_labels, "dtype": torch.float32}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    with convert._quiet():
        if is_routed_checkpoint(ref):
            extra = {}
            if top_k is not None:
                extra["num_experts_per_tok"] = top_k
            if routing_impl is not None:
                extra["routing_impl"] = routing_impl
            model = AutoModelForSequenceClassification.from_pretrained(ref, trust_remote_code=True, **kwargs, **extra)
        else:
            src = _source(ref)
            convert.load_base_config(src)  # a Llama, or one clear error before the weights load
            model = AutoModelForSequenceClassification.from_pretrained(src.path, **src.kwargs, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF: weights arrive dequantised
        model.hf_quantizer.remove_quantization_config(model)
    if model.config.pad_token_id is None:
        tok = tokenizer if tokenizer is not None else load_tokenizer(ref)
        model.config.pad_token_id = tok.pad_token_id
    return model


@torch.no_grad()
def init_score(model, seed: int):
    """Re-initialise the classification head from `seed` (normal, std = initializer_range, as transformers does)."""
    g = torch.Generator().manual_seed(seed)
    w = model.score.weight
    std = getattr(model.config, "initializer_range", 0.02)
    w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32) * std)


def base_fingerprint(model) -> str:
    """A short hash that identifies the frozen backbone an adapter was trained on, so that loading the adapter over
    another base fails loudly: the architecture and routing layout (not k, which may change at deployment) and a
    strided sample of every FFN down_proj weight (surgery permutes their columns)."""
    cfg = model.config
    layout = {f: getattr(cfg, f, None) for f in ("model_type", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "vocab_size", "num_experts", "routed_layers")}
    h = hashlib.sha256(json.dumps(layout, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        if name.endswith("down_proj.weight") and "lora_" not in name:
            h.update(t.detach().float().cpu().flatten()[::997].numpy().tobytes())
    return h.hexdigest()[:16]
