"""python -m finetune sweep: a pre-registered plan of routed-LoRA configs x GLUE tasks x seeds, against plain LoRA.

The plan (a JSON file, committed before any of its runs) fixes everything: the tasks, the recipe every arm shares,
the routed configs, the seeds and the analysis. The sweep runs it in stages, in the plan's `stage_order`:

- "lr": plain LoRA per task on a held-out slice of train (never dev), every lr of the grid x the lr seeds; the lr
  with the best mean holdout metric (ties: the smaller lr) is used by every arm of that task;
- "round1": plain and every config x every task x the round-1 seeds, ordered so that an interrupted sweep has
  finished whole (arm, task) cells in priority order;
- "confirmation": the config with the best mean standardised Δ on the selection tasks, re-run with fresh seeds on
  the held-out tasks, together with plain on those seeds.

Every run writes its own result.json under OUTPUT/runs/; with `resume` a run whose result.json exists is kept and
an interrupted one is redone. The statistics and the report are rebuilt from those files at the end of every
invocation, so they always describe what has been run so far.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import tasks
from .config import RunConfig
from .runner import check_count, resolve_jobs

from routed_llama.errors import UserError

PROG = "python -m finetune sweep"
PLAN_FORMAT = "routed-llama-sweep-plan/1"
PLAIN = "plain"
STAGES = ("lr", "round1", "confirmation")
_PER_RUN = {"task", "model", "arm", "seed", "lr", "holdout_fraction", "data_dir", "output_dir", "eval_routing_off"}
_PLAN_KEYS = {"format", "name", "written", "question", "model", "data_dir", "tasks", "recipe", "stage_order",
              "lr_selection", "configs", "reference", "round1", "confirmation", "analysis"}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SweepSettings:
    """Settings of `python -m finetune sweep`."""

    plan: str = field(metadata={"help": "the plan JSON (e.g. results/sweep/plan.json)"})
    output: str = field(metadata={"help": "results folder: plan.json, runs/, results.json, report.md, figures"})
    resume: bool = field(default=False, metadata={"help": "keep finished runs in OUTPUT and redo interrupted ones"})
    jobs: int | None = field(default=None, metadata={
        "help": "worker processes, round-robin over the GPUs (default: one per visible GPU, 1 without a GPU)"})
    group: int = field(default=1, metadata={"help": "seeds of one cell each worker trains together, packed into one "
                                                    "model (fast engine)"})  # fmt: skip
    only_stage: list[str] = field(default_factory=lambda: list(STAGES),
                                  metadata={"help": f"run only these stages ({', '.join(STAGES)}; 'report': run "
                                                    "nothing, rewrite the report); the report always covers every "
                                                    "finished run"})  # fmt: skip
    only_task: list[str] | None = field(default=None, metadata={
        "help": "run only these tasks' cells (e.g. `--only-stage round1 --only-task rte mrpc`: the selection tasks, "
                "all that the confirmation round's choice needs); None: every task of the plan"})  # fmt: skip
    data_dir: str | None = field(default=None, metadata={"help": "local GLUE folder; None: the plan's data_dir"})
    model: str | None = field(default=None, metadata={"help": "where to load the plan's base model from (the same "
                                                              "weights, e.g. the stand-in exported to a folder); "
                                                              "None: the plan's model"})  # fmt: skip
    checkpoint_dir: str = field(default="outputs/sweep-checkpoints",
                                metadata={"help": "where each routed config is converted once (reused when there)"})
    budget_s: float | None = field(default=None, metadata={"help": "seconds: start no batch of runs that would end "
                                                                   "later (estimated from the last batch), then write "
                                                                   "the report; None: no limit"})  # fmt: skip

    def __post_init__(self):
        self.only_stage = list(self.only_stage)
        bad = [s for s in self.only_stage if s not in (*STAGES, "report")]
        if bad or not self.only_stage:
            raise UserError(f"--only-stage takes {', '.join(STAGES)} or report; got {self.only_stage}")
        if self.jobs is not None:
            check_count("--jobs", self.jobs)
        check_count("--group", self.group)
        if self.budget_s is not None and not self.budget_s > 0:
            raise UserError(f"--budget-s must be > 0, got {self.budget_s}")


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutedConfig:
    """One routed arm: how the base is converted (N = num_clusters, k = top_k clusters kept per token)."""

    name: str
    layers: str
    num_clusters: int
    top_k: int
    method: str = "kmeans"
    router: str = "centroid"
    partition_seed: int = 0
    description: str = ""


@dataclass(frozen=True)
class Plan:
    """A parsed plan; `raw` is the JSON as read (what OUTPUT/plan.json must equal)."""

    name: str
    model: str
    data_dir: str | None
    tasks: tuple[str, ...]
    recipe: dict
    stage_order: tuple[str, ...]
    lr_grid: tuple[float, ...]
    lr_seeds: tuple[int, ...]
    holdout_fraction: float
    configs: tuple[RoutedConfig, ...]
    reference: str
    round1_seeds: tuple[int, ...]
    select_tasks: tuple[str, ...]
    confirm_tasks: tuple[str, ...]
    confirm_seeds: tuple[int, ...]
    analysis: dict
    raw: dict

    def config(self, name: str) -> RoutedConfig:
        return next(c for c in self.configs if c.name == name)

    @property
    def metrics(self) -> dict[str, str]:
        return {t: tasks.get_task(t).primary for t in self.tasks}


def _get(d: dict, key: str, where: str):
    if key not in d:
        raise UserError(f"plan: {where} has no {key!r}")
    return d[key]


def _seeds(values, where: str) -> tuple[int, ...]:
    if not isinstance(values, list) or not values or not all(isinstance(s, int) for s in values):
        raise UserError(f"plan: {where} seeds must be a non-empty list of integers, got {values!r}")
    if len(set(values)) != len(values):
        raise UserError(f"plan: {where} seeds repeat: {values}")
    if len(values) < 2:
        raise UserError(f"plan: {where} needs at least 2 seeds (a paired CI needs them), got {values}")
    return tuple(values)


def read_plan(path: str | Path) -> Plan:
    """Parse and check a plan's structure (no model or data is read)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the plan {path}: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise UserError(f"{path} is not a sweep plan (format must be {PLAN_FORMAT!r})")
    unknown = sorted(set(raw) - _PLAN_KEYS)
    if unknown:
        raise UserError(f"plan: unknown keys {unknown}")
    plan_tasks = _tasks(_get(raw, "tasks", "the plan"))
    lr, r1, cf = (_get(raw, k, "the plan") for k in ("lr_selection", "round1", "confirmation"))
    plan = Plan(
        name=str(_get(raw, "name", "the plan")),
        model=str(_get(raw, "model", "the plan")),
        data_dir=raw.get("data_dir"),
        tasks=plan_tasks,
        recipe=_recipe(_get(raw, "recipe", "the plan")),
        stage_order=tuple(_get(raw, "stage_order", "the plan")),
        lr_grid=tuple(float(x) for x in _get(lr, "grid", "lr_selection")),
        lr_seeds=_seeds(_get(lr, "seeds", "lr_selection"), "lr_selection"),
        holdout_fraction=float(_get(lr, "holdout_fraction", "lr_selection")),
        configs=tuple(_routed_config(c) for c in _get(raw, "configs", "the plan")),
        reference=str(_get(raw, "reference", "the plan")),
        round1_seeds=_seeds(_get(r1, "seeds", "round1"), "round1"),
        select_tasks=tuple(_tasks(_get(cf, "select_on", "confirmation"))),
        confirm_tasks=tuple(_tasks(_get(cf, "tasks", "confirmation"))),
        confirm_seeds=_seeds(_get(cf, "seeds", "confirmation"), "confirmation"),
        analysis=dict(_get(raw, "analysis", "the plan")),
        raw=raw,
    )
    _check_structure(plan)
    return plan


def _tasks(names) -> tuple[str, ...]:
    if not isinstance(names, (list, dict)) or not names:
        raise UserError(f"plan: tasks must be a non-empty list (or task -> metric), got {names!r}")
    try:
        out = tuple(tasks.get_task(n).name for n in names)
    except ValueError as exc:  # TaskError: an unknown task
        raise UserError(f"plan: {exc}") from None
    if isinstance(names, dict):  # the plan states each task's metric: it must be the registry's
        for n, m in names.items():
            if tasks.get_task(n).primary != m:
                raise UserError(f"plan: task {n}'s metric is {tasks.get_task(n).primary}, the plan says {m!r}")
    if len(set(out)) != len(out):
        raise UserError(f"plan: tasks repeat: {list(names)}")
    return out


def _recipe(recipe: dict) -> dict:
    if not isinstance(recipe, dict):
        raise UserError("plan: recipe must be an object of RunConfig fields")
    fields_ = set(RunConfig.__dataclass_fields__) - _PER_RUN
    unknown = sorted(set(recipe) - fields_)
    if unknown:
        raise UserError(f"plan: recipe keys {unknown} are not shared recipe fields; allowed: {sorted(fields_)}")
    return dict(recipe)


def _routed_config(c: dict) -> RoutedConfig:
    if not isinstance(c, dict):
        raise UserError(f"plan: a config must be an object, got {c!r}")
    known = set(RoutedConfig.__dataclass_fields__)
    unknown = sorted(set(c) - known)
    if unknown:
        raise UserError(f"plan: config {c.get('name')!r} has unknown keys {unknown}; known: {sorted(known)}")
    try:
        rc = RoutedConfig(**c)
    except TypeError as exc:
        raise UserError(f"plan: config {c.get('name')!r}: {exc}") from None
    for name, tp in (("name", str), ("layers", str), ("num_clusters", int), ("top_k", int), ("partition_seed", int),
                     ("method", str), ("router", str), ("description", str)):  # fmt: skip
        value = getattr(rc, name)
        if not isinstance(value, tp) or isinstance(value, bool) or (tp is str and name == "name" and not value):
            raise UserError(f"plan: config {c.get('name')!r}: {name} must be of type {tp.__name__}, got {value!r}")
    if not 1 <= int(rc.top_k) <= int(rc.num_clusters):
        raise UserError(f"plan: config {rc.name}: need 1 <= top_k <= num_clusters, got k={rc.top_k}, "
                        f"N={rc.num_clusters}")  # fmt: skip
    if rc.method not in ("kmeans", "random"):
        raise UserError(f"plan: config {rc.name}: method must be kmeans or random, got {rc.method!r}")
    if rc.router not in ("centroid", "activation"):
        raise UserError(f"plan: config {rc.name}: router must be centroid or activation, got {rc.router!r}")
    return rc


def _check_structure(plan: Plan):
    names = [c.name for c in plan.configs]
    if not names or len(set(names)) != len(names) or PLAIN in names:
        raise UserError(f"plan: config names must be present, distinct and not {PLAIN!r}: {names}")
    if plan.reference not in names:
        raise UserError(f"plan: the reference {plan.reference!r} is not a config name")
    if sorted(plan.stage_order) != sorted(STAGES):
        raise UserError(f"plan: stage_order must name each of {list(STAGES)} once, got {list(plan.stage_order)}")
    if list(plan.stage_order).index("lr") > min(list(plan.stage_order).index(s) for s in ("round1", "confirmation")):
        raise UserError("plan: the lr stage must come before the rounds that use its lr")
    if not plan.lr_grid or any(not lr > 0 for lr in plan.lr_grid) or len(set(plan.lr_grid)) != len(plan.lr_grid):
        raise UserError(f"plan: the lr grid must be distinct positive numbers, got {list(plan.lr_grid)}")
    if not 0 < plan.holdout_fraction < 1:
        raise UserError(f"plan: holdout_fraction must be in (0, 1), got {plan.holdout_fraction}")
    for where, ts in (("confirmation select_on", plan.select_tasks), ("confirmation tasks", plan.confirm_tasks)):
        if not set(ts) <= set(plan.tasks):
            raise UserError(f"plan: {where} {list(ts)} are not all among the plan's tasks {list(plan.tasks)}")
    if set(plan.select_tasks) & set(plan.confirm_tasks):
        raise UserError("plan: the confirmation tasks must be held out from the selection tasks")
    if set(plan.confirm_seeds) & set(plan.round1_seeds):
        reused = sorted(set(plan.confirm_seeds) & set(plan.round1_seeds))
        raise UserError(f"plan: the confirmation seeds must be fresh; {reused} are round-1 seeds")
    for t in plan.tasks:
        try:
            RunConfig(**plan.recipe, task=t).validate()
        except (TypeError, ValueError) as exc:
            raise UserError(f"plan: recipe: {exc}") from None


def check_inputs(plan: Plan, data_dir: str | None):
    """Every task's train and dev split can be read, and every config fits the base model (layers, N)."""
    from routed_llama.source import load_base_config, resolve_source
    from routed_llama.surgery import check_fits

    for t in plan.tasks:
        task = tasks.get_task(t)
        try:
            for split in ("train", "validation"):
                tasks.load_split(task, split, data_dir)
        except ValueError as exc:  # TaskError
            raise UserError(f"plan: {exc}") from None
    try:
        base = load_base_config(resolve_source(plan.model))
    except ValueError as exc:  # ConversionError: not a Llama, missing, unreadable
        raise UserError(f"plan: model {plan.model!r}: {exc}") from None
    for c in plan.configs:
        check_fits(base, c.layers, c.num_clusters, f"plan: config {c.name}")


def check_output(plan: Plan, out: Path, resume: bool):
    """OUTPUT is empty, or holds this plan (and, with `resume`, its runs); never another plan's results."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    held = out / "plan.json"
    if not held.is_file():
        raise UserError(f"{out} is not empty and holds no plan.json: not a sweep of this plan; pick another --output")
    try:
        same = json.loads(held.read_text()) == plan.raw
    except (OSError, json.JSONDecodeError):
        same = False
    if not same:
        raise UserError(f"{out} holds the results of another plan ({held} differs from the given plan); "
                        "pick another --output")  # fmt: skip
    runs = out / "runs"
    if runs.is_dir() and any(runs.iterdir()) and not resume:
        raise UserError(f"{out} already holds runs of this plan; pass --resume to continue the sweep")


# ---------------------------------------------------------------------------------------------------------------
# Runs and cells
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the sweep. A cell is the runs of one (stage, arm, task) over the stage's seeds."""

    stage: str
    task: str
    arm: str
    seed: int
    lr: float

    def folder(self, out: Path) -> Path:
        if self.stage == "lr":
            return out / "runs" / "lr" / self.task / f"lr{self.lr:g}" / f"seed{self.seed}"
        return out / "runs" / self.task / self.arm / f"seed{self.seed}"


def lr_cells(plan: Plan) -> list[list[Run]]:
    return [[Run("lr", t, PLAIN, s, lr) for s in plan.lr_seeds] for t in plan.tasks for lr in plan.lr_grid]


def round1_cells(plan: Plan, lrs: dict[str, float]) -> list[list[Run]]:
    """Priority order: plain and the reference on every task; then the other configs on the selection tasks
    (what the confirmation round's choice needs), then on the remaining tasks. Tasks without an lr are left out."""
    others = [c.name for c in plan.configs if c.name != plan.reference]
    rest_tasks = [t for t in plan.tasks if t not in plan.select_tasks]
    order = [(a, t) for t in plan.tasks for a in (PLAIN, plan.reference)]
    order += [(a, t) for t in (*plan.select_tasks, *rest_tasks) for a in others]
    return [[Run("round1", t, a, s, lrs[t]) for s in plan.round1_seeds] for a, t in order if t in lrs]


def confirmation_cells(plan: Plan, lrs: dict[str, float], best: str) -> list[list[Run]]:
    return [[Run("confirmation", t, a, s, lrs[t]) for s in plan.confirm_seeds]
            for t in plan.confirm_tasks for a in (PLAIN, best) if t in lrs]  # fmt: skip


def read_result(run: Run, out: Path) -> dict | None:
    """The run's complete result.json (the runner's reading); None if it is missing or cut off (an interrupted
    run). A complete result of another (task, arm, seed, lr) is refused: it is not this plan's."""
    from .runner import read_result as read_run

    r = read_run(run.folder(out))
    if r is None:
        return None
    got = (r.get("task"), r.get("arm"), r.get("seed"))
    if got != (run.task, run.arm, run.seed) or not math.isclose(float(r["lr"]), run.lr, rel_tol=1e-9):
        raise UserError(f"{run.folder(out)} holds a run (task, arm, seed {got}, lr {r['lr']}) that is not this "
                        f"plan's ({run.task}, {run.arm}, {run.seed}, lr {run.lr:g})")  # fmt: skip
    return r


@dataclass
class Progress:
    """What has been run: finished results per run, the chosen lr per task, the confirmation config."""

    results: dict[Run, dict]
    lr_scores: dict[str, dict[float, list[float]]]  # task -> lr -> holdout scores (complete tasks only)
    lrs: dict[str, float]
    round1_cells: list[list[Run]]
    best: str | None
    best_scores: dict
    confirmation_cells: list[list[Run]]

    def scores(self, cell: list[Run], key: str = "final") -> dict[int, float] | None:
        """seed -> primary metric of a complete cell (`key` "final" or "final_routing_off"); None if incomplete."""
        rs = [self.results.get(r) for r in cell]
        if any(r is None or not r.get(key) for r in rs):
            return None
        return {r["seed"]: float(r[key][r["primary_metric"]]) for r in rs}


def collect(plan: Plan, out: Path) -> Progress:
    """Read every finished run of the plan and derive the lr choices and the confirmation config."""
    from . import sweep_stats

    results, by_task = {}, {}
    for cell in lr_cells(plan):
        for r in cell:
            if (res := read_result(r, out)) is not None:
                results[r] = res
        done = [results[r]["final"][results[r]["primary_metric"]] for r in cell if r in results]
        by_task.setdefault(cell[0].task, {})[cell[0].lr] = done
    lr_scores = {t: v for t, v in by_task.items() if all(len(x) == len(plan.lr_seeds) for x in v.values())}
    lrs = {t: sweep_stats.choose_lr(v) for t, v in lr_scores.items()}
    r1 = round1_cells(plan, lrs)
    for cell in r1:
        for r in cell:
            if (res := read_result(r, out)) is not None:
                results[r] = res
    progress = Progress(results, lr_scores, lrs, r1, None, {}, [])
    stats = round_stats(plan, progress, r1, plan.select_tasks)
    names = [c.name for c in plan.configs]
    progress.best, progress.best_scores = sweep_stats.select_best(stats, names, plan.select_tasks)
    if progress.best is not None:
        progress.confirmation_cells = confirmation_cells(plan, lrs, progress.best)
        for cell in progress.confirmation_cells:
            for r in cell:
                if (res := read_result(r, out)) is not None:
                    results[r] = res
    return progress


def round_scores(progress: Progress, cells: list[list[Run]], task_names) -> tuple[dict, dict, dict]:
    """(plain, routed, routing_off) scores of the complete cells: task -> seed -> score for plain, and
    arm -> task -> seed -> score for the routed arms."""
    plain, routed, off = {}, {}, {}
    for cell in cells:
        arm, task = cell[0].arm, cell[0].task
        s = progress.scores(cell)
        if task not in task_names or s is None:
            continue
        if arm == PLAIN:
            plain[task] = s
        else:
            routed.setdefault(arm, {})[task] = s
            if (o := progress.scores(cell, "final_routing_off")) is not None:
                off.setdefault(arm, {})[task] = o
    return plain, routed, off


def round_stats(plan: Plan, progress: Progress, cells: list[list[Run]], task_names) -> dict:
    from . import sweep_stats

    plain, routed, off = round_scores(progress, cells, task_names)
    family = len({c[0].arm for c in cells} - {PLAIN})  # Holm over every config the round plans, run or not
    return sweep_stats.analyze_round(plain, routed, off, plan.analysis, family)


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def _run_many():
    """The runner (a function, so that tests can put a fake in its place)."""
    from .runner import run_many

    return run_many


class Checkpoints:
    """Each routed config converted once into `folder`/<name> (a finished conversion there is reused)."""

    def __init__(self, plan: Plan, folder: Path, log=print):
        self.plan, self.folder, self.log, self.paths = plan, folder, log, {PLAIN: plan.model}

    def path(self, arm: str) -> str:
        if arm not in self.paths:
            self.paths[arm] = str(self._convert(self.plan.config(arm)))
        return self.paths[arm]

    def _convert(self, c: RoutedConfig) -> Path:
        from .compare import converted

        return converted(self.plan.model, self.folder / c.name, c, self.log)


def run_config(plan: Plan, run: Run, model: str, data_dir: str | None, out: Path) -> RunConfig:
    """The plan's recipe for one run; the lr stage scores a held-out slice of train instead of dev."""
    return RunConfig(**plan.recipe, task=run.task, model=model, arm=run.arm, seed=run.seed, lr=run.lr,
                     data_dir=data_dir, holdout_fraction=plan.holdout_fraction if run.stage == "lr" else None,
                     eval_routing_off=run.arm != PLAIN, output_dir=str(run.folder(out)))  # fmt: skip


def batches(cells: list[list[Run]], at_once: int, whole: bool) -> list[list[Run]]:
    """Runs grouped into batches of whole cells; with `whole` one batch, else batches of >= 2 x `at_once` runs
    (the budget is checked between batches)."""
    flat = [r for cell in cells for r in cell]
    if whole or not flat:
        return [flat] if flat else []
    out, cur = [], []
    for cell in cells:
        cur += cell
        if len(cur) >= 2 * at_once:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def execute(cells: list[list[Run]], ctx: dict) -> bool:
    """Run the unfinished runs of `cells` in order; False if the budget stopped it before the end."""
    s: SweepSettings = ctx["settings"]
    out, log = Path(s.output), ctx["log"]
    todo = [[r for r in cell if read_result(r, out) is None] for cell in cells]
    todo = [c for c in todo if c]
    last = 0.0
    jobs = resolve_jobs(s.jobs)
    for batch in batches(todo, jobs * s.group, whole=ctx["deadline"] is None):
        if ctx["deadline"] is not None and time.monotonic() + last > ctx["deadline"]:
            log(f"budget reached: {sum(map(len, todo))} runs of this stage not started")
            return False
        t0 = time.monotonic()
        models = [ctx["checkpoints"].path(r.arm) for r in batch]
        configs = [run_config(ctx["plan"], r, m, ctx["data_dir"], out) for r, m in zip(batch, models)]
        _run_many()(configs, [r.folder(out) for r in batch], jobs, True, log, group=s.group)
        todo = [[r for r in c if r not in batch] for c in todo]
        last = time.monotonic() - t0
    return True


def check_prerequisites(plan: Plan, settings: SweepSettings, progress: Progress):
    """A stage asked for alone needs what the stages before it decide (the lr; the confirmation config)."""
    stages = settings.only_stage
    wanted = settings.only_task or plan.tasks
    if "round1" in stages and "lr" not in stages and not set(wanted) <= set(progress.lrs):
        missing = [t for t in wanted if t not in progress.lrs]
        raise UserError(f"round1 needs the lr of every task; the lr stage is not finished for {missing}: "
                        "run it first (--only-stage lr)")  # fmt: skip
    if "confirmation" in stages and "round1" not in stages and progress.best is None:
        raise UserError(f"the confirmation round needs round 1 finished on {list(plan.select_tasks)} for plain and "
                        "every config: run round1 first")  # fmt: skip


def write_plan_copy(out: Path, source: str):
    """OUTPUT/plan.json: a byte copy of the plan file (left alone when there: check_output found it equal)."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / "plan.json"
    if not target.is_file():
        tmp = target.with_name(".plan.json.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)


def sweep(settings: SweepSettings, log=print, command: str = "") -> dict:
    """Validate the plan and OUTPUT, run the requested stages in the plan's order (resumably), then write
    results.json, report.md and the figures from every finished run. Returns the results dict."""
    from . import sweep_report

    if not Path(settings.plan).is_file():  # here, not in SweepSettings: parsing the flags touches no file
        raise UserError(f"no plan file {settings.plan}")
    plan = read_plan(settings.plan)
    if settings.model:  # the same base from another place; plan.raw (what OUTPUT must hold) keeps the plan's name
        plan = dataclasses.replace(plan, model=settings.model)
    out = Path(settings.output)
    data_dir = settings.data_dir or plan.data_dir
    if settings.only_task and not set(settings.only_task) <= set(plan.tasks):
        raise UserError(f"--only-task takes tasks of the plan ({', '.join(plan.tasks)}); got {settings.only_task}")
    check_inputs(plan, data_dir)
    check_output(plan, out, settings.resume or settings.only_stage == ["report"])
    progress = collect(plan, out)
    check_prerequisites(plan, settings, progress)
    write_plan_copy(out, settings.plan)
    t0 = time.monotonic()
    ctx = {"settings": settings, "plan": plan, "data_dir": data_dir, "log": log,
           "deadline": None if settings.budget_s is None else t0 + settings.budget_s,
           "checkpoints": Checkpoints(plan, Path(settings.checkpoint_dir), log)}  # fmt: skip
    for stage in plan.stage_order:
        if stage not in settings.only_stage:
            continue
        progress = collect(plan, out)
        cells = {"lr": lambda: lr_cells(plan), "round1": lambda: progress.round1_cells,
                 "confirmation": lambda: progress.confirmation_cells}[stage]()  # fmt: skip
        cells = [c for c in cells if not settings.only_task or c[0].task in settings.only_task]
        if stage == "confirmation" and progress.best is None:
            log("confirmation: not started (round 1 is not finished on the selection tasks)")
            continue
        log(f"stage {stage}: {sum(map(len, cells))} runs in {len(cells)} cells")
        if not execute(cells, ctx):
            break
    progress = collect(plan, out)
    return sweep_report.write(plan, progress, out, {"command": command, "wall_seconds": time.monotonic() - t0})


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune sweep ...`: 0 on success; bad input is one line on stderr and exit code 2."""
    from routed_llama.cli import run_cli
    from routed_llama.io import command_line

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = command_line(argv, PROG)

    def run(settings: SweepSettings) -> None:
        sweep(settings, log=lambda m: print(m, flush=True), command=command)

    return run_cli(run, SweepSettings, argv, PROG, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
