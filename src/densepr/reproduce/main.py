"""The main job: :func:`run` runs every stage of a profile in order and writes ``results.json``.

Under torchrun, training runs on every process and the rest on rank 0.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from densepr.data.fetch import fetch_embedded
from densepr.data.pretrained import fetch_pretrained
from densepr.fileio.atomic import write_json
from densepr.fileio.dirs import dir_lock, writable_dir
from densepr.machine import machine_info
from densepr.reproduce.context import Job, load_sets, process_group
from densepr.reproduce.profiles import PROFILES, ReproduceConfig, dense_stage, model_label
from densepr.reproduce.reading import qa, reader_cloze, reader_data, train_reader, tune_reader
from densepr.reproduce.report import qa_results, report, training_summary
from densepr.reproduce.retrieval import bm25, dense, evaluate, passages, tune
from densepr.reproduce.training import available_memory_gib, memory_notice, mine, remine, train_and_encode, trains_on_cpu
from densepr.retrieve.index_dir import IndexDir
from densepr.stages import RECORDS


def run(cfg: ReproduceConfig, log: Callable[[str], None] = print, show_progress: bool = False) -> dict:
    """Run the main job; returns (and writes to ``<out>/results.json``) the full results.

    Under torchrun, training runs on every process and the rest on rank 0; only rank 0 returns
    the results (the others return ``{}``).

    Each stage is skipped when its output is current (see :mod:`densepr.stages`); ``cfg.force_from``
    reruns one and all after it. The run holds a lock on ``cfg.out_dir`` (:func:`~densepr.fileio.dir_lock`):
    a second run into the same directory is refused while this one runs.
    """
    rank, sync = process_group(cfg.device)
    if rank != 0:
        return _run(cfg, (lambda m: None), False, rank, sync)
    out = cfg.out_dir
    if not (out / RECORDS).is_dir():  # not a reproduce output yet: only a new or empty directory (a link: its target)
        writable_dir(out, "reproduce output")
    (out / RECORDS).mkdir(parents=True, exist_ok=True)  # marks it as one from the start: a killed run is rerun in place
    with dir_lock(out, "reproduce run"):  # held to the end: a second run in this directory is refused
        return _run(cfg, log, show_progress, rank, sync)


def _run(cfg: ReproduceConfig, log: Callable[[str], None], show_progress: bool, rank: int, sync: Callable) -> dict:
    t_start = time.perf_counter()
    out = cfg.out_dir
    sync(None)
    job = Job(cfg, log, show_progress, rank, sync)
    runner = job.runner
    if trains_on_cpu(cfg.device) and (notice := memory_notice(job.plan, available_memory_gib())) is not None:
        log(notice)  # the measured peak is host memory for CPU training; on a GPU the activations live there
    runner.timed("fetch", fetch_embedded, cfg.cache_dir, verify=False, log=log)
    for name in job.pretrained_models():  # e.g. profile dpr-gpu's all-mpnet-base-v2
        runner.timed(f"fetch-{name}", fetch_pretrained, name, cfg.cache_dir, verify=False, log=log)
    if PROFILES[cfg.profile].expected:
        log(f"profile {cfg.profile}: {PROFILES[cfg.profile].expected}")
    runner.run(passages(job))
    runner.run(bm25(job))
    if job.plan is None:
        runner.run(dense(job))
    else:
        plan = job.plan
        runner.run(dense(job, "dense-zeroshot"))
        runner.run(mine(job))
        for model, data, hard, epochs, init in (("inbatch", "mine", 0, plan.epochs, None), ("round1", "mine", plan.hard_negatives, plan.epochs, None),
                                                ("round2", "remine", plan.hard_negatives, *plan.round2())):
            if data == "remine":
                runner.run(remine(job))
            train_and_encode(job, model, data, hard, epochs, init, dense_stage(model))
    best, grid_scores = runner.run(tune(job)).get()
    tuned_on = "the held-out dev questions" if job.plan else ", ".join(cfg.tune_sets)
    log(f"hybrid lambda tuned on {tuned_on}: {best} (dev top-20 {grid_scores[str(best)]}%)")

    results, evaluated = {}, {}
    for qas in load_sets(job.data, cfg.datasets, cfg.limit):
        done = runner.run(evaluate(job, qas))
        entry = results[qas.name] = done.get()[0]
        evaluated[qas.name] = done.stage.name
        log(f"{qas.name}: {len(qas)} questions, {entry['n_answerable']} answerable; top-20 "
            + ", ".join(f"{m} {r['all']['top20']:.1f}" for m, r in entry["methods"].items()))  # fmt: skip
    qa_done: dict[str, str] = {}
    if job.reader_plan is not None:
        rp = job.reader_plan
        runner.run(reader_data(job))
        if rp.cloze:
            runner.run(reader_cloze(job))
        runner.run(train_reader(job))
        for mode, c in runner.run(tune_reader(job)).get().items():
            log(f"reader ({mode}): k={c['k']}, held-out EM {c['em']} (DPR's rule: {c['paper_em']} at k={c['paper_k']})")
        sets = load_sets(job.data, cfg.datasets, rp.qa_limit)
        for qas in sorted(sets, key=len):  # smallest first: in a long full-set run the finished sets come soonest
            done = runner.run(qa(job, qas))
            qa_done[qas.name] = done.stage.name
            res = done.get()
            log(f"{qas.name}: {len(qas)} questions read end to end; best EM "
                + ", ".join(f"{m} {max(v['em'] for v in res['modes'][m]['k'].values()):.1f}" for m in rp.modes))  # fmt: skip
        qa_done = {qas.name: qa_done[qas.name] for qas in sets}  # reported in the sets' order
    runner.run(report(job, evaluated, qa_done))
    if rank != 0:
        return {}  # rank 0 writes and returns the results
    training = training_summary(job) if job.plan else None

    total = round(time.perf_counter() - t_start, 1)
    q_name = IndexDir(out).dense_manifest().get("question_encoder") if cfg.encoder else "embedded:all-MiniLM-L6-v2"
    if job.plan:
        q_name = f"trained here from {model_label(job.plan.model)}"
    summary = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("cache_dir", "out_dir", "device", "force_from")},
                   "encoder": q_name, **({"reader_encoder": f"trained here from {model_label(job.reader_plan.model)}"} if job.reader_plan else {}),
                   "hybrid_lambda": best, **({"train": asdict(job.plan)} if job.plan else {}),
                   **({"reader": asdict(job.reader_plan)} if job.reader_plan else {})},
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "timings_s": {**runner.timings(), **job.timings, "total": total},
        "stages": runner.rows,
        "method_names": {str(m): job.names.get(str(m), str(m)) for m in job.methods},
        "results": results,
        **({"training": training} if training else {}),
        **({"qa": qa_results(job, qa_done)} if qa_done else {}),
    }  # fmt: skip
    write_json(out / "results.json", summary)
    log("stages:\n" + runner.table().rstrip())
    log(f"done in {total}s: {out / 'results.md'}, {out / 'topk.png'}, {out / 'results.json'}")
    return summary
