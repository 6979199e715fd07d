"""Plain LoRA vs routed LoRA: every arm x every seed (x an optional lr grid) with identical settings.

Routed arms are converted once (or given as checkpoints) and reused across seeds. With an lr grid, each arm's lr is
chosen on a held-out slice of train (first seed only), never on dev; dev is then scored with the chosen lr for every
seed. The headline is the final-epoch dev metric; per-epoch numbers are reported, never a best epoch.

Runs go through `runner.run_many` (persistent workers over the visible GPUs). With `resume`, finished runs are kept
and interrupted ones redone; everything in results.json except its "provenance" block, and everything in report.md
above its "How it ran" section, is then byte-identical to an uninterrupted comparison's (the runs are deterministic
per seed). The provenance block holds what depends on when and how the runs were made: date, command, hardware,
jobs, wall and train seconds, throughput, peak memory.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import stats, tasks
from routed_llama.errors import UserError
from routed_llama.io import command_line, write_file, write_json, write_text

from .config import RunConfig
from .runner import RESULT_KEYS, check_count, complete_record, config_record, read_json_strict, resolve_jobs, run_many

FORMAT_VERSION = 2
PLAN_FILE = "compare.json"  # the comparison's settings, written first: what --resume checks against
OUTPUT_FILES = ("results.json", "report.md", "curves.png")
RUNS, SELECTION, CHECKPOINTS = "runs", "lr-selection", "checkpoints"
PROVENANCE_HEADING = "## How it ran"  # report.md from here on depends on when and how the runs were made
BASELINE = "baseline"


# --- settings -------------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    """One routed arm: a `checkpoint` folder, or conversion options applied to the recipe's base model."""

    name: str
    checkpoint: str | None = None  # a routed checkpoint folder; None: convert from the base with the options below
    layers: str | None = "all"
    num_clusters: int | None = 32  # N (config.json: num_experts)
    top_k: int | None = 16  # k, clusters kept per token (config.json: num_experts_per_tok)
    method: str | None = "kmeans"
    router: str | None = "centroid"
    partition_seed: int | None = 0


_ARM_INTS = ("num_clusters", "top_k", "partition_seed")


def parse_arm(spec: str) -> Arm:
    """`name=last8,layers=22-29,num_clusters=32,top_k=16` or `name=x,checkpoint=DIR` -> Arm."""
    values = {}
    for part in spec.split(","):
        if "=" not in part:
            raise UserError(f"--arm wants key=value pairs separated by commas, got {spec!r}")
        k, v = part.split("=", 1)
        values[k.strip().replace("-", "_")] = v.strip()
    known = [f for f in Arm.__dataclass_fields__]
    unknown = sorted(set(values) - set(known))
    if unknown:
        hint = " (N is num_clusters)" if "num_experts" in unknown else ""
        raise UserError(f"unknown --arm keys {unknown}{hint}; known: {known}")
    if not values.get("name"):
        raise UserError(f"--arm needs a name: {spec!r}")
    for k in _ARM_INTS:
        if k in values:
            try:
                values[k] = int(values[k])
            except ValueError:
                raise UserError(f"--arm {values['name']}: {k} must be an integer, got {values[k]!r}") from None
    return check_arm(Arm(**values))


def check_arm(arm: Arm) -> Arm:
    if arm.name == BASELINE:
        raise UserError(f"the routed arms need names other than {BASELINE!r} (the plain arm's name)")
    if arm.checkpoint is None and not (isinstance(arm.top_k, int) and isinstance(arm.num_clusters, int)
                                       and 1 <= arm.top_k <= arm.num_clusters):  # fmt: skip
        raise UserError(f"arm {arm.name}: need 1 <= top_k <= num_clusters, got top_k={arm.top_k}, "
                        f"num_clusters={arm.num_clusters}")  # fmt: skip
    return arm


@dataclass
class CompareSettings:
    """How to compare: the arms, seeds, lr grid and where the results go (the recipe of each run is a RunConfig)."""

    arms: list[str] = field(metadata={"aliases": ["--arm"], "help": (
        "routed arms, e.g. --arm name=last8,layers=22-29,num_clusters=32,top_k=16 --arm name=x,checkpoint=DIR; "
        "the plain arm 'baseline' is always included")})  # fmt: skip
    output: str = field(metadata={"help": "results folder, e.g. results/rte-standin"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    lrs: list[float] | None = field(default=None, metadata={
        "help": "an lr grid: each arm's lr is chosen on a held-out slice of train (not dev); default: the recipe's lr"})
    lr_holdout: float = field(default=0.1, metadata={"help": "fraction of train held out to choose the lr"})
    jobs: int | None = field(default=None, metadata={
        "help": "worker processes, round-robin over the GPUs (default: one per visible GPU, 1 without a GPU)"})
    group: int = field(default=1, metadata={
        "help": "seeds of one arm each worker trains together, packed into one model (fast engine)"})
    name: str | None = field(default=None, metadata={"help": "experiment name (default: the output folder's name)"})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "where routed arms are converted (default OUTPUT/checkpoints; a finished conversion is reused)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the results of an earlier comparison"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted comparison: keep finished runs"})
    command: str | None = field(default=None, metadata={"help": "the command recorded (default: as run)"})
    arm_list: list[Arm] = field(init=False, repr=False)

    def __post_init__(self):
        self.arm_list = [check_arm(a) if isinstance(a, Arm) else parse_arm(a) for a in self.arms]
        names = [BASELINE, *(a.name for a in self.arm_list)]
        if not self.arm_list:
            raise UserError("need at least one routed arm (--arm)")
        if len(set(names)) != len(names):
            raise UserError(f"arm names repeat: {names}")
        if not self.seeds:
            raise UserError("need at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds repeat: {self.seeds}")
        if self.lrs is not None and (not self.lrs or any(not lr > 0 for lr in self.lrs)):
            raise UserError(f"learning rates must be > 0, got {self.lrs}")
        if self.lrs is not None and len(set(self.lrs)) != len(self.lrs):
            raise UserError(f"learning rates repeat: {self.lrs}")
        if not 0 < self.lr_holdout < 1:
            raise UserError(f"lr_holdout must be in (0, 1), got {self.lr_holdout}")
        if self.jobs is not None:
            check_count("jobs", self.jobs)
        check_count("group", self.group)
        if not self.output:
            raise UserError("need an output folder")
        if self.overwrite and self.resume:
            raise UserError("--overwrite and --resume exclude each other (replace the runs, or keep them)")

    def workers(self) -> int:
        """`jobs`, or one worker per visible GPU when not given (`runner.resolve_jobs`)."""
        return resolve_jobs(self.jobs)


def _plan(settings: CompareSettings, recipe: RunConfig) -> dict:
    """What makes the comparison's results: an interrupted comparison may only be resumed with the same plan."""
    return {"format_version": FORMAT_VERSION, "recipe": config_record(recipe),
            "arms": [asdict(a) for a in settings.arm_list], "seeds": list(settings.seeds),
            "lrs": _lrs(settings, recipe), "lr_holdout": settings.lr_holdout,
            "checkpoint_dir": settings.checkpoint_dir}  # fmt: skip


def _lrs(settings: CompareSettings, recipe: RunConfig) -> list[float]:
    return list(settings.lrs) if settings.lrs else [recipe.lr]


# --- checks before any model is loaded ------------------------------------------------------------------------------


def check_inputs(settings: CompareSettings, recipe: RunConfig):
    """The recipe, the data, the base model and the arms' checkpoints: everything checkable before heavy work."""
    from routed_llama.source import resolve_source

    from .models import is_routed_checkpoint

    recipe.validate()
    task = tasks.get_task(recipe.task)
    tasks.load_split(task, "train", recipe.data_dir, recipe.max_train_samples)
    tasks.load_split(task, "validation", recipe.data_dir, recipe.max_eval_samples)
    resolve_source(recipe.model)  # the base must exist (the Hub is checked when loading)
    for arm in settings.arm_list:
        if arm.checkpoint is not None and not is_routed_checkpoint(arm.checkpoint):
            raise UserError(f"arm {arm.name}: {arm.checkpoint} is not a routed checkpoint")
    check_conversions(settings, recipe)


def start_output(settings: CompareSettings, recipe: RunConfig):
    """Make the output folder ready: refuse a non-empty one (unless overwrite or resume), clear what --overwrite
    replaces (only the files compare writes; converted checkpoints are reused when they match), record the plan."""
    out = Path(settings.output)
    plan, plan_file = _plan(settings, recipe), out / PLAN_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if settings.resume:
            if not plan_file.is_file():
                raise UserError(f"{out} holds no {PLAN_FILE}: not a comparison that can be resumed")
            recorded = read_json_strict(plan_file)
            if isinstance(recorded, dict) and isinstance(recorded.get("recipe"), dict):
                recorded["recipe"] = complete_record(recorded["recipe"])  # a plan from before a RunConfig field
            if recorded != json.loads(json.dumps(plan)):
                raise UserError(f"{out} holds a comparison with other settings; --resume needs the same ones")
            return
        if not settings.overwrite:
            raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it or --resume to continue it")
        for name in (RUNS, SELECTION, PLAN_FILE, *OUTPUT_FILES):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, plan)


# --- routed checkpoints ---------------------------------------------------------------------------------------------


def _conversion_matches(record: dict, arm: Arm) -> bool:
    from routed_llama.surgery import parse_layers

    layers = parse_layers(arm.layers, record["num_hidden_layers"])
    want = {"num_experts": arm.num_clusters, "num_experts_per_tok": arm.top_k, "method": arm.method,
            "router": arm.router, "seed": arm.partition_seed, "routed_layers": layers}  # fmt: skip
    return all(record.get(k) == v for k, v in want.items())


def _conversion_settings(base: str, target: Path, arm: Arm):
    """The converter's settings for `arm` (checked as they are made: a bad method or layer spec is a UserError)."""
    import convert

    try:
        return convert.ConvertSettings(model=base, out_dir=str(target), num_clusters=arm.num_clusters,
                                       top_k=arm.top_k, layers=arm.layers, seed=arm.partition_seed, method=arm.method,
                                       router=arm.router, progress=False)  # fmt: skip
    except UserError as exc:
        raise UserError(f"arm {arm.name}: {exc}") from None


def check_conversions(settings: CompareSettings, recipe: RunConfig):
    """The arms to convert fit the base: their settings, layers and cluster counts against its config (no weight
    is read)."""
    todo = [a for a in settings.arm_list if a.checkpoint is None]
    if not todo:
        return
    from routed_llama.source import load_base_config, resolve_source
    from routed_llama.surgery import check_fits

    config = load_base_config(resolve_source(recipe.model))
    for arm in todo:
        _conversion_settings(recipe.model, Path(settings.output) / CHECKPOINTS / arm.name, arm)
        check_fits(config, arm.layers, arm.num_clusters, f"arm {arm.name}")


def converted(base: str, target: Path, arm, log) -> Path:
    """The routed checkpoint of `arm` (an Arm or anything with its conversion fields) in `target`: a matching finished
    conversion there is reused, none is converted; another conversion there is an error."""
    import convert

    record = target / "conversion.json"
    if record.is_file():
        if not _conversion_matches(json.loads(record.read_text()), arm):
            raise UserError(f"{target} holds a different conversion than {arm.name}; remove it or pick another "
                            "checkpoint dir")  # fmt: skip
        log(f"reusing the routed checkpoint {target}")
        return target
    log(f"converting {base} for {arm.name} (layers {arm.layers}, N={arm.num_clusters}, k={arm.top_k}, {arm.method}, "
        f"{arm.router} router)")  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(convert.convert(_conversion_settings(base, target, arm), log=log))


def prepare_checkpoints(settings: CompareSettings, recipe: RunConfig, log) -> dict[str, str]:
    """{arm: model reference}: every routed arm converted once (a matching finished conversion is reused)."""
    refs = {BASELINE: recipe.model}
    ckdir = Path(settings.checkpoint_dir) if settings.checkpoint_dir else Path(settings.output) / CHECKPOINTS
    for arm in settings.arm_list:
        if arm.checkpoint is not None:
            refs[arm.name] = arm.checkpoint
            continue
        refs[arm.name] = str(converted(recipe.model, ckdir / arm.name, arm, log))
    return refs


# --- the comparison -------------------------------------------------------------------------------------------------


def choose_lrs(settings: CompareSettings, recipe: RunConfig, refs: dict, log) -> tuple[dict, dict | None]:
    """({arm: lr}, {arm: {lr: held-out metric}} or None): with several lrs, each arm's best on a held-out slice of
    train (a tie goes to the lr given first), first seed; dev is not touched."""
    lrs = _lrs(settings, recipe)
    if len(lrs) == 1:
        return {a: lrs[0] for a in refs}, None
    seed = settings.seeds[0]
    log(f"choosing lr per arm on a {settings.lr_holdout:.0%} held-out slice of train (seed {seed})")
    pairs = [(a, lr) for a in refs for lr in lrs]
    configs = [replace(recipe, model=refs[a], arm=a, seed=seed, lr=lr, holdout_fraction=settings.lr_holdout,
                       eval_routing_off=False) for a, lr in pairs]  # fmt: skip
    dirs = [Path(settings.output) / SELECTION / f"{a}-lr{lr:g}" for a, lr in pairs]
    results = run_many(configs, dirs, settings.workers(), settings.resume, log, group=settings.group)
    primary = tasks.get_task(recipe.task).primary
    selection = {a: {} for a in refs}
    for r in results:
        selection[r["arm"]][str(r["lr"])] = r["final"][primary]
    chosen = {a: float(max(s.items(), key=lambda kv: kv[1])[0]) for a, s in selection.items()}
    log("chosen lr: " + ", ".join(f"{a} {lr:g}" for a, lr in chosen.items()))
    return chosen, selection


def compare(settings: CompareSettings, recipe: RunConfig | None = None, log=print) -> dict:
    """Fine-tune the plain arm and every routed arm with every seed under one recipe; write results.json,
    report.md and curves.png to the output folder; return the summary."""
    recipe = recipe or RunConfig()
    t0 = time.perf_counter()
    check_inputs(settings, recipe)
    start_output(settings, recipe)
    refs = prepare_checkpoints(settings, recipe, log)
    chosen, selection = choose_lrs(settings, recipe, refs, log)
    pairs = [(a, s) for s in settings.seeds for a in refs]
    configs = [replace(recipe, model=refs[a], arm=a, seed=s, lr=chosen[a], holdout_fraction=None) for a, s in pairs]
    dirs = [Path(settings.output) / RUNS / f"{a}-seed{s}" for a, s in pairs]
    results = run_many(configs, dirs, settings.workers(), settings.resume, log, group=settings.group)
    arms = {BASELINE: {"name": BASELINE}}
    arms.update({a.name: asdict(a) if a.checkpoint is None else _checkpoint_arm(a.name, a.checkpoint)
                 for a in settings.arm_list})  # fmt: skip
    summary = summarise(results, arms, Path(settings.output).name if settings.name is None else settings.name,
                        selection)  # fmt: skip
    command = settings.command if settings.command is not None else command_line()
    summary["provenance"] = provenance(results, summary, command, settings.workers(), time.perf_counter() - t0)
    write_outputs(Path(settings.output), summary)
    return summary


# --- the summary ----------------------------------------------------------------------------------------------------


def _arm_summary(rs: list[dict], arm_config: dict, metric: str) -> dict:
    """One arm's runs (sorted by seed) -> the numbers the report needs."""
    final = [r["final"][metric] for r in rs]
    mean, std = stats.mean_std(final)
    off = [r["final_routing_off"][metric] for r in rs if r.get("final_routing_off")]
    return {
        "config": {**arm_config, "model": rs[0]["model"], "lr": rs[0]["lr"]},
        "seeds": [r["seed"] for r in rs],
        "final": final,
        "final_mean": mean,
        "final_std": std,
        "final_std_reason": None if std is not None else "one seed",
        "final_all_metrics": [r["final"] for r in rs],
        "before": [r["before"][metric] for r in rs],
        "per_epoch": [[e[metric] for e in r["per_epoch"]] for r in rs],
        "final_routing_off": off or None,
        "predictions": [r["predictions"] for r in rs],
        "labels": rs[0]["labels"],
        "correct": [r["correct"] for r in rs],
    }


def _comparison(name: str, arm: dict, base: dict, metric: str) -> dict:
    """Treatment `name` against the baseline, paired by seed."""
    delta, (lo, hi) = stats.paired_ci(arm["final"], base["final"])
    per_seed = None
    if arm["correct"][0] is not None:
        per_seed = [{"seed": s, **mc} for s, mc in zip(arm["seeds"], stats.mcnemar_per_seed(arm["correct"], base["correct"]))]
    base_epoch_mean = np.mean(base["per_epoch"], axis=0)
    return {
        "baseline": BASELINE,
        "treatment": name,
        "metric": metric,
        "delta_mean": delta,
        "ci95": [lo, hi],
        "ci95_reason": None if lo is not None else "fewer than two seeds",
        "per_seed_delta": [a - b for a, b in zip(arm["final"], base["final"])],
        "paired_t": stats.paired_t(arm["final"], base["final"]),
        "sign_flip": stats.sign_flip(arm["final"], base["final"]),
        "mcnemar_per_seed": per_seed,
        "epochs_to_reach_baseline_final": stats.epochs_to_reach(np.mean(arm["per_epoch"], axis=0), base["final_mean"]),
        "baseline_epochs_to_reach_own_final": stats.epochs_to_reach(base_epoch_mean, base["final_mean"]),
    }


STATISTICS = {
    "unit": "seed",
    "delta_ci": "95% Student-t interval of the per-seed differences (scipy.stats.ttest_rel)",
    "tests": "two-sided paired t over seeds (scipy.stats.ttest_rel) and exact two-sided sign-flip permutation "
             "over seeds (scipy.stats.permutation_test; smallest attainable p = 2/2^seeds)",
    "mcnemar": "exact McNemar (scipy.stats.binomtest) per seed only; pooling the same dev examples over seeds would "
               "treat them as independent and overstate significance",
}  # fmt: skip


def summarise(results: list[dict], arm_configs: dict[str, dict], name: str, selection: dict | None) -> dict:
    """The deterministic part of results.json: a function of the runs' results alone (arms in `arm_configs`
    order, seeds ascending)."""
    task = tasks.get_task(results[0]["task"])
    metric = task.primary
    arms = {}
    for arm, config in arm_configs.items():
        rs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        arms[arm] = _arm_summary(rs, config, metric)
    base = arms[BASELINE]
    comparisons = [_comparison(a, arms[a], base, metric) for a in arms if a != BASELINE]
    first = next(r for r in results if r["arm"] == BASELINE)
    skip = ("arm", "seed", "lr", "output_dir", "model")
    return {
        "format_version": FORMAT_VERSION,
        "experiment": name,
        "task": task.name,
        "metric": metric,
        "model": first["model"],
        "precision": first["precision"],
        "settings": {k: v for k, v in first["config"].items() if k not in skip},
        "lrs": sorted({r["lr"] for r in results}),
        "lr_selection": selection,
        "statistics": STATISTICS,
        "arms": arms,
        "comparisons": comparisons,
        "notes": None,
    }


def provenance(results: list[dict], summary: dict, command: str, jobs: int | None, seconds: float | None,
               date: str | None = None) -> dict:  # fmt: skip
    """How the runs were made: what a resumed comparison need not share with an uninterrupted one. `devices`: the
    GPUs (CUDA_VISIBLE_DEVICES entries) the runs recorded, each run on one (None: none recorded)."""
    timing = {}
    for arm, a in summary["arms"].items():
        rs = {r["seed"]: r for r in results if r["arm"] == arm}
        timing[arm] = {k: [rs[s].get(k) for s in a["seeds"]] for k in ("train_seconds", "train_tokens_per_s", "peak_gpu_mem_bytes")}
    base_s = np.mean(timing[BASELINE]["train_seconds"])
    dates = sorted(r["date"] for r in results if r.get("date"))
    return {
        "hardware": results[0].get("hardware"),  # where the runs ran (each run sees its one GPU), not where collected
        "devices": sorted({r["device"] for r in results if r.get("device")}) or None,
        "date": date or (f"{dates[0]} .. {dates[-1]}" if dates and dates[0] != dates[-1] else (dates or [None])[0]),
        "command": command,
        "jobs": jobs,
        "wall_seconds": None if seconds is None else round(seconds, 1),
        "timing": timing,
        "time_ratio": {c["treatment"]: float(np.mean(timing[c["treatment"]]["train_seconds"]) / base_s)
                       for c in summary["comparisons"]},  # fmt: skip
    }


# --- collect --------------------------------------------------------------------------------------------------------


@dataclass
class CollectSettings:
    """Assemble the comparison report from finished runs' result.json files (e.g. runs made one by one on several
    machines, or the runs/ folder of a comparison)."""

    results: list[str] = field(metadata={"help": "run result files, or folders searched for result.json "
                                                 "(a folder without any: its *.json files)"})  # fmt: skip
    output: str = field(metadata={"help": "results folder"})
    name: str | None = field(default=None, metadata={"help": "experiment name (default: the output folder's name)"})
    command: str | None = field(default=None, metadata={"help": "the command that produced the runs, recorded as is"})
    jobs: int | None = field(default=None, metadata={"help": "how many runs shared the device at a time"})
    notes: str | None = field(default=None, metadata={"help": "free text recorded in results.json and the report"})
    date: str | None = field(default=None, metadata={"help": "when the runs were made (default: from the runs)"})
    conversions: list[str] = field(default_factory=list, metadata={
        "help": "ARM=PATH: that arm's conversion.json, where its checkpoint folder is not at hand"})
    overwrite: bool = False

    def __post_init__(self):
        if not self.results:
            raise UserError("no run results given")
        if self.jobs is not None:
            check_count("jobs", self.jobs)
        for c in self.conversions:
            if "=" not in c:
                raise UserError(f"--conversions wants ARM=PATH, got {c!r}")


def run_files(paths: list[str]) -> list[Path]:
    """The run result files among `paths`: files as given; in a folder, every result.json below it (a compare's
    runs/ holds one folder per run), else its *.json files (a folder of run files, the older layout)."""
    files = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():  # a compare's runs/ (adapter folders hold other .json files), or a folder of run files
            files += sorted(p.rglob("result.json")) or sorted(p.glob("*.json"))
        else:
            raise UserError(f"no such file or folder: {p}")
    return files


def _read_run(path: Path) -> dict:
    """One run's result.json, checked to be one (a stray .json file would otherwise fail with a KeyError)."""
    try:
        r = read_json_strict(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the run result {path}: {exc}") from None
    missing = [k for k in RESULT_KEYS if not isinstance(r, dict) or k not in r]
    if missing:
        raise UserError(f"{path} is not a run's result.json (no {', '.join(missing)})")
    return r


def _check_runs(by_arm: dict[str, list[dict]]):
    if len({r["task"] for rs in by_arm.values() for r in rs}) != 1:
        raise UserError(f"runs of several tasks: {sorted({r['task'] for rs in by_arm.values() for r in rs})}")
    lrs = {a: sorted({r["lr"] for r in rs}) for a, rs in by_arm.items()}
    if any(len(v) != 1 for v in lrs.values()):
        raise UserError(f"each arm needs one lr: {lrs}")
    if BASELINE not in by_arm:
        raise UserError(f"no run of the arm {BASELINE!r}")
    seeds = {a: sorted(r["seed"] for r in rs) for a, rs in by_arm.items()}
    if len({tuple(v) for v in seeds.values()}) != 1 or any(len(set(v)) != len(v) for v in seeds.values()):
        raise UserError(f"every arm needs the same seeds, once each: {seeds}")


def collect(settings: CollectSettings) -> dict:
    """results.json, report.md and curves.png from finished runs: the summary `compare` writes."""
    out = Path(settings.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not settings.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    results = [_read_run(f) for f in run_files(settings.results)]
    if not results:
        raise UserError("no run results found")
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    _check_runs(by_arm)
    given = dict(c.split("=", 1) for c in settings.conversions)
    unknown = sorted(set(given) - set(by_arm))
    if unknown:
        raise UserError(f"--conversions names arms with no runs: {unknown}")
    arms = {BASELINE: {"name": BASELINE}}
    for a, rs in by_arm.items():
        if a != BASELINE:
            arms[a] = _checkpoint_arm(a, rs[0]["model"], given.get(a))
    summary = summarise(results, arms, settings.name or out.name, None)
    summary["notes"] = settings.notes
    summary["provenance"] = provenance(results, summary, settings.command or "", settings.jobs, None, settings.date)
    write_outputs(out, summary)
    return summary


def _checkpoint_arm(name: str, checkpoint: str, record: str | None = None) -> dict:
    """An arm given as a checkpoint: its conversion settings from `record` or the checkpoint's conversion.json;
    None where neither is there (not the Arm defaults, which would misreport the layout)."""
    conv = Path(record) if record else Path(checkpoint) / "conversion.json"
    if not conv.is_file():
        if record:
            raise UserError(f"no conversion record {conv}")
        return asdict(Arm(name=name, checkpoint=checkpoint, layers=None, num_clusters=None, top_k=None, method=None,
                          router=None, partition_seed=None))  # fmt: skip
    c = json.loads(conv.read_text())
    layers = c["routed_layers"]
    spec = "all" if layers == list(range(c["num_hidden_layers"])) else ",".join(str(i) for i in layers)
    return asdict(Arm(name=name, checkpoint=checkpoint, layers=spec, num_clusters=c["num_experts"],
                      top_k=c["num_experts_per_tok"], method=c["method"], router=c["router"],
                      partition_seed=c["seed"]))  # fmt: skip


# --- outputs --------------------------------------------------------------------------------------------------------


def write_outputs(out: Path, summary: dict):
    """results.json, report.md and curves.png, each written beside and renamed into place (`io.write_file`)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", summary, indent=1)
    write_file(out / "curves.png", lambda p: plot_curves(summary, p))
    write_text(out / "report.md", report(summary))


def _fmt(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def _p(test: dict) -> str:
    return f"{test['p']:.3g}" if test["p"] is not None else f"— ({test['reason']})"


def _arm_row(name: str, a: dict) -> str:
    off = a["final_routing_off"]
    off_text = "—" if not off else f"{np.mean(off):.2f} ± {_fmt(stats.mean_std(off)[1])}"
    epochs = " → ".join(f"{v:.1f}" for v in np.mean(a["per_epoch"], axis=0))
    return (f"| {name} | {a['config']['lr']:g} | {a['final_mean']:.2f} ± {_fmt(a['final_std'])} | "
            f"{np.mean(a['before']):.2f} | {off_text} | {epochs} |")  # fmt: skip


def _comparison_row(c: dict) -> str:
    lo, hi = c["ci95"]
    return (f"| {c['treatment']} | {c['delta_mean']:+.2f} | [{_fmt(lo)}, {_fmt(hi)}] | "
            f"{', '.join(f'{d:+.1f}' for d in c['per_seed_delta'])} | {_p(c['paired_t'])} | {_p(c['sign_flip'])} | "
            f"{c['epochs_to_reach_baseline_final'] or 'never'} |")  # fmt: skip


def _mcnemar_lines(s: dict) -> list[str]:
    rows = [c for c in s["comparisons"] if c["mcnemar_per_seed"]]
    if not rows:
        return []
    seeds = [m["seed"] for m in rows[0]["mcnemar_per_seed"]]
    lines = ["", "Exact McNemar per seed (p, and b/c = examples only the baseline / only the treatment gets right); "
             "not pooled over seeds:", "", "| treatment | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]  # fmt: skip
    for c in rows:
        cells = [f"{m['p']:.3g} ({m['b']}/{m['c']})" for m in c["mcnemar_per_seed"]]
        lines.append(f"| {c['treatment']} | " + " | ".join(cells) + " |")
    return lines


def _header_lines(s: dict) -> list[str]:
    st, m = s["settings"], s["metric"]
    seeds = next(iter(s["arms"].values()))["seeds"]
    return [
        f"# {s['experiment']}: LoRA on {s['model']} vs routed, {s['task'].upper()} dev",
        "",
        f"- recipe: LoRA r={st['lora_r']} alpha={st['lora_alpha']} on {','.join(st['lora_targets'])}, "
        f"{st['epochs']:g} epochs, batch {st['batch_size']}, warmup {st['warmup_ratio']:g}, linear decay, "
        f"max length {st['max_length']}, precision {s['precision']}"
        + (", decoder layers compiled (--compile)" if st.get("compile") else ""),
        f"- seeds: {', '.join(map(str, seeds))} ({len(seeds)} per arm, paired across arms)",
        f"- headline: **{m} after the final epoch** (no epoch picked on dev), mean ± sample std over seeds",
        f"- statistics (unit: the seed): Δ with a {s['statistics']['delta_ci']}; p: {s['statistics']['tests']}; "
        f"{s['statistics']['mcnemar']}",
        *([f"- notes: {s['notes']}"] if s.get("notes") else []),
    ]


def _provenance_lines(s: dict) -> list[str]:
    p = s["provenance"]
    lines = [PROVENANCE_HEADING, "", "Wall-clock and provenance (differs between a resumed and an uninterrupted run):",
             "", f"- hardware: {p['hardware']}"
             + (f" per run; GPUs used: {','.join(p['devices'])}" if p.get("devices") else "")
             + f"; date: {p['date']}; "
             f"{p['jobs'] if p['jobs'] is not None else '?'} run(s) at a time"
             + (f"; wall {p['wall_seconds']:.0f} s" if p.get("wall_seconds") else ""),
             f"- command: `{p['command']}`", "",
             "| arm | train s | train tok/s | peak GPU MiB | time ratio |", "|---|---|---|---|---|"]  # fmt: skip
    for name, t in p["timing"].items():
        mem = [x for x in t["peak_gpu_mem_bytes"] if x]
        ratio = p["time_ratio"].get(name)
        lines.append(f"| {name} | {np.mean(t['train_seconds']):.1f} | {np.mean(t['train_tokens_per_s']):.0f} | "
                     f"{'—' if not mem else f'{np.mean(mem) / 2**20:.0f}'} | {_fmt(ratio)} |")  # fmt: skip
    return lines


def report(s: dict) -> str:
    """report.md: the deterministic part, then (from PROVENANCE_HEADING) how and when the runs were made."""
    m = s["metric"]
    lines = [*_header_lines(s), "",
             f"| arm | lr | {m} final | before fine-tuning | routing off (k=N) | per-epoch mean |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [_arm_row(name, a) for name, a in s["arms"].items()]
    lines += ["", "Paired comparisons (treatment − baseline, same seeds):", "",
              "| treatment | Δ mean | 95% CI (paired t) | per-seed Δ | p (paired t, seeds) | p (sign-flip, seeds) | "
              "epochs to reach baseline final |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [_comparison_row(c) for c in s["comparisons"]]
    lines += _mcnemar_lines(s)
    if s["lr_selection"]:
        lines += ["", "lr selection on a held-out slice of train (first seed; dev untouched):", ""]
        lines += [f"- {a}: " + ", ".join(f"lr {lr}: {v:.2f}" for lr, v in sel.items()) for a, sel in s["lr_selection"].items()]
    lines += ["", "![metric vs epoch](curves.png)", "", *_provenance_lines(s), ""]
    return "\n".join(lines)


def plot_curves(s: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, a in s["arms"].items():
        curves = np.array([[b, *pe] for b, pe in zip(a["before"], a["per_epoch"])])  # (seeds, epochs + 1)
        x = np.arange(curves.shape[1])
        line = ax.plot(x, curves.mean(0), marker="o", label=f"{name} (lr {a['config']['lr']:g})")[0]
        ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch (0 = before fine-tuning)")
    ax.set_ylabel(f"dev {s['metric']} (%)")
    ax.set_title(f"{s['task'].upper()}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same data give the same bytes
    plt.close(fig)
