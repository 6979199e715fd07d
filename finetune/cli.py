"""python -m finetune {run,compare,evaluate,merge,analyze}: LoRA fine-tuning of plain and routed Llamas on GLUE.

Every subcommand's help is the docstring of the function it calls. Bad input is reported as one line on stderr
with exit code 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys

from . import tasks
from .train import RunConfig


def _recipe_args(p: argparse.ArgumentParser):
    d = RunConfig()
    g = p.add_argument_group("recipe (defaults: the reference recipe)")
    g.add_argument("--task", default=d.task, help=f"GLUE task: {', '.join(tasks.TASKS)}")
    g.add_argument("--model", default=d.model, help='base model: Hub id, folder, .gguf file or "stand-in"')
    g.add_argument("--data-dir", default=None, help="local GLUE folder (RTE/train.tsv, ...); default: the Hub")
    g.add_argument("--max-train-samples", type=int, default=None)
    g.add_argument("--max-eval-samples", type=int, default=None)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--lora-r", type=int, default=d.lora_r)
    g.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    g.add_argument("--lora-targets", nargs="+", default=d.lora_targets)
    g.add_argument("--modules-to-save", nargs="+", default=d.modules_to_save)
    g.add_argument("--max-length", type=int, default=d.max_length)
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=d.precision)
    g.add_argument("--routing-impl", choices=["mask", "sparse", "auto"], default=None)
    g.add_argument("--num-workers", type=int, default=0, help="data loader workers")


def cmd_run(args):
    """One LoRA fine-tune of one arm: the plain model (--model) or a routed checkpoint (--routed CKPT)."""
    from .train import run_one

    cfg = {k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__}
    if args.routed:
        cfg.update(model=args.routed, arm=args.arm or "routed")
    else:
        cfg["arm"] = args.arm or "baseline"
    result = run_one(RunConfig(**cfg))
    m = result["primary_metric"]
    print(json.dumps({k: result[k] for k in ("arm", "seed", "lr", "before", "per_epoch", "final", "final_routing_off",
                                             "train_seconds", "train_tokens_per_s", "peak_gpu_mem_bytes")}, indent=1))  # fmt: skip
    print(f"{result['arm']}: {m} {result['final'][m]:.2f} after {args.epochs:g} epochs ({result['train_seconds']:.1f} s)")


def cmd_compare(args):
    """Both arms x seeds (x an optional lr grid chosen on a train slice) with identical settings: writes
    results.json, report.md and curves.png to --output."""
    from .compare import main_compare

    main_compare(args)


def cmd_evaluate(args):
    """Score a saved adapter (over the base it was trained on, checked by fingerprint) on its task's dev set."""
    from .train import evaluate_adapter

    r = evaluate_adapter(args.adapter, data_dir=args.data_dir, max_eval_samples=args.max_eval_samples, top_k=args.top_k)
    print(json.dumps({"task": r["task"], "metrics": r["metrics"], "trained_final": r["info"].get("final")}, indent=1))


def cmd_merge(args):
    """Merge an adapter into its base and write a standalone checkpoint (remote code included for routed bases)."""
    from .adapters import merge

    out = merge(args.adapter, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_collect(args):
    """Assemble the comparison report (results.json, report.md, curves.png) from finished runs' result.json
    files, e.g. those of runs made one by one on several machines."""
    from pathlib import Path

    from .compare import collect, report

    # a folder (e.g. a compare's runs/) is searched for result.json: its adapter folders hold other .json files
    files = sorted(p for f in args.results for p in ([Path(f)] if Path(f).is_file() else Path(f).rglob("result.json")))
    summary = collect(files, Path(args.output), args.name, args.command or "", args.jobs, args.notes, args.overwrite,
                      args.date)
    print(report(summary))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="subcommand", required=True)

    r = sub.add_parser("run", help=inspect.getdoc(cmd_run), description=inspect.getdoc(cmd_run))
    _recipe_args(r)
    r.add_argument("--routed", default=None, metavar="CKPT", help="a routed checkpoint folder (the routed arm)")
    r.add_argument("--arm", default=None, help="arm name recorded in the result")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--output-dir", default=None, help="save the adapter and result.json here")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help=inspect.getdoc(cmd_compare), description=inspect.getdoc(cmd_compare))
    _recipe_args(c)
    c.add_argument("--arm", action="append", required=True, metavar="SPEC",
                   help="a routed arm, e.g. name=last8,layers=22-29,num_experts=32,top_k=16 or name=x,checkpoint=DIR; "
                        "repeatable. The plain arm 'baseline' is always included.")  # fmt: skip
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    c.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="an lr grid; each arm's lr is chosen on a held-out slice of train (not dev)")  # fmt: skip
    c.add_argument("--lr-holdout", type=float, default=0.1, help="fraction of train held out to choose lr")
    c.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes; they share the GPU)")
    c.add_argument("--output", required=True, help="results folder, e.g. results/rte-standin")
    c.add_argument("--name", default=None, help="experiment name (default: the output folder's name)")
    c.add_argument("--checkpoint-dir", default=None, help="where routed arms are converted (default OUTPUT/checkpoints)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--command", default=None, help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_compare)

    k = sub.add_parser("collect", help=inspect.getdoc(cmd_collect), description=inspect.getdoc(cmd_collect))
    k.add_argument("results", nargs="+", help="result.json files or folders searched for result.json")
    k.add_argument("--output", required=True)
    k.add_argument("--name", default=None)
    k.add_argument("--command", default=None, help="the command that produced the runs, recorded as is")
    k.add_argument("--jobs", type=int, default=1, help="how many runs shared the device at a time")
    k.add_argument("--notes", default=None, help="free text recorded in results.json and the report")
    k.add_argument("--date", default=None, help="when the runs were made (default: from the runs, else now)")
    k.add_argument("--overwrite", action="store_true")
    k.set_defaults(func=cmd_collect)

    e = sub.add_parser("evaluate", help=inspect.getdoc(cmd_evaluate), description=inspect.getdoc(cmd_evaluate))
    e.add_argument("adapter")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--max-eval-samples", type=int, default=None)
    e.add_argument("--top-k", type=int, default=None, help="override k of a routed base (k = N: routing off)")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("merge", help=inspect.getdoc(cmd_merge), description=inspect.getdoc(cmd_merge))
    m.add_argument("adapter")
    m.add_argument("out_dir")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_merge)

    try:
        from . import analyze
    except ImportError:
        analyze = None
    if analyze is not None and hasattr(analyze, "add_arguments"):
        a = sub.add_parser("analyze", help=inspect.getdoc(analyze.run), description=inspect.getdoc(analyze.run))
        analyze.add_arguments(a)
        a.set_defaults(func=analyze.run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    if args.subcommand == "compare" and args.command is None:  # record these arguments, not the caller's sys.argv
        args.command = " ".join(["python -m finetune", shlex.join(argv)])
    try:
        out = args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # TaskError, ModelError, AdapterError, ConversionError
        print(f"finetune {args.subcommand}: error: {exc}", file=sys.stderr)
        return 2
    return out if isinstance(out, int) else 0


if __name__ == "__main__":
    sys.exit(main())
