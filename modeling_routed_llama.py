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
(`config.routing_impl`): "mask" (the reference: compute the whole FFN, zero the dropped clusters), "sparse" (compute
only the kept clusters: tokens grouped by cluster in plain PyTorch, or fused Triton kernels on CUDA for a few tokens,
as in decoding) and "auto" (the fastest measured: today "mask", see `RoutedLlamaMLP.pick_impl`).

This file ships inside every converted checkpoint as remote code: it imports only the standard library, torch,
transformers and its configuration file (Triton, which ships with CUDA builds of torch, is optional).
"""

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
except ImportError:  # CPU-only installs: the PyTorch paths below need no Triton
    triton = None


# The fused kernels are written for decoding (a few tokens; tiles of 16 token rows); above this the grouped path runs.
TRITON_MAX_TOKENS = 16


def cluster_means(weight: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Mean row of each contiguous block of `weight` (I, H) bounded by `offsets` (N + 1): the centroids, (N, H)."""
    return torch.stack([weight[a:b].float().mean(0) for a, b in zip(offsets[:-1], offsets[1:])])


class RoutedLlamaRouter(nn.Module):
    """Scores N clusters per token and keeps the top k. Holds only buffers: nothing here is trained.

    Its forward returns the kept cluster ids, so a forward hook on it sees every routing decision (the analysis
    tools use that). The fused Triton decode path routes inside its kernel and does not call this module.
    """

    def __init__(self, config: RoutedLlamaConfig, layer_idx: int):
        super().__init__()
        self.kind = config.router
        self.num_experts = config.num_experts
        self.top_k = config.top_k_experts
        offsets = config.offsets_for_layer(layer_idx)
        self.register_buffer("centroids", torch.zeros(config.num_experts, config.hidden_size))
        self.register_buffer("expert_offsets", torch.tensor(offsets, dtype=torch.long))

    def scores(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Cluster scores in fp32, (M, N), for tokens x (M, H); the activation router also needs h (M, I)."""
        if self.kind == "centroid":
            # fp32 so that bf16 rounding does not create ties that different implementations break differently
            return F.linear(x.float(), self.centroids.float())  # (M, N)
        sq = torch.zeros(h.shape[0], self.num_experts, device=h.device, dtype=torch.float32)  # (M, N)
        sq.index_add_(1, self.expert_of_neuron(h.shape[-1]), h.float().square())
        return (sq / self.expert_offsets.diff().float()).sqrt()  # RMS: a cluster one neuron larger is not favoured

    def expert_of_neuron(self, intermediate_size: int) -> torch.Tensor:
        """Cluster id of every intermediate neuron, (I,), from the offsets (no host sync)."""
        neurons = torch.arange(intermediate_size, device=self.expert_offsets.device)
        return torch.searchsorted(self.expert_offsets[1:], neurons, right=True)  # (I,)

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
        if impl == "triton":
            out = self.forward_triton(x)
        elif impl == "sparse":
            out = self.forward_sparse(x)
        else:
            out = self.forward_mask(x)
        return out.view(shape)

    def pick_impl(self, x: torch.Tensor) -> str:
        """Which implementation runs for these tokens: "mask", "sparse" (grouped PyTorch) or "triton".

        "auto" is "mask" everywhere: on the H200 (results/decode/) the fused kernels reach about a third of the
        bandwidth cuBLAS reaches on the dense FFN, so skipping half the weights still loses; the grouped path syncs
        with the host once per call, which rules it out for CUDA graphs. "sparse" runs the kernels on CUDA for up to
        TRITON_MAX_TOKENS tokens without gradients, and the grouped path otherwise.
        """
        impl = self.config.routing_impl
        if impl in ("mask", "auto"):
            return "mask"
        return "triton" if self._triton_ok(x) else "sparse"

    def _plain_projections(self) -> bool:
        """No adapter wraps gate/up/down: the weights can be sliced and read directly."""
        return all(type(p) is nn.Linear for p in (self.gate_proj, self.up_proj, self.down_proj))

    def _triton_ok(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.gate_proj.weight.requires_grad)
        return (
            triton is not None
            and x.is_cuda
            and self._plain_projections()
            and not needs_grad  # the kernels have no backward
            and self.config.hidden_act == "silu"
            and self.router.kind == "centroid"
            and x.shape[0] <= TRITON_MAX_TOKENS
        )

    def forward_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: the whole FFN, then zero every neuron of the dropped clusters. x (M, H) -> (M, H)."""
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (M, I)
        keep_ids = self.router(x, h)  # (M, k)
        keep = torch.zeros(x.shape[0], self.router.num_experts, device=x.device, dtype=h.dtype)  # (M, N)
        keep.scatter_(1, keep_ids, 1)
        keep = keep.index_select(1, self.router.expert_of_neuron(self.intermediate_size))  # (M, I)
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

    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """Fused CUDA kernels for a few tokens: route, then read only the kept clusters' weight blocks.

        Four launches, no host sync and static shapes, so a decode step can be captured in a CUDA graph.
        x (M, H) -> (M, H).
        """
        if self.gate_proj.bias is not None:  # the kernels have no bias terms; no Llama checkpoint uses them
            raise NotImplementedError("the Triton path does not support mlp_bias; use routing_impl='mask'")
        return triton_routed_ffn(
            x,
            self.router.centroids,
            self.router.expert_offsets,
            self.gate_proj.weight,
            self.up_proj.weight,
            self.down_proj.weight,
            self.router.top_k,
            self._max_cluster_size,
        )

    @property
    def _max_cluster_size(self) -> int:
        offsets = self.offsets
        return max(b - a for a, b in zip(offsets[:-1], offsets[1:]))


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels for the "sparse" path on CUDA (decode: up to TRITON_MAX_TOKENS tokens).
#
# Surgery made every cluster a contiguous block of gate/up rows and down columns, so a kept cluster is a plain
# strided tile: the kernels index it through `offsets` and never copy weights. A cluster no token kept is never read.
# ---------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _route_kernel(
        x_ptr, c_ptr, keep_ptr, H, N: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        # one program per token: scores = x . centroids in fp32, then keep the k best (ties: lower cluster id)
        m = tl.program_id(0)
        n = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + m * H + kk, mask=kk < H, other=0.0).to(tl.float32)  # (BK,)
            cv = tl.load(
                c_ptr + n[:, None] * H + kk[None, :], mask=(n[:, None] < N) & (kk[None, :] < H), other=0.0
            ).to(tl.float32)  # (BN, BK)
            acc += tl.sum(cv * xv[None, :], axis=1)
        s = tl.where(n < N, acc, float("-inf"))
        s_i = s[:, None]  # (BN, 1) the cluster being ranked
        s_j = s[None, :]  # (1, BN) its competitors
        beats = (s_j > s_i) | ((s_j == s_i) & (n[None, :] < n[:, None]))  # (BN, BN)
        rank = tl.sum(beats.to(tl.int32), axis=1)  # (BN,)
        keep = (rank < TOP_K) & (n < N)
        tl.store(keep_ptr + m * N + n, keep.to(tl.float32), mask=n < N)

    @triton.jit
    def _gate_up_kernel(
        x_ptr, wg_ptr, wu_ptr, off_ptr, keep_ptr, h_ptr, M, H, I,
        N: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # program (e, t): rows [lo + t*BR, lo + (t+1)*BR) of cluster e for every token; writes h = silu(g) * u * keep
        e = tl.program_id(0)
        t = tl.program_id(1)
        lo = tl.load(off_ptr + e)
        hi = tl.load(off_ptr + e + 1)
        m = tl.arange(0, BLOCK_M)
        kept = tl.load(keep_ptr + m * N + e, mask=m < M, other=0.0)  # (BM,)
        r = lo + t * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
        if (tl.max(kept, axis=0) > 0) & (lo + t * BLOCK_R < hi):
            acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_ptr + m[:, None] * H + kk[None, :], mask=(m[:, None] < M) & (kk[None, :] < H), other=0.0)
                wmask = (r[:, None] < hi) & (kk[None, :] < H)
                wg = tl.load(wg_ptr + r[:, None] * H + kk[None, :], mask=wmask, other=0.0)  # (BR, BK)
                wu = tl.load(wu_ptr + r[:, None] * H + kk[None, :], mask=wmask, other=0.0)  # (BR, BK)
                if FP32:
                    acc_g = tl.dot(xt, tl.trans(wg), acc_g, input_precision="ieee")
                    acc_u = tl.dot(xt, tl.trans(wu), acc_u, input_precision="ieee")
                else:
                    acc_g = tl.dot(xt, tl.trans(wg), acc_g)
                    acc_u = tl.dot(xt, tl.trans(wu), acc_u)
            h = acc_g * tl.sigmoid(acc_g) * acc_u * kept[:, None]  # (BM, BR); dropped tokens write zeros
            tl.store(
                h_ptr + m[:, None] * I + r[None, :],
                h.to(h_ptr.dtype.element_ty),
                mask=(m[:, None] < M) & (r[None, :] < hi),
            )

    @triton.jit
    def _down_kernel(
        h_ptr, wd_ptr, off_ptr, keep_ptr, part_ptr, M, H, I,
        N: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # program (ht, g): output rows of tile ht summed over clusters g, g + SPLIT, ...; one fp32 partial per g
        ht = tl.program_id(0)
        g = tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        rows = ht * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,)
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for e in range(g, N, SPLIT):
            kept = tl.load(keep_ptr + m * N + e, mask=m < M, other=0.0)
            if tl.max(kept, axis=0) > 0:  # only kept clusters' h columns were written
                lo = tl.load(off_ptr + e)
                hi = tl.load(off_ptr + e + 1)
                for c0 in range(lo, hi, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    ht_ = tl.load(h_ptr + m[:, None] * I + c[None, :], mask=(m[:, None] < M) & (c[None, :] < hi), other=0.0)
                    wd = tl.load(
                        wd_ptr + rows[:, None] * I + c[None, :], mask=(rows[:, None] < H) & (c[None, :] < hi), other=0.0
                    )  # (BH, BC)
                    if FP32:
                        acc = tl.dot(ht_, tl.trans(wd), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(ht_, tl.trans(wd), acc)
        tl.store(part_ptr + g * M * H + m[:, None] * H + rows[None, :], acc, mask=(m[:, None] < M) & (rows[None, :] < H))

    @triton.jit
    def _reduce_kernel(part_ptr, out_ptr, MH, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for g in range(SPLIT):
            acc += tl.load(part_ptr + g * MH + i, mask=i < MH, other=0.0)
        tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=i < MH)


# Tile sizes: the fastest of the 12 that `benchmarks/decode.py --tune` tried on the H200 at the Llama-7B shape (bf16).
TRITON_TILES = {"BLOCK_R": 32, "BLOCK_K": 256, "BLOCK_H": 64, "BLOCK_C": 64, "SPLIT": 8, "warps_gu": 4, "warps_d": 4}


def triton_routed_ffn(x, centroids, offsets, w_gate, w_up, w_down, top_k, max_cluster_size, tiles=None):
    """Routed SwiGLU FFN for a few tokens with the Triton kernels. x (M, H) -> (M, H) in x's dtype.

    `offsets` (N + 1,) is a device tensor, `max_cluster_size` a Python int (it sizes the grid, so it must not be
    read from the device). Static shapes throughout: a CUDA graph can capture it.
    """
    tiles = TRITON_TILES if tiles is None else tiles
    m, hidden = x.shape
    inter = w_gate.shape[0]
    n = centroids.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    fp32 = x.dtype == torch.float32
    x = x.contiguous()
    keep = torch.empty(m, n, device=x.device, dtype=torch.float32)  # (M, N) 1.0 where kept
    _route_kernel[(m,)](x, centroids, keep, hidden, N=n, TOP_K=top_k, BLOCK_N=triton.next_power_of_2(n), BLOCK_K=128)
    h = torch.empty(m, inter, device=x.device, dtype=x.dtype)  # (M, I) only kept clusters' columns are written
    grid_gu = (n, triton.cdiv(max_cluster_size, tiles["BLOCK_R"]))
    _gate_up_kernel[grid_gu](
        x, w_gate, w_up, offsets, keep, h, m, hidden, inter, N=n, FP32=fp32, BLOCK_M=block_m,
        BLOCK_R=tiles["BLOCK_R"], BLOCK_K=tiles["BLOCK_K"], num_warps=tiles["warps_gu"],
    )  # fmt: skip
    split = min(tiles["SPLIT"], n)
    part = torch.empty(split, m, hidden, device=x.device, dtype=torch.float32)  # (SPLIT, M, H)
    grid_d = (triton.cdiv(hidden, tiles["BLOCK_H"]), split)
    _down_kernel[grid_d](
        h, w_down, offsets, keep, part, m, hidden, inter, N=n, SPLIT=split, FP32=fp32, BLOCK_M=block_m,
        BLOCK_H=tiles["BLOCK_H"], BLOCK_C=tiles["BLOCK_C"], num_warps=tiles["warps_d"],
    )  # fmt: skip
    out = torch.empty(m, hidden, device=x.device, dtype=x.dtype)
    _reduce_kernel[(triton.cdiv(m * hidden, 1024),)](part, out, m * hidden, SPLIT=split, BLOCK=1024)
    return out


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
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, num_experts={n}], got {k}")
        self.config.num_experts_per_tok = k
        for mlp in self.routed_mlps().values():
            mlp.router.top_k = k


class RoutedLlamaForCausalLM(RoutedLlamaPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: RoutedLlamaConfig):
        RoutedLlamaPreTrainedModel.__init__(self, config)
        self.model = RoutedLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


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
    "RoutedLlamaConfig",
    "RoutedLlamaForCausalLM",
    "RoutedLlamaForSequenceClassification",
    "RoutedLlamaMLP",
    "RoutedLlamaModel",
    "RoutedLlamaPreTrainedModel",
    "RoutedLlamaRouter",
]
