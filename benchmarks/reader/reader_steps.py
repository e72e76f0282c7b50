"""Reader training step time for several starting encoders, side by side (e.g. MiniLM-L6 against the 12-layer MPNet).

Each model trains ``--steps`` steps of the ``reproduce --profile dpr`` reader recipe (ReaderPlan: 32 questions x
M = 2 passages, 192-token windows, shared normalisation, heads at lr 1e-3, no dropout) on the same retrieval
results, in fp32 and/or bf16 autocast, through ``densepr train-reader`` in a fresh process (peak RSS is its own).
The first step is a warm-up; questions/s is the median of the others. A run directory whose ``metrics.jsonl``
already holds the steps is read, not trained again (the benchmark resumes).

    python benchmarks/reader/reader_steps.py --train R.json --model minilm=DIR --model mpnet=DIR \\
        [--precision bf16 fp32] [--steps 6] [--work runs/reader-steps] [-o benchmarks/reader/results/reader-steps.json]

``R.json``: a DPR result JSON with ``has_answer`` for training questions, e.g.
``densepr retrieve --qa nq-dev --index runs/embedded --mode bm25 -k 20 --limit 3000 -o R.json``.
Prints a table and writes JSON: per model and precision, s/step, questions/s, peak RSS, and the time one epoch
and ``reproduce --profile dpr``'s reader training (3 epochs over ``--epoch-questions`` questions) would take.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECIPE = ["--passages", "2", "--batch-size", "32", "--max-length", "192", "--lr", "1e-4", "--head-lr", "1e-3", "--span-loss", "shared",
          "--warmup-steps", "10", "--dropout", "0", "--depth", "20", "--save-every", "100", "--dev-limit", "0"]  # fmt: skip


def run_one(name: str, model: str, precision: str, args) -> dict:
    out = args.work / f"{name}-{precision}"
    metrics = out / "metrics.jsonl"
    rss_file = args.work / f"{name}-{precision}.log"

    def steps() -> list[dict]:
        if not metrics.is_file():
            return []
        return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "train"]

    if len(steps()) < args.steps:
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "densepr", "--quiet", "train-reader", "--init", model, "--train", str(args.train),
               "-o", str(out), *RECIPE, "--max-steps", str(args.steps), "--precision", precision]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rss_file.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"{name} {precision} failed:\n{(proc.stderr + proc.stdout)[-2000:]}")
    rows = steps()[: args.steps]
    qps = statistics.median(r["questions_per_s"] for r in rows[1:])
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", rss_file.read_text()) if rss_file.is_file() else None
    step_s = 32 / qps
    epoch_steps = -(-args.epoch_questions // 32)
    return {"model": name, "path": model, "precision": precision, "timed_steps": len(rows) - 1, "step_s": round(step_s, 2),
            "questions_per_s": round(qps, 2), "peak_rss_gib": round(int(m.group(1)) / 2**20, 2) if m else None,
            "epoch_steps": epoch_steps, "epoch_min": round(epoch_steps * step_s / 60, 1), "three_epochs_min": round(3 * epoch_steps * step_s / 60, 1),
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR of a starting encoder (repeat)")
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--epoch-questions", type=int, default=4196, help="training questions in one epoch (profile dpr's reader: 4,196)")
    ap.add_argument("--work", type=Path, default=Path("runs/reader-steps"))
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "results" / "reader-steps.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
    from common import machine_info

    from densepr.fileio import write_json

    args.work.mkdir(parents=True, exist_ok=True)
    models = dict(m.split("=", 1) for m in args.model)
    rows = []
    for precision in args.precision:
        for name, path in models.items():
            rows.append(run_one(name, path, precision, args))
            print(json.dumps(rows[-1]), flush=True)
    base = {r["precision"]: r for r in rows if r["model"] == next(iter(models))}
    for r in rows:
        r["step_x_first_model"] = round(r["step_s"] / base[r["precision"]]["step_s"], 2)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reader training step (32 questions x 2 passages, 192 tokens), CPU")
    for col in ("model", "precision", "s/step", "questions/s", f"x {next(iter(models))}", "peak RSS GiB", "epoch min", "3 epochs min"):
        table.add_column(col, justify="left" if col in ("model", "precision") else "right")
    for r in rows:
        table.add_row(r["model"], r["precision"], f"{r['step_s']:.1f}", f"{r['questions_per_s']:.2f}", f"{r['step_x_first_model']:.2f}",
                      str(r["peak_rss_gib"]), f"{r['epoch_min']:.0f}", f"{r['three_epochs_min']:.0f}")  # fmt: skip
    Console(width=140).print(table)
    result = {"command": "python benchmarks/reader/reader_steps.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": machine_info(), "recipe": RECIPE, "rows": rows}  # fmt: skip
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
