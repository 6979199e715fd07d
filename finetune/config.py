"""Settings of one fine-tuning run: one dataclass, validated once; the CLI is generated from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from routed_llama.errors import UserError

from . import tasks

BF16_AUTOCAST = ("bf16", "bf16-base")  # the (resolved) precisions that train under bf16 autocast


@dataclass
class RunConfig:
    """Settings of one run. Defaults are the reference recipe (LoRA r=32, alpha=64 on q_proj,v_proj; lr 2e-5;
    5 epochs; batch 16, eval batch 32; 10% linear warmup, then linear decay)."""

    task: str = "rte"
    model: str = "stand-in"  # plain arm: a base reference; routed arm: a routed checkpoint folder
    arm: str = "baseline"
    seed: int = 0
    lr: float = 2e-5
    epochs: float = 5.0
    batch_size: int = 16
    eval_batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: list[str] = field(default_factory=lambda: ["score"])
    max_length: int = 256
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # lr selection: hold out this fraction of train as the evaluation set (dev is not touched)
    holdout_fraction: float | None = None
    # bf16-base: a GPU profile of bf16 steps found most device time in elementwise kernels (autocast casting the
    # fp32 frozen weights, an fp32 residual stream); a base stored in bf16 halves that traffic (models.cast_frozen)
    precision: str = field(default="auto", metadata={"help": (
        "auto (bf16 on a GPU that has it, else fp32), bf16 (fp32 weights, bf16 autocast), bf16-base (bf16 "
        "autocast over a frozen base stored in bf16; LoRA and head stay fp32), fp16 (Trainer engine only) or fp32"
    )})  # fmt: skip
    # engine: "fast" = the project's loop (static length buckets; on CUDA each bucket's whole training step is one
    # CUDA graph); "trainer" = transformers.Trainer (the reference, and the multi-GPU path under torchrun/accelerate);
    # "auto" = trainer when launched distributed, else fast
    engine: str = "auto"
    buckets: list[int] = field(default_factory=lambda: [64, 128, 256])  # fast engine: padded lengths (ascending)
    # compile: fast engine, torch.compile each decoder layer inside the captured step (fuses the norms, rotary and
    # SwiGLU elementwise kernels, where a packed step's device time went: results/train-profile); the layers of a
    # class share one compiled forward, so a 30-layer model compiles a few graphs per bucket, not 30
    compile: bool = field(default=False, metadata={"help": (
        "fast engine: torch.compile each decoder layer inside the captured training step (compiles once per worker "
        "and bucket; needs Triton on a GPU or a C++ compiler on the CPU)"
    )})  # fmt: skip
    routing_impl: str | None = None  # routed arm: override the checkpoint's routing_impl
    eval_routing_off: bool = True  # routed arm: also score the final model with k = N
    output_dir: str | None = None  # where the adapter and predictions go; None: nothing saved
    num_workers: int = 0

    def validate(self):
        tasks.get_task(self.task)
        for name in ("lr", "epochs", "batch_size", "eval_batch_size", "lora_r", "max_length"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.holdout_fraction is not None and not 0 < self.holdout_fraction < 1:
            raise UserError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.precision not in ("auto", "bf16", "bf16-base", "fp16", "fp32"):
            raise UserError(f"precision must be auto, bf16, bf16-base, fp16 or fp32, got {self.precision!r}")
        if self.routing_impl not in (None, "mask", "sparse", "auto"):
            raise UserError(f"routing_impl must be mask, sparse or auto, got {self.routing_impl!r}")
        if self.engine not in ("auto", "fast", "trainer"):
            raise UserError(f"engine must be auto, fast or trainer, got {self.engine!r}")
        if self.precision == "fp16" and self.engine != "trainer":
            raise UserError("fp16 needs loss scaling, which only the Trainer engine has: pass --engine trainer, or "
                            "use bf16 or fp32")  # fmt: skip
        if self.compile:
            if self.engine == "trainer":
                raise UserError("--compile compiles the fast engine's step; the Trainer engine does not take it")
            from routed_llama.hardware import compile_problem

            problem = compile_problem()
            if problem:
                raise UserError(f"--compile: {problem}")
        b = list(self.buckets)
        if not b or any(int(x) != x or x <= 0 or x % 8 for x in b) or b != sorted(set(b)):
            raise UserError(f"buckets must be ascending distinct positive multiples of 8, got {self.buckets}")
        if b[-1] < self.max_length:
            raise UserError(f"the largest bucket ({b[-1]}) must be >= max_length ({self.max_length}): nothing is truncated")
        return self


def resolve_precision(precision: str, device: str | None = None) -> str:
    """"auto" -> "bf16" on a CUDA device that has it (`device` None: the default device), else "fp32"; any other
    value ("bf16-base" too) is returned as it is. One rule for training and for evaluating an adapter."""
    if precision != "auto":
        return precision
    import torch

    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
