"""Reading stages (profiles with a :class:`~densepr.reproduce.profiles.ReaderPlan`): the reader's data,
its cloze pre-training, its training, its passage selection and k tuned on held-out questions, and exact
match end to end on each test set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, astuple
from pathlib import Path

from densepr.data.qa import QASet
from densepr.data.runs import write_dpr_results
from densepr.fileio.atomic import file_name, read_json, write_json
from densepr.fileio.dirs import remove_tree
from densepr.progress import progress_bar
from densepr.reproduce.context import Job
from densepr.reproduce.training import mining_sets, same_run
from densepr.retrieve.index_dir import IndexDir
from densepr.retrieve.modes import Mode
from densepr.stages import Stage


def _heldout(job: Job, limit: int | None) -> QASet:
    from densepr.train.mining import heldout_path

    return job.data.resolve_qa(str(heldout_path(job.cfg.out_dir / "train-data" / "train-dev.json")), limit=limit)


def _reader_files(job: Job) -> tuple[list[Path], Path]:
    """``reader-data/``'s files: one per mining set (training) and the held-out questions' (validation)."""
    d = job.cfg.out_dir / "reader-data"
    return [d / f"{file_name(s)}.json" for s in job.plan.sets], d / "heldout.json"


def reader_data(job: Job) -> Stage:
    """The final retriever's (dense) top ``depth`` for every mining question, with ``has_answer``:
    ``reader-data/<set>.json`` (DPR's result JSON; the trainer drops the held-out questions) and
    ``reader-data/heldout.json`` (the held-out questions: validation)."""
    rp, sets = job.reader_plan, [*mining_sets(job), _heldout(job, None)]
    files = [*_reader_files(job)[0], _reader_files(job)[1]]

    def build() -> list[Path]:
        retriever, corpus, matcher = job.retriever(), job.corpus(), job.matcher()
        for qas, path in zip(sets, files):
            res = retriever.retrieve(qas.questions, rp.depth, Mode.DENSE, job.show_progress)
            write_dpr_results(path, qas.questions, [q.answers for q in qas.items], res, corpus, matcher.hits(res.rows, qas))
        job.log(f"reader data: top {rp.depth} of the trained retriever for {', '.join(f'{len(q)} {q.name}' for q in sets)}")
        return files

    settings = {"depth": rp.depth, "questions": [q.fingerprint() for q in sets], "mode": Mode.DENSE.value}
    return Stage("reader-data", build, lambda: files, settings, ("passages", "dense", "mine"), files)


def _reader_config(job: Job, train_files: Sequence[Path], run_dir: Path, init: str, **kw):
    """The reader recipe (ReaderPlan) as a training config: ``train-reader``'s and ``reader-cloze``'s."""
    from densepr.train.config import ReaderTrainConfig

    rp = job.reader_plan
    return ReaderTrainConfig(train_files=[str(f) for f in train_files], output_dir=str(run_dir), init=init,
                             passages=rp.passages, depth=rp.depth, batch_size=rp.batch_size, max_length=rp.max_length, lr=rp.lr,
                             warmup_steps=rp.warmup_steps, max_steps=rp.max_steps, save_every=rp.save_every, dropout=rp.dropout,
                             span_loss=rp.span_loss, head_lr=rp.head_lr, precision=rp.train_precision or job.plan.precision, **kw)  # fmt: skip


def _train_reader_run(job: Job, cfg, timer: str) -> None:
    """Train reader config ``cfg``, resuming a killed run of the same settings from its last checkpoint."""
    from densepr.train.reader import train_reader

    run_dir = Path(cfg.output_dir)
    resume = (run_dir / "config.json").is_file() and same_run(read_json(run_dir / "config.json"), cfg)
    if not resume:
        remove_tree(run_dir)  # a run of other settings (or none): start afresh
    job.timed(timer, train_reader, cfg, resume=resume, device=job.cfg.device, show_progress=job.show_progress, log=job.log)


def reader_cloze(job: Job) -> Stage:
    """The reader pre-trained on cloze questions (run only when ``ReaderPlan.cloze`` > 0; Dhingra et al.,
    NAACL 2018; Lewis et al., ACL 2019): ``cloze/cloze.json``, questions made from the corpus's own sentences
    by :mod:`densepr.train.cloze` (no QA set's question or answer; BM25's top passages as negatives), then one
    epoch of the reader recipe from the embedded weights into ``models/reader-cloze/``, whose ``final/`` is
    where ``train-reader`` starts."""
    from densepr.train.cloze import CLOZE_SEED, cloze_records, write_cloze

    rp, run_dir, data = job.reader_plan, job.cfg.out_dir / "models" / "reader-cloze", job.cfg.out_dir / "cloze" / "cloze.json"
    cfg = _reader_config(job, [data], run_dir, job.model_dir(rp.model), epochs=1)

    def build() -> Path:
        bm25 = job.runner.done["bm25"].get()
        records = job.timed("cloze questions", cloze_records, job.corpus(), bm25, rp.cloze, CLOZE_SEED, rp.depth)
        write_cloze(records, data)
        job.log(f"reader pre-training: {len(records)} cloze questions from {len(job.corpus())} passages")
        _train_reader_run(job, cfg, "train reader (cloze)")
        return run_dir / "final"

    settings = {"questions": rp.cloze, "seed": CLOZE_SEED, **{k: v for k, v in asdict(cfg).items() if k not in ("train_files", "output_dir", "init")},
                **({"init": rp.model} if rp.model != "embedded" else {})}  # fmt: skip
    return Stage("reader-cloze", build, lambda: run_dir / "final", settings, ("passages", "bm25"), [data, run_dir / "final"])


def train_reader(job: Job) -> Stage:
    """DPR's reader from ``ReaderPlan.model``'s weights (the embedded MiniLM by default; new heads; or from ``reader-cloze``'s reader when
    ``ReaderPlan.cloze`` > 0) into ``models/reader/``; its ``best/`` (by held-out EM) is the output. A
    killed run resumes from its last checkpoint."""
    from densepr.train.mining import heldout_path

    rp, run_dir = job.reader_plan, job.cfg.out_dir / "models" / "reader"
    train_files, dev_file = _reader_files(job)
    held = heldout_path(job.cfg.out_dir / "train-data" / "train-dev.json")
    cloze = rp.cloze > 0
    init = job.cfg.out_dir / "models" / "reader-cloze" / "final" if cloze else job.model_dir(rp.model)
    cfg = _reader_config(job, train_files, run_dir, str(init), dev_file=str(dev_file), holdout=[str(held)], epochs=rp.epochs,
                              dev_limit=rp.dev_limit)  # fmt: skip

    def build() -> Path:
        _train_reader_run(job, cfg, "train reader")
        return run_dir / "best"

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("train_files", "output_dir", "dev_file", "holdout", "init")}
    settings["init"] = "reader-cloze" if cloze else rp.model  # "embedded" (MiniLM): as before models existed
    upstream = ("reader-data", "reader-cloze") if cloze else ("reader-data",)
    return Stage("train-reader", build, lambda: run_dir / "best", settings, upstream, [run_dir / "best"],
                 added={"precision": "fp32"})  # fmt: skip


def tune_reader(job: Job) -> Stage:
    """Per retrieval mode, the passage selection (DPR's rule or fused with the retriever score) and k
    with the best EM on held-out questions, stored with a copy of the trained reader: ``<out>/reader/``,
    which ``densepr answer/serve`` and ``Pipeline.load`` find beside the index."""
    from densepr.models.reader import Reader
    from densepr.pipeline import tune_selection

    rp, dst = job.reader_plan, IndexDir(job.cfg.out_dir).reader_dir
    held = _heldout(job, rp.tune_limit)

    def build() -> dict:
        reader = Reader.load(job.runner.done["train-reader"].get(), job.cfg.device)
        choices = {}
        with progress_bar(None, "read held-out questions", job.show_progress, unit="window") as advance:
            for mode in rp.modes:
                best = job.timed("tune reader", tune_selection, job.retriever(), reader, held, mode, rp.ks, progress=advance)
                reader.config.selection[mode] = choices[mode] = {**best, "tuned_on": held.name}
                job.log(f"reader, {mode}: EM {best['em']:.1f} at k={best['k']} with selection x{best['relevance']:g} + span "
                         f"x{best['span']:g} + retriever x{best['retriever']:g}, aggregation {best['aggregate']:g} "
                         f"(DPR's rule: {best['paper_em']:.1f} at k={best['paper_k']})")  # fmt: skip
        from densepr.fileio.dirs import atomic_dir
        from densepr.models.hf import MODEL_FILES

        with atomic_dir(dst, "reader", MODEL_FILES) as tmp:  # built beside, swapped in; no fixed-name sibling deleted
            reader.save(tmp)
        return choices

    from densepr.pipeline import SELECTION_GRID

    settings = {"questions": held.fingerprint(), "limit": rp.tune_limit, "modes": list(rp.modes), "ks": list(rp.ks),
                "grid": [list(astuple(s)) for s in SELECTION_GRID]}  # a changed grid changes the choice: rerun
    return Stage("tune-reader", build, lambda: read_json(dst / "densepr_reader.json").get("selection", {}), settings,
                 ("passages", "bm25", "dense", "train-reader"), [dst])  # fmt: skip


def qa(job: Job, qas: QASet) -> Stage:
    """End-to-end exact match and F1 of one test set (its first ``qa_limit`` questions) with the
    tuned reader over BM25's and the trained retriever's top k (each passage read once)."""
    from densepr.pipeline import evaluate_qa

    rp, path = job.reader_plan, job.cfg.out_dir / "qa" / f"{file_name(qas.name)}.json"

    def build(pieces: Path) -> dict:  # a killed read resumes from its finished pieces of questions
        with progress_bar(None, f"read {qas.name}", job.show_progress, unit="window") as advance:
            res = job.timed(f"qa {qas.name}", evaluate_qa, job.retriever(), job.reader(), qas, rp.modes, rp.ks,
                             job.matcher(), progress=advance, pieces=pieces, log=lambda m: job.log(f"qa {qas.name}: {m}"))  # fmt: skip
        write_json(path, res)
        return res

    settings = {"set": qas.name, "questions": qas.fingerprint(), "limit": rp.qa_limit, "modes": list(rp.modes), "ks": list(rp.ks),
                "precision": rp.read_precision}  # fmt: skip
    return Stage(f"qa-{file_name(qas.name)}", build, lambda: read_json(path), settings,
                 ("passages", "bm25", "dense", "tune", "tune-reader"), [path], group="qa", resumable=True, added={"precision": "fp32"})  # fmt: skip
