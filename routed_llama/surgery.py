"""Model surgery: a dense Llama plus a routing spec -> a RoutedLlama with the same weights, permuted per layer.

Each chosen layer's FFN neurons are partitioned (`partition.partition_layer`); `gate_proj`/`up_proj` rows and
`down_proj` columns are permuted so every cluster is contiguous, and the router of each layer is the mean of its
clusters' `gate_proj` rows. No parameter is added except the router's centroids, which are derived. With k = N the
routed model computes exactly what the dense one computes.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from .errors import UserError
from .partition import partition_layer, permute_mlp

HEAD_CLASSES = {
    "causal-lm": "RoutedLlamaForCausalLM",
    "sequence-classification": "RoutedLlamaForSequenceClassification",
}


@dataclass(frozen=True)
class RoutingSpec:
    """What the surgery does: route `layers` with N = `num_clusters` clusters, keep k = `top_k` per token."""

    layers: tuple[int, ...]
    num_clusters: int
    top_k: int
    head: str = "causal-lm"
    method: str = "kmeans"
    router: str = "centroid"
    seed: int = 0
    n_init: int = 1
    base_model: str = ""  # recorded in the routed config as base_model_name_or_path


def _layer_items(spec: str, num_layers: int) -> list[int]:
    items = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
        if not m:
            items.append(int(part))  # ValueError for anything else
            continue
        given = [int(v) for v in m.groups()]
        a, b = (v + num_layers if v < 0 else v for v in given)
        if a < 0 or b < 0:
            raise UserError(f"layer range {part!r} out of range: the model has {num_layers} layers")
        if b < a:
            raise UserError(f"empty layer range {part!r}")
        items.extend(range(a, b + 1))
    return items


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Layer indices from "all", "A-B" (inclusive) or "A,B,C"; negative indices count from the end ("-8--1")."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, (list, tuple)):
        items = [int(i) for i in spec]
    else:
        try:
            items = _layer_items(str(spec), num_layers)
        except UserError:
            raise
        except ValueError:
            raise UserError(f"--layers must be 'all', 'A-B' or 'A,B,C'; got {spec!r}") from None
    items = [i + num_layers if i < 0 else i for i in items]
    bad = sorted({i for i in items if not 0 <= i < num_layers})
    if bad:
        raise UserError(f"layer indices {bad} out of range: the model has {num_layers} layers (0-{num_layers - 1})")
    if not items:
        raise UserError("--layers selects no layer")
    return sorted(set(items))


def check_fits(base_config, layers, num_clusters: int, name: str):
    """A routed layout fits a base's config, no weight read: its layers exist and N is at most the FFN's
    intermediate size. Errors start with `name` (e.g. "arm last8", "plan: config reference")."""
    try:
        parse_layers(layers, base_config.num_hidden_layers)
    except ValueError as exc:
        raise UserError(f"{name}: {exc}") from None
    if num_clusters > base_config.intermediate_size:
        raise UserError(f"{name}: num_clusters {num_clusters} exceeds the FFN's intermediate_size "
                        f"{base_config.intermediate_size}")  # fmt: skip


def routed_config_from(base_config, spec: RoutingSpec, offsets_by_layer: dict[int, list[int]]):
    """The RoutedLlamaConfig of the surgery's result: the dense config plus the routing fields."""
    from configuration_routed_llama import RoutedLlamaConfig

    d = base_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version",
                "quantization_config", "dtype", "torch_dtype"):  # fmt: skip
        d.pop(key, None)
    offsets = [offsets_by_layer.get(i) for i in range(base_config.num_hidden_layers)]
    return RoutedLlamaConfig(
        **d,
        num_experts=spec.num_clusters,
        num_experts_per_tok=spec.top_k,
        routed_layers=list(spec.layers),
        router=spec.router,
        expert_offsets=offsets,
        base_model_name_or_path=spec.base_model,
        partition_method=spec.method,
        partition_seed=spec.seed,
    )


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer", file=sys.stderr)


def permute_layer(state: dict, i: int, spec: RoutingSpec) -> tuple[list[int], dict]:
    """Partition layer `i` of the state dict `state` and permute its FFN in place; add the router's tensors.
    Returns (offsets, clustering record)."""
    import torch

    import modeling_routed_llama as mrl

    p = f"model.layers.{i}.mlp."
    part = partition_layer(state[p + "gate_proj.weight"], spec.num_clusters, spec.method, spec.seed + i, spec.n_init)
    new = permute_mlp(state[p + "gate_proj.weight"], state[p + "up_proj.weight"], state[p + "down_proj.weight"],
                      part["perm"], state.get(p + "gate_proj.bias"), state.get(p + "up_proj.bias"))  # fmt: skip
    state[p + "gate_proj.weight"], state[p + "up_proj.weight"] = new["gate"], new["up"]
    state[p + "down_proj.weight"] = new["down"]
    if "gate_bias" in new:
        state[p + "gate_proj.bias"], state[p + "up_proj.bias"] = new["gate_bias"], new["up_bias"]
    state[p + "router.centroids"] = mrl.cluster_means(new["gate"], part["offsets"])  # (N, H)
    state[p + "router.expert_offsets"] = torch.tensor(part["offsets"], dtype=torch.long)  # (N + 1,)
    return part["offsets"], part["record"]


def route_dense_model(dense, spec: RoutingSpec, progress: bool = True):
    """(routed model, per-layer records): partition and permute every chosen layer of `dense` (not modified)."""
    from transformers.initialization import no_init_weights

    import modeling_routed_llama as mrl

    state = dict(dense.state_dict())
    records, offsets_by_layer = {}, {}
    for i in _progress(spec.layers, progress, desc="partition"):
        offsets_by_layer[i], records[i] = permute_layer(state, i, spec)
    config = routed_config_from(dense.config, spec, offsets_by_layer)
    with no_init_weights():
        routed = getattr(mrl, HEAD_CLASSES[spec.head])(config)
    routed.load_state_dict(state, strict=True)
    routed.tie_weights()  # load_state_dict copied lm_head and embed_tokens into separate tensors
    generation_config = getattr(dense, "generation_config", None)  # a sequence-classification model has none
    if generation_config is not None:
        routed.generation_config = generation_config
    return routed.eval(), records
