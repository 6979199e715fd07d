"""Loading the two arms' models for sequence classification, with every loading problem refused in one line.

A model reference is what `convert.py` accepts (a Hub id, a local folder, a .gguf file or "stand-in") or a routed
checkpoint folder written by `convert.py` (loaded with `trust_remote_code=True`, as users load it). A load that
reports missing, unexpected or mis-shaped weights, an unreadable weight file or a head with another label count is
a `ModelError`; the one expected gap is a new `score` head over a causal-LM checkpoint (whose `lm_head` is dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from routed_llama import source
from routed_llama.errors import UserError, first_line


class ModelError(UserError):
    """Bad model input; the command line prints it as one line."""


def _config_dict(ref: str | Path) -> dict | None:
    """The config.json of a local folder as a dict; None when there is no such file (or it is not JSON)."""
    path = Path(ref) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_routed_checkpoint(ref: str | Path) -> bool:
    """True for a local folder whose config.json says model_type "routed_llama" (no model code is run)."""
    return (_config_dict(ref) or {}).get("model_type") == source.ROUTED_MODEL_TYPE


def saved_num_labels(ref: str | Path) -> int | None:
    """The number of labels of the classification head a local checkpoint folder holds; None if it holds none."""
    cfg = _config_dict(ref)
    return None if cfg is None else source.saved_num_labels(cfg)


def _location(ref: str, read_config: bool) -> tuple[str, dict, str, dict | None]:
    """(path, from_pretrained kwargs, display name, config as a dict or None) of a model reference. With
    `read_config`, a plain base is checked to be a Llama on its config before any weights load (a GGUF's config is
    parsed from the whole file: it is read once)."""
    if is_routed_checkpoint(ref):
        return str(ref), {"trust_remote_code": True}, str(ref), _config_dict(ref)
    try:
        src = source.resolve_source(ref)
        config = source.load_base_config(src).to_dict() if read_config else None
    except UserError as exc:
        raise ModelError(str(exc)) from None
    return src.path, src.kwargs, src.display, config


def load_tokenizer(ref: str):
    """The reference's tokenizer, right-padded, with a pad token (the EOS token where it has none)."""
    from transformers import AutoTokenizer

    path, kwargs, display, _ = _location(ref, read_config=False)
    try:
        with source.quiet():
            tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:  # no tokenizer files, an unreadable one
        raise ModelError(f"cannot load the tokenizer of {display}: {first_line(exc)}") from None
    if tok.pad_token_id is None:  # Llama tokenizers often have none; the classifier finds the last non-pad token
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _routed_overrides(raw: dict, ref: str, top_k: int | None, routing_impl: str | None) -> dict:
    """Config overrides of a routed checkpoint at load time, checked against its config.json."""
    extra = {}
    if top_k is not None:
        n = raw.get("num_experts")
        if not (isinstance(top_k, int) and isinstance(n, int) and 1 <= top_k <= n):
            raise ModelError(f"top_k must be an integer in [1, {n}] (the number of clusters of {ref}), got {top_k!r}")
        extra["num_experts_per_tok"] = top_k
    if routing_impl is not None:
        extra["routing_impl"] = routing_impl
    return extra


def _from_pretrained(path: str, display: str, **kwargs):
    """(model, loading info) of `AutoModelForSequenceClassification`; absent or unreadable weight files raise
    `ModelError`; mis-shaped weights are reported in the loading info, not raised."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    try:
        with source.quiet():
            return AutoModelForSequenceClassification.from_pretrained(
                path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except (OSError, SafetensorError, EOFError) as exc:  # no weight file, a truncated or corrupt one
        raise ModelError(f"cannot load the weights of {display}: {first_line(exc)}") from None


def load_classifier(ref: str, num_labels: int, tokenizer=None, top_k: int | None = None, routing_impl: str | None = None):
    """A `*ForSequenceClassification` in fp32 on the CPU, with `config.pad_token_id` set.

    The `score` head is whatever the checkpoint holds (its label count must be `num_labels`), else freshly
    initialised; `init_score` makes it a function of the seed so that both arms start from the same head. Every
    other weight must come from the checkpoint with the shape its config gives.
    """
    path, kwargs, display, raw = _location(ref, read_config=True)
    saved = source.saved_num_labels(raw)
    if saved is not None and saved != num_labels:  # caught here: transformers would only see a shape mismatch
        raise ModelError(f"{display} has a classification head with {saved} labels; the task needs num_labels={num_labels}")
    if is_routed_checkpoint(ref):
        kwargs = {**kwargs, **_routed_overrides(raw, display, top_k, routing_impl)}
    elif top_k is not None:  # (a routing_impl is ignored: a recipe shares it between the plain and routed arms)
        raise ModelError(f"{display} is not a routed checkpoint: top_k applies to routed ones only")
    extra = {"problem_type": "regression"} if num_labels == 1 else {}
    model, info = _from_pretrained(path, display, num_labels=num_labels, dtype=torch.float32, **kwargs, **extra)
    new, dropped = source.head_exceptions("sequence-classification", raw, bool(model.config.tie_word_embeddings))
    try:
        source.check_loading_info(info, display, new, dropped)
    except UserError as exc:
        raise ModelError(str(exc)) from None
    source.remove_quantization(model)  # GGUF: the weights arrived dequantised
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


@torch.no_grad()
def cast_frozen(model, dtype: torch.dtype) -> int:
    """Store every frozen floating-point parameter of `model` (requires_grad False: under PEFT, the base) in `dtype`,
    in place; trainable parameters (LoRA, the trained head) and buffers (router centroids, rotary frequencies) keep
    theirs. Tied parameters stay tied (the Parameter objects are kept). Returns the bytes saved."""
    saved = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            before = p.numel() * p.element_size()
            p.data = p.data.to(dtype)
            saved += before - p.numel() * p.element_size()
    return saved


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


@contextlib.contextmanager
def top_k(model, k: int | None):
    """A routed model (bare, or wrapped by PEFT) at k for the duration of a `with` block, then at its k before, also
    on an error; None leaves it as it is. k = N scores it with routing off. Through `set_top_k`, which every copy of
    the modeling file has: a checkpoint runs its own copy, however old."""
    if k is None:
        yield model
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config.num_experts_per_tok
    base.model.set_top_k(k)
    try:
        yield model
    finally:
        base.model.set_top_k(before)
