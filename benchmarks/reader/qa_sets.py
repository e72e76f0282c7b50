"""The end-to-end sets a ``densepr reproduce --profile dpr`` run has read so far, collected while it runs.

Reading all five full test sets (``--qa-limit all``) takes hours on 2 CPU cores and may span several
sessions (each ``qa-<set>`` stage resumes from its finished pieces). This collects the sets whose stage is
recorded (finished, at the run's current settings) into one ``qa-results.json`` in the format of
``densepr evaluate-qa`` (with each set's question limit, seconds and passages read), renders its tables
and plot with the same code as the run's report, and lists the sets still being read and how far.

    python benchmarks/reader/qa_sets.py --run runs/dpr [--limit all] [--add DIR] -o benchmarks/reader/results/qa/full

``--add DIR`` (repeatable) adds the sets a ``densepr evaluate-qa ... -o DIR`` of the same run read (e.g. in
bfloat16, to finish the largest sets sooner), each labelled with its reader precision; a set the run itself
recorded is kept from the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.evaluate.report import plot_qa, qa_markdown
from densepr.fileio.atomic import atomic_write, read_json, write_json


def seconds_cell(res: dict) -> str:
    """A set's seconds; a lower bound, said so, when a resumed read kept pieces whose time was not recorded."""
    untimed = (res.get("resumed") or {}).get("pieces_without_seconds", 0)
    return f"{res['seconds']:,.0f}" if not untimed else f"≥ {res['seconds']:,.0f} ({untimed} kept pieces untimed)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/dpr"), help="a `densepr reproduce --profile dpr` output directory")
    ap.add_argument("--limit", default="all", help="collect the sets read with this --qa-limit (a number, or 'all')")
    ap.add_argument("--add", type=Path, action="append", default=[], help="a `densepr evaluate-qa -o DIR` output whose sets to add")
    ap.add_argument("-o", "--output", type=Path, required=True, help="directory for qa-results.json, .md and qa-em.png")
    args = ap.parse_args()
    limit = None if args.limit == "all" else int(args.limit)
    stages = args.run / "stages"
    sets, pending, ks = {}, {}, None
    for rec_path in sorted(stages.glob("qa-*.json")):
        rec = read_json(rec_path)
        name, settings = rec["settings"]["set"], rec["settings"]
        if settings["limit"] != limit:
            continue  # read with another --qa-limit (e.g. the default run's first 100 questions)
        res = read_json(args.run / "qa" / f"{rec_path.stem[len('qa-'):]}.json")
        ks = ks or settings["ks"]
        sets[name] = {**res, "limit": settings["limit"], "finished": rec["finished"], "stage_seconds": rec["seconds"],
                      "precision": settings.get("precision", "fp32"), "source": str(args.run)}  # fmt: skip
    for extra in args.add:
        got = read_json(extra / "qa-results.json")
        if got.get("limit") != limit:
            raise SystemExit(f"{extra}: read with --limit {got.get('limit')}, not {args.limit}")
        if ks and got["ks"] != ks:
            raise SystemExit(f"{extra}: read at ks {got['ks']}, the run at {ks}")
        ks = ks or got["ks"]
        finished = datetime.fromtimestamp((extra / "qa-results.json").stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        for name, res in got["sets"].items():
            if name not in sets:  # the run's own reading first
                sets[name] = {**res, "limit": got["limit"], "finished": finished, "precision": got.get("precision", "fp32"), "source": str(extra)}
    for partial in sorted(stages.glob("qa-*.partial")):
        name = partial.name[len("qa-") : -len(".partial")]
        if name not in sets:  # a set read to the end elsewhere (--add) is not pending
            pending[name] = len(list(partial.glob("readings-*.json")))
    for extra in args.add:  # an evaluate-qa output keeps a set's pieces in pieces/<set>/<inputs key>/
        for partial in sorted((extra / "pieces").glob("*/*")):
            pending[f"{partial.parent.name} ({extra})"] = len(list(partial.glob("readings-*.json")))
    if not sets:
        raise SystemExit(f"{args.run}: no end-to-end set recorded yet with --qa-limit {args.limit}")
    # largest first in the table, as the paper lists them
    results = {"run": str(args.run), "ks": ks, "sets": dict(sorted(sets.items(), key=lambda kv: -kv[1]["n_all"]))}
    md = qa_markdown(results)
    md += "\n| dataset | questions (limit) | passages read | seconds | reader precision | read by | finished |\n|---|---:|---:|---:|---|---|---|\n"
    md += "".join(f"| {n} | {r['n_all']} ({r['limit'] or 'all'}) | {r['passages_read']:,} | {seconds_cell(r)} | {r['precision']} | {r['source']} | {r['finished']} |\n"
                  for n, r in results["sets"].items())  # fmt: skip
    if pending:
        md += "\nStill being read (finished pieces of 250 questions): " + ", ".join(f"{n} {p}" for n, p in pending.items()) + "\n"
    print(md)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "qa-results.json", {**results, "pending_pieces": pending, "command": f"python benchmarks/reader/qa_sets.py --run {args.run} --limit {args.limit}{''.join(f' --add {a}' for a in args.add)} -o {args.output}",
                                                 "date": time.strftime("%Y-%m-%d"), "machine": machine_info()})  # fmt: skip
    with atomic_write(args.output / "qa-results.md") as fh:
        fh.write(md)
    plot_qa(results, args.output / "qa-em.png")
    print(f"wrote {args.output}/qa-results.json, qa-results.md, qa-em.png")


if __name__ == "__main__":
    main()
