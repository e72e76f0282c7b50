"""Two or more ``densepr reproduce`` runs side by side: what each stage cost and what each run measured.

For a setting that should keep the figures and cut the time (``--train-precision bf16``), or one that
should move the figures (``--epochs 3``): seconds per stage (each stage record's own, written by the
invocation that ran the stage), top-k accuracy of every retrieval method, the retrievers' training
(steps, loss, validation) and end-to-end exact match of every mode and selection rule. The first run is
the reference: seconds as ratios to it, figures as differences from it.

    python benchmarks/training/compare_runs.py --run fp32=runs/dpr --run bf16=runs/dpr-bf16 -o benchmarks/training/results/dpr-bf16

Writes ``compare.md`` and ``compare.json`` in ``-o``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.fileio.atomic import atomic_write, read_json, write_json
from densepr.reproduce import qa_figures

KS = ("top1", "top5", "top20", "top100")


def load_run(d: Path) -> dict:
    """A run's results.json and each stage record's seconds (``{stage: s}``, in run order).

    A record finished after the ``report`` stage's was written by a later invocation that did not reach
    the report (e.g. one reading more questions), so its seconds do not belong to these results: left out
    and listed under ``later``."""
    summary = read_json(d / "results.json")
    report = d / "stages" / "report.json"
    written = read_json(report)["finished"] if report.is_file() else None
    seconds, later = {}, []
    for stage in (e["stage"] for e in summary.get("stages", [])):
        rec = d / "stages" / f"{stage}.json"
        if rec.is_file():
            r = read_json(rec)
            if written is not None and r["finished"] > written:  # ISO times in UTC compare as strings
                later.append(stage)
            else:
                seconds[stage] = float(r["seconds"])
    return {"dir": str(d), "summary": summary, "seconds": seconds, "later": later}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=DIR of a `densepr reproduce` output (first: reference)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    runs = {}
    for spec in args.run:
        name, _, path = spec.partition("=")
        if not path or not (Path(path) / "results.json").is_file():
            raise SystemExit(f"--run: expected NAME=DIR with DIR/results.json, got {spec!r}")
        runs[name] = load_run(Path(path))
    if len(runs) < 2:
        raise SystemExit("--run: give at least two runs")
    names = list(runs)
    ref = runs[names[0]]
    md = ["# densepr reproduce runs side by side", "", "Runs: " + ", ".join(f"`{n}` = {r['dir']}" for n, r in runs.items()), ""]

    # seconds per stage
    stages = list(dict.fromkeys(s for r in runs.values() for s in r["seconds"]))
    md += ["## Seconds per stage (stage records)", "", "| stage | " + " | ".join(names) + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |",
           "|---|" + "---:|" * (2 * len(names) - 1)]  # fmt: skip
    totals = {n: sum(r["seconds"].values()) for n, r in runs.items()}
    for s in [*stages, "total"]:
        vals = [totals[n] if s == "total" else runs[n]["seconds"].get(s) for n in names]
        ratios = [f"{v / vals[0]:.2f}x" if v is not None and vals[0] else "" for v in vals[1:]]
        cells = [f"{v:,.0f}" if v is not None else "" for v in vals]
        md.append(f"| {'**total**' if s == 'total' else s} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    for n, r in runs.items():
        if r["later"]:
            md.append(f"\n`{n}`: no seconds for {', '.join(r['later'])} (recorded by a later invocation than its results.json; its total leaves them out).")

    # retrieval top-k
    topk = {}
    md += ["", "## Top-k accuracy (%), all questions / answerable", "", "| test set | method | " + " | ".join(f"{k} ({n})" for k in ("top20", "top100") for n in names) + " |",
           "|---|---|" + "---:|" * (2 * len(names))]  # fmt: skip
    for ds, entry in ref["summary"]["results"].items():
        for method in entry["methods"]:
            row = {n: runs[n]["summary"]["results"].get(ds, {}).get("methods", {}).get(method) for n in names}
            topk[f"{ds} {method}"] = row
            cells = []
            for k in ("top20", "top100"):
                for n in names:
                    rep = row[n]
                    cells.append(f"{rep['all'][k]:.1f} / {rep['answerable'][k]:.1f}" if rep else "")
            md.append(f"| {ds} | {method} | " + " | ".join(cells) + " |")
    diffs = [abs(topk[key][n][sub][k] - topk[key][names[0]][sub][k]) for key in topk for n in names[1:] if topk[key][n]
             for sub in ("all", "answerable") for k in KS]  # fmt: skip
    if diffs:
        md += ["", f"Largest top-k difference from `{names[0]}`: {max(diffs):.2f} points; mean {sum(diffs) / len(diffs):.2f} ({len(diffs)} figures)."]

    # retriever training
    md += ["", "## Retriever training (last validation: positive's rank in the pool)", "", "| run | model | steps | questions/s | first -> last loss | avg. rank | pool top-20 |",
           "|---|---|---:|---:|---|---:|---:|"]  # fmt: skip
    training = {n: (r["summary"].get("training") or {}).get("runs", {}) for n, r in runs.items()}
    for model in training[names[0]]:
        for n in names:
            t = training[n].get(model)
            if t:
                v = t.get("validation") or {}
                md.append(f"| {n} | {model} | {t['steps']} | {t['questions_per_s']} | {t['first_loss']} -> {t['last_loss']} | {v.get('avg_rank', '')} | {v.get('top20', '')} |")

    # end-to-end EM
    em = {n: qa_figures(r["summary"].get("qa")) for n, r in runs.items()}
    keys = [k for k in em[names[0]] if all(k in em[n] for n in names[1:])]
    if keys:
        # one row per set, mode, rule and subset; a column per k, each cell the runs' EM in --run order
        rows: dict[str, dict[str, str]] = {}
        for key in keys:
            ds, mode, rule, k, subset = key.split()
            rows.setdefault(f"{ds} | {mode} | {rule} | {subset}", {})[k] = " / ".join(f"{em[n][key]:.1f}" for n in names)
        ks = list(dict.fromkeys(k for r in rows.values() for k in r))
        md += ["", f"## End-to-end exact match (%), each cell {' / '.join(names)}", "", "| set | mode | rule | questions | " + " | ".join(f"EM{k}" for k in ks) + " |",
               "|---|---|---|---|" + "---:|" * len(ks)]  # fmt: skip
        md += [f"| {label} | " + " | ".join(r.get(k, "") for k in ks) + " |" for label, r in rows.items()]
        qa_diffs = [abs(em[n][k] - em[names[0]][k]) for k in keys for n in names[1:]]
        same = sum(d == 0 for d in qa_diffs)
        md += ["", f"EM figures equal to `{names[0]}`'s: {same} of {len(qa_diffs)}; largest difference {max(qa_diffs):.1f} points, "
                   f"mean {sum(qa_diffs) / len(qa_diffs):.2f}."]  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    text = "\n".join(md) + "\n"
    with atomic_write(args.output / "compare.md") as fh:
        fh.write(text)
    write_json(args.output / "compare.json", {"command": "python benchmarks/training/compare_runs.py " + " ".join(f"--run {s}" for s in args.run) + f" -o {args.output}",
                                              "machine": machine_info(), "runs": {n: r["dir"] for n, r in runs.items()},
                                              "seconds": {n: r["seconds"] for n, r in runs.items()}, "totals_s": totals,
                                              "topk": topk, "training": training, "em": {n: {k: em[n][k] for k in keys} for n in names},
                                              "configs": {n: r["summary"].get("config") for n, r in runs.items()}})  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
