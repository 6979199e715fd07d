"""The sweep's outputs, rebuilt from every finished run: results.json (strict JSON), report.md, heatmap.png (Δ per
config x task) and forest.png (pooled Δ per config). The headline sentence is chosen by the rule the plan states."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from routed_llama.io import write_file, write_json, write_text

from . import tasks
from .sweep import PLAIN, Plan, Progress, lr_cells, round_stats

FORMAT_VERSION = 1


def _tn(task: str) -> str:
    """A task's display name (RTE, MRPC, CoLA, STS-B)."""
    return tasks.get_task(task).folder


# ---------------------------------------------------------------------------------------------------------------
# results.json
# ---------------------------------------------------------------------------------------------------------------


def _cell_status(progress: Progress, cells, stage: str) -> list[dict]:
    out = []
    for cell in cells:
        done = sum(r in progress.results for r in cell)
        out.append({"stage": stage, "arm": cell[0].arm, "task": cell[0].task, "lr": cell[0].lr,
                    "finished_seeds": done, "planned_seeds": len(cell)})  # fmt: skip
    return out


def not_run(plan: Plan, progress: Progress) -> list[dict]:
    """Every cell of the plan that is not complete, with what it waits for."""
    rows = [c for c in _cell_status(progress, lr_cells(plan), "lr") if c["finished_seeds"] < c["planned_seeds"]]
    r1 = _cell_status(progress, progress.round1_cells, "round1")
    rows += [c for c in r1 if c["finished_seeds"] < c["planned_seeds"]]

    def waiting(stage, arm, task, seeds, why):
        return {"stage": stage, "arm": arm, "task": task, "finished_seeds": 0, "planned_seeds": len(seeds),
                "waits_for": why}  # fmt: skip

    arms = (PLAIN, *(c.name for c in plan.configs))
    rows += [waiting("round1", a, t, plan.round1_seeds, "the lr stage of this task")
             for t in plan.tasks if t not in progress.lrs for a in arms]  # fmt: skip
    if progress.best is None:
        why = f"round 1 on {', '.join(_tn(t) for t in plan.select_tasks)} (it chooses the config)"
        rows += [waiting("confirmation", a, t, plan.confirm_seeds, why)
                 for t in plan.confirm_tasks for a in (PLAIN, "best config")]  # fmt: skip
    else:
        conf = _cell_status(progress, progress.confirmation_cells, "confirmation")
        rows += [c for c in conf if c["finished_seeds"] < c["planned_seeds"]]
    return rows


def _lr_section(plan: Plan, progress: Progress) -> dict:
    scores = {t: {f"{lr:g}": {"mean": float(np.mean(v)), "scores": v} for lr, v in by_lr.items()}
              for t, by_lr in progress.lr_scores.items()}  # fmt: skip
    return {"grid": list(plan.lr_grid), "seeds": list(plan.lr_seeds), "holdout_fraction": plan.holdout_fraction,
            "holdout_scores": scores, "chosen": progress.lrs}  # fmt: skip


def build(plan: Plan, progress: Progress, meta: dict) -> dict:
    """Everything results.json holds: status, lr choice, both rounds' statistics, the headline."""
    r1 = _round(plan, progress, progress.round1_cells, plan.tasks)
    conf = None
    if progress.best is not None:
        conf = _round(plan, progress, progress.confirmation_cells, plan.confirm_tasks)
        conf["config"] = progress.best
        conf["selection"] = {"tasks": list(plan.select_tasks), "mean_standardised_delta": progress.best_scores}
    runs = sorted(progress.results.values(), key=lambda r: r.get("date") or "")
    return {
        "format_version": FORMAT_VERSION,
        "plan": plan.name,
        "plan_sha256": hashlib.sha256(json.dumps(plan.raw, sort_keys=True).encode()).hexdigest(),
        "model": plan.raw["model"],
        "model_loaded_from": plan.model,
        "metrics": plan.metrics,
        "command": meta.get("command", ""),
        "wall_seconds_this_invocation": round(meta.get("wall_seconds", 0.0), 1),
        "hardware": sorted({r.get("hardware") for r in runs if r.get("hardware")}),
        "dates": [runs[0].get("date"), runs[-1].get("date")] if runs else None,
        "finished_runs": len(progress.results),
        "lr_selection": _lr_section(plan, progress),
        "round1": r1,
        "confirmation": conf,
        "not_run": not_run(plan, progress),
        "headline": headline(plan, r1, conf),
    }


def _round(plan: Plan, progress: Progress, cells, task_names) -> dict:
    stats = round_stats(plan, progress, cells, task_names)
    stats["complete_cells"] = sum(progress.scores(c) is not None for c in cells)
    stats["planned_cells"] = len(cells)
    stats["tasks"] = list(task_names)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# The headline, by the plan's rule
# ---------------------------------------------------------------------------------------------------------------

HEADLINE_RULE = (
    "Only the confirmation round is the headline. If its pooled standardised Δ (best round-1 config vs plain, "
    "held-out tasks, fresh seeds) has a 95% CI above 0: 'config X beats plain LoRA by Δ [CI] pooled over the "
    "round-1 tasks, confirmed on held-out tasks'. Otherwise: 'no config beats plain LoRA; any gain is below B' with "
    "B the upper end of that CI (also per task, in metric points). Before the confirmation round is complete: no "
    "headline."
)


def _ci(ci, nd=2, sign="+") -> str:
    return "[undefined]" if not ci or None in ci else f"[{ci[0]:{sign}.{nd}f}, {ci[1]:{sign}.{nd}f}]"


def headline(plan: Plan, r1: dict, conf: dict | None) -> dict:
    """{"kind": beats | no_gain | pending | undefined, "sentence": ..., "rule": HEADLINE_RULE}."""
    out = {"rule": HEADLINE_RULE}
    done = conf is not None and conf["complete_cells"] == conf["planned_cells"]
    if not done:
        return {**out, "kind": "pending", "sentence": (
            "No headline yet: the confirmation round (the best round-1 config on "
            + " + ".join(_tn(t) for t in plan.confirm_tasks)
            + " with fresh seeds) is not complete; round-1 numbers are exploratory (a config is chosen among "
            f"{len(plan.configs)}).")}  # fmt: skip
    best = conf["config"]
    c = conf["configs"][best]
    pool = c["pooled"]
    lo, hi = pool["ci95"] or (None, None)
    held = " + ".join(_tn(t) for t in plan.confirm_tasks)
    if lo is None or hi is None:
        return {**out, "kind": "undefined", "sentence": f"No headline: the confirmation round's pooled CI is undefined "
                f"({'; '.join(pool['undefined'].values())})."}  # fmt: skip
    if lo > 0:
        p1 = r1["configs"].get(best, {}).get("pooled", {})
        n1 = len(p1.get("tasks", []))
        return {**out, "kind": "beats", "sentence": (
            f"Config {best} beats plain LoRA by {p1.get('delta_z', float('nan')):+.2f} {_ci(p1.get('ci95'))} plain-SD "
            f"units pooled over {n1} tasks (round 1, where it was chosen), confirmed on held-out tasks ({held}, fresh "
            f"seeds): {pool['delta_z']:+.2f} {_ci(pool['ci95'])}.")}  # fmt: skip
    per_task = "; ".join(
        f"{_tn(t)}: below {cell['ci95'][1]:+.2f} {plan.metrics[t]} points" if cell["ci95"] else f"{_tn(t)}: undefined"
        for t, cell in c["cells"].items()
    )  # fmt: skip
    if hi > 0:
        s = (f"No config beats plain LoRA; any gain of the best round-1 config ({best}) on held-out tasks ({held}, "
             f"fresh seeds) is below {hi:.2f} plain-SD units with 95% confidence ({per_task}).")  # fmt: skip
    else:
        s = (f"No config beats plain LoRA; on held-out tasks ({held}, fresh seeds) the best round-1 config ({best}) "
             f"is worse than plain LoRA by at least {-hi:.2f} plain-SD units with 95% confidence "
             f"({per_task}).")  # fmt: skip
    return {**out, "kind": "no_gain", "sentence": s}


# ---------------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------------


def _p(x) -> str:
    return "—" if x is None else f"{x:.2g}" if x >= 0.001 else f"{x:.1e}"


def _status_lines(plan: Plan, res: dict, progress: Progress) -> list[str]:
    lr_total = len(plan.tasks) * len(plan.lr_grid) * len(plan.lr_seeds)
    lr_done = sum(1 for r in progress.results if r.stage == "lr")
    r1_done = sum(1 for r in progress.results if r.stage == "round1")
    r1_total = len(plan.tasks) * (1 + len(plan.configs)) * len(plan.round1_seeds)
    cf_done = sum(1 for r in progress.results if r.stage == "confirmation")
    cf_total = len(plan.confirm_tasks) * 2 * len(plan.confirm_seeds)
    r1, cf = res["round1"], res["confirmation"]
    return [
        "| stage | runs finished / planned | complete cells / planned |",
        "|---|---|---|",
        f"| lr selection | {lr_done} / {lr_total} | {len(progress.lrs)} / {len(plan.tasks)} tasks |",
        f"| round 1 | {r1_done} / {r1_total} | {r1['complete_cells']} / {len(plan.tasks) * (1 + len(plan.configs))} |",
        f"| confirmation | {cf_done} / {cf_total} | {cf['complete_cells'] if cf else 0} / "
        f"{len(plan.confirm_tasks) * 2} |",
    ]


def _round_table(plan: Plan, stats: dict, names: list[str], task_names) -> list[str]:
    head = " | ".join(f"{_tn(t)} Δ {plan.metrics[t]} [95% CI] (p)" for t in task_names)
    lines = [f"| config | {head} |", "|---|" + "---|" * len(task_names)]
    lines.append("| plain (mean) | " + " | ".join(
        f"{stats['plain_mean'][t]:.2f} (SD {stats['plain_sd'][t]:.2f})" if t in stats["plain_mean"] else "not run"
        for t in task_names) + " |")  # fmt: skip
    for n in names:
        cells = stats["configs"].get(n, {}).get("cells", {})
        row = []
        for t in task_names:
            c = cells.get(t)
            row.append("not run" if c is None else f"{c['delta_mean']:+.2f} {_ci(c['ci95'])} ({_p(c['p'])})")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return lines


def _pooled_table(stats: dict, names: list[str], holm: bool) -> list[str]:
    head = ("| config | tasks | units | Δ (plain-SD units) [95% bootstrap CI] "
            "| P(routed > plain) [95% CI] (wins/ties/losses) | sign-flip p |")  # fmt: skip
    lines = [head + (" Holm p |" if holm else ""), "|---|---|---|---|---|---|" + ("---|" if holm else "")]
    for n in names:
        c = stats["configs"].get(n)
        if c is None:
            lines.append(f"| {n} | — | 0 | not run | | |" + (" |" if holm else ""))
            continue
        p, w = c["pooled"], c["pooled"]["win"]
        dz = "undefined" if p["delta_z"] is None else f"{p['delta_z']:+.2f} {_ci(p['ci95'])}"
        win = "—" if w["p_win"] is None else (f"{w['p_win']:.2f} {_ci(w['ci95'], sign='')} "
                                               f"({w['wins']}/{w['ties']}/{w['losses']})")  # fmt: skip
        names_ = ", ".join(_tn(t) for t in p["tasks"])
        lines.append(f"| {n} | {names_} | {p['n_units']} | {dz} | {win} | {_p(p['p_permutation'])} |"
                     + (f" {_p(p.get('p_holm'))} |" if holm else ""))  # fmt: skip
    return lines


def _routing_off_table(plan: Plan, stats: dict, names: list[str], task_names) -> list[str]:
    lines = ["| config | task | routing on | routing off (k = N) | off − plain [95% CI] | off − on [95% CI] |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for n in names:
        c = stats["configs"].get(n, {})
        for t in task_names:
            o = c.get("routing_off", {}).get(t)
            if o is None:
                continue
            vp, vo = o["vs_plain"], o["vs_routing_on"]
            on = c["cells"][t]["routed_mean"]
            lines.append(f"| {n} | {_tn(t)} | {on:.2f} | {o['mean']:.2f} | {vp['delta_mean']:+.2f} {_ci(vp['ci95'])} | "
                         f"{vo['delta_mean']:+.2f} {_ci(vo['ci95'])} |")  # fmt: skip
    return lines if len(lines) > 2 else ["No complete routed cell yet."]


def report(plan: Plan, res: dict, progress: Progress) -> str:
    names = [c.name for c in plan.configs]
    a = plan.analysis
    lines = [
        f"# Sweep {plan.name}: routed LoRA vs plain LoRA on {', '.join(_tn(t) for t in plan.tasks)}",
        "",
        f"- model: {plan.raw['model']}"
        + (f" (loaded from {plan.model})" if plan.model != plan.raw["model"] else "")
        + f"; hardware: {', '.join(res['hardware']) or '—'}; runs dated "
        f"{' to '.join(res['dates']) if res['dates'] else '—'}",
        f"- plan: `plan.json` (committed before its runs; sha256 of its content {res['plan_sha256'][:12]}); "
        f"command: `{res['command']}`",
        "- metric per task (final epoch on dev, no epoch picked): "
        + ", ".join(f"{_tn(t)} {m}" for t, m in plan.metrics.items()),
        "",
        "## Headline",
        "",
        f"**{res['headline']['sentence']}**",
        "",
        f"Rule (fixed in the plan): {res['headline']['rule']}",
        "",
        "## What was run",
        "",
        *_status_lines(plan, res, progress),
        "",
    ]
    missing = res["not_run"]
    if missing:
        lines += [f"Not run yet ({len(missing)} cells; a cell is reported only with all its seeds):", ""]
        lines += [f"- {m['stage']}: {m['arm']}" + (f" at lr {m['lr']:g}" if m["stage"] == "lr" else "")
                  + f" on {_tn(m['task'])}: {m['finished_seeds']}/{m['planned_seeds']} seeds"
                  + (f" (waits for {m['waits_for']})" if m.get("waits_for") else "") for m in missing]  # fmt: skip
        lines.append("")
    lines += ["## lr selection (plain LoRA, held-out slice of train; dev untouched)", ""]
    for t, by_lr in res["lr_selection"]["holdout_scores"].items():
        lines.append(f"- {_tn(t)}: " + ", ".join(f"lr {lr}: {v['mean']:.2f}" for lr, v in by_lr.items())
                     + f" -> **{res['lr_selection']['chosen'][t]:g}**")  # fmt: skip
    r1 = res["round1"]
    lines += ["", f"## Round 1 ({len(plan.round1_seeds)} seeds per cell, exploratory)", "",
              "Paired by seed, Δ = routed − plain in metric points; Student-t 95% CI and paired t p over seeds:", "",
              *_round_table(plan, r1, names, plan.tasks), "",
              "Pooled over tasks (Δ / plain arm's across-seed SD of the task), Holm across the round-1 configs:", "",
              *_pooled_table(r1, names, holm=True), "",
              "Routing off at evaluation (the routed adapter scored with k = N: train routed, deploy dense):", "",
              *_routing_off_table(plan, r1, names, plan.tasks), ""]  # fmt: skip
    lines += ["## Confirmation round (the headline)", ""]
    cf = res["confirmation"]
    if cf is None:
        lines += ["Not run: round 1 is not complete on " + ", ".join(_tn(t) for t in plan.select_tasks)
                  + " for plain and every config, so the config to confirm is not chosen yet.", ""]  # fmt: skip
    else:
        sel = ", ".join(f"{n} {v:+.2f}" for n, v in cf["selection"]["mean_standardised_delta"].items())
        lines += [f"Chosen config: **{cf['config']}** (mean standardised Δ on "
                  f"{', '.join(_tn(t) for t in plan.select_tasks)}: {sel}).", "",
                  *_round_table(plan, cf, [cf["config"]], plan.confirm_tasks), "",
                  *_pooled_table(cf, [cf["config"]], holm=False), ""]  # fmt: skip
    lines += [
        "## Method",
        "",
        "- The unit of every test is a seed (one fine-tuning run), never a dev example pooled over seeds: the same "
        "dev examples recur in every seed, so pooling them would overstate significance.",
        f"- Per cell: paired t over seeds (`scipy.stats.ttest_rel`). Pooled: stratified percentile bootstrap of the "
        f"mean standardised Δ ({a.get('bootstrap_resamples', 10000)} resamples, seeds resampled within each task, "
        "plain SDs held fixed; `scipy.stats.bootstrap`), sign-flip permutation p over the (task, seed) units "
        "(`scipy.stats.permutation_test`; random flips when there are more arrangements than resamples, so the "
        f"smallest p it can give is about 2 / ({a.get('permutation_resamples', 10000)} + 1)), P(routed > plain) "
        "with a Clopper-Pearson CI (`scipy.stats.binomtest`; ties are not wins), Holm step-down across all the "
        "round-1 configs of the plan (a config not run yet counts as p = 1).",
        "- Statistics that cannot be computed are null in results.json, with the reason.",
        "",
        "![Δ per config and task](heatmap.png)",
        "",
        "![pooled Δ per config](forest.png)",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def plot_heatmap(plan: Plan, r1: dict, path: Path):
    """Round 1: colour = mean Δ in plain-SD units, text = Δ in metric points and its 95% CI; grey = not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, ts = [c.name for c in plan.configs], list(plan.tasks)
    z = np.full((len(names), len(ts)), np.nan)
    text = {}
    for i, n in enumerate(names):
        for j, t in enumerate(ts):
            c = r1["configs"].get(n, {}).get("cells", {}).get(t)
            sd = r1["plain_sd"].get(t)
            if c is not None and sd:
                z[i, j] = c["delta_mean"] / sd
            text[i, j] = "not run" if c is None else f"{c['delta_mean']:+.2f}\n{_ci(c['ci95'], 1)}"
    lim = max(1.0, float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0)
    fig, ax = plt.subplots(figsize=(2.2 * len(ts) + 2.5, 0.55 * len(names) + 1.6), dpi=120)
    for (i, j), s in text.items():  # white on the darkest cells
        dark = np.isfinite(z[i, j]) and abs(z[i, j]) > 0.6 * lim
        color = "white" if dark else "0.4" if s == "not run" else "black"
        ax.text(j, i, s, ha="center", va="center", fontsize=7, color=color)
    cmap = plt.get_cmap("RdBu").with_extremes(bad="0.9")
    im = ax.imshow(np.ma.masked_invalid(z), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(ts)), [f"{_tn(t)}\n({plan.metrics[t]})" for t in ts], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    fig.colorbar(im, ax=ax, label="Δ / plain SD")
    ax.set_title("Round 1: routed − plain (points, 95% CI over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_forest(plan: Plan, r1: dict, conf: dict | None, path: Path):
    """Pooled Δ (plain-SD units) per config with its bootstrap CI; the confirmation round in its own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in plan.configs]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(names) + 1.8), dpi=120)
    for i, n in enumerate(names):
        p = r1["configs"].get(n, {}).get("pooled")
        if p is None or p["delta_z"] is None:
            ax.text(0, i, "not run", ha="center", va="center", fontsize=7, color="0.4")
            continue
        lo, hi = p["ci95"] or (p["delta_z"], p["delta_z"])
        ax.errorbar(p["delta_z"], i, xerr=[[p["delta_z"] - lo], [hi - p["delta_z"]]], fmt="o", color="C0", capsize=3,
                    label="round 1" if i == 0 else None)  # fmt: skip
    if conf is not None:
        p = conf["configs"].get(conf["config"], {}).get("pooled")
        if p is not None and p["delta_z"] is not None:
            i = names.index(conf["config"]) + 0.3
            lo, hi = p["ci95"] or (p["delta_z"], p["delta_z"])
            ax.errorbar(p["delta_z"], i, xerr=[[p["delta_z"] - lo], [hi - p["delta_z"]]], fmt="s", color="C3",
                        capsize=3, label="confirmation (held-out tasks)")  # fmt: skip
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("pooled Δ, routed − plain (plain-SD units), 95% CI")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(plan: Plan, progress: Progress, out: Path, meta: dict) -> dict:
    """results.json, report.md, heatmap.png and forest.png in `out` (each written beside and renamed into place)."""
    res = build(plan, progress, meta)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "heatmap.png", lambda p: plot_heatmap(plan, res["round1"], p))
    write_file(out / "forest.png", lambda p: plot_forest(plan, res["round1"], res["confirmation"], p))
    write_json(out / "results.json", res, indent=1)
    write_text(out / "report.md", report(plan, res, progress))
    return res
