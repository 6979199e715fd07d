"""Many fine-tuning runs, `jobs` at a time, in persistent worker processes spread over the visible GPUs; resumable.

Each worker is a spawned process that runs many runs one after another, so imports, the CUDA context and whatever
the engine compiles or captures are paid once per worker, not once per run. Workers are placed round-robin over the
visible GPUs (several workers per GPU when `jobs` exceeds the GPUs); each worker sees only its GPU, through
CUDA_VISIBLE_DEVICES set in its environment before it starts. Without a GPU the workers run on the CPU.

A run's result is what it wrote to `run_dir/result.json`, read back from disk: a run made now and a run kept from an
earlier, interrupted invocation (`resume=True`) are read the same way, so the results do not depend on which runs
were resumed, nor on how many workers made them (each run is a function of its config alone).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from .config import RunConfig

from routed_llama.errors import UserError

RESULT_FILE = "result.json"
# keys every run's result.json has (a stray or truncated file lacks some)
RESULT_KEYS = ("arm", "seed", "lr", "task", "model", "config", "final", "per_epoch", "before", "predictions")
_POLL_S = 1.0  # how often the parent checks that its workers are alive while it waits


# --- placement --------------------------------------------------------------------------------------------------------


def visible_devices(environ: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """The GPUs runs may use, as CUDA_VISIBLE_DEVICES entries: that variable's entries when it is set (up to the
    first empty or negative one, where CUDA stops reading it), else "0" .. str(count - 1), count defaulting to
    torch.cuda.device_count(). An empty list: no GPU."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        out = []
        for entry in value.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break
            out.append(entry)
        return out
    if count is None:
        import torch

        count = torch.cuda.device_count()
    return [str(i) for i in range(count)]


def resolve_jobs(jobs: int | None) -> int:
    """`jobs` checked, or when None the default: one worker per visible GPU, 1 without a GPU. With packed runs
    (`group`) one worker fills its GPU: on an H200 two packs sharing one GPU took as long as one after the other
    (2026-11-29)."""
    return check_count("jobs", jobs) if jobs is not None else max(1, len(visible_devices()))


def place_workers(jobs: int, devices: Sequence[str]) -> list[str | None]:
    """The device of each of `jobs` workers: round-robin over `devices` (worker w on devices[w % G]); None (the
    CPU) for every worker when there is no device."""
    check_count("jobs", jobs)
    if not devices:
        return [None] * jobs
    return [devices[w % len(devices)] for w in range(jobs)]


def cpu_threads(jobs: int, cores: int | None = None) -> int:
    """Intra-op threads per worker: the cores shared out evenly, at least one (workers that each take every core
    wait on one another)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // jobs)


def check_count(name: str, value) -> int:
    """The one check of a worker or pack count (`jobs`, `group`): an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# --- results on disk --------------------------------------------------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_json_strict(path: Path):
    """A JSON file that must be standard JSON (no NaN or Infinity)."""
    return json.loads(Path(path).read_text(), parse_constant=_refuse_constant)


def config_record(cfg: RunConfig) -> dict:
    """The config as a run records it (JSON types), without output_dir: the folder may move between invocations."""
    rec = json.loads(json.dumps(asdict(cfg)))
    rec.pop("output_dir", None)
    return rec


def complete_record(rec: dict) -> dict:
    """A recorded config with the RunConfig fields it predates filled in with their defaults: a run made before a
    field existed ran as that field's default does (e.g. `compile`), so its result still matches its config."""
    return {**config_record(RunConfig()), **rec}


def read_result(run_dir: Path, cfg: RunConfig | None = None) -> dict | None:
    """The run's result.json if it is complete (strict JSON with every key a result has), else None. With `cfg`,
    a complete result of another config raises UserError (it is not this run's: never replaced silently)."""
    path = Path(run_dir) / RESULT_FILE
    try:
        r = read_json_strict(path)
    except (OSError, ValueError):
        return None
    if not isinstance(r, dict) or any(k not in r for k in RESULT_KEYS):
        return None
    if cfg is not None:
        have, want = complete_record(dict(r["config"])), config_record(cfg)
        have.pop("output_dir", None)
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise UserError(f"{path} is a run with other settings ({', '.join(diff)} differ); "
                            "use another output folder or --overwrite")  # fmt: skip
    return r


def _prepare_run_dirs(configs, run_dirs, resume: bool) -> dict[int, dict]:
    """{index: kept result} of the runs already complete (resume); clears the folders of interrupted runs. Without
    resume, an existing non-empty run folder is an error (the caller clears what it means to replace)."""
    kept = {}
    for i, (cfg, run_dir) in enumerate(zip(configs, run_dirs)):
        run_dir = Path(run_dir)
        if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
            continue
        if not resume:
            raise UserError(f"{run_dir} exists and is not empty; resume, or pass --overwrite to replace it")
        r = read_result(run_dir, cfg)
        if r is not None:
            kept[i] = r
        elif run_dir.is_dir():
            shutil.rmtree(run_dir)  # an interrupted run: redone from scratch
        else:
            raise UserError(f"{run_dir} is a file, not a run folder")
    return kept


# --- workers --------------------------------------------------------------------------------------------------------


@contextmanager
def _environment(**values: str | None):
    """os.environ with `values` set (None: left as is) for the duration: a spawned child copies it when it starts."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exit_with_parent():
    """End this worker as soon as its parent ends, kill -9 included: an orphan would keep its GPU memory and go on
    writing into run folders that a resumed comparison clears."""
    import multiprocessing as mp
    import threading
    from multiprocessing.connection import wait

    parent = mp.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker(threads: int, tasks_q, results_q):
    """A worker's loop: take (indices, configs) until None, train them side by side (`train.run_group`); report
    ("done"|"error", index, detail) for each."""
    _exit_with_parent()
    import torch

    torch.set_num_threads(threads)
    from .train import run_group

    while (item := tasks_q.get()) is not None:
        indices, cfgs = item
        try:
            run_group([RunConfig(**c) for c in cfgs])
            for i in indices:
                results_q.put(("done", i, None))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
            results_q.put(("error", indices[0], _portable(exc)))
            if not isinstance(exc, Exception):
                raise


def _portable(exc: BaseException):
    """The exception itself when it survives pickling (the parent re-raises it: a UserError stays one line), else
    its traceback text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return "".join(traceback.format_exception(exc))


def _start_workers(devices: list[str | None], threads: int):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fork would copy the parent's CUDA or thread state
    tasks_q, results_q = ctx.Queue(), ctx.Queue()
    procs = []
    for device in devices:
        p = ctx.Process(target=_worker, args=(threads, tasks_q, results_q), daemon=True)
        with _environment(CUDA_VISIBLE_DEVICES=device):
            p.start()
        procs.append(p)
    return procs, tasks_q, results_q


def _stop(procs):
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)


def _raise_from_worker(detail, run_dir: Path):
    if isinstance(detail, BaseException):
        if isinstance(detail, UserError):
            raise detail
        raise RuntimeError(f"the run into {run_dir} failed: {detail!r}") from detail
    raise RuntimeError(f"the run into {run_dir} failed in its worker:\n{detail}")


def _wait(procs, results_q, pending: set[int], run_dirs, on_done: Callable[[int], None]):
    """Collect the workers' reports until no run is pending; a failed run or a dead worker raises."""
    while pending:
        try:
            kind, i, detail = results_q.get(timeout=_POLL_S)
        except queue.Empty:
            codes = [p.exitcode for p in procs]
            # a worker leaves with 0 only after the queue ran dry; anything else lost the run it held
            if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
                raise RuntimeError(f"a run worker died (exit codes {codes}) with {len(pending)} run(s) unfinished")
            continue
        if kind == "error":
            _raise_from_worker(detail, Path(run_dirs[i]))
        pending.discard(i)
        on_done(i)


def pack(configs: list[RunConfig], todo: list[int], group: int) -> list[list[int]]:
    """`todo` cut into units of at most `group` runs that may train side by side (fast engine, same task, data and
    recipe, model and lr; they differ only in `train.GROUP_FIELDS_FREE`: seed, arm name, output folder), in the order
    of their first run."""
    from .train import GROUP_FIELDS_FREE

    units: list[list[int]] = []
    open_unit: dict[str, list[int]] = {}
    for i in todo:
        cfg = configs[i]
        rec = {k: v for k, v in asdict(cfg).items() if k not in GROUP_FIELDS_FREE}
        key = json.dumps(rec, sort_keys=True, default=str)
        if group <= 1 or cfg.engine == "trainer":
            units.append([i])
            continue
        unit = open_unit.get(key)
        if unit is None or len(unit) >= group:
            unit = open_unit[key] = []
            units.append(unit)
        unit.append(i)
    return units


# --- the entry point ------------------------------------------------------------------------------------------------


def run_many(configs: list[RunConfig], run_dirs: list[Path], jobs: int, resume: bool, log=print,
             devices: list[str] | None = None, threads: int | None = None, group: int = 1) -> list[dict]:  # fmt: skip
    """Run every config into its run folder, `jobs` workers at a time, each training up to `group` compatible runs
    side by side (`pack`); return the results in config order.

    With `resume`, a run whose folder holds a complete result.json of the same config is kept (and read back), a
    folder without one (an interrupted run) is cleared and redone. `devices` (default: `visible_devices()`) are the
    GPUs the workers are placed on; `threads` (default `cpu_threads(jobs)`) the intra-op threads of each worker."""
    check_count("jobs", jobs)
    if len(configs) != len(run_dirs):
        raise ValueError(f"{len(configs)} configs but {len(run_dirs)} run folders")
    if len({Path(d).resolve() for d in run_dirs}) != len(run_dirs):
        raise ValueError("two runs share a run folder")
    configs = [replace(cfg, output_dir=str(d)) for cfg, d in zip(configs, run_dirs)]
    results: list[dict | None] = [None] * len(configs)
    for i, r in _prepare_run_dirs(configs, run_dirs, resume).items():
        results[i] = r
        log(f"{result_line(r)} (kept from an earlier run)")
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return results
    units = pack(configs, todo, group)
    placement = place_workers(min(jobs, len(units)), visible_devices() if devices is None else devices)
    threads = cpu_threads(jobs) if threads is None else threads
    procs, tasks_q, results_q = _start_workers(placement, threads)

    def on_done(i: int):
        r = read_result(Path(run_dirs[i]), configs[i])
        if r is None:
            raise RuntimeError(f"the run into {run_dirs[i]} finished without a complete {RESULT_FILE}")
        results[i] = r
        log(result_line(r))

    try:
        for unit in units:
            tasks_q.put((unit, [asdict(configs[i]) for i in unit]))
        for _ in procs:
            tasks_q.put(None)
        _wait(procs, results_q, set(todo), run_dirs, on_done)
    finally:
        _stop(procs)
    return results


def result_line(r: dict) -> str:
    """One log line per run: arm, seed, lr, the headline metric before and after, train seconds."""
    m = r.get("primary_metric") or next(iter(r["final"]))
    return (f"  {r['arm']:<12} seed {r['seed']:<3} lr {r['lr']:<8g} {m} {r['final'][m]:6.2f} "
            f"(before {r['before'][m]:6.2f}) {r.get('train_seconds', 0):7.1f} s")  # fmt: skip
