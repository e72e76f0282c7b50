"""Round 2 (re-mined hard negatives) trained from round 1's weights or from the initial ones.

Runs the DPR experiment's retriever stages of ``densepr reproduce --profile dpr`` (same stages,
same records, so a killed run resumes) without the ablation, zero-shot and reader stages:
passages -> BM25 -> mine -> round 1 -> re-mine with round 1 -> round 2 from each init in
``--inits`` -> top-k accuracy of BM25, round 1 and each round 2 on the test sets (all questions
and the answerable subset). Both round 2 models train on the same re-mined data in the same run,
so the comparison does not carry the ±1-point spread between runs of CPU training.

    python benchmarks/training/round2_init.py --output runs/round2-init [--inits initial,round1] [--sets nq-test,trivia-test]
    python benchmarks/training/round2_init.py --output runs/round2-init --inits round1,round1:2 -o round2-epochs.json  # 1 vs 2 epochs
    python benchmarks/training/round2_init.py --output runs/round2-init --inits round1,round1:1:2 -o round2-hard.json  # 1 vs 2 hard negatives
    python benchmarks/training/round2_init.py --output runs/round1-3ep --round1-epochs 3 --inits round1 -o round1-epochs.json  # a longer round 1

``--output`` can be a ``reproduce --profile dpr`` output directory: its finished stages are reused.
Prints a table and writes benchmarks/training/results/round2-init.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.data.fetch import fetch_embedded
from densepr.evaluate.topk import accuracy_report
from densepr.fileio.atomic import write_json
from densepr.index.dense import DenseIndex
from densepr.models.encoder import Encoder
from densepr.reproduce import Job, ReproduceConfig, retrieval
from densepr.reproduce.training import mine, remine, train_and_encode
from densepr.retrieve.modes import Mode
from densepr.retrieve.retriever import Retriever

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=Path("runs/round2-init"))
    ap.add_argument("--inits", default="initial,round1",
                    help="round 2's starting weights, in the order trained; INIT:E trains E epochs instead of the plan's, "
                         "INIT:E:H with H re-mined hard negatives per question")
    ap.add_argument("--round1-epochs", type=int, default=None, help="train round 1 (and so re-mine with) this many epochs instead of the plan's")
    ap.add_argument("--sets", default="nq-test,trivia-test")
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions of each test set")
    ap.add_argument("--profile", default="dpr", choices=("dpr", "dpr-smoke"), help="dpr-smoke: a few steps on 2,000 passages (a check of this script)")
    ap.add_argument("-o", "--json", type=Path, default=RESULTS / "round2-init.json")
    args = ap.parse_args()
    inits = [i.strip() for i in args.inits.split(",") if i.strip()]
    variants = []  # (init, epochs or None, hard negatives or None), parsed once
    for i in inits:
        init, *rest = i.split(":")
        if init not in ("initial", "round1") or len(rest) > 2 or not all(n.isdigit() and int(n) > 0 for n in rest):
            ap.error(f"--inits: 'initial' or 'round1', optionally ':EPOCHS[:HARD_NEGATIVES]', not {i!r}")
        variants.append((init, *(int(n) for n in rest), *(None,) * (2 - len(rest))))
    if args.round1_epochs is not None and args.round1_epochs < 1:
        ap.error("--round1-epochs: at least 1")

    t_start = time.perf_counter()
    cfg = ReproduceConfig(out_dir=args.output, profile=args.profile)
    job = Job(cfg, print, show_progress=True)
    plan, runner = job.plan, job.runner
    fetch_embedded(None, verify=False, log=print)
    runner.run(retrieval.passages(job))
    runner.run(retrieval.bm25(job))
    runner.run(mine(job))
    round1_epochs = args.round1_epochs or plan.epochs
    train_and_encode(job, "round1", "mine", plan.hard_negatives, round1_epochs, None, "dense-round1")
    runner.run(remine(job))
    indexes = {f"round 1 ({round1_epochs} epoch{'s' if round1_epochs > 1 else ''})": "dense-round1"}
    for init, e, h in variants:
        default_epochs, start = replace(plan, round2_init=init, epochs=round1_epochs).round2()
        epochs, hard = e or default_epochs, h or plan.hard_negatives
        # what reproduce trains keeps its stage names, so reproduce reuses it; the other variants take its slots
        name = init + (f"-{epochs}ep" if epochs != default_epochs else "") + (f"-{hard}hn" if hard != plan.hard_negatives else "")
        model, index = ("round2", "dense") if name == plan.round2_init else (f"round2-{name}", f"dense-round2-{name}")
        train_and_encode(job, model, "remine", hard, epochs, start, index, slot="round2")
        indexes[f"round 2 from {init} weights ({epochs} epoch{'s' if epochs > 1 else ''}, {hard} hard neg.)"] = index

    corpus, matcher = job.corpus(), job.matcher()
    bm25 = runner.done["bm25"].get()
    rows: dict[str, dict] = {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        qas = job.data.resolve_qa(name, limit=args.limit)
        answerable = matcher.answerable(qas)
        runs = {"BM25": Retriever(corpus, bm25, None, None).retrieve(qas.questions, 100, Mode.BM25).rows}
        for label, index in indexes.items():
            dense = DenseIndex.load(cfg.out_dir / index, corpus=corpus)
            r = Retriever(corpus, None, dense, Encoder.load(dense.manifest["question_encoder"]))
            runs[label] = r.retrieve(qas.questions, 100, Mode.DENSE, show_progress=True).rows
        for label, hits in zip(runs, matcher.hits_many(list(runs.values()), qas)):
            rows.setdefault(label, {})[name] = accuracy_report(hits, answerable, ks=(1, 5, 20, 100))

    sets = list(next(iter(rows.values())))
    print(f"\ntop-20 / top-100 accuracy (%), answerable subset ({', '.join(sets)}); all questions in the JSON")
    print(f"{'method':<44}" + "".join(f"{s:>22}" for s in sets))
    for label, per in rows.items():
        print(f"{label:<44}" + "".join(f"{per[s]['answerable']['top20']:>13.1f} / {per[s]['answerable']['top100']:<6.1f}" for s in sets))
    write_json(args.json, {"command": "python benchmarks/training/round2_init.py --output " + str(args.output) + " --inits " + ",".join(inits)
                           + " --sets " + ",".join(sets) + (f" --round1-epochs {args.round1_epochs}" if args.round1_epochs else "") + (f" --limit {args.limit}" if args.limit else "") + f" --profile {args.profile}", "date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
                           "seconds": round(time.perf_counter() - t_start, 1), "stage_seconds": runner.timings(),
                           "plan": {"epochs": plan.epochs, "round1_epochs": round1_epochs, "round2_epochs": plan.round2_epochs, "hard_negatives": plan.hard_negatives, "lr": plan.lr, "batch_size": plan.batch_size},
                           "results": rows})  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
