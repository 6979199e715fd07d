"""Plain LoRA vs routed LoRA: every arm x every seed (x an optional lr grid) with identical settings.

Routed arms are converted once (or given as checkpoints) and reused across seeds. With an lr grid, each arm's lr is
chosen on a held-out slice of train (first seed only), never on dev; dev is then scored with the chosen lr for every
seed. The headline is the final-epoch dev metric; per-epoch numbers are reported, never a best epoch.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import stats, tasks
from .models import is_routed_checkpoint
from .train import RunConfig, hardware, run_one

FORMAT_VERSION = 1


@dataclass
class Arm:
    """One arm. `name` "baseline" is the plain model; a routed arm has a `checkpoint` or conversion options."""

    name: str
    checkpoint: str | None = None  # a routed checkpoint folder; None: convert from the base with the options below
    layers: str = "all"
    num_experts: int = 32
    top_k: int = 16
    method: str = "kmeans"
    router: str = "centroid"
    partition_seed: int = 0

    @property
    def routed(self) -> bool:
        return self.name != "baseline"


def parse_arm(spec: str) -> Arm:
    """`name=last8,layers=22-29,num_experts=32,top_k=16` or `name=x,checkpoint=PATH` -> Arm."""
    fields_ = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"--arm wants key=value pairs separated by commas, got {spec!r}")
        k, v = part.split("=", 1)
        fields_[k.strip().replace("-", "_")] = v.strip()
    known = set(Arm.__dataclass_fields__)
    unknown = set(fields_) - known
    if unknown:
        raise ValueError(f"unknown --arm keys {sorted(unknown)}; known: {sorted(known)}")
    if "name" not in fields_:
        raise ValueError(f"--arm needs a name: {spec!r}")
    for k in ("num_experts", "top_k", "partition_seed"):
        if k in fields_:
            fields_[k] = int(fields_[k])
    arm = Arm(**fields_)
    if arm.name == "baseline":
        raise ValueError("the routed arms need names other than 'baseline' (the plain arm's name)")
    return arm


@dataclass
class Experiment:
    name: str
    base: RunConfig  # task, model, recipe; arm, seed and lr are filled per run
    arms: list[Arm]
    seeds: list[int]
    lrs: list[float]  # one value: no selection; several: chosen per arm on a train slice
    holdout_fraction: float = 0.1
    jobs: int = 1
    output: Path = Path("results/experiment")
    checkpoint_dir: Path | None = None  # where routed arms are converted (reused when already there)
    overwrite: bool = False
    command: str = ""
    arm_checkpoints: dict = field(default_factory=dict)


def validate(exp: Experiment):
    """Everything that can be checked before any model is loaded."""
    exp.base.validate()
    task = tasks.get_task(exp.base.task)
    tasks.load_split(task, "train", exp.base.data_dir, exp.base.max_train_samples)
    tasks.load_split(task, "validation", exp.base.data_dir, exp.base.max_eval_samples)
    if not exp.seeds:
        raise ValueError("need at least one seed")
    if len(set(exp.seeds)) != len(exp.seeds):
        raise ValueError(f"seeds repeat: {exp.seeds}")
    names = ["baseline", *(a.name for a in exp.arms)]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names repeat: {names}")
    if not exp.arms:
        raise ValueError("need at least one routed arm")
    if any(lr <= 0 for lr in exp.lrs) or not exp.lrs:
        raise ValueError(f"learning rates must be > 0, got {exp.lrs}")
    if exp.output.exists() and any(exp.output.iterdir()) and not exp.overwrite:
        raise ValueError(f"{exp.output} exists and is not empty; pass --overwrite to replace it")
    import convert

    convert.resolve_source(exp.base.model)  # the base must exist (the Hub is checked when loading)
    for arm in exp.arms:
        if arm.checkpoint is not None:
            if not is_routed_checkpoint(arm.checkpoint):
                raise ValueError(f"arm {arm.name}: {arm.checkpoint} is not a routed checkpoint")
        elif not 1 <= arm.top_k <= arm.num_experts:
            raise ValueError(f"arm {arm.name}: need 1 <= top_k <= num_experts")


def prepare_checkpoints(exp: Experiment, log) -> dict[str, str]:
    """Convert every routed arm once (reusing a finished conversion in the checkpoint folder)."""
    import convert

    out = {"baseline": exp.base.model}
    ckdir = exp.checkpoint_dir or (exp.output / "checkpoints")
    ckdir.mkdir(parents=True, exist_ok=True)
    for arm in exp.arms:
        if arm.checkpoint is not None:
            out[arm.name] = arm.checkpoint
            continue
        target = ckdir / arm.name
        wanted = {"num_experts": arm.num_experts, "num_experts_per_tok": arm.top_k, "method": arm.method,
                  "router": arm.router, "seed": arm.partition_seed}  # fmt: skip
        done = target / "conversion.json"
        if done.is_file():
            have = json.loads(done.read_text())
            layers = convert.parse_layers(arm.layers, have["num_hidden_layers"])
            if all(have.get(k) == v for k, v in wanted.items()) and have["routed_layers"] == layers:
                log(f"reusing the routed checkpoint {target}")
                out[arm.name] = str(target)
                continue
            raise ValueError(f"{target} holds a different conversion; remove it or pick another --checkpoint-dir")
        log(f"converting {exp.base.model} for arm {arm.name} (layers {arm.layers}, N={arm.num_experts}, k={arm.top_k})")
        convert.convert(exp.base.model, target, num_experts=arm.num_experts, top_k=arm.top_k, layers=arm.layers,
                        seed=arm.partition_seed, method=arm.method, router=arm.router, progress=False)  # fmt: skip
        out[arm.name] = str(target)
    return out


def _run_many(configs: list[RunConfig], jobs: int, log) -> list[dict]:
    """Run configs, `jobs` at a time in fresh processes (several small runs share one GPU well)."""
    results = [None] * len(configs)
    if jobs <= 1:
        for i, cfg in enumerate(configs):
            results[i] = run_one(cfg)
            log(_line(results[i]))
        return results
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_one, asdict(cfg)): i for i, cfg in enumerate(configs)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            log(_line(results[i]))
    return results


def _line(r: dict) -> str:
    m = r["primary_metric"]
    return (f"  {r['arm']:<12} seed {r['seed']:<3} lr {r['lr']:<8g} {m} {r['final'][m]:6.2f} "
            f"(before {r['before'][m]:6.2f}) {r['train_seconds']:7.1f} s")  # fmt: skip


def run_experiment(exp: Experiment, log=print) -> dict:
    validate(exp)
    t0 = time.perf_counter()
    refs = prepare_checkpoints(exp, log)
    exp.arm_checkpoints = refs
    arm_names = list(refs)
    selection = None
    chosen = {a: exp.lrs[0] for a in arm_names}
    if len(exp.lrs) > 1:
        log(f"choosing lr per arm on a {exp.holdout_fraction:.0%} held-out slice of train (seed {exp.seeds[0]})")
        configs = [replace(exp.base, model=refs[a], arm=a, seed=exp.seeds[0], lr=lr, holdout_fraction=exp.holdout_fraction,
                           eval_routing_off=False, output_dir=None)
                   for a in arm_names for lr in exp.lrs]  # fmt: skip
        results = _run_many(configs, exp.jobs, log)
        primary = tasks.get_task(exp.base.task).primary
        selection = {a: {} for a in arm_names}
        for r in results:
            selection[r["arm"]][str(r["lr"])] = r["final"][primary]
        chosen = {a: float(max(s.items(), key=lambda kv: kv[1])[0]) for a, s in selection.items()}
        log("chosen lr: " + ", ".join(f"{a} {lr:g}" for a, lr in chosen.items()))
    configs = [replace(exp.base, model=refs[a], arm=a, seed=s, lr=chosen[a], holdout_fraction=None,
                       output_dir=str(exp.output / "runs" / f"{a}-seed{s}"))
               for s in exp.seeds for a in arm_names]  # fmt: skip
    results = _run_many(configs, exp.jobs, log)
    summary = summarise(exp, results, chosen, selection, time.perf_counter() - t0)
    write_outputs(exp, summary)
    return summary


def summarise(exp: Experiment, results: list[dict], chosen: dict, selection, seconds: float) -> dict:
    task = tasks.get_task(exp.base.task)
    m = task.primary
    arms = {}
    for name in ["baseline", *(a.name for a in exp.arms)]:
        rs = sorted((r for r in results if r["arm"] == name), key=lambda r: r["seed"])
        spec = next((a for a in exp.arms if a.name == name), None)
        if spec is not None and spec.checkpoint is not None:  # record the checkpoint's layout, not the Arm defaults
            spec = _checkpoint_arm(spec.name, spec.checkpoint)
        arm_spec = asdict(spec) if spec is not None else {"name": "baseline"}
        final = [r["final"][m] for r in rs]
        mean, std = stats.mean_std(final)
        off = [r["final_routing_off"][m] for r in rs if r["final_routing_off"]]
        arms[name] = {
            "config": {**arm_spec, "model": exp.arm_checkpoints.get(name), "lr": chosen[name]},
            "seeds": [r["seed"] for r in rs],
            "final": final,
            "final_mean": mean,
            "final_std": std,
            "final_all_metrics": [r["final"] for r in rs],
            "before": [r["before"][m] for r in rs],
            "per_epoch": [[e[m] for e in r["per_epoch"]] for r in rs],
            "final_routing_off": off or None,
            "train_seconds": [r["train_seconds"] for r in rs],
            "train_tokens_per_s": [r["train_tokens_per_s"] for r in rs],
            "peak_gpu_mem_bytes": [r["peak_gpu_mem_bytes"] for r in rs],
            "predictions": [r["predictions"] for r in rs],
            "labels": rs[0]["labels"] if rs else None,
            "correct": [r["correct"] for r in rs],
        }
    comparisons = []
    base = arms["baseline"]
    base_epoch_mean = np.mean(base["per_epoch"], axis=0) if base["per_epoch"] else None
    for name, arm in arms.items():
        if name == "baseline":
            continue
        delta, ci = stats.paired_ci(arm["final"], base["final"])
        mc = None
        if arm["correct"][0] is not None:
            mc = stats.mcnemar(np.concatenate(arm["correct"]), np.concatenate(base["correct"]))
        treat_epoch_mean = np.mean(arm["per_epoch"], axis=0)
        comparisons.append({
            "baseline": "baseline",
            "treatment": name,
            "metric": m,
            "delta_mean": delta,
            "ci95": list(ci),
            "per_seed_delta": [a - b for a, b in zip(arm["final"], base["final"])],
            "mcnemar_p": None if mc is None else mc["p"],
            "mcnemar_b_baseline_only": None if mc is None else mc["b"],
            "mcnemar_c_treatment_only": None if mc is None else mc["c"],
            "epochs_to_reach_baseline_final": stats.epochs_to_reach(treat_epoch_mean, base["final_mean"]),
            "baseline_epochs_to_reach_own_final": stats.epochs_to_reach(base_epoch_mean, base["final_mean"]),
            "time_ratio": float(np.mean(arm["train_seconds"]) / np.mean(base["train_seconds"])),
        })  # fmt: skip
    return {
        "format_version": FORMAT_VERSION,
        "experiment": exp.name,
        "task": task.name,
        "metric": m,
        "model": exp.base.model,
        "hardware": results[0].get("hardware") or hardware(),  # where the runs ran, not where they were collected
        "date": results[0].get("date") or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": exp.command,
        "wall_seconds": round(seconds, 1),
        "jobs": exp.jobs,
        "precision": results[0]["precision"],
        "settings": {k: v for k, v in asdict(exp.base).items() if k not in ("arm", "seed", "output_dir", "model")},
        "lrs": exp.lrs,
        "lr_selection": selection,
        "arms": arms,
        "comparisons": comparisons,
    }


def collect(run_files: list[Path], output: Path, name: str | None = None, command: str = "", jobs: int = 1,
            notes: str | None = None, overwrite: bool = False, date: str | None = None) -> dict:
    """Assemble results.json, report.md and curves.png from the `result.json` of finished runs (from `run`, or
    from the `runs/` folders of interrupted `compare`s): the same summary `compare` writes."""
    results = [_read_run(Path(f)) for f in run_files]
    if not results:
        raise ValueError("no run results given")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{output} exists and is not empty; pass --overwrite to replace it")
    if len({r["task"] for r in results}) != 1:
        raise ValueError(f"runs of several tasks: {sorted({r['task'] for r in results})}")
    by_arm = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    lrs = {a: sorted({r["lr"] for r in rs}) for a, rs in by_arm.items()}
    if any(len(v) != 1 for v in lrs.values()):
        raise ValueError(f"each arm needs one lr: {lrs}")
    if "baseline" not in by_arm:
        raise ValueError("no run of the arm 'baseline'")
    seeds = {a: sorted(r["seed"] for r in rs) for a, rs in by_arm.items()}
    if len({tuple(v) for v in seeds.values()}) != 1 or any(len(set(v)) != len(v) for v in seeds.values()):
        raise ValueError(f"every arm needs the same seeds, once each: {seeds}")
    first = by_arm["baseline"][0]
    base = RunConfig(**first["config"])
    exp = Experiment(
        name=name or output.name,
        base=base,
        arms=[Arm(name=a, checkpoint=rs[0]["model"]) for a, rs in by_arm.items() if a != "baseline"],
        seeds=seeds["baseline"],
        lrs=sorted({r["lr"] for r in results}),
        jobs=jobs,
        output=output,
        command=command,
        arm_checkpoints={a: rs[0]["model"] for a, rs in by_arm.items()},
    )
    chosen = {a: rs[0]["lr"] for a, rs in by_arm.items()}
    summary = summarise(exp, results, chosen, None, seconds=0.0)
    summary["wall_seconds"] = None
    summary["notes"] = notes
    if date:
        summary["date"] = date
    write_outputs(exp, summary)
    return summary


_RUN_KEYS = ("arm", "seed", "lr", "task", "model", "config", "final", "per_epoch", "before", "predictions")


def _read_run(path: Path) -> dict:
    """One run's result.json, checked to be one (a stray .json file would otherwise fail with a KeyError)."""
    try:
        r = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the run result {path}: {exc}") from None
    missing = [k for k in _RUN_KEYS if not isinstance(r, dict) or k not in r]
    if missing:
        raise ValueError(f"{path} is not a run's result.json (no {', '.join(missing)})")
    return r


def _checkpoint_arm(name: str, checkpoint: str) -> Arm:
    """An arm given as a checkpoint: its conversion settings from the checkpoint's conversion.json, or None where
    that file is not there (not the Arm defaults, which would misreport the layout)."""
    conv = Path(checkpoint) / "conversion.json"
    if not conv.is_file():
        return Arm(name=name, checkpoint=checkpoint, layers=None, num_experts=None, top_k=None, method=None,
                   router=None, partition_seed=None)  # fmt: skip
    c = json.loads(conv.read_text())
    layers = c["routed_layers"]
    spec = "all" if layers == list(range(c["num_hidden_layers"])) else ",".join(str(i) for i in layers)
    return Arm(name=name, checkpoint=checkpoint, layers=spec, num_experts=c["num_experts"], top_k=c["num_experts_per_tok"],
               method=c["method"], router=c["router"], partition_seed=c["seed"])  # fmt: skip


def write_outputs(exp: Experiment, summary: dict):
    """results.json, report.md and curves.png, written to a temporary folder and moved over the output's files."""
    exp.output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".write-", dir=exp.output))
    try:
        (tmp / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot_curves(summary, tmp / "curves.png")
        (tmp / "report.md").write_text(report(summary))
        for f in tmp.iterdir():
            f.replace(exp.output / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def report(s: dict) -> str:
    m = s["metric"]
    lines = [
        f"# {s['experiment']}: LoRA on {s['model']} vs routed, {s['task'].upper()} dev",
        "",
        f"- hardware: {s['hardware']}; date: {s['date']}; {len(next(iter(s['arms'].values()))['seeds'])} seeds per arm; "
        f"{s['jobs']} run(s) at a time on the device"
        + (f"; wall {s['wall_seconds']:.0f} s" if s.get("wall_seconds") else ""),
        f"- command: `{s['command']}`",
        f"- recipe: LoRA r={s['settings']['lora_r']} alpha={s['settings']['lora_alpha']} on "
        f"{','.join(s['settings']['lora_targets'])}, {s['settings']['epochs']:g} epochs, batch {s['settings']['batch_size']}, "
        f"warmup {s['settings']['warmup_ratio']:g}, linear decay, max length {s['settings']['max_length']}, "
        f"precision {s['precision']}",
        f"- headline: **{m} after the final epoch** (no epoch picked on dev), mean ± sample std over seeds",
        *([f"- notes: {s['notes']}"] if s.get("notes") else []),
        "",
        f"| arm | lr | {m} final | before fine-tuning | routing off (k=N) | per-epoch mean | train s | train tok/s | peak GPU MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in s["arms"].items():
        epoch_mean = np.mean(a["per_epoch"], axis=0) if a["per_epoch"] else []
        off = a["final_routing_off"]
        mem = [x for x in a["peak_gpu_mem_bytes"] if x]
        lines.append(
            f"| {name} | {a['config']['lr']:g} | {a['final_mean']:.2f} ± {a['final_std']:.2f} | "
            f"{np.mean(a['before']):.2f} | {'—' if not off else f'{np.mean(off):.2f} ± {np.std(off, ddof=1) if len(off) > 1 else 0:.2f}'} | "
            f"{' → '.join(f'{v:.1f}' for v in epoch_mean)} | {np.mean(a['train_seconds']):.1f} | "
            f"{np.mean(a['train_tokens_per_s']):.0f} | {'—' if not mem else f'{np.mean(mem) / 2**20:.0f}'} |"
        )  # fmt: skip
    lines += ["", "Paired comparisons (treatment − baseline, same seeds):", "",
              "| treatment | Δ mean | 95% CI (paired t) | per-seed Δ | McNemar p (pooled, b/c) | epochs to reach baseline final | time ratio |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in s["comparisons"]:
        lo, hi = c["ci95"]
        mc = "—" if c["mcnemar_p"] is None else f"{c['mcnemar_p']:.3g} ({c['mcnemar_b_baseline_only']}/{c['mcnemar_c_treatment_only']})"
        lines.append(
            f"| {c['treatment']} | {c['delta_mean']:+.2f} | [{_fmt(lo)}, {_fmt(hi)}] | "
            f"{', '.join(f'{d:+.1f}' for d in c['per_seed_delta'])} | {mc} | "
            f"{c['epochs_to_reach_baseline_final'] or 'never'} | {c['time_ratio']:.2f} |"
        )
    if s["lr_selection"]:
        lines += ["", "lr selection on a held-out slice of train (first seed; dev untouched):", ""]
        for arm, sel in s["lr_selection"].items():
            lines.append(f"- {arm}: " + ", ".join(f"lr {lr}: {v:.2f}" for lr, v in sel.items()))
    lines += ["", "![metric vs epoch](curves.png)", ""]
    return "\n".join(lines)


def plot_curves(s: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, a in s["arms"].items():
        if not a["per_epoch"]:
            continue
        curves = np.array([[b, *pe] for b, pe in zip(a["before"], a["per_epoch"])])  # (seeds, epochs + 1)
        x = np.arange(curves.shape[1])
        mean, lo, hi = curves.mean(0), curves.min(0), curves.max(0)
        line = ax.plot(x, mean, marker="o", label=f"{name} (lr {a['config']['lr']:g})")[0]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch (0 = before fine-tuning)")
    ax.set_ylabel(f"dev {s['metric']} (%)")
    ax.set_title(f"{s['task'].upper()}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main_compare(args) -> dict:
    base = RunConfig(**{k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__})
    exp = Experiment(
        name=args.name or Path(args.output).name,
        base=base,
        arms=[parse_arm(a) for a in args.arm],
        seeds=list(args.seeds),
        lrs=list(args.lrs) if args.lrs else [args.lr],
        holdout_fraction=args.lr_holdout,
        jobs=args.jobs,
        output=Path(args.output),
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
        overwrite=args.overwrite,
        command=" ".join(["python -m finetune", *sys.argv[1:]]) if args.command is None else args.command,
    )
    summary = run_experiment(exp, log=lambda msg: print(msg, flush=True))
    print(report(summary))
    return summary
