"""Several LoRA runs of one model trained as one: K adapters over one frozen base, in one forward of K batches.

Why: a 5-epoch RTE run of the 135M stand-in is ~780 steps of 16 short sequences. Even as one CUDA graph per step,
such a step leaves an H200 mostly idle (each of its ~thousand kernels is too small to fill the GPU), so runs one after
another, or side by side on CUDA streams (measured: 1.4x), waste it. The seeds of one arm share the frozen base and
differ only in their adapters, head, and data order: stacking their K batches into one batch of K*B rows makes every
base kernel K times larger at little extra cost, and each run's adapter touches only its own rows.

Each run's math is its own: rows [j*B, (j+1)*B) of every packed batch are run j's batch (padded to the longest
bucket among the K; right padding does not change a real token's result), go through adapter j and head j, and
feed run j's loss alone; gradients of run j's adapter come from that loss alone (the base is frozen); clipping is
per run; AdamW is elementwise. Only floating-point rounding differs from a run alone (GEMMs of another size).

The modules keep PEFT's parameter names (`lora_A`, `lora_B`, `score`), stacked on a leading run dimension K;
`unpack` writes the trained values back into each run's own PEFT model, which saves and evaluates as before.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PackedLoRALinear(nn.Module):
    """A frozen linear layer with K LoRA adapters: rows [j*B, (j+1)*B) of the input go through adapter j."""

    def __init__(self, base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 dropout: nn.Module):  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(lora_A)  # (K, r, in)
        self.lora_B = nn.Parameter(lora_B)  # (K, out, r)
        self.scaling = scaling
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (K*B, T, out)
        k = self.lora_A.shape[0]
        h = self.dropout(x).reshape(k, -1, x.shape[-1])  # (K, B*T, in)
        h = torch.bmm(torch.bmm(h, self.lora_A.transpose(1, 2)), self.lora_B.transpose(1, 2))  # (K, B*T, out)
        return y + (h * self.scaling).reshape(y.shape).to(y.dtype)


class PackedLinear(nn.Module):
    """K trainable linear layers (the runs' classification heads): rows [j*B, (j+1)*B) go through layer j."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (K, out, in)
        self.bias = None if bias is None else nn.Parameter(bias)  # (K, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        h = torch.bmm(x.reshape(k, -1, x.shape[-1]), self.weight.transpose(1, 2))  # (K, B*T, out)
        if self.bias is not None:
            h = h + self.bias[:, None, :]
        return h.reshape(*x.shape[:-1], -1)  # (K*B, T, out)


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (root.get_submodule(path) if path else root), child


class Pack:
    """The runs' PEFT models (same base weights, same LoRA and head settings) packed into the first one's base.

    `model` is the packed model (the first run's base model with packed modules swapped in); `unpack()` copies the
    trained values into every run's own PEFT modules and puts the first run's modules back."""

    def __init__(self, peft_models: list):
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        self.k = len(peft_models)
        bases = [m.get_base_model() for m in peft_models]
        self.model = bases[0]
        self.swapped: list[tuple[str, nn.Module, nn.Module]] = []  # (name, original of run 0, packed)
        for name, mod in list(self.model.named_modules()):
            if isinstance(mod, LoraLayer):
                mods = [b.get_submodule(name) for b in bases]
                (adapter,) = mod.active_adapters
                packed = PackedLoRALinear(
                    mod.base_layer,
                    torch.stack([m.lora_A[adapter].weight.detach() for m in mods]).clone(),
                    torch.stack([m.lora_B[adapter].weight.detach() for m in mods]).clone(),
                    float(mod.scaling[adapter]), mod.lora_dropout[adapter],
                )  # fmt: skip
            elif isinstance(mod, ModulesToSaveWrapper):
                mods = [b.get_submodule(name).modules_to_save[mod.active_adapter] for b in bases]
                if not all(isinstance(m, nn.Linear) for m in mods):
                    raise ValueError(f"packing trains linear heads only; {name} is {type(mods[0]).__name__}")
                bias = None if mods[0].bias is None else torch.stack([m.bias.detach() for m in mods]).clone()
                packed = PackedLinear(torch.stack([m.weight.detach() for m in mods]).clone(), bias)
            else:
                continue
            self.swapped.append((name, mod, packed))
        for name, _, packed in self.swapped:
            parent, child = _parent(self.model, name)
            setattr(parent, child, packed)
        self.bases = bases
        packed_params = {id(p) for _, _, packed in self.swapped for p in packed.parameters()}
        extra = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in packed_params]
        if extra:
            self.unpack()  # leave the first run's model as it was
            raise ValueError(f"packing cannot train {extra[:3]}: only LoRA adapters and linear heads are packed")

    @torch.no_grad()
    def unpack(self):
        """Copy run j's trained values into run j's PEFT modules; restore the first run's model."""
        from peft.tuners.lora import LoraLayer

        for name, original, packed in self.swapped:
            for j, base in enumerate(self.bases):
                mod = original if j == 0 else base.get_submodule(name)
                if isinstance(original, LoraLayer):
                    (adapter,) = mod.active_adapters
                    mod.lora_A[adapter].weight.copy_(packed.lora_A[j])
                    mod.lora_B[adapter].weight.copy_(packed.lora_B[j])
                else:
                    head = mod.modules_to_save[mod.active_adapter]
                    head.weight.copy_(packed.weight[j])
                    if packed.bias is not None:
                        head.bias.copy_(packed.bias[j])
            parent, child = _parent(self.model, name)
            setattr(parent, child, original)
