"""Recording routing decisions: the inputs (GLUE items), the model, and forward hooks on every router.

A forward hook on every module whose class name is `RoutedLlamaRouter` (the router returns the kept ids (B*T, k) of
one layer) collects the kept ids; padding tokens are dropped with the attention mask. The hooks return nothing, so
the model's outputs are untouched; `config.routing_impl` is set to "mask" while recording (the fused Triton decode
path routes inside its kernel and never calls the router module) and restored afterwards.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from routed_llama.errors import UserError

from .statistics import example_counts

ROUTER_CLASS = "RoutedLlamaRouter"
_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AnalysisError(UserError):
    """Bad input to the analysis; the command line prints it as one line and exits with status 2."""


def find_routers(model) -> dict[int, object]:
    """Layer index -> router module, for every module whose class name is RoutedLlamaRouter."""
    routers = {}
    for name, module in model.named_modules():
        if type(module).__name__ != ROUTER_CLASS:
            continue
        m = _LAYER_IN_NAME.search(name)
        if m is None:
            raise AnalysisError(f"cannot tell the layer of router {name!r}")
        routers[int(m.group(1))] = module
    return dict(sorted(routers.items()))


class RoutingRecorder:
    """Context manager: while active, every router's kept ids for non-padding tokens are appended per layer.

    Call `set_attention_mask(mask)` (B, T) before each forward; the router sees the flattened B*T tokens, and the
    rows where the mask is 0 are dropped. Without a mask every row is kept. Hooks are removed and the models'
    `routing_impl` restored on exit, also after an exception.
    """

    def __init__(self, model):
        self.model = model
        self.routers = find_routers(model)
        if not self.routers:
            raise AnalysisError(f"the model has no {ROUTER_CLASS} module: it is not a routed model")
        self.selections: dict[int, list[np.ndarray]] = {i: [] for i in self.routers}
        self._keep = None
        self._calls: dict[int, int] = {i: 0 for i in self.routers}
        self._handles = []
        self._configs = []

    def __enter__(self):
        seen = set()
        for module in self.model.modules():  # every RoutedLlamaMLP's config (they share one, normally)
            cfg = getattr(module, "config", None)
            if cfg is not None and hasattr(cfg, "routing_impl") and id(cfg) not in seen:
                seen.add(id(cfg))
                self._configs.append((cfg, cfg.routing_impl))
                cfg.routing_impl = "mask"  # the Triton path does not call the router module
        for layer, router in self.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for cfg, impl in self._configs:
            cfg.routing_impl = impl
        self._configs.clear()
        return False

    def set_attention_mask(self, attention_mask):
        self._keep = None if attention_mask is None else attention_mask.detach().reshape(-1).bool().cpu()
        self._calls = {i: 0 for i in self.routers}

    def check_batch(self):
        """Every routed layer must have routed exactly once since `set_attention_mask`."""
        bad = {i: c for i, c in self._calls.items() if c != 1}
        if bad:
            raise RuntimeError(f"routers were called {bad} times (layer: calls) in one forward; expected once each")

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            ids = output.detach().to("cpu", copy=True)  # (B*T, k)
            if self._keep is not None:
                if ids.shape[0] != self._keep.numel():
                    raise RuntimeError(
                        f"layer {layer}: the router saw {ids.shape[0]} tokens, the attention mask has "
                        f"{self._keep.numel()}"
                    )
                ids = ids[self._keep]
            self.selections[layer].append(ids.numpy().astype(np.int16 if module.num_experts < 32768 else np.int64))
            self._calls[layer] += 1
            return None  # never replace the output

        return hook

    def result(self) -> dict[int, np.ndarray]:
        return {i: (np.concatenate(v) if v else np.zeros((0, 0), dtype=np.int64)) for i, v in self.selections.items()}


@dataclass
class Item:
    """One model input: its text, where the GLUE texts lie in it, and what it is."""

    text: str
    task: str
    label: float | int
    idx: int
    text_spans: list[tuple[int, int]] | None = None


@dataclass(frozen=True)
class Layout:
    """What a recording covers: the routed layers, N clusters per layer, k kept per token."""

    layers: list[int]
    num_experts: int
    top_k: int


@dataclass
class Recording:
    """Everything recorded on one model: selections per layer over the same token order, and per-token metadata."""

    selections: dict[int, np.ndarray]  # layer -> (M, k)
    token_example: np.ndarray  # (M,) index into the items
    token_is_text: np.ndarray | None  # (M,) True where the token overlaps a GLUE text (None: tokenizer not fast)
    n_truncated: int
    seconds: float
    layout: Layout | None = None

    def stacked_counts(self, n_examples: int, num_experts: int, token_mask=None) -> np.ndarray:
        """(E, L, N) per-example selection counts over the routed layers, optionally over a subset of tokens."""
        te = self.token_example if token_mask is None else self.token_example[token_mask]
        out = []
        for layer in sorted(self.selections):
            sel = self.selections[layer] if token_mask is None else self.selections[layer][token_mask]
            out.append(example_counts(sel, te, n_examples, num_experts))
        return np.stack(out, axis=1)


def _text_flags(offsets, spans) -> np.ndarray:
    """(T,) True where a token's character span [s, e) overlaps one of the text spans."""
    out = np.zeros(len(offsets), dtype=bool)
    for t, (s, e) in enumerate(offsets):
        if e > s:
            out[t] = any(s < b and e > a for a, b in spans)
    return out


@dataclass
class _Batches:
    """Runs batches of items through the model and keeps, per non-padding token, its example and text flag."""

    model: object
    tokenizer: object
    items: list[Item]
    max_length: int
    device: object
    want_offsets: bool
    token_example: list[np.ndarray] = field(default_factory=list)
    token_is_text: list[np.ndarray] = field(default_factory=list)
    n_truncated: int = 0

    def run(self, batch: list[int], rec: RoutingRecorder):
        texts = [self.items[i].text for i in batch]
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_offsets_mapping=self.want_offsets,
        )
        full = self.tokenizer(texts, truncation=False)["input_ids"]
        self.n_truncated += sum(len(f) > self.max_length for f in full)
        offsets = enc.pop("offset_mapping", None)
        mask = enc["attention_mask"]  # (B, T)
        rec.set_attention_mask(mask)
        self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask.to(self.device))
        rec.check_batch()
        for b, i in enumerate(batch):
            n = int(mask[b].sum())
            if not bool(mask[b, :n].all()):
                raise AnalysisError("the tokenizer pads on the left; set padding_side='right'")
            self.token_example.append(np.full(n, i, dtype=np.int64))
            if self.want_offsets:
                self.token_is_text.append(_text_flags(offsets[b, :n].tolist(), self.items[i].text_spans))


def record_routing(
    model, tokenizer, items: list[Item], *, batch_size: int = 16, max_length: int = 512, device=None,
    progress: bool = False,
) -> Recording:  # fmt: skip
    """Run every item through `model` (inference mode) and record the routing of its non-padding tokens."""
    import torch

    t0 = time.perf_counter()
    device = device if device is not None else next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i].text))  # similar lengths together: less padding
    want_offsets = bool(getattr(tokenizer, "is_fast", False)) and all(it.text_spans is not None for it in items)
    runner = _Batches(model, tokenizer, items, max_length, device, want_offsets)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="record", unit="batch", file=sys.stderr)
    was_training = model.training
    model.eval()
    try:
        with RoutingRecorder(model) as rec, torch.inference_mode():
            for batch in batches:
                runner.run(batch, rec)
            selections = rec.result()
    finally:
        model.train(was_training)
    first = next(iter(rec.routers.values()))
    return Recording(
        selections={i: s.astype(np.int64) for i, s in selections.items()},
        token_example=np.concatenate(runner.token_example) if runner.token_example else np.zeros(0, dtype=np.int64),
        token_is_text=np.concatenate(runner.token_is_text) if want_offsets and runner.token_is_text else None,
        n_truncated=runner.n_truncated,
        seconds=time.perf_counter() - t0,
        layout=Layout(sorted(rec.routers), int(first.num_experts), int(first.top_k)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Inputs and models
# ---------------------------------------------------------------------------------------------------------------


def text_spans(task, example) -> list[tuple[int, int]] | None:
    """Character spans of the GLUE texts in `format_example(task, example)`, or None if its layout is not the one
    expected ("Name: text" lines joined by newlines)."""
    from ..tasks import format_example

    spans, pos, parts = [], 0, []
    for name, text in zip(task.field_names, example.texts):
        prefix = f"{name}: "
        spans.append((pos + len(prefix), pos + len(prefix) + len(text)))
        parts.append(prefix + text)
        pos += len(prefix) + len(text) + 1
    return spans if "\n".join(parts) == format_example(task, example) else None


def load_items(task_names: list[str], data_dir, split: str, max_examples: int, seed: int) -> list[Item]:
    """The inputs, `max_examples` per task (seeded subset), as formatted by `finetune.tasks.format_example`."""
    from ..tasks import format_example, get_task, load_split

    items = []
    for name in task_names:
        task = get_task(name)
        rows = load_split(task, split, data_dir, max_samples=max_examples, seed=seed)
        for ex in rows:
            items.append(Item(format_example(task, ex), task.name, ex.label, ex.idx, text_spans(task, ex)))
    return items


def check_checkpoint(ref: str) -> dict:
    """The config of a routed checkpoint folder; `AnalysisError` for anything else (reads only config.json)."""
    from ..models import is_routed_checkpoint

    path = Path(ref).expanduser()
    if not path.is_dir():
        if path.exists():
            raise AnalysisError(f"{ref} is a file, not a routed checkpoint folder")
        hint = " (convert it first: python convert.py stand-in OUT)" if ref == "stand-in" else ""
        raise AnalysisError(f"no routed checkpoint folder {ref}{hint}")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise AnalysisError(f"{ref} has no config.json: not a model checkpoint")
    if not is_routed_checkpoint(str(path)):
        try:
            kind = json.loads(cfg_path.read_text()).get("model_type")
        except json.JSONDecodeError:
            raise AnalysisError(f"{cfg_path} is not valid JSON") from None
        raise AnalysisError(
            f"{ref} is a {kind!r} checkpoint, not a routed one (model_type 'routed_llama'); convert it first with "
            f"convert.py"
        )
    cfg = json.loads(cfg_path.read_text())
    if not (path / "modeling_routed_llama.py").is_file():
        raise AnalysisError(f"{ref} lacks modeling_routed_llama.py (the remote code of a routed checkpoint)")
    return cfg


def routed_layers_of(cfg: dict) -> list[int]:
    """The routed layer indices a checkpoint config names (every layer when it names none)."""
    layers = cfg.get("routed_layers")
    return list(range(cfg["num_hidden_layers"])) if layers is None else sorted(int(i) for i in layers)


def load_model(checkpoint: str | None, adapter: str | None, top_k: int | None):
    """(model, tokenizer, adapter info or None): the routed classifier, or the adapter on its base, eval, CPU.

    Loaded with a sequence-classification head, as the fine-tuning harness loads it: only the routers matter here,
    and the small `score` head is cheaper than a vocabulary-sized `lm_head`."""
    from .. import adapters, models

    if adapter is not None:
        return adapters.load_finetuned(adapter, base=checkpoint, top_k=top_k)
    tok = models.load_tokenizer(checkpoint)
    return models.load_classifier(checkpoint, num_labels=2, tokenizer=tok, top_k=top_k).eval(), tok, None
