# Copyright 2026 The routed-llama authors. Apache-2.0.
"""RoutedLlama: a dense Llama whose FFNs keep, per token, only the top-k of N contiguous neuron clusters.

Everything except the FFN is the stock transformers Llama (attention, rotary embeddings, KV cache, generation),
reused by subclassing, so a RoutedLlama follows whatever the installed transformers does for Llama. The FFN keeps
the child names `gate_proj`, `up_proj` and `down_proj` as plain `nn.Linear`, so state-dict keys and PEFT targets are
unchanged; the router adds only buffers.

Routing in one routed layer, for a token x (hidden size H, intermediate size I, N clusters, k kept):

    scores  = x @ centroids.T                           # (N,)  "centroid" router: centroid_e = mean of e's gate rows
    keep    = top-k(scores)                             # k cluster ids
    h       = act(gate_proj(x)) * up_proj(x)            # (I,)  only the kept clusters' rows are needed
    out     = down_proj(h restricted to kept clusters)  # (H,)

With k = N the layer computes exactly the dense FFN. Three implementations compute the same function
(`config.routing_impl`): "mask" (the reference: compute the whole FFN, zero the dropped clusters), "sparse" (without
gradients on CUDA: the Triton decode kernels, which compute only the kept clusters, for up to TRITON_MAX_TOKENS tokens
and the prefill path above; with gradients or on CPU: tokens grouped by cluster in plain PyTorch) and "auto" (on CUDA
devices of compute capability 8.0 or newer, without gradients: the decode kernels for up to AUTO_TRITON_MAX_TOKENS
tokens and the prefill path above; "mask" everywhere else). The prefill path (`triton_prefill_ffn`) computes what
"mask" computes, with cuBLAS for the three projections and one Triton kernel for the routing, activation and zeroing
in between, so that long inputs pay fewer launches than "mask" does. See AUTO_TRITON_MAX_TOKENS, AUTO_PREFILL and
`triton_mode` for what was measured.

For decoding through the kernels, `RoutedLlamaForCausalLM.fast_generate` runs greedy decoding over a StaticCache with
one CUDA graph per step.

This file ships inside every converted checkpoint as remote code: it imports only the standard library, torch,
transformers and its configuration file (Triton, which ships with CUDA builds of torch, is optional).
"""

import collections
import inspect
import operator
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)


try:  # relative import when loaded as remote code from a checkpoint folder, absolute when imported from the repo
    from .configuration_routed_llama import RoutedLlamaConfig
except ImportError:
    from configuration_routed_llama import RoutedLlamaConfig

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: the PyTorch paths below need no Triton
    triton = None

# Under Triton's CPU interpreter (set before triton is imported) the kernels also run on CPU tensors: the tests use it.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Without gradients, "sparse" runs the Triton decode kernels for up to this many tokens (decode-sized inputs) and the
# prefill path (`triton_prefill_ffn`) above; with gradients it runs the grouped PyTorch path.
TRITON_MAX_TOKENS = 16

# "auto" runs the Triton decode kernels for up to this many tokens on CUDA devices of compute capability >= 8.0 (and
# the prefill path above, see AUTO_PREFILL), and the mask reference otherwise (training, CPU); 0 turns the decode
# kernels off. Chosen by what was measured (results/decode-compiled/decode.json, H200, bf16, Llama-7B FFN alone with
# the tuned TRITON_TILES, time per layer against mask, the alternative that then computed the same function): 1 token,
# "gemv1" kernel: 1.71x dense at k/N 1/2 and 2.48x at 1/4, mask 0.77x and 0.75x; 4 tokens, "dot" kernel
# (`triton_mode`): 0.98x dense at k/N 1/2 and 1.15x at 1/4, mask 0.72x at both, so the kernels beat the reference.
# 2, 3 and 5-8 tokens were not measured. Only the H200 (capability 9.0) was measured; other devices of capability
# >= 8.0 take the same choice unmeasured.
AUTO_TRITON_MAX_TOKENS = 8
# "auto" runs the prefill path for more than AUTO_TRITON_MAX_TOKENS tokens on the same devices, without gradients;
# False runs mask there. Chosen because it computes what mask computes (the same GEMMs and fp32 centroid scores, h
# rounded as mask rounds it: bit-identical in the interpreter tests) in fewer launches per layer: 6 against mask's 12
# with the centroid router (7 against 17 with the activation router; dense LlamaMLP: 5). Measured
# (results/prefill-graph/, H200, bf16, 2026-11-30, the bit-mask routing kernel): Llama-7B FFN alone at 512 tokens
# 0.93x dense at k/N 1/2 and 0.95x at 1/4 (mask 0.85x / 0.87x), at 2048 tokens 0.96x / 0.97x; the whole Llama-7B
# forward of 512 tokens in a CUDA graph 0.96x dense (mask 0.90-0.92x), eagerly 0.81-0.82x (host-bound: the routed
# layer's Python costs more than LlamaMLP's). 9-16 tokens take the prefill path too, not the "dot" decode kernels
# (neither was measured there).
AUTO_PREFILL = True
AUTO_MIN_CAPABILITY = (8, 0)


def cluster_means(weight: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Mean row of each contiguous block of `weight` (I, H) bounded by `offsets` (N + 1): the centroids, (N, H)."""
    return torch.stack([weight[a:b].float().mean(0) for a, b in zip(offsets[:-1], offsets[1:])])


_CAPABILITY = {}  # CUDA device index -> compute capability, asked once (eager prefill asks in every layer)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _capability(index: int) -> tuple[int, int]:
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


@torch.compiler.assume_constant_result  # under torch.compile: a constant of the graph, not a traced device query
def _capable(index: int) -> bool:
    return _capability(index) >= AUTO_MIN_CAPABILITY


def _auto_device(x: torch.Tensor) -> bool:
    """The device half of `routing_impl="auto"`: x is on a CUDA device of compute capability >= AUTO_MIN_CAPABILITY."""
    return x.is_cuda and _capable(_cuda_index(x.device))


def auto_uses_triton(x: torch.Tensor) -> bool:
    """"auto" runs the decode kernels: at most AUTO_TRITON_MAX_TOKENS tokens on a capable CUDA device. x (M, H)."""
    return x.shape[0] <= AUTO_TRITON_MAX_TOKENS and _auto_device(x)


def auto_uses_prefill(x: torch.Tensor) -> bool:
    """"auto" runs the prefill path: more than AUTO_TRITON_MAX_TOKENS tokens on a capable CUDA device, unless
    AUTO_PREFILL is off. x (M, H)."""
    return AUTO_PREFILL and x.shape[0] > AUTO_TRITON_MAX_TOKENS and _auto_device(x)


class RoutedLlamaRouter(nn.Module):
    """Scores N clusters per token and keeps the top k. Holds only buffers: nothing here is trained.

    Its forward returns the kept cluster ids, so a forward hook on it sees every routing decision (the analysis
    tools use that). The Triton path scores and ranks clusters inside its kernels and does not call this module.
    """

    def __init__(self, config: RoutedLlamaConfig, layer_idx: int):
        super().__init__()
        self.kind = config.router
        self.num_experts = config.num_experts
        self.top_k = config.top_k_experts
        offsets = config.offsets_for_layer(layer_idx)
        self.register_buffer("centroids", torch.zeros(config.num_experts, config.hidden_size))
        self.register_buffer("expert_offsets", torch.tensor(offsets, dtype=torch.long))
        self._row_cluster = {}  # device -> (offsets, its version, (I,) int32 cluster ids); a cache, not state
        self._centroids_fp32 = None  # (centroids tensor, its version, fp32 copy); a cache, not state

    def scores(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Cluster scores, (M, N), for tokens x (M, H); the activation router also needs h (M, I). fp32, except the
        centroid router's under autocast (below)."""
        if self.kind == "centroid":
            # fp32 so that bf16 rounding does not create ties that different implementations break differently.
            # Under a bf16 autocast (training and scoring in the finetune harness) autocast runs this product in bf16
            # anyway; that is kept, as every committed run was made so, and fp32 scores left the all-30 model about
            # as sensitive to rounding (an ad hoc check, results/compile-drift/README.md)
            return F.linear(x.float(), self.centroids.float())  # (M, N)
        sq = torch.zeros(h.shape[0], self.num_experts, device=h.device, dtype=torch.float32)  # (M, N)
        sq.index_add_(1, self.row_cluster(h.shape[-1]), h.float().square())
        return (sq / self.expert_offsets.diff().float()).sqrt()  # RMS: a cluster one neuron larger is not favoured

    def expert_of_neuron(self, intermediate_size: int) -> torch.Tensor:
        """Cluster id of every intermediate neuron, (I,), from the offsets (no host sync)."""
        neurons = torch.arange(intermediate_size, device=self.expert_offsets.device)  # (I,)
        # the number of cluster ends at or below each neuron (searchsorted(ends, neurons, right=True)); not
        # searchsorted itself: compiled by inductor on CUDA (torch 2.11, H200, 2026-11-30) it ignored the slice's
        # offset (pytorch/pytorch#182343) and returned every id one too high, so compiled calls routed each row by its
        # neighbour cluster's decision (benchmarks/check_gpu.py "autocast" failed; it passes with this)
        return (neurons[:, None] >= self.expert_offsets[None, 1:]).sum(1)  # (I, N) -> (I,)

    def row_cluster(self, intermediate_size: int) -> torch.Tensor:
        """`expert_of_neuron` as int32, cached per device until the offsets buffer is replaced or changed in place
        (its version counter moves; the mask path and the Triton kernels read it every call). Not cached while traced,
        while a CUDA graph is captured (a tensor from the graph's private pool must not outlive it), or for
        inference-mode offsets, which have no version counter."""
        offsets = self.expert_offsets
        if torch.compiler.is_compiling() or offsets.is_inference():  # traced: small ops in the graph
            return self.expert_of_neuron(intermediate_size).to(torch.int32)
        cached = self._row_cluster.get(offsets.device)
        if cached is not None and cached[0] is offsets and cached[1] == offsets._version:
            if cached[2].numel() == intermediate_size:
                return cached[2]
        with torch.inference_mode(False):  # a normal tensor even when first asked under inference mode: training
            ids = self.expert_of_neuron(intermediate_size).to(torch.int32)  # may save it for backward later
        # not while a CUDA graph is captured, and never a fake tensor (a FakeTensorMode trace outside torch.compile)
        if type(ids) is torch.Tensor and not (offsets.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._row_cluster[offsets.device] = (offsets, offsets._version, ids)
        return ids

    def centroids_fp32(self) -> torch.Tensor:
        """The centroids in fp32, (N, H), for the prefill path's scores: a bf16 model's centroids are bf16 buffers, and
        their fp32 copy is kept until the buffer is replaced or changed in place (its version counter moves), which
        saves the prefill path one cast launch per layer. Not kept while traced or while a CUDA graph is captured (as
        in `row_cluster`), nor for inference-mode tensors, which have no version counter."""
        c = self.centroids
        if c.dtype == torch.float32 or torch.compiler.is_compiling() or c.is_inference():
            return c.float()
        cached = self._centroids_fp32
        if cached is not None and cached[0] is c and cached[1] == c._version:
            return cached[2]
        c32 = c.float()
        if not (c.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._centroids_fp32 = (c, c._version, c32)
        return c32

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Kept cluster ids, (M, k), for tokens x (M, H)."""
        return self.scores(x, h).topk(self.top_k, dim=-1).indices  # (M, k)


class RoutedLlamaMLP(nn.Module):
    """Llama's SwiGLU FFN where each token keeps only its top-k neuron clusters."""

    def __init__(self, config: RoutedLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.router = RoutedLlamaRouter(config, layer_idx)
        sizes = {b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])}
        self.cluster_size = sizes.pop() if len(sizes) == 1 else None  # equal clusters: the mask broadcasts per cluster

    @property
    def offsets(self) -> list[int]:
        return self.config.offsets_for_layer(self.layer_idx)

    @torch.no_grad()
    def refresh_router(self):
        """Recompute the centroids from the current `gate_proj` rows (after surgery). Not called after merging an
        adapter: the unmerged model routes with the base's centroids, and the merged one must compute the same."""
        self.router.centroids.copy_(cluster_means(self.gate_proj.weight, self.offsets))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.router.top_k >= self.router.num_experts:  # k = N: the stock FFN, bit for bit
            return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)  # (M, H), M = B * T
        impl = self.pick_impl(x)
        if impl == "triton" or impl == "prefill":
            out = self.forward_triton(x, prefill=impl == "prefill")
        elif impl == "sparse":
            out = self.forward_sparse(x)
        else:
            out = self.forward_mask(x)
        return out.view(shape)

    def pick_impl(self, x: torch.Tensor) -> str:
        """Which implementation runs for these tokens: "mask", "sparse" (grouped PyTorch), "triton" (the decode
        kernels) or "prefill" (`triton_prefill_ffn`: cuBLAS GEMMs and one routing kernel).

        "mask" always runs the reference. Where `_triton_ok` holds (no gradients, a CUDA tensor, ...), "auto" runs
        "triton" where `auto_uses_triton` holds (at most AUTO_TRITON_MAX_TOKENS tokens on a CUDA device of capability
        >= 8.0), "prefill" where `auto_uses_prefill` holds (more tokens, same devices) and "mask" otherwise; it never
        picks the grouped path, which syncs with the host. "sparse" runs "triton" for up to TRITON_MAX_TOKENS tokens
        and "prefill" above where `_triton_ok` holds, and the grouped path otherwise (training).
        """
        impl = self.config.routing_impl
        if impl == "mask":
            return "mask"
        kernels = self._triton_ok(x)
        if impl == "auto":
            if kernels and auto_uses_triton(x):
                return "triton"
            return "prefill" if kernels and auto_uses_prefill(x) else "mask"
        if not kernels:
            return "sparse"
        return "triton" if x.shape[0] <= TRITON_MAX_TOKENS else "prefill"

    def _plain_projections(self) -> bool:
        """No adapter wraps gate/up/down: the weights can be sliced and read directly."""
        return all(type(p) is nn.Linear for p in (self.gate_proj, self.up_proj, self.down_proj))

    def _triton_ok(self, x: torch.Tensor) -> bool:
        """The Triton paths (decode kernels and prefill path) can compute this call: no gradients (they have no
        backward), plain bias-free projections with SiLU, a supported dtype, a CUDA tensor (or any tensor under
        Triton's CPU interpreter). Any token count: which path runs is `pick_impl`'s choice."""
        # cheap checks first: on the training path they fail before anything queries the device
        if triton is None:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.gate_proj.weight.requires_grad):
            return False
        return (
            (x.is_cuda or TRITON_INTERPRET)
            and self._plain_projections()
            and self.gate_proj.bias is None
            and self.config.hidden_act == "silu"
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and x.dtype == self.gate_proj.weight.dtype
        )

    def forward_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: the whole FFN, then zero every neuron of the dropped clusters. x (M, H) -> (M, H)."""
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (M, I)
        keep_ids = self.router(x, h)  # (M, k)
        m, n = x.shape[0], self.router.num_experts
        keep = torch.zeros(m, n, device=x.device, dtype=h.dtype)  # (M, N)
        keep.scatter_(1, keep_ids, 1)
        if self.cluster_size is not None:  # (M, N, size) * (M, N, 1): no (M, I) mask is built
            return self.down_proj((h.reshape(m, n, self.cluster_size) * keep[:, :, None]).reshape(m, -1))
        keep = keep.index_select(1, self.router.row_cluster(self.intermediate_size))  # (M, I)
        return self.down_proj(h * keep)

    def forward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        """Only the kept clusters: sort (token, cluster) pairs by cluster and run one slice of each weight per cluster.

        Slices the weights, so it needs plain `nn.Linear` projections; with an adapter attached (whose low-rank
        update is not sliced) it runs the mask path instead. Supports autograd. x (M, H) -> (M, H).
        """
        if not self._plain_projections():
            return self.forward_mask(x)
        h_full = None
        if self.router.kind == "activation":  # its scores need every cluster's activation: only down_proj is skipped
            h_full = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (M, I)
        keep_ids = self.router(x, h_full)  # (M, k)
        m, k = keep_ids.shape
        flat = keep_ids.reshape(-1)  # (M * k,)
        order = flat.argsort(stable=True)  # (M * k,) pairs grouped by cluster
        token_of_pair = order // k  # (M * k,)
        counts = torch.bincount(flat, minlength=self.router.num_experts).tolist()  # host sync: not for CUDA graphs
        offsets = self.offsets
        gw, gb = self.gate_proj.weight, self.gate_proj.bias
        uw, ub = self.up_proj.weight, self.up_proj.bias
        dw = self.down_proj.weight
        out = x.new_zeros(m, self.hidden_size, dtype=torch.float32)  # (M, H) accumulated in fp32
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of_pair[start : start + count]  # (c,)
            start += count
            lo, hi = offsets[e], offsets[e + 1]
            xe = x.index_select(0, tokens)  # (c, H)
            if h_full is None:
                g = F.linear(xe, gw[lo:hi], None if gb is None else gb[lo:hi])  # (c, s_e)
                u = F.linear(xe, uw[lo:hi], None if ub is None else ub[lo:hi])  # (c, s_e)
                he = self.act_fn(g) * u  # (c, s_e)
            else:
                he = h_full.index_select(0, tokens)[:, lo:hi]  # (c, s_e)
            out = out.index_add(0, tokens, F.linear(he, dw[:, lo:hi]).float())  # (M, H)
        if self.down_proj.bias is not None:
            out = out + self.down_proj.bias.float()
        return out.to(x.dtype)

    def forward_triton(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """The Triton paths (`triton_routed_ffn`): the decode kernels, which read only the kept clusters' weights, for
        up to TRITON_MAX_TOKENS tokens, and the prefill path above them or with `prefill`. No host sync and static
        shapes, so a decode step can be captured in a CUDA graph. Only called where `_triton_ok` holds.
        x (M, H) -> (M, H)."""
        router = self.router
        prefill = prefill or x.shape[0] > TRITON_MAX_TOKENS  # the decode kernels' register tiles hold at most 16
        kw = dict(
            w_gate=self.gate_proj.weight,
            w_up=self.up_proj.weight,
            w_down=self.down_proj.weight,
            row_cluster=router.row_cluster(self.intermediate_size),
            top_k=router.top_k,
            centroids=router.centroids if router.kind == "centroid" else None,
            offsets=router.expert_offsets,
        )
        if torch.compiler.is_compiling():
            # under torch.compile the kernels run as one opaque custom op (`routed_llama::routed_ffn`): the compiler
            # fuses everything around them and never traces their launch code. A custom op's body runs without the
            # caller's autocast once compiled (eagerly it runs with it), so an active autocast is passed in and the
            # op re-enters it: compiled and eager calls compute in the same dtypes (the prefill path's GEMMs and
            # router scores in bf16 under a bf16 autocast, as the mask path that trained the model).
            device = x.device.type
            args = {}
            if prefill:  # the prefill path (autocast casts its GEMMs; the decode kernels ignore it)
                args["mode"] = "prefill"
                if torch.is_autocast_enabled(device):
                    args["autocast"] = torch.get_autocast_dtype(device)
            if not set(args) <= _OP_ARGS:  # an older copy of this file registered the op (see `_OP_ARGS`)
                return self.forward_mask(x)
            return torch.ops.routed_llama.routed_ffn(x, **kw, **args)
        if prefill:  # straight to the prefill path: no tile dictionaries to merge
            if kw["centroids"] is not None:
                kw["centroids"] = router.centroids_fp32()  # cached: one cast launch fewer per layer
            return triton_prefill_ffn(x, **kw)
        return triton_routed_ffn(x, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels for a few tokens (decoding). Decode is bound by memory bandwidth, so the kernels are GEMVs that
# stream only the weights of kept clusters, with many programs so that every SM streams.
#
# Surgery made every cluster a contiguous block of gate/up rows and down columns. The kernels tile the intermediate
# dimension I into aligned tiles (not cluster-shaped ones, whose runtime bounds would defeat vectorised loads):
#   1. scores (centroid router): one program per (cluster, token) computes x . centroid in fp32. (Computing them in
#      N extra programs of the gate/up launch, the others spinning on a counter until they are done, measured slower:
#      52.2 against 48.0 us per Llama-7B layer at k/N 1/2 on an H200, results/decode-kernels/.)
#   2. gate/up: one program per tile of BLOCK_R rows. It ranks the scores itself (top-k fused, no extra launch) and,
#      if any token keeps any of its rows, reads those rows of gate and up once for all tokens and writes
#      h = silu(gate x) * (up x) * kept in fp32; a tile nobody keeps writes zeros and reads no weights.
#      (Activation router: every tile is computed, then per-cluster RMS scores and a pass that zeroes dropped rows.)
#   3. down: programs (row tile of W_down, split g) sum over column tiles g, g + SPLIT, ...; a column tile whose h is
#      all zero (no token kept it) is skipped without reading its weights. Partial sums are fp32: either one buffer
#      per split summed in a fixed order by a last small kernel ("split", deterministic), the same sum done inside
#      down by the last program of each row tile to finish ("last": deterministic, the same bits as "split", one
#      launch fewer), or atomically added ("atomic").
# "last" counts arrivals in a per-device buffer of int32 counters (`_counters`) that each launch leaves zeroed again,
# so two FFN calls on one device must not run at the same time (on two streams) with it.
# Three ways to multiply: MODE 0 (one token: products accumulated elementwise, one reduction at the end, as in
# TEAL/CATS GEMVs), MODE 1 (a few tokens: the weight tile is loaded once and reduced per token on CUDA cores; run
# only on request, it measured slower than MODE 2, see `triton_mode`) and MODE 2 (tl.dot on tensor cores with the
# tokens padded to 16 rows).
# ---------------------------------------------------------------------------------------------------------------

# Per mode: tile sizes and warps of the gate/up ("_gu") and down ("_d") kernels, and (gemv1, dot) programs per SM of
# down. gemv1 and dot as measured fastest by `benchmarks/decode.py --tune` (H200, bf16, Llama-7B FFN, k/N 1/2; a
# coordinate search, gate/up first: results/decode-compiled/decode.json "tuning"): gemv1 48.4 us per layer against
# 51.6 us for the earlier reasoned choice (BLOCK_R 8, BLOCK_K 512, 4 warps; BLOCK_H 16, BLOCK_C 256, 4 warps, 8 per
# SM), dot (4 tokens) 86.4 us against 96.5 us (BLOCK_H 32, BLOCK_C 128, 8 per SM). "gemv" is not tuned (never chosen).
# gemv1's down tiles later changed to BLOCK_H 16 at 8 per SM, and "pdl" (programmatic dependent launch: gate/up and
# down are launched while the kernel before them runs and wait for it on the GPU, so their launch and ramp overlap it)
# turned on, from an ad hoc sweep in one process (results/decode-kernels-3/, H200, 2026-11-30, two passes each): per
# layer at k/N 1/2, 46.97 us before, 46.38-46.50 with the tiles, 45.80-45.95 with pdl, 45.48-45.58 with both; at 1/4
# 31.74-31.80, 31.37-31.40, 31.38-31.49, 30.96-30.97. pdl made "dot" (4 tokens) slower (84.3 -> 90.3 us): off there.
TRITON_TILES = {
    "gemv1": {"BLOCK_R": 2, "BLOCK_K": 512, "warps_gu": 2, "BLOCK_H": 16, "BLOCK_C": 128, "warps_d": 2,
              "ctas_per_sm": 8, "pdl": True},
    "gemv": {"BLOCK_R": 8, "BLOCK_K": 256, "warps_gu": 4, "BLOCK_H": 16, "BLOCK_C": 128, "warps_d": 4},
    "dot": {"BLOCK_R": 32, "BLOCK_K": 128, "warps_gu": 4, "BLOCK_H": 64, "BLOCK_C": 64, "warps_d": 4, "ctas_per_sm": 4},
}
# How down's fp32 partial sums are reduced ("last" and "split": deterministic and the same bits; "atomic": atomic adds;
# see the notes above), how many programs per SM down aims for (unless the mode sets its own), and the warps of the
# router-scores kernel. "last" measured fastest (results/decode-kernels/, H200, bf16, Llama-7B FFN alone, per layer):
# 1 token 48.0 us against "split" 48.8 and "atomic" 49.5 at k/N 1/2, 32.8 against 33.6 and 34.1 at 1/4; 4 tokens
# ("dot") 85.4 against 86.9 and 86.4. Scores with 8 warps: 46.8 against 47.7 us (4 warps), 48.9 (1) and 49.6 (2) at
# 1 token and k/N 1/2, 31.8 against 32.7 at 1/4, 83.4 against 84.3 at 4 tokens (results/decode-kernels-2/variants/).
# "pdl" is off unless a mode turns it on (above); CUDA devices below compute capability 9.0 never use it (`_pdl`).
TRITON_OPTIONS = {"reduce": "last", "ctas_per_sm": 8, "warps_scores": 8, "pdl": False}
_MODES = {"gemv1": 0, "gemv": 1, "dot": 2}
_REDUCE = {"split": 0, "atomic": 1, "last": 2}
# The prefill path's routing kernel (`_route_rows_kernel`): tokens per program, rows per inner step, rows per program,
# warps, and whether each token's kept set is held as an int64 bit mask (N <= 64; else each row's score is gathered).
# Tiles from one ad hoc sweep on an H200 (2026-11-30, bf16, 512 tokens, I = 11008, N = 32, k = 16, the kernel alone in
# a CUDA graph, with the gather; no committed command): 21.8 us per layer, against 26.8-30.3 us for 16 tokens x 128
# rows and 47 us and more for the first choice (16 x 128, 1024 rows, 4 warps: too few programs); PyTorch's unrouted
# silu(g) * u took 13.6 us there. The bit mask then took the FFN alone from 250.2 to 247.4 us at k/N 1/2 and from
# 973.0 to 955.2 us at 2048 tokens (results/prefill-graph/: "prefill" against "prefill/gather").
PREFILL_TILES = {"BLOCK_M": 4, "BLOCK_R": 512, "ROWS": 2048, "warps": 8, "keep_bits": True}

if triton is not None:

    @triton.jit
    def _centroid_scores_kernel(x_ptr, c_ptr, s_ptr, H, N, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
        # program (e, m): s[m, e] = x[m] . centroid[e] in fp32
        if PDL:  # let gate/up's programs start on the SMs these few programs leave idle (they wait for this grid)
            tl.extra.cuda.gdc_launch_dependents()
        e = tl.program_id(0)
        m = tl.program_id(1)
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            kk = k0 + tl.arange(0, BLOCK_H)
            xv = tl.load(x_ptr + m * H + kk, mask=kk < H, other=0.0).to(tl.float32)
            cv = tl.load(c_ptr + e * H + kk, mask=kk < H, other=0.0).to(tl.float32)
            acc += xv * cv
        tl.store(s_ptr + m * N + e, tl.sum(acc, axis=0))

    @triton.jit
    def _beats(s_other, id_other, s_own, id_own):
        # the routing order of every kernel: a cluster beats another with a higher score, or an equal one and a lower id
        return (s_other > s_own) | ((s_other == s_own) & (id_other < id_own))

    @triton.jit
    def _kept(s_ptr, rc, M, N, top_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # (BM, BR) True where token m keeps the cluster rc[r] of row r: fewer than k clusters beat it (ties: lower id)
        m = tl.arange(0, BLOCK_M)
        j = tl.arange(0, BLOCK_N)
        s = tl.load(s_ptr + m[:, None] * N + j[None, :], mask=(m[:, None] < M) & (j[None, :] < N), other=float("-inf"))
        s_r = tl.load(s_ptr + m[:, None] * N + rc[None, :], mask=m[:, None] < M, other=0.0)  # (BM, BR)
        s3 = s[:, None, :]  # (BM, 1, BN) competitors
        r3 = s_r[:, :, None]  # (BM, BR, 1) the row's own cluster score
        beats = _beats(s3, j[None, None, :], r3, rc[None, :, None])  # (BM, BR, BN)
        rank = tl.sum(beats.to(tl.int32), axis=2)  # (BM, BR)
        return (rank < top_k) & (m[:, None] < M)

    @triton.jit
    def _gate_up_rows(x_ptr, wg_ptr, wu_ptr, r, M, H, I, MODE: tl.constexpr, DOT_FP32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # gate and up projections of rows r for every token: two (BM, BR) fp32 tensors
        m = tl.arange(0, BLOCK_M)
        rmask = r < I
        if MODE == 0:  # one token: accumulate products elementwise, reduce once after the loop
            acc_g = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        else:
            acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            wmask = rmask[:, None] & (kk[None, :] < H)
            wg = tl.load(wg_ptr + r[:, None] * H + kk[None, :], mask=wmask, other=0.0)  # (BR, BK)
            wu = tl.load(wu_ptr + r[:, None] * H + kk[None, :], mask=wmask, other=0.0)  # (BR, BK)
            if MODE == 0:
                xv = tl.load(x_ptr + kk, mask=kk < H, other=0.0).to(tl.float32)  # (BK,)
                acc_g += wg.to(tl.float32) * xv[None, :]
                acc_u += wu.to(tl.float32) * xv[None, :]
            elif MODE == 1:
                wgf = wg.to(tl.float32)
                wuf = wu.to(tl.float32)
                for i in tl.static_range(BLOCK_M):
                    xmask = (kk < H) & (tl.full((BLOCK_K,), i, tl.int32) < M)  # token i may be padding
                    xv = tl.load(x_ptr + i * H + kk, mask=xmask, other=0.0).to(tl.float32)  # (BK,)
                    pg = tl.sum(wgf * xv[None, :], axis=1)  # (BR,)
                    pu = tl.sum(wuf * xv[None, :], axis=1)
                    acc_g += tl.where(m[:, None] == i, pg[None, :], 0.0)
                    acc_u += tl.where(m[:, None] == i, pu[None, :], 0.0)
            else:
                xt = tl.load(x_ptr + m[:, None] * H + kk[None, :], mask=(m[:, None] < M) & (kk[None, :] < H), other=0.0)
                if DOT_FP32:
                    xt = xt.to(tl.float32)
                    acc_g = tl.dot(xt, tl.trans(wg.to(tl.float32)), acc_g, input_precision="ieee")
                    acc_u = tl.dot(xt, tl.trans(wu.to(tl.float32)), acc_u, input_precision="ieee")
                else:
                    acc_g = tl.dot(xt, tl.trans(wg), acc_g)
                    acc_u = tl.dot(xt, tl.trans(wu), acc_u)
        # one return statement: Triton types every `return` it meets, also one after a constexpr branch returned
        if MODE == 0:
            g = tl.sum(acc_g, axis=1)[None, :]  # (1, BR)
            u = tl.sum(acc_u, axis=1)[None, :]
        else:
            g = acc_g  # (BM, BR)
            u = acc_u
        return g, u

    @triton.jit
    def _gate_up_kernel(x_ptr, wg_ptr, wu_ptr, rc_ptr, s_ptr, h_ptr, M, H, I, N, top_k,
                        ROUTE: tl.constexpr, MODE: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr):  # fmt: skip
        # program t: rows [t * BR, (t + 1) * BR) of h (M, I) = silu(x Wg^T) * (x Wu^T), zero where not kept
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
        m = tl.arange(0, BLOCK_M)
        valid = (m[:, None] < M) & (r[None, :] < I)  # (BM, BR)
        if PDL:  # launched before the previous kernel ended: wait for it before any read or write
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()  # down's programs may start as this grid's last programs run
        if ROUTE:
            rc = tl.load(rc_ptr + r, mask=r < I, other=0)
            kept = _kept(s_ptr, rc, M, N, top_k, BLOCK_M, BLOCK_N) & valid
        else:  # the activation router ranks after h exists: compute every row
            kept = valid
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if tl.max(tl.max(kept.to(tl.int32), axis=1), axis=0) > 0:  # some token keeps a row here: read the weights
            g, u = _gate_up_rows(x_ptr, wg_ptr, wu_ptr, r, M, H, I, MODE, DOT_FP32, BLOCK_M, BLOCK_R, BLOCK_K)
            h = tl.where(kept, g * tl.sigmoid(g) * u, 0.0)
        tl.store(h_ptr + m[:, None] * I + r[None, :], h, mask=valid)

    @triton.jit
    def _cluster_rms_kernel(h_ptr, off_ptr, s_ptr, I, N, BLOCK_C: tl.constexpr):
        # activation router, program (e, m): s[m, e] = RMS of h[m] over cluster e's neurons
        e = tl.program_id(0)
        m = tl.program_id(1)
        lo = tl.load(off_ptr + e)
        hi = tl.load(off_ptr + e + 1)
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for c0 in range(lo, hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            v = tl.load(h_ptr + m * I + c, mask=c < hi, other=0.0).to(tl.float32)  # the prefill path's h is bf16/fp16
            acc += v * v
        tl.store(s_ptr + m * N + e, tl.sqrt(tl.sum(acc, axis=0) / (hi - lo).to(tl.float32)))

    @triton.jit
    def _mask_rows_kernel(h_ptr, rc_ptr, s_ptr, M, I, N, top_k,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
        # activation router: zero h where the token does not keep the row's cluster
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        m = tl.arange(0, BLOCK_M)
        valid = (m[:, None] < M) & (r[None, :] < I)
        rc = tl.load(rc_ptr + r, mask=r < I, other=0)
        kept = _kept(s_ptr, rc, M, N, top_k, BLOCK_M, BLOCK_N)
        ptrs = h_ptr + m[:, None] * I + r[None, :]
        tl.store(ptrs, tl.where(kept, tl.load(ptrs, mask=valid, other=0.0), 0.0), mask=valid)

    @triton.jit
    def _down_kernel(h_ptr, wd_ptr, part_ptr, out_ptr, cnt_ptr, M, H, I, n_col_tiles, split,
                     MODE: tl.constexpr, DOT_FP32: tl.constexpr, REDUCE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        # program (row tile, g): out rows of this tile summed over column tiles g, g + split, ... (kept ones only), in
        # fp32: REDUCE 0 stores the partial in part[g] (summed by `_sum_splits_kernel`), 1 adds it to part[0]
        # atomically, 2 stores it in part[g] and the tile's last program to arrive sums part[0..split) into out.
        # A tile is read whole or not at all: masking out the columns of dropped clusters in groups of 8 (a tile that
        # straddles a kept cluster reads a dropped one's columns too) read fewer bytes but measured slower, 53.0
        # against 48.5 us per Llama-7B layer at k/N 1/2 (H200; results/decode-kernels/).
        if PDL:  # launched before gate/up ended: wait for h
            tl.extra.cuda.gdc_wait()
        rows = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,)
        g = tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        if MODE == 0:
            acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        c = g * BLOCK_C + tl.arange(0, BLOCK_C)
        hv = tl.load(h_ptr + m[:, None] * I + c[None, :], mask=(m[:, None] < M) & (c[None, :] < I), other=0.0)
        for ct in range(g, n_col_tiles, split):
            c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
            # prefetch the next tile's h, so that deciding to read a tile's weights waits for no load
            c_next = c + split * BLOCK_C
            hv_next = tl.load(h_ptr + m[:, None] * I + c_next[None, :], mask=(m[:, None] < M) & (c_next[None, :] < I),
                              other=0.0)  # fmt: skip
            # h is zero on every row no token kept: such a tile adds nothing, so its weights are not read (NaN != 0)
            if tl.sum(tl.sum((hv != 0).to(tl.int32), axis=1), axis=0) > 0:
                wd = tl.load(wd_ptr + rows[:, None] * I + c[None, :], mask=(rows[:, None] < H) & (c[None, :] < I),
                             other=0.0)  # (BH, BC)  # fmt: skip
                if MODE == 0:
                    acc += wd.to(tl.float32) * hv  # hv (1, BC)
                elif MODE == 1:
                    wdf = wd.to(tl.float32)
                    for i in tl.static_range(BLOCK_M):
                        hi = tl.sum(tl.where(m[:, None] == i, hv, 0.0), axis=0)  # (BC,) token i's row of hv
                        p = tl.sum(wdf * hi[None, :], axis=1)  # (BH,)
                        acc += tl.where(m[:, None] == i, p[None, :], 0.0)
                elif DOT_FP32:
                    acc = tl.dot(hv, tl.trans(wd.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(hv.to(wd.dtype), tl.trans(wd), acc)
            hv = hv_next
        if MODE == 0:
            res = tl.sum(acc, axis=1)[None, :]  # (1, BH)
        else:
            res = acc
        omask = (m[:, None] < M) & (rows[None, :] < H)
        mh = m[:, None] * H + rows[None, :]  # (BM, BH) offsets in an (M, H) buffer
        if REDUCE == 1:
            tl.atomic_add(part_ptr + mh, res, mask=omask)
        else:
            tl.store(part_ptr + g * M * H + mh, res, mask=omask)
        if REDUCE == 2:
            tl.debug_barrier()  # every thread's partial stored, then one release (acq_rel: the last one acquires all)
            arrived = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel")
            if arrived == split - 1:  # the last: sum in split order (as _sum_splits_kernel: the same bits)
                acc_out = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
                for s in range(split):  # .cg: from L2, where the other programs' partials are
                    acc_out += tl.load(part_ptr + s * M * H + mh, mask=omask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + mh, acc_out.to(out_ptr.dtype.element_ty), mask=omask)
                tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0)  # zeroed for the next call

    # The prefill path's one kernel (`triton_prefill_ffn`): an elementwise pass between cuBLAS GEMMs.

    @triton.jit
    def _rounded(v, like, INTERPRETED: tl.constexpr):
        # fp32 v in like's dtype, rounded to nearest even as the GPU's cast and PyTorch round; the CPU interpreter's
        # cast to bf16 truncates, so there the low 16 bits are rounded away first
        if INTERPRETED and like.dtype == tl.bfloat16:
            b = v.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            v = b.to(tl.float32, bitcast=True)
        return v.to(like.dtype)

    @triton.jit
    def _silu_mul(g, u, INTERPRETED: tl.constexpr):
        # act(g) * u in g's dtype, computed as PyTorch computes it on CUDA: silu(x) = x / (1 + expf(-x)) in fp32
        # (libdevice's expf and IEEE division, which is what nvcc makes of ATen's silu kernel) rounded to g's dtype,
        # then the product of the two rounded operands in fp32, rounded. The CPU interpreter has no libdevice: there
        # exp is numpy's, so fp32 results may differ from PyTorch's in the last bit.
        gf = g.to(tl.float32)
        if INTERPRETED:
            e = tl.exp(-gf)
        else:
            e = libdevice.exp(-gf)
        a = _rounded(tl.div_rn(gf, 1.0 + e), g, INTERPRETED)
        return _rounded(a.to(tl.float32) * u.to(tl.float32), g, INTERPRETED)

    @triton.jit
    def _route_rows_kernel(g_ptr, u_ptr, rc_ptr, s_ptr, h_ptr, M, I, N, top_k, rows_per_program,
                           ACT: tl.constexpr, INTERPRETED: tl.constexpr, KEEP_BITS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
        # prefill path, program (token tile, chunk of rows_per_program rows): h[m, r] = silu(g) * u (ACT) or h = g
        # (already act(g) * u: zeroed in place), and 0 where token m does not keep the cluster of row r
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        j = tl.arange(0, BLOCK_N)  # (BN,)
        s = tl.load(s_ptr + m[:, None] * N + j[None, :], mask=(m[:, None] < M) & (j[None, :] < N), other=float("-inf"))
        # every cluster's rank per token, one competitor at a time so that registers hold (BM, BN), not (BM, BN, BN);
        # the competitor's column is taken from the registers (a load per competitor would serialise N latencies)
        rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for c in range(0, N):
            s_c = tl.sum(tl.where(j[None, :] == c, s, 0.0), axis=1)  # (BM,) s[:, c]
            rank += _beats(s_c[:, None], c, s, j[None, :]).to(tl.int32)
        # a cluster is kept iff fewer than k clusters beat it (`_kept`'s rule; the ranks of 0..N-1 are distinct).
        # KEEP_BITS (N <= 64): each token's kept set as one int64 bit mask, so a row's test is a shift of registers;
        # otherwise each token's k-th cluster, and a row is kept iff that cluster does not beat the row's own, which
        # gathers the row's score from the (M, N) table for every element
        if KEEP_BITS:
            bit = tl.full((BLOCK_N,), 1, tl.int64) << j.to(tl.int64)  # (BN,) 1 << j
            bits = tl.sum(tl.where((rank < top_k) & (j[None, :] < N), bit[None, :], 0), axis=1)  # (BM,) int64
        else:
            kth = (rank == top_k - 1) & (j[None, :] < N)  # (BM, BN) one True per token
            s_k = tl.sum(tl.where(kth, s, 0.0), axis=1)  # (BM,)
            c_k = tl.sum(tl.where(kth, j[None, :], 0), axis=1)  # (BM,)
        r_lo = tl.program_id(1) * rows_per_program
        for r0 in range(r_lo, tl.minimum(r_lo + rows_per_program, I), BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)  # (BR,)
            valid = (m[:, None] < M) & (r[None, :] < I)  # (BM, BR)
            rc = tl.load(rc_ptr + r, mask=r < I, other=0)  # (BR,) cluster of each row
            if KEEP_BITS:
                kept = ((bits[:, None] >> rc[None, :].to(tl.int64)) & 1) != 0  # (BM, BR)
            else:
                s_r = tl.load(s_ptr + m[:, None] * N + rc[None, :], mask=valid, other=0.0)  # (BM, BR) its score
                kept = ~_beats(s_k[:, None], c_k[:, None], s_r, rc[None, :])  # (BM, BR)
            offs = m[:, None] * I + r[None, :]
            g = tl.load(g_ptr + offs, mask=valid, other=0.0)
            if ACT:
                h = _silu_mul(g, tl.load(u_ptr + offs, mask=valid, other=0.0), INTERPRETED)
            else:
                h = g
            tl.store(h_ptr + offs, tl.where(kept, h, 0.0).to(g.dtype), mask=valid)

    @triton.jit
    def _sum_splits_kernel(part_ptr, out_ptr, MH, split, BLOCK: tl.constexpr):
        # out = sum over splits of the fp32 partials, in split order (deterministic), cast to out's dtype
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for g in range(0, split):
            acc += tl.load(part_ptr + g * MH + i, mask=i < MH, other=0.0)
        tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=i < MH)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1). Plain Python: triton.next_power_of_2 and triton.cdiv are constexpr
    functions whose Python-side call costs microseconds, paid per launch in every layer of an eager forward."""
    return 1 << (n - 1).bit_length()


_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: any small number exercises the split
    index = _cuda_index(device)
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# Programmatic dependent launch needs griddepcontrol (NVIDIA compute capability 9.0 and up) and a Triton that has it.
PDL_MIN_CAPABILITY = (9, 0)
_PDL_TRITON = triton is not None and hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


def _pdl(device: torch.device, t: dict) -> bool:
    """Programmatic dependent launch for gate/up and down (t["pdl"]): a kernel is launched while the one before it
    runs and waits for it on the GPU (griddepcontrol) before any read or write. NVIDIA devices of capability >=
    PDL_MIN_CAPABILITY."""
    if not (t.get("pdl") and _PDL_TRITON and device.type == "cuda" and torch.version.hip is None):
        return False
    return _capability(_cuda_index(device)) >= PDL_MIN_CAPABILITY


def _pdl_launch(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


def _dot_fp32(dtype: torch.dtype) -> bool:
    """tl.dot in fp32 ("ieee"): for fp32 inputs, and for bf16 under the CPU interpreter, whose bf16 dot is wrong."""
    return dtype == torch.float32 or (TRITON_INTERPRET and dtype == torch.bfloat16)


def resolved_tiles(mode: str, tiles: dict | None = None) -> dict:
    """What the decode kernels run in `mode`: TRITON_OPTIONS, overridden by the mode's own TRITON_TILES entries (e.g.
    gemv1's ctas_per_sm and pdl), overridden by `tiles`."""
    return {**TRITON_OPTIONS, **TRITON_TILES[mode], **(tiles or {})}


def triton_mode(tokens: int, tiles: dict | None = None) -> str:
    """The multiply mode for this many tokens: "gemv1" for one token, "dot" for up to TRITON_MAX_TOKENS, "prefill"
    (`triton_prefill_ffn`, not a decode kernel) above; `tiles["mode"]` overrides it (also to "gemv", which is never
    the default, and to "prefill" for any token count).

    Chosen by measured speed (results/decode-compiled/decode.json, H200, bf16, Llama-7B FFN alone, split reduction,
    tuned tiles): for 1 token "gemv1" took 49.0 us at k/N 1/2 against dense 83.9 us and mask 109.5 us; for 4 tokens
    "dot" took 86.5 us against "gemv" 358.9 us (dense 85.0 us, mask 117.8 us). 2, 3 and 5-16 tokens were not
    measured: they take "dot", the faster mode at 4. Above 16 the decode kernels' register tiles of all tokens
    (BLOCK_M 16) no longer hold the input: "prefill" (results/prefill-graph/: 0.93-0.95x dense at 512 tokens, above
    mask's 0.85-0.87x; the decode kernels were not run there).
    """
    if tiles and "mode" in tiles:
        return tiles["mode"]
    return "gemv1" if tokens == 1 else "dot" if tokens <= TRITON_MAX_TOKENS else "prefill"


def triton_routed_ffn(x, *, w_gate, w_up, w_down, row_cluster, top_k, centroids=None, offsets=None, tiles=None):
    """Routed SwiGLU FFN without gradients, x (M, H) -> (M, H) in x's dtype: the decode kernels for up to
    TRITON_MAX_TOKENS tokens, `triton_prefill_ffn` for more (or for any count with `tiles["mode"]` "prefill").

    The centroid router is used when `centroids` (N, H) is given, the activation router (which needs `offsets`, the
    (N + 1,) device tensor of cluster bounds) otherwise. `row_cluster` (I,) int32 holds every neuron's cluster.
    For several tokens the decode kernels read the union of their kept clusters once. `tiles` overrides entries of
    TRITON_TILES[mode] and TRITON_OPTIONS (and may set "mode" and "SPLIT"), or of PREFILL_TILES. No host sync, static
    shapes: a CUDA graph can capture it.
    """
    tiles = tiles or {}
    m, hidden = x.shape
    mode = triton_mode(m, tiles)
    if mode == "prefill":
        return triton_prefill_ffn(x, w_gate=w_gate, w_up=w_up, w_down=w_down, row_cluster=row_cluster, top_k=top_k,
                                  centroids=centroids, offsets=offsets, tiles=tiles)  # fmt: skip
    inter = w_gate.shape[0]
    n = centroids.shape[0] if centroids is not None else offsets.numel() - 1
    t = resolved_tiles(mode, tiles)
    block_m = 16 if mode == "dot" else _pow2(m)
    block_n = _pow2(n)
    x = x.contiguous()
    scores = torch.empty(m, n, device=x.device, dtype=torch.float32)  # (M, N)
    h = torch.empty(m, inter, device=x.device, dtype=torch.float32)  # (M, I), every element written below
    route = centroids is not None
    pdl = _pdl(x.device, t)
    if route:
        block_h = min(4096, _pow2(hidden))
        _centroid_scores_kernel[(n, m)](x, centroids, scores, hidden, n, BLOCK_H=block_h, PDL=pdl,
                                        num_warps=t["warps_scores"])  # fmt: skip
    grid_rows = (_cdiv(inter, t["BLOCK_R"]),)
    _gate_up_kernel[grid_rows](
        x, w_gate, w_up, row_cluster, scores, h, m, hidden, inter, n, top_k, ROUTE=route, MODE=_MODES[mode],
        DOT_FP32=_dot_fp32(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=t["BLOCK_R"], BLOCK_K=t["BLOCK_K"],
        PDL=pdl, num_warps=t["warps_gu"], **_pdl_launch(pdl),
    )  # fmt: skip
    if not route:
        _cluster_rms_kernel[(n, m)](h, offsets, scores, inter, n, BLOCK_C=256)
        _mask_rows_kernel[grid_rows](h, row_cluster, scores, m, inter, n, top_k, BLOCK_M=block_m, BLOCK_N=block_n,
                                     BLOCK_R=t["BLOCK_R"])  # fmt: skip
    return _down(h, w_down, x.dtype, mode, t, pdl)


def triton_prefill_ffn(x, *, w_gate, w_up, w_down, row_cluster, top_k, centroids=None, offsets=None, tiles=None):
    """The prefill path: what `RoutedLlamaMLP.forward_mask` computes, in fewer launches. x (M, H) -> (M, H).

    Every cluster's gate, up and down are computed, as in mask: skipping dropped clusters in long inputs would need
    each cluster's list of tokens (a host sync, as in `forward_sparse`, or a grouped-GEMM kernel). What this path
    removes is the mask path's extra launches (router, top-k, keep mask, multiply), each of which costs host time in
    every layer of an eager prefill. Gate and up are cuBLAS GEMMs, the router's fp32 scores are the reference's
    F.linear, one Triton program per (token tile, row chunk) ranks the scores and writes h = silu(g) * u where the
    token keeps the row's cluster and 0 elsewhere (into g's buffer, rounded as the reference rounds it), and down is a
    cuBLAS GEMM over the zeroed h. Centroid router: 6 launches (gate, up, x.float(), scores, routing kernel, down; a
    bf16 model's centroids are cast to fp32 by the caller, `RoutedLlamaRouter.centroids_fp32` caches that cast) against
    LlamaMLP's 5 (gate, up, silu, mul, down). Activation router: h = act(g) * u by PyTorch, per-cluster RMS scores by
    `_cluster_rms_kernel` (summed in another order than the reference's), then the routing kernel zeroes dropped rows
    in place: 7 launches. Arguments as for `triton_routed_ffn`; `tiles` overrides PREFILL_TILES. No host sync: a CUDA
    graph can capture it.
    """
    t = PREFILL_TILES if not tiles else {**PREFILL_TILES, **tiles}
    m, inter = x.shape[0], w_gate.shape[0]
    g = F.linear(x, w_gate)  # (M, I)
    u = F.linear(x, w_up)  # (M, I)
    if centroids is not None:
        # the reference's scores (RoutedLlamaRouter.scores), so that both rank the same values; bf16 under a bf16
        # autocast, where .float() hands the kernel the same values in the fp32 it reads (exact; a no-op otherwise)
        scores = F.linear(x.float(), centroids.float()).float()  # (M, N)
        n, act = centroids.shape[0], True
    else:
        g = F.silu(g, inplace=True).mul_(u)  # (M, I) h = act(g) * u, rounded as the reference rounds it
        n, act = offsets.numel() - 1, False
        scores = torch.empty(m, n, device=x.device, dtype=torch.float32)  # (M, N)
        _cluster_rms_kernel[(n, m)](g, offsets, scores, inter, n, BLOCK_C=256)
    grid = (_cdiv(m, t["BLOCK_M"]), _cdiv(inter, t["ROWS"]))
    _route_rows_kernel[grid](g, u, row_cluster, scores, g, m, inter, n, top_k, t["ROWS"], ACT=act,
                             INTERPRETED=TRITON_INTERPRET, KEEP_BITS=t["keep_bits"] and n <= 64, BLOCK_M=t["BLOCK_M"],
                             BLOCK_N=_pow2(n), BLOCK_R=t["BLOCK_R"], num_warps=t["warps"])  # fmt: skip
    return F.linear(g, w_down)  # (M, H)


_COUNTERS: dict = {}  # device -> the down kernel's int32 arrival counters, zero between launches


def _counters(device: torch.device) -> torch.Tensor | None:
    """The device's int32 arrival counters of the "last" reduction (one per row tile of down), zeroed when made on
    first use; every launch leaves them zeroed again. None if none exist yet and a CUDA graph is being captured: the
    memory would belong to that graph (a capture follows warm-up calls, which make them)."""
    buf = _COUNTERS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[device] = torch.zeros(8192, device=device, dtype=torch.int32)  # H up to 65536 at BLOCK_H 8
    return buf


def _down(h, w_down, dtype, mode, t, pdl):
    """out (M, H) = h (M, I) @ W_down^T over the column tiles where h is nonzero, with fp32 partial sums reduced as
    t["reduce"] says ("last" runs "split", which gives the same bits, where `_counters` has none to give)."""
    m, inter = h.shape
    hidden = w_down.shape[0]
    row_tiles = _cdiv(hidden, t["BLOCK_H"])
    col_tiles = _cdiv(inter, t["BLOCK_C"])
    split = t.get("SPLIT") or _cdiv(t["ctas_per_sm"] * _sm_count(h.device), row_tiles)
    split = max(1, min(split, col_tiles))
    reduce, counters = t["reduce"], None
    if reduce == "last":
        counters = _counters(h.device)
        if counters is None or counters.numel() < row_tiles:  # none to give: "split" (the same bits)
            reduce, counters = "split", None
    block_m = 16 if mode == "dot" else _pow2(m)
    if reduce == "atomic":
        part = out = torch.zeros(m, hidden, device=h.device, dtype=torch.float32)  # (M, H) added to by every split
    else:
        part = torch.empty(split, m, hidden, device=h.device, dtype=torch.float32)  # (SPLIT, M, H)
        out = torch.empty(m, hidden, device=h.device, dtype=dtype)
    _down_kernel[(row_tiles, split)](
        h, w_down, part, out, counters if counters is not None else part, m, hidden, inter, col_tiles, split,
        MODE=_MODES[mode], DOT_FP32=_dot_fp32(dtype), REDUCE=_REDUCE[reduce], BLOCK_M=block_m, BLOCK_H=t["BLOCK_H"],
        BLOCK_C=t["BLOCK_C"], PDL=pdl, num_warps=t["warps_d"], **_pdl_launch(pdl),
    )  # fmt: skip
    if reduce == "atomic":
        return part.to(dtype)
    if reduce == "split":
        _sum_splits_kernel[(_cdiv(m * hidden, 1024),)](part, out, m * hidden, split, BLOCK=1024)
    return out


# `triton_routed_ffn` (default tiles; `mode` "prefill" forces the prefill path, None picks by token count) as a custom
# op, so that torch.compile can hold it in a graph (fake: shapes and dtype). `autocast`: the caller's autocast dtype
# (passed with the prefill path, whose GEMMs autocast casts), which the compiled op's body would otherwise not see;
# the result then has that dtype, as the eager call's does. A checkpoint's copy of this file may be imported more
# than once (one module per checkpoint folder): the first registration serves them all. An older copy registers an op
# without `mode` (whose kernels are wrong above 16 tokens) or without `autocast`: where that one came first, compiled
# calls that need the missing argument run the mask path instead (`_OP_ARGS`).
if triton is not None and not hasattr(torch.ops.routed_llama, "routed_ffn"):

    @torch.library.custom_op("routed_llama::routed_ffn", mutates_args=())
    def _routed_ffn_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                       row_cluster: torch.Tensor, top_k: int, centroids: torch.Tensor | None = None,
                       offsets: torch.Tensor | None = None, mode: str | None = None,
                       autocast: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = triton_routed_ffn(x, w_gate=w_gate, w_up=w_up, w_down=w_down, row_cluster=row_cluster, top_k=top_k,
                                    centroids=centroids, offsets=offsets, tiles=mode and {"mode": mode})  # fmt: skip
        return out.to(autocast or x.dtype)  # the eager call's dtype: autocast's under autocast (a no-op cast)

    @_routed_ffn_op.register_fake
    def _(x, w_gate, w_up, w_down, row_cluster, top_k, centroids=None, offsets=None, mode=None, autocast=None):
        return torch.empty_like(x, dtype=autocast or x.dtype)

_OP_ARGS = set()
if triton is not None:
    _OP_ARGS = {a.name for a in torch.ops.routed_llama.routed_ffn.default._schema.arguments}


# ---------------------------------------------------------------------------------------------------------------
# Greedy decoding over a StaticCache with one CUDA graph per step (RoutedLlamaForCausalLM.fast_generate).
# ---------------------------------------------------------------------------------------------------------------

# transformers renamed the cache argument of forward (`past_key_values` -> `cache`); use whichever this one takes.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}  # CUDA device index -> the warm-up stream of every capture


def capture_cuda_graph(fn, pool=None):
    """(graph, output) of `fn()` captured in a CUDA graph (in memory pool `pool`, default: the graph's own), after two
    warm-up calls on a side stream: allocation and compilation (Triton's, torch.compile's; a second call may recompile)
    must never happen inside a capture. One side stream per device serves every capture of the process: cuBLAS keeps
    a workspace (32 MiB on an H200) for each stream a handle has run on until the process ends, so a fresh stream per
    capture left ~0.3 GiB more in the default pool after each training run (the routed-llama project's
    results/train-speed-one-stream/)."""
    device = torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class GreedyDecodeStep:
    """One greedy decode step (B tokens in, B tokens out) over a StaticCache of `max_cache_len` positions.

    With `cuda_graph` the step is captured once (after two warm-up steps on a side stream, which also compile the
    Triton kernels) and replayed; the cache's write position is a device tensor that the replay advances, so
    nothing is read back to the host. `reset()` empties the cache for the next prompt without re-capturing.
    With `compile` the decode step (not the prefill, whose length varies) runs `torch.compile(model)` (default
    mode: the graph capture is this class's own), which fuses the many small kernels around the matrix products
    (norms, rotary embedding, residual adds); the Triton FFN stays one custom op. Compiling costs tens of seconds
    per model, batch and k, paid in the warm-up.

    With `cuda_graph`, `prefill` also replays a graph for a prompt length it has seen before: an eager prefill of a
    short prompt is bound by the host's kernel launches, and the routed FFN launches more than the stock one. The
    first call of a length runs eagerly (a one-off prompt pays no capture), the second captures (two warm-up
    prefills, then the capture), later ones replay. The last PREFILL_GRAPHS lengths seen are kept; each kept graph
    holds the memory of its prefill's activations until it is dropped (or `clear_fast_generate` drops the step), and
    PREFILL_GRAPHS = 0 keeps none (every prefill eager).
    """

    PREFILL_GRAPHS = 4

    def __init__(self, model, batch: int, max_cache_len: int, cuda_graph: bool, compile: bool = False):
        from transformers import StaticCache

        self.model = model
        self.step_model = torch.compile(model, dynamic=False) if compile else model
        self.key = None  # set by the owner: what this step was built for
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=model.device)  # (B, 1) the step's static input
        self.graph = None
        self.next_tokens = None
        # prompt length -> None (seen once) or (prefill graph, static ids (B, T), logits (B, V)); oldest first
        self.prefills = collections.OrderedDict()
        if cuda_graph:
            self._capture()
        self.reset()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, model=None) -> torch.Tensor:
        """Logits of the last position, (B, V), of input_ids (B, T) appended to the cache, by `model` (default: the
        eager model, as for a prefill). Always without gradients, whatever the caller's grad mode: the Triton kernels
        run only without them (`_triton_ok`), and a step captured with gradients on would replay the mask path for
        good."""
        kwargs = {_CACHE_KWARG: self.cache}
        model = self.model if model is None else model
        return model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the last position, (B, V), of the prompt input_ids (B, T) written into the emptied cache (call
        `reset` first). Eager on a length's first call; from its second on (with `cuda_graph`), a graph's replay. In
        graph mode the result is a buffer that the next prefill of this length overwrites."""
        length = input_ids.shape[1]
        if self.graph is None:
            return self.forward(input_ids)
        if length not in self.prefills:
            self.prefills[length] = None
            while len(self.prefills) > self.PREFILL_GRAPHS:
                self.prefills.popitem(last=False)
            return self.forward(input_ids)
        self.prefills.move_to_end(length)
        if self.prefills[length] is None:
            ids = input_ids.clone()

            def run():
                if not torch.cuda.is_current_stream_capturing():
                    self.cache.reset()  # each warm-up prefills an empty cache (a replay follows the caller's reset)
                return self.forward(ids)

            graph, logits = capture_cuda_graph(run)
            self.prefills[length] = graph, ids, logits
            self.reset()  # the warm-ups filled it
        graph, ids, logits = self.prefills[length]
        ids.copy_(input_ids)
        graph.replay()
        return logits

    def _step(self) -> torch.Tensor:
        return self.forward(self.ids, self.step_model).argmax(-1)  # (B,)

    def _capture(self):
        self.graph, self.next_tokens = capture_cuda_graph(self._step)

    def reset(self):
        self.cache.reset()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next tokens, (B,), after feeding tokens (B,). In graph mode the result is a buffer the next call
        overwrites."""
        self.ids.copy_(tokens[:, None])
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.next_tokens


def _eos_ids(generation_config, eos_token_id):
    eos = generation_config.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _trim_after_eos(new_tokens: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """Cut new_tokens (B, T) after the first step by which every row has produced an EOS (as `generate` stops)."""
    if not eos:
        return new_tokens
    hit = torch.isin(new_tokens, torch.tensor(eos, device=new_tokens.device))  # (B, T)
    done = hit.int().cummax(dim=1).values.bool().all(0)  # (T,) every row finished by this step
    if not bool(done.any()):
        return new_tokens
    return new_tokens[:, : int(done.int().argmax()) + 1]


# ---------------------------------------------------------------------------------------------------------------
# The model: stock Llama with RoutedLlamaMLP in the routed layers.
# ---------------------------------------------------------------------------------------------------------------


class RoutedLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: RoutedLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if layer_idx in config.layers_to_route():
            self.mlp = RoutedLlamaMLP(config, layer_idx)


class RoutedLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = RoutedLlamaConfig
    config: RoutedLlamaConfig
    _no_split_modules = ["RoutedLlamaDecoderLayer"]
    # A checkpoint loaded with fewer routed_layers than it was saved with carries router buffers nobody reads.
    _keys_to_ignore_on_load_unexpected = [r"\.mlp\.router\."]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RoutedLlamaMLP):
            # children are initialised first, so gate_proj already holds its final (random or loaded) rows
            init.copy_(module.router.expert_offsets, torch.tensor(module.offsets, dtype=torch.long))
            init.copy_(module.router.centroids, cluster_means(module.gate_proj.weight, module.offsets))


class RoutedLlamaModel(RoutedLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: RoutedLlamaConfig):
        RoutedLlamaPreTrainedModel.__init__(self, config)
        config.validate_routing()  # again: load-time overrides are applied after the config's own checks
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [RoutedLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def routed_mlps(self) -> dict[int, RoutedLlamaMLP]:
        """Layer index -> routed FFN, for every layer that routes."""
        return {i: layer.mlp for i, layer in enumerate(self.layers) if isinstance(layer.mlp, RoutedLlamaMLP)}

    def set_top_k(self, k: int):
        """Change k in every routed layer at run time (k = N turns routing off: "train routed, deploy dense")."""
        n = self.config.num_experts
        try:
            value = None if isinstance(k, bool) else operator.index(k)  # ints and integer scalars; not "3", 3.0, True
        except TypeError:
            value = None
        if value is None or not 1 <= value <= n:
            raise ValueError(f"num_experts_per_tok (k) must be an integer in [1, num_experts={n}], got {k!r}")
        self.config.num_experts_per_tok = value
        for mlp in self.routed_mlps().values():
            mlp.router.top_k = value


class RoutedLlamaForCausalLM(RoutedLlamaPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: RoutedLlamaConfig):
        RoutedLlamaPreTrainedModel.__init__(self, config)
        self.model = RoutedLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._greedy_step = None  # the last GreedyDecodeStep of fast_generate, reused while its key matches
        self.post_init()

    @torch.no_grad()
    def fast_generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id=None,
                      cuda_graph: bool | None = None, compile: bool = False) -> torch.Tensor:  # fmt: skip
        """Greedy decoding: the tokens `generate(input_ids, do_sample=False, max_new_tokens=...)` returns, faster.

        The prompt is prefilled into a StaticCache; each further token is one decode step, replayed from a CUDA
        graph on CUDA (`cuda_graph=None` means "on CUDA"). With routing_impl "auto" or "sparse", decode steps of up
        to AUTO_TRITON_MAX_TOKENS (resp. TRITON_MAX_TOKENS) sequences run the Triton kernels that read only the kept
        clusters, and a longer prompt's prefill runs the prefill path (`triton_prefill_ffn`). With `compile` the
        decode step is also `torch.compile`d (see `GreedyDecodeStep`): faster steps, tens of seconds of compilation
        on the first call of a shape. The graph and cache are kept for the next call with the same batch size, cache
        length (rounded up to a multiple of 128), k, routing_impl and `compile`; the first call of a shape pays for
        one capture (`clear_fast_generate` frees them). The prefill of a prompt length seen in an earlier such call
        is replayed from a graph too (captured on the length's second call; see `GreedyDecodeStep`).

        Limits: greedy only (sampling and logits processors in `generation_config` are ignored); no padding
        (all rows of input_ids (B, T) are real tokens). Like `generate`, a row that produced an EOS token
        (`eos_token_id`, default `generation_config.eos_token_id`) continues with the pad token, and decoding stops
        once every row has. Returns (B, T + new) token ids. The model should be in eval mode.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        batch, length = input_ids.shape
        use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        step = self._decode_step(batch, -(-(length + max_new_tokens) // 128) * 128, use_graph, compile)
        eos = _eos_ids(self.generation_config, eos_token_id)
        pad = self.generation_config.pad_token_id
        pad = eos[0] if pad is None and eos else pad
        eos_t = torch.tensor(eos, device=self.device, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=self.device)  # (B, new)
        tokens = step.prefill(input_ids).argmax(-1)  # (B,)
        for i in range(max_new_tokens):
            if eos:
                tokens = torch.where(finished, pad, tokens)
                finished = finished | torch.isin(tokens, eos_t)
            out[:, i] = tokens
            if i + 1 == max_new_tokens or (eos and i % 16 == 15 and bool(finished.all())):  # a host sync every 16
                break
            tokens = step(tokens)
        return torch.cat([input_ids, _trim_after_eos(out[:, : i + 1], eos)], dim=1)

    def _decode_step(self, batch: int, max_cache_len: int, cuda_graph: bool, compile: bool) -> GreedyDecodeStep:
        # a captured graph holds k and the implementation as they were at capture: they are part of the key
        routing = tuple((i, m.router.top_k) for i, m in self.model.routed_mlps().items()), self.config.routing_impl
        key = (batch, max_cache_len, self.device, self.dtype, cuda_graph, compile, routing)
        if self._greedy_step is not None and self._greedy_step.key == key:
            self._greedy_step.reset()
        else:
            self.clear_fast_generate()  # free the old graph and cache before allocating new ones
            self._greedy_step = GreedyDecodeStep(self, batch, max_cache_len, cuda_graph, compile)
            self._greedy_step.key = key
        return self._greedy_step

    def clear_fast_generate(self):
        """Drop the CUDA graph and cache that `fast_generate` keeps. Needed after replacing weight tensors (a graph
        reads the tensors it was captured with; in-place updates such as `load_state_dict` are seen)."""
        self._greedy_step = None


class RoutedLlamaForSequenceClassification(RoutedLlamaPreTrainedModel, LlamaForSequenceClassification):
    def __init__(self, config: RoutedLlamaConfig):
        RoutedLlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = RoutedLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


# `save_pretrained` writes `auto_map` and copies this file and the configuration next to the weights.
RoutedLlamaConfig.register_for_auto_class()
RoutedLlamaModel.register_for_auto_class("AutoModel")
RoutedLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
RoutedLlamaForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "GreedyDecodeStep",
    "RoutedLlamaConfig",
    "RoutedLlamaForCausalLM",
    "RoutedLlamaForSequenceClassification",
    "RoutedLlamaMLP",
    "RoutedLlamaModel",
    "RoutedLlamaPreTrainedModel",
    "RoutedLlamaRouter",
    "triton_routed_ffn",
]
