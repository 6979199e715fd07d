"""The PNG figures of a routing analysis (matplotlib, Agg backend), drawn from `report.describe`'s result."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .record import Layout
from .statistics import PermutationResult
from .summary import format_p

DPI = 130


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)


def _cluster_ticks(n: int) -> tuple[range, list[str]]:
    """Every cluster id up to 32 clusters, else about 16 evenly spaced ones."""
    step = 1 if n <= 32 else max(1, n // 16)
    return range(0, n, step), [str(e) for e in range(0, n, step)]


def _heat(ax, data, layers, title, cbar_label, *, center=None, cmap="viridis", vmax=None):
    """A layers x clusters heatmap; with `center`, a diverging colour scale symmetric around it."""
    from matplotlib.colors import TwoSlopeNorm

    data = np.asarray(data, dtype=np.float64)
    if center is not None:
        span = vmax if vmax is not None else max(np.nanmax(np.abs(data - center)), 1e-12)
        norm = TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
        im = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    else:
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest", vmax=vmax)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_xticks(*_cluster_ticks(data.shape[1]), fontsize=7)
    ax.set_xlabel("cluster id (ids are per layer)")
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(im, ax=ax, label=cbar_label, fraction=0.046, pad=0.02)
    return im


def plot_load(result: dict, layout: Layout, path: Path, title_extra: str = ""):
    """Load per cluster and layer, centred on the uniform load 1/N."""
    plt = _plt()
    n, layers = layout.num_experts, [int(i) for i in result["layers"]]
    load = np.array([result["layers"][str(i)]["load"] for i in layers]) * 100
    fig, ax = plt.subplots(figsize=(max(8, n * 0.3), 1.2 + 0.45 * len(layers)))
    title = f"Load per cluster{title_extra} (uniform = {100 / n:.2f}%; red = busier)"
    _heat(ax, load, layers, title, "share of token-selections (%)", center=100 / n, cmap="RdBu_r")
    _save(fig, path)


def plot_layer_stats(result: dict, layout: Layout, path: Path):
    """Normalised entropy and the busiest cluster's token share per layer, with their even-load and extreme lines."""
    plt = _plt()
    n, k = layout.num_experts, layout.top_k
    layers = [int(i) for i in result["layers"]]
    ent = [result["layers"][str(i)]["normalised_entropy"] for i in layers]
    busy = [result["layers"][str(i)]["busiest_share"] for i in layers]
    floor = math.log(k) / math.log(n)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ax = axes[0]
    ax.plot(layers, ent, "o-", label="observed")
    ax.axhline(1.0, color="grey", ls=":", label="even load (1)")
    ax.axhline(floor, color="red", ls="--", label=f"floor log k/log N = {floor:.2f}")
    ax.set_xlabel("routed layer")
    ax.set_ylabel("entropy of load / log N")
    ax.set_title("Normalised routing entropy per layer", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(layers, busy, "o-", color="C1", label="observed")
    ax.axhline(k / n, color="grey", ls=":", label=f"even load (k/N = {k / n:.2f})")
    ax.axhline(1.0, color="red", ls="--", label="every token (1)")
    ax.set_xlabel("routed layer")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Share of tokens that keep the busiest cluster", fontsize=10)
    ax.legend(fontsize=7)
    for a in axes:
        a.set_xticks(layers)
    _save(fig, path)


def plot_coselection(cos: dict, layer: int, n: int, path: Path):
    """One layer: the fraction of tokens that keep both clusters, and the correlation of their keep-indicators."""
    plt = _plt()
    c = np.array(cos["normalised"]) * 100
    corr = np.array(cos["correlation"], dtype=np.float64)  # None (never / always kept) -> NaN
    np.fill_diagonal(corr, np.nan)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    im = axes[0].imshow(c, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=axes[0], label="% of tokens that keep both (diagonal: keep i)", fraction=0.046, pad=0.02)
    axes[0].set_title(f"Layer {layer}: co-selection, % of {cos['tokens']} tokens", fontsize=10)
    span = np.nanmax(np.abs(corr)) if np.isfinite(corr).any() else 1.0
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")  # undefined: a cluster kept by every token
    im = axes[1].imshow(corr, cmap=cmap, vmin=-span, vmax=span, interpolation="nearest")
    fig.colorbar(im, ax=axes[1], label="correlation (phi) of the keep-indicators", fraction=0.046, pad=0.02)
    axes[1].set_title(
        f"Layer {layer}: kept together (red) / apart (blue); mean off-diagonal "
        f"{cos['mean_correlation_off_diagonal']:+.3f}\n(grey: the diagonal, or a cluster kept by every token)",
        fontsize=10,
    )
    ticks, labels = _cluster_ticks(n)
    for ax in axes:
        ax.set_xticks(ticks, labels, fontsize=6)
        ax.set_yticks(ticks, labels, fontsize=6)
        ax.set_xlabel("cluster j")
        ax.set_ylabel("cluster i")
    _save(fig, path)


def _panels(panels: list[tuple[str, np.ndarray]], layout: Layout, res: PermutationResult, title: str, path: Path):
    """One heatmap per (title, layers x clusters data) on a shared symmetric scale, titled with the test."""
    plt = _plt()
    span = max(np.nanmax(np.abs(p[1])) for p in panels)
    n, rows = layout.num_experts, len(panels)
    fig, axes = plt.subplots(rows, 1, figsize=(max(8, n * 0.3), 0.9 + (0.4 * len(layout.layers) + 0.8) * rows))
    for ax, (name, d) in zip(np.atleast_1d(axes), panels):
        _heat(ax, d, layout.layers, name, "percentage points", center=0.0, cmap="PuOr_r", vmax=span)
    null = res.null_mean if res.null_mean is None else round(res.null_mean, 3)
    fig.suptitle(
        f"{title}: {res.statistic} = {res.observed:.3f} (null mean {null}), permutation p = {format_p(res.p_value)}",
        fontsize=11,
    )
    _save(fig, path)


def plot_task_specialisation(by_task: dict, layout: Layout, path: Path, scope: str):
    """Per task: its token share minus the (unweighted) mean over tasks, percentage points."""
    res = by_task["_result"]
    loads = res.group_loads[0]  # (G, L, N)
    pooled_share = np.nanmean(loads, axis=0) * layout.top_k
    panels = [
        (f"{name}: token share minus the mean over tasks", (loads[g] * layout.top_k - pooled_share) * 100)
        for g, name in enumerate(by_task["groups"])
    ]
    _panels(panels, layout, res, f"Cluster usage by task ({scope} tokens)", path)


def plot_label_specialisation(by_label: dict, layout: Layout, path: Path, scope: str) -> bool:
    """Per task: the token share of one label minus the other (or the range over > 2 labels); False if no task has
    two labels present (nothing drawn)."""
    res, values, k = by_label["_result"], by_label["label_values"], layout.top_k
    panels = []
    for s, name in enumerate(by_label["tasks"]):
        loads = res.group_loads[s]  # (G, L, N)
        present = [g for g in range(loads.shape[0]) if np.isfinite(loads[g]).all()]
        names = by_label["label_names"].get(name, [])

        def label(g, names=names):
            return names[values[g]] if values[g] < len(names) else f"label {values[g]}"

        if len(present) == 2:
            a, b = present
            panels.append(
                (f"{name}: token share of {label(b)} minus {label(a)} examples", (loads[b] - loads[a]) * k * 100)
            )
        elif len(present) > 2:
            panels.append((f"{name}: range of token share across labels", res.effect[s] * k * 100))
    if not panels:
        return False
    _panels(panels, layout, res, f"Cluster usage by label within each task ({scope} tokens)", path)
    return True


def plot_change(change: dict, layout: Layout, path: Path):
    """Fine-tuned minus converted token share per cluster and layer."""
    plt = _plt()
    n, layers = layout.num_experts, layout.layers
    d = np.array(change["delta_load"]) * layout.top_k * 100
    fig, ax = plt.subplots(figsize=(max(8, n * 0.3), 1.4 + 0.45 * len(layers)))
    title = (
        f"Fine-tuned minus converted: change of token share (green = gained); total TV "
        f"{change['tv_total']:.4f}, paired permutation p = {format_p(change['p_value'])}"
    )
    _heat(ax, d, layers, title, "percentage points", center=0.0, cmap="PiYG")
    _save(fig, path)


def write_figures(result: dict, layout: Layout, out: Path, fine_tuned: bool) -> dict[str, str]:
    """Every figure into `out`; returns figure key -> file name (the keys `summary.summary_markdown` looks up)."""
    figures = {"load": "load.png", "layer_stats": "layer_stats.png"}
    plot_load(result, layout, out / figures["load"], " (fine-tuned)" if fine_tuned else "")
    plot_layer_stats(result, layout, out / figures["layer_stats"])
    for i, cos in result["coselection"].items():
        figures[f"coselection_{i}"] = f"coselection_layer{i}.png"
        plot_coselection(cos, int(i), layout.num_experts, out / figures[f"coselection_{i}"])
    for scope, spec in result["specialisation"].items():
        if "by_task" in spec:
            figures[f"task_{scope}"] = f"specialisation_task_{scope}.png"
            plot_task_specialisation(spec["by_task"], layout, out / figures[f"task_{scope}"], scope)
        lab = spec.get("by_label")
        if lab and "_result" in lab:
            name = f"specialisation_label_{scope}.png"
            if plot_label_specialisation(lab, layout, out / name, scope):
                figures[f"label_{scope}"] = name
    if "change" in result:
        figures["change"] = "load_change.png"
        plot_change(result["change"], layout, out / figures["change"])
    return figures
