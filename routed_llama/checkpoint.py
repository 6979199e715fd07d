"""A routed checkpoint on disk: weights, config, the two remote-code files, tokenizer, model card and
`conversion.json`, written atomically; and uploading it to the Hub."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np

from .errors import UserError, first_line
from .io import atomic_output, write_json, write_text
from .source import STAND_IN_HUB_ID, Source

REMOTE_CODE_FILES = ("configuration_routed_llama.py", "modeling_routed_llama.py")
AUTO_MAP = {
    "AutoConfig": "configuration_routed_llama.RoutedLlamaConfig",
    "AutoModel": "modeling_routed_llama.RoutedLlamaModel",
    "AutoModelForCausalLM": "modeling_routed_llama.RoutedLlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_routed_llama.RoutedLlamaForSequenceClassification",
}
TAGS = ("routed-llama", "mixture-of-experts", "emoe", "moefication")
CARD_LICENSE_FALLBACK = {"license": "other", "license_name": "same-as-base-model"}


def remote_code_file(name: str) -> Path:
    """Path of one of the repository's remote-code files (they are top-level modules)."""
    spec = importlib.util.find_spec(name.removesuffix(".py"))
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{name} is not importable; install the project (pip install -e .)")
    return Path(spec.origin)


def save_dtype(dtype: str, base_config):
    """The torch dtype to save in: `dtype`, or for "auto" the base's float dtype (fp32 if it has none)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    base = getattr(base_config, "dtype", None)
    if isinstance(base, str):
        base = getattr(torch, base, None)
    return base if base in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def mean_or_none(values) -> float | None:
    """Mean of the values that are not None; None when there are none (an undefined statistic)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def layers_text(layers, n: int) -> str:
    if layers is None or list(layers) == list(range(n)):
        return f"all {n}"
    return ", ".join(map(str, layers))


def base_license(source: Source) -> dict:
    """The card metadata `license` (and `license_name`) of the base model: read from the base's own model card
    (local README.md or the Hub); "other, same-as-base-model" when it cannot be read."""
    from huggingface_hub import ModelCard

    if source.hub_id == STAND_IN_HUB_ID:
        return {"license": "apache-2.0"}
    readme = Path(source.path) / "README.md"
    where = readme if readme.is_file() else source.hub_id
    if where is None:
        return dict(CARD_LICENSE_FALLBACK)
    try:
        data = ModelCard.load(where).data
    except Exception:  # no card, offline, unparsable: the fallback says what we know
        return dict(CARD_LICENSE_FALLBACK)
    if not getattr(data, "license", None):
        return dict(CARD_LICENSE_FALLBACK)
    out = {"license": data.license}
    for key in ("license_name", "license_link"):
        if getattr(data, key, None):
            out[key] = getattr(data, key)
    return out


def _card_metadata(source: Source, record: dict, license_: dict) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="transformers", tags=list(TAGS), base_model=source.hub_id, **license_,
                         pipeline_tag="text-generation" if record["head"] == "causal-lm" else "text-classification")
    return data.to_yaml()


def _cosine_text(record: dict) -> str:
    if record["mean_intra_cosine"] is None:
        return "undefined (every cluster holds a single neuron)"
    random = record["mean_intra_cosine_random"]
    return f"{record['mean_intra_cosine']:.4f} (random partition of the same sizes: {random:.4f})"


def model_card(config, record: dict, source: Source, license_: dict) -> str:
    """The checkpoint's README.md: Hub metadata (base_model, library_name, tags, license) and the conversion's
    figures from `record` (the conversion.json dict)."""
    sizes = sorted({s for r in record["layers"].values() for s in r["cluster_sizes"]})
    auto_cls = "AutoModelForCausalLM" if record["head"] == "causal-lm" else "AutoModelForSequenceClassification"
    base = source.display
    return f"""---
{_card_metadata(source, record, license_)}
---

# Routed {base}

A top-k routed version of **{base}** made by [routed-llama](https://github.com/routed-llama/routed-llama)'s
`convert.py`, with **no new parameters**: in each routed layer the FFN's {config.intermediate_size} neurons were
clustered into **N = {config.num_experts}** clusters and every token keeps the **k = {config.num_experts_per_tok}**
clusters whose centroid scores highest.

| | |
|---|---|
| base model | {base} |
| head | {record["head"]} |
| N (clusters per layer) | {config.num_experts} |
| k (kept per token) | {config.num_experts_per_tok} |
| routed layers | {layers_text(config.routed_layers, config.num_hidden_layers)} |
| router | {config.router} |
| partition | {record["method"]}, seed {record["seed"]} |
| cluster sizes | {", ".join(map(str, sizes))} |
| mean intra-cluster cosine of gate rows | {_cosine_text(record)} |

Per-layer clustering figures are in `conversion.json`. The config keeps Hugging Face's field names: `num_experts` is
N and `num_experts_per_tok` is k.

## Load

```python
from transformers import {auto_cls}, AutoTokenizer

model = {auto_cls}.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
# change k at load time; k = N computes exactly what the dense base model computes
dense = {auto_cls}.from_pretrained("PATH_OR_REPO", trust_remote_code=True, num_experts_per_tok={config.num_experts})
```

`routing_impl` selects the implementation: `"mask"` (reference), `"sparse"` (only the kept clusters) or `"auto"`.

## Licence

The weights are a permutation of the base model's and carry its licence.
"""


def save_into(folder: Path, routed, tokenizer, dtype, record: dict, card: str) -> None:
    """Write the whole checkpoint into the existing folder `folder`."""
    routed.config.auto_map = dict(AUTO_MAP)  # every head, whichever this checkpoint was saved with
    routed.to(dtype)
    routed.config.dtype = dtype
    routed.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name in REMOTE_CODE_FILES:  # save_pretrained copies them for a dynamic module; the repo's are plain modules
        if not (folder / name).exists():
            shutil.copy2(remote_code_file(name), folder / name)
    write_text(folder / "README.md", card)
    write_json(folder / "conversion.json", record)


def write_checkpoint(out: Path, overwrite: bool, routed, tokenizer, dtype, record: dict, card: str) -> Path:
    """`save_into` a temporary sibling of `out`, then move it into place (`io.atomic_output`)."""
    with atomic_output(out, overwrite) as tmp:
        save_into(tmp, routed, tokenizer, dtype, record, card)
    return out


def upload(folder: Path, repo_id: str) -> str:
    """Create (if needed) the Hub model repo `repo_id` and upload `folder` to it; returns the commit URL. Any Hub or
    network failure is a `UserError`; `folder` is only read."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="Upload routed-llama checkpoint")  # fmt: skip
    except _network_errors() as exc:
        raise UserError(f"uploading {folder} to {repo_id} failed (the local checkpoint is complete): {first_line(exc)}")
    return str(getattr(info, "commit_url", info))


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a Hub call raises for a refused request or a failed connection: OSError (HfHubHTTPError is one) and
    the HTTP client's own error base class."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client, whichever this version uses
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
