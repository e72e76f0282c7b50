"""One table from several `densepr reproduce` runs: BM25, zero-shot and fine-tuned dense, hybrids.

Each ``--run NAME=DIR`` is the output directory of a ``densepr reproduce`` run (its
``results.json``); BM25 is taken from the first. Each ``--train NAME=DIR`` is a ``densepr train``
run directory, whose validation history and best checkpoint are summarised.

    python benchmarks/training/training_report.py --run zero-shot=runs/embedded --run fine-tuned=runs/ft-hn \\
        --train fine-tuned=runs/train-hn --out benchmarks/training/results/finetune

Writes ``results.md`` and ``results.json`` in ``--out`` and copies each training run's
``metrics.jsonl`` and ``config.json`` there.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KS = (1, 5, 20, 100)


def pairs(values: list[str]) -> dict[str, Path]:
    out = {}
    for v in values:
        name, _, path = v.partition("=")
        if not path:
            raise SystemExit(f"expected NAME=DIR, got {v!r}")
        out[name] = Path(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="NAME=DIR of a `densepr reproduce` output")
    ap.add_argument("--train", action="append", default=[], help="NAME=DIR of a `densepr train` output")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/training/results/finetune"))
    args = ap.parse_args()
    runs = {name: json.loads((d / "results.json").read_text()) for name, d in pairs(args.run).items()}
    first = next(iter(runs.values()))
    rows: dict[str, dict[str, dict]] = {}
    for ds, entry in first["results"].items():
        rows[ds] = {"n_all": entry["n_all"], "n_answerable": entry["n_answerable"], "methods": {"BM25": entry["methods"]["bm25"]}}
        for name, res in runs.items():
            e = res["results"][ds]
            rows[ds]["methods"][f"dense ({name})"] = e["methods"]["dense"]
        for name, res in runs.items():
            e = res["results"][ds]
            rows[ds]["methods"][f"hybrid ({name}, λ={res['config']['hybrid_lambda']})"] = e["methods"]["hybrid"]
    training = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, d in pairs(args.train).items():
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        vals = [m for m in metrics if m["kind"] == "validation"]
        steps = [m for m in metrics if m["kind"] == "train"]
        best = json.loads((d / "best" / "validation.json").read_text()) if (d / "best" / "validation.json").is_file() else None
        training[name] = {"config": json.loads((d / "config.json").read_text()), "validation": vals, "best": best,
                          "steps": len(steps), "mean_questions_per_s": round(sum(m["questions_per_s"] for m in steps) / max(len(steps), 1), 2),
                          "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None}  # fmt: skip
        for f in ("metrics.jsonl", "config.json"):
            shutil.copy(d / f, args.out / f"{name}.{f}")
    lines = ["| test set | method | " + " | ".join(f"top-{k}" for k in KS) + " | " + " | ".join(f"ans. top-{k}" for k in KS) + " |",
             "|---|---|" + "---:|" * (2 * len(KS))]  # fmt: skip
    for ds, entry in rows.items():
        for i, (method, rep) in enumerate(entry["methods"].items()):
            label = f"{ds} ({entry['n_all']} q, {entry['n_answerable']} answerable)" if i == 0 else ""
            lines.append(f"| {label} | {method} | " + " | ".join(f"{rep['all'][f'top{k}']:.1f}" for k in KS) + " | "
                         + " | ".join(f"{rep['answerable'][f'top{k}']:.1f}" for k in KS) + " |")  # fmt: skip
    md = ["# Fine-tuned DPR encoders on the embedded benchmark", "", "Runs: " + ", ".join(f"`{n}` = {d}" for n, d in pairs(args.run).items()), "",
          "\n".join(lines), ""]  # fmt: skip
    for name, t in training.items():
        md.append(f"## training run `{name}`")
        c = t["config"]
        md.append(f"batch {c['batch_size']}, {c['hard_negatives']} hard negative(s), lr {c['lr']}, {c['epochs']} epochs, "
                  f"{t['steps']} steps, {t['mean_questions_per_s']} questions/s on average; loss {t['first_loss']} -> {t['last_loss']}")  # fmt: skip
        md.append("")
        md.append("| after step | avg. rank of positive (pool) | pool top-1 | pool top-5 | pool top-20 |")
        md.append("|---:|---:|---:|---:|---:|")
        for v in t["validation"]:
            md.append(f"| {v['step']} | {v['avg_rank']} of {v['pool']} | {v['top1']} | {v['top5']} | {v['top20']} |")
        md.append("")
    (args.out / "results.md").write_text("\n".join(md), encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps({"runs": {n: str(d) for n, d in pairs(args.run).items()}, "results": rows,
                                                       "training": training}, indent=1, ensure_ascii=False), encoding="utf-8")  # fmt: skip
    print("\n".join(md))


if __name__ == "__main__":
    main()
