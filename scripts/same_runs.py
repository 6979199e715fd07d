"""Do two folders of fine-tuning runs hold the same results? Every result.json under RERUN/runs is compared with the
one at the same path under ORIGINAL/runs: final metrics, routing-off metrics and per-example predictions, exactly.

    python scripts/same_runs.py ORIGINAL RERUN [--out FILE.json]

Prints one line per run that differs and a summary; with --out also writes them as JSON. Exit 0 when every rerun
has an original and all are identical, 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from routed_llama.io import write_json

FIELDS = ("final", "final_routing_off", "predictions")


def compare(original: Path, rerun: Path) -> dict:
    rows = []
    for f in sorted((rerun / "runs").rglob("result.json")):
        rel = f.relative_to(rerun)
        mine, theirs = json.loads(f.read_text()), original / rel
        if not theirs.is_file():
            rows.append({"run": str(rel.parent), "identical": False, "why": "no original"})
            continue
        theirs = json.loads(theirs.read_text())
        differ = [k for k in FIELDS if mine.get(k) != theirs.get(k)]
        row = {"run": str(rel.parent), "identical": not differ, "group_size": [theirs.get("group_size"),
                                                                               mine.get("group_size")]}
        if differ:
            m = mine["primary_metric"]
            row.update(why=f"{', '.join(differ)} differ", final=[theirs["final"][m], mine["final"][m]])
        rows.append(row)
    return {"original": str(original), "rerun": str(rerun), "compared": len(rows),
            "identical": sum(r["identical"] for r in rows), "runs": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/same_runs.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("original", type=Path)
    ap.add_argument("rerun", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    for p in (a.original, a.rerun):
        if not (p / "runs").is_dir():
            print(f"{ap.prog}: error: {p} has no runs/ folder", file=sys.stderr)
            return 2
    res = compare(a.original, a.rerun)
    for r in res["runs"]:
        if not r["identical"]:
            print(f"{r['run']}: {r['why']}" + (f" (final {r['final'][0]} vs {r['final'][1]}; group size "
                                                f"{r['group_size'][0]} vs {r['group_size'][1]})" if "final" in r else ""))
    print(f"{res['identical']} of {res['compared']} reruns identical to the original")
    if a.out:
        write_json(a.out, res, indent=1)
    return 0 if res["identical"] == res["compared"] else 1


if __name__ == "__main__":
    sys.exit(main())
