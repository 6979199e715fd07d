"""summary.md: the routing.json record as tables, with the figures inline."""

from __future__ import annotations

import math
from pathlib import Path


def format_number(x, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def format_p(p) -> str:
    """A p-value: 3 significant digits below 0.01, else 3 decimals; "n/a" when there is none."""
    return "n/a" if p is None else (f"{p:.3g}" if p < 0.01 else f"{p:.3f}")


def _header(r: dict) -> list[str]:
    n, k = r["checkpoint"]["num_experts"], r["checkpoint"]["top_k"]
    hw = r["hardware"]
    tasks = ", ".join(f"{t} ({v['examples']} ex., {v['tokens']} tokens)" for t, v in r["tasks"].items())
    return [
        f"# Routing analysis: {Path(r['checkpoint']['path']).name}" + (" + adapter" if r["adapter"] else ""),
        "",
        "| | |",
        "|---|---|",
        f"| checkpoint | `{r['checkpoint']['path']}` (base {r['checkpoint'].get('base_model')}) |",
        f"| adapter | {('`' + r['adapter']['path'] + '`') if r['adapter'] else 'none'} |",
        f"| N clusters, k kept | {n}, {k} |",
        f"| routed layers | {', '.join(map(str, r['checkpoint']['routed_layers']))} |",
        f"| tasks ({r['split']}) | {tasks} |",
        f"| examples / tokens | {r['n_examples']} / {r['n_tokens']} (non-padding; {r['n_truncated']} truncated at "
        f"{r['max_length']}) |",
        f"| permutations, seed | {r['n_permutations']}, {r['seed']} |",
        f"| date | {r['date']} |",
        f"| hardware | {hw['cpu']}, {hw['cpu_cores']} cores, {hw['device']}; torch {hw['torch']}, "
        f"{hw['torch_threads']} threads |",
        f"| time | {r['seconds']['total']:.0f} s (recording {r['seconds']['record']:.0f} s) |",
        "",
        "Command:",
        "",
        "```",
        r["command"],
        "```",
        "",
    ]


def _load_section(r: dict, figures: dict[str, str]) -> list[str]:
    n, k = r["checkpoint"]["num_experts"], r["checkpoint"]["top_k"]
    lines = [
        "## Load and entropy",
        "",
        f"Load = fraction of token-selections per cluster (uniform {100 / n:.2f}%); token share = fraction of tokens "
        f"that keep the cluster (uniform k/N = {k / n:.2f}). Normalised entropy = H(load)/log N; with k = {k} of "
        f"N = {n} it cannot go below log k/log N = {math.log(k) / math.log(n):.3f}. Batch of 4 = expected fraction "
        f"of clusters that at least one of 4 independently drawn tokens keeps (what the decode kernels read for 4 "
        f"concurrent requests; uniform routing: {1 - (1 - k / n) ** 4:.3f}).",
        "",
        "| layer | normalised entropy | busiest cluster | its token share | least-used cluster | its token share "
        "| unused | clusters kept by > 90% / < 10% of tokens | batch of 4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, s in r["layers"].items():
        union = s.get("batch_union", {}).get("4")  # records written before it existed lack it
        lines.append(
            f"| {i} | {s['normalised_entropy']:.4f} | {s['busiest_cluster']} | {s['busiest_share']:.3f} | "
            f"{s['least_used_cluster']} | {s['least_used_share']:.3g} | {s['unused_clusters']} | "
            f"{s['clusters_kept_by_over_90pct']} / {s['clusters_kept_by_under_10pct']} | "
            f"{'' if union is None else f'{union:.3f}'} |"
        )
    return lines + [
        "",
        f"![load per cluster]({figures['load']})",
        "",
        f"![entropy and busiest share]({figures['layer_stats']})",
        "",
    ]


def _pairs(pairs: list[dict]) -> str:
    return ", ".join(f"{p['pair'][0]}&{p['pair'][1]} {p['correlation']:+.2f} ({p['lift']:.2f})" for p in pairs[:3])


def _coselection_section(r: dict, figures: dict[str, str]) -> list[str]:
    n = r["checkpoint"]["num_experts"]
    lines = [
        "## Co-selection",
        "",
        "Left: fraction of tokens that keep both clusters. Right: correlation (phi) of the two clusters' "
        f"keep-indicators over tokens; keeping exactly k makes its mean about -1/(N-1) = {-1 / (n - 1):.3f}. "
        "Pairs below: correlation (lift = P(i,j) / (P(i) P(j)) in brackets).",
        "",
    ]
    for i, c in r["coselection"].items():
        lines += [
            f"Layer {i}: mean off-diagonal correlation {c['mean_correlation_off_diagonal']:+.3f}, largest "
            f"|correlation| {c['max_abs_correlation_off_diagonal']:.2f}; most together {_pairs(c['most_together'])}; "
            f"most apart {_pairs(c['most_apart'])}; {c['pairs_never_together']} pairs never kept together.",
            "",
            f"![co-selection layer {i}]({figures['coselection_' + i]})",
            "",
        ]
    return lines


def _tests_table(r: dict) -> list[str]:
    lines = [
        "## Specialisation",
        "",
        f"Statistic: {r['statistic']} (mean pairwise total variation between the groups' load distributions, "
        "summed over layers, for tv); p-value from shuffling whole examples between groups (labels only within a "
        'task). Scope "text" counts only tokens of the GLUE texts, not the field names that differ between '
        "tasks.",
        "",
        "| test | scope | tokens | observed | null mean | null 95% | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for scope, spec in r["specialisation"].items():
        for test in ("by_task", "by_label"):
            t = spec.get(test)
            if not t or "skipped" in t:
                continue
            lines.append(
                f"| {test.replace('_', ' ')} | {scope} | {spec['tokens']} | {t['observed']:.4f} | "
                f"{format_number(t['null_mean'])} | {format_number(t['null_p95'])} | {format_p(t['p_value'])} |"
            )
    for scope, spec in r["specialisation"].items():
        per = (spec.get("by_label") or {}).get("per_task")
        if per:
            one = (
                f"{t} {v['observed']:.4f} vs null {format_number(v['null_mean'])}, p = {format_p(v['p_value'])}"
                if "skipped" not in v
                else f"{t} skipped ({v['skipped']})"
                for t, v in per.items()
            )
            lines += ["", f"Label test one task at a time ({scope} tokens): " + "; ".join(one) + "."]
    if r["n_permutations"]:
        lines += [
            "",
            f"The smallest possible p-value with {r['n_permutations']} permutations is "
            f"1/{r['n_permutations'] + 1} = {1 / (r['n_permutations'] + 1):.3g}.",
        ]
    return lines


def _top_clusters_table(r: dict, figures: dict[str, str], test: str, title: str) -> list[str]:
    t = r["specialisation"]["all"].get(test)
    if not t or "skipped" in t:
        return []
    by_label = test == "by_label"
    lines = [
        "",
        f"Top specialised clusters, {title} (all tokens): range of token share across groups, "
        "permutation p (unadjusted / max-T adjusted over every cluster of every layer).",
        "",
        "| layer | cluster | " + ("task | " if by_label else "") + "highest | lowest | range (pp) | "
        "token share per group | p | p adj. |",
        "|---|---|" + ("---|" if by_label else "") + "---|---|---|---|---|---|",
    ]
    for row in t["top_clusters"]:
        shares = ", ".join(f"{g} {v:.3f}" for g, v in row["token_share"].items())
        lines.append(
            f"| {row['layer']} | {row['cluster']} | "
            + (f"{row['within']} | " if by_label else "")
            + f"{row['max_group']} | {row['min_group']} | {row['range_pp']:.1f} | {shares} | "
            f"{format_p(row.get('p'))} | {format_p(row.get('p_adjusted'))} |"
        )
    for scope in r["specialisation"]:
        key = ("label_" if by_label else "task_") + scope
        if key in figures:
            lines += ["", f"![specialisation by {title}, {scope} tokens]({figures[key]})"]
    return lines


def _specialisation_section(r: dict, figures: dict[str, str]) -> list[str]:
    lines = _tests_table(r)
    lines += _top_clusters_table(r, figures, "by_task", "tasks")
    lines += _top_clusters_table(r, figures, "by_label", "labels (within a task)")
    skipped = r["specialisation"]["all"].get("label_test_skips_regression_tasks")
    if skipped:
        lines += ["", f"No label test for regression tasks: {skipped}."]
    return lines + [""]


def _change_section(ch: dict, figures: dict[str, str]) -> list[str]:
    overlap = ", ".join(f"layer {i} {v:.3f}" for i, v in ch["kept_overlap"].items())
    lines = [
        "## Change from the converted model to the fine-tuned one",
        "",
        f"Same tokens through both. Total variation between the two loads, summed over layers: "
        f"{ch['tv_total']:.4f} (paired sign-flip permutation p = {format_p(ch['p_value'])}). Mean fraction of a "
        f"token's kept clusters that stay the same: {overlap}.",
        "",
        "| | layer | cluster | token share before | change (pp) |",
        "|---|---|---|---|---|",
    ]
    for kind in ("gained", "lost"):
        for row in ch[kind][:5]:
            lines.append(
                f"| {kind} | {row['layer']} | {row['cluster']} | {row['base_token_share']:.3f} | "
                f"{row['delta_token_share_pp']:+.2f} |"
            )
    return lines + ["", f"![load change]({figures['change']})", ""]


def _sharpening_section(report: dict) -> list[str]:
    """The specialisation tests of the fine-tuned model beside the same tests of the converted one (same tokens)."""
    after, before = report["specialisation"], report["specialisation_converted"]
    lines = [
        "Specialisation before and after fine-tuning (the tests above, on the converted model's routing of the same "
        "tokens; in brackets the mean of each permutation null). The two statistics are not tested against each other.",
        "",
        "| test | scope | converted | fine-tuned | ratio |",
        "|---|---|---|---|---|",
    ]
    for scope in after:
        for test, name in (("by_task", "by task"), ("by_label", "by label")):
            a, b = after[scope].get(test), before[scope].get(test)
            if not a or not b or a.get("observed") is None or b.get("observed") is None:
                continue
            ratio = f"{a['observed'] / b['observed']:.3f}" if b["observed"] else "n/a"
            lines.append(f"| {name} | {scope} | {b['observed']:.4f} ({b['null_mean']:.4f}) | "
                         f"{a['observed']:.4f} ({a['null_mean']:.4f}) | {ratio} |")  # fmt: skip
    return lines + [""]


def summary_markdown(report: dict, figures: dict[str, str]) -> str:
    """The markdown summary of a routing.json record; `figures` maps figure keys to file names beside it."""
    lines = _header(report) + _load_section(report, figures) + _coselection_section(report, figures)
    lines += _specialisation_section(report, figures)
    if report.get("change"):
        lines += _change_section(report["change"], figures)
    if report.get("specialisation_converted"):
        lines += _sharpening_section(report)
    return "\n".join(lines) + "\n"
