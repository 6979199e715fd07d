# Copyright 2026 The routed-llama authors. Apache-2.0.
"""RoutedLlama configuration.

A RoutedLlama checkpoint is a dense Llama checkpoint whose FFN neurons were clustered and permuted so that every
cluster ("expert") is a contiguous block of `gate_proj`/`up_proj` rows and `down_proj` columns. At run time each
token keeps only the top-k clusters of a routed layer. No parameter is added: the router of the default `centroid`
gate is the mean of each cluster's `gate_proj` rows, stored as a buffer.

This file ships inside every converted checkpoint as remote code, so it imports only the standard library and
transformers.
"""

from transformers.models.llama.configuration_llama import LlamaConfig


ROUTERS = ("centroid", "activation")
ROUTING_IMPLS = ("mask", "sparse", "auto")


class RoutedLlamaConfig(LlamaConfig):
    r"""
    Configuration of a top-k routed Llama. Every [`LlamaConfig`] field keeps its meaning; the fields below add routing.

    Args:
        num_experts (`int`, defaults to 8):
            N, the number of clusters each routed layer's FFN neurons were split into. `1 <= N <= intermediate_size`.
        num_experts_per_tok (`int`, *optional*):
            k, the number of clusters each token keeps in a routed layer, `1 <= k <= N`. `None` means N, i.e. the
            dense model. k = N computes exactly what the stock Llama computes. Named as in Mixtral and Qwen2-MoE;
            a field called `top_k` would leak into `generation_config.json` and change sampling.
        routed_layers (`list[int]`, *optional*):
            Indices of the decoder layers that route; `None` routes every layer. Each must have boundaries in
            `expert_offsets`. The other layers run the plain dense `LlamaMLP`.
        router (`str`, defaults to `"centroid"`):
            How a token scores clusters. `"centroid"` (EMoE avg-k): score_e = x . mean of cluster e's `gate_proj`
            rows, computed before the activation, so unselected clusters need no FFN work at all. `"activation"`:
            the root-mean-square of the cluster's actual intermediate activation `act(gate(x)) * up(x)`, which needs
            the full gate and up projections and only lets `down_proj` skip work.
        expert_offsets (`list[list[int] | None]`, *optional*):
            Per decoder layer, the N + 1 increasing offsets into the intermediate dimension that bound its clusters
            (`[0, ..., intermediate_size]`), or `None` for a layer that was not partitioned. `None` for the whole
            field means equal splits (as `numpy.array_split`) in every layer, which is what a random config gets.
            Uneven sizes are allowed (they arise where N does not divide `intermediate_size`).
        routing_impl (`str`, defaults to `"auto"`):
            How a routed FFN is computed. `"mask"`: the reference; compute the whole FFN, zero the unselected
            clusters. `"sparse"`: without gradients on CUDA, the Triton decode kernels (only the selected clusters'
            weights are read) for up to 16 tokens and the prefill path above (cuBLAS GEMMs and one Triton kernel
            that ranks and masks); with gradients, the selected clusters grouped in PyTorch. `"auto"`, on CUDA GPUs
            of compute capability 8.0 or newer without gradients: the decode kernels for up to 8 tokens and the
            prefill path above; `"mask"` everywhere else (training, CPU). See `AUTO_TRITON_MAX_TOKENS`,
            `AUTO_PREFILL` and `triton_mode` in modeling_routed_llama.py.
        base_model_name_or_path (`str`, *optional*):
            Provenance: the dense checkpoint this one was converted from.
        partition_method (`str`, *optional*):
            Provenance: how neurons were clustered (`"kmeans"` or `"random"`).
        partition_seed (`int`, *optional*):
            Provenance: the seed of the partition.
    """

    model_type = "routed_llama"

    num_experts: int = 8
    num_experts_per_tok: int | None = None
    routed_layers: list[int] | None = None
    router: str = "centroid"
    expert_offsets: list[list[int] | None] | None = None
    routing_impl: str = "auto"
    base_model_name_or_path: str | None = None
    partition_method: str | None = None
    partition_seed: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # JSON has no int keys or tuples; normalise what users may pass so that comparisons and saving are stable.
        if self.routed_layers is not None:
            self.routed_layers = sorted({int(i) for i in self.routed_layers})
        if self.expert_offsets is not None:
            self.expert_offsets = [None if o is None else [int(v) for v in o] for o in self.expert_offsets]
        self.validate_routing()

    # Load-time overrides (`from_pretrained(..., num_experts_per_tok=4)`) are set with setattr after `__init__`,
    # so the model calls this again when it is built; it is the single place the routing fields are checked.
    def validate_routing(self):
        """Raise a `ValueError` that names the field if the routing fields are inconsistent."""
        n, inter, layers = self.num_experts, self.intermediate_size, self.num_hidden_layers
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_experts must be a positive integer, got {n!r}")
        if n > inter:
            raise ValueError(f"num_experts ({n}) cannot exceed intermediate_size ({inter}): a cluster needs a neuron")
        k = self.num_experts_per_tok
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n):
            raise ValueError(f"num_experts_per_tok must be an integer in [1, num_experts={n}], got {k!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.routing_impl not in ROUTING_IMPLS:
            raise ValueError(f"routing_impl must be one of {ROUTING_IMPLS}, got {self.routing_impl!r}")
        if self.routed_layers is not None:
            bad = [i for i in self.routed_layers if not 0 <= i < layers]
            if bad:
                raise ValueError(f"routed_layers {bad} out of range for num_hidden_layers={layers}")
        if self.expert_offsets is not None:
            if len(self.expert_offsets) != layers:
                raise ValueError(
                    f"expert_offsets must have one entry per layer ({layers}), got {len(self.expert_offsets)}"
                )
            for i, offsets in enumerate(self.expert_offsets):
                if offsets is None:
                    continue
                if len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != inter:
                    raise ValueError(
                        f"expert_offsets[{i}] must hold num_experts + 1 = {n + 1} offsets from 0 to "
                        f"intermediate_size={inter}, got {len(offsets)} ending at {offsets[-1] if offsets else None}"
                    )
                if any(b <= a for a, b in zip(offsets, offsets[1:])):
                    raise ValueError(f"expert_offsets[{i}] must be strictly increasing (no empty cluster)")
            missing = [i for i in self.layers_to_route() if self.expert_offsets[i] is None]
            if missing:
                raise ValueError(f"routed layers {missing} have no cluster boundaries in expert_offsets")

    @property
    def top_k_experts(self) -> int:
        """k with the `None` default resolved to N."""
        return self.num_experts if self.num_experts_per_tok is None else self.num_experts_per_tok

    def layers_to_route(self) -> list[int]:
        """Routed layer indices with the `None` default resolved to every layer."""
        return list(range(self.num_hidden_layers)) if self.routed_layers is None else list(self.routed_layers)

    def offsets_for_layer(self, layer_idx: int) -> list[int]:
        """The N + 1 cluster boundaries of one layer; equal splits when the config carries none."""
        if self.expert_offsets is not None and self.expert_offsets[layer_idx] is not None:
            return list(self.expert_offsets[layer_idx])
        base, extra = divmod(self.intermediate_size, self.num_experts)
        offsets = [0]
        for e in range(self.num_experts):
            offsets.append(offsets[-1] + base + (1 if e < extra else 0))
        return offsets


__all__ = ["RoutedLlamaConfig"]
