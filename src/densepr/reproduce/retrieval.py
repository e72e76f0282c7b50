"""Retrieval stages: passages, BM25, dense encoding, the hybrid lambda, evaluation of each test set.

Each function builds one :class:`~densepr.stages.Stage` over the :class:`~densepr.reproduce.context.Job`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from densepr.data.passages import Corpus, write_passages_tsv
from densepr.data.qa import QASet
from densepr.data.runs import write_dpr_results, write_trec_run
from densepr.data.summaries import load_wiki_summaries
from densepr.evaluate.topk import accuracy_report, topk_curve
from densepr.evaluate.tuning import tune_lambda
from densepr.fileio.atomic import file_name, read_json, write_json
from densepr.fileio.identity import file_identity
from densepr.fileio.manifest import sha256_file
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import Embeddings, encode_corpus
from densepr.models.encoder import load_biencoder
from densepr.reproduce.context import Job, load_sets
from densepr.reproduce.profiles import PROFILES
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.fusion import PAPER_LAMBDA
from densepr.retrieve.index_dir import IndexDir
from densepr.retrieve.modes import Mode
from densepr.retrieve.retriever import open_corpus
from densepr.stages import Stage


def passages(job: Job) -> Stage:
    path, limit = IndexDir(job.cfg.out_dir).passages, PROFILES[job.cfg.profile].corpus_limit

    def build() -> Corpus:
        corpus = load_wiki_summaries(job.data.summaries)
        n = write_passages_tsv(iter(corpus) if limit is None else itertools.islice(corpus, limit), path)
        job.log(f"wrote {n} passages to {path}")
        return open_corpus(job.cfg.out_dir)  # what later stages read: the store beside it, as a rerun loads it

    settings = {"summaries": sha256_file(job.data.summaries), **({"first": limit} if limit is not None else {})}
    return Stage("passages", build, lambda: open_corpus(job.cfg.out_dir), settings, (), [path])


def bm25(job: Job) -> Stage:
    d = IndexDir(job.cfg.out_dir).bm25

    def build() -> BM25Index:
        index = BM25Index.build(job.corpus())
        index.save(d)
        job.log(f"built BM25 index (k1={index.k1}, b={index.b}) in {d}")
        return index

    return Stage("bm25", build, lambda: BM25Index.load(d, corpus=job.corpus()), {}, ("passages",), [d])


def dense(job: Job, name: str = "dense", model: Callable[[], str] | None = None, upstream: Sequence[str] = ()) -> Stage:
    """Encode the passages with a (bi-)encoder and build the exact FAISS index ``<out>/<name>/``.

    ``model`` gives the encoder's directory once the stages before have run (default: ``--encoder``
    or the embedded MiniLM, whose weights' sha256 are then part of the settings; a trained
    model's are covered by its training stage's fingerprint, in ``upstream``).
    """
    suffix = name.removeprefix("dense")
    d_index, emb_dir = job.cfg.out_dir / name, job.cfg.out_dir / f"embeddings{suffix}"
    settings: dict = {"batch_size": job.cfg.passage_batch_size}
    if model is None:
        root = Path(job.encoder_path)
        weights = [f for f in root.rglob("*") if f.suffix in (".safetensors", ".bin")]
        settings.update(encoder=job.encoder_path, weights=dict(file_identity(root, weights, "sha256")))
        model = lambda: job.encoder_path  # noqa: E731

    def build() -> DenseIndex:
        path = Path(model())
        q_enc, p_enc = load_biencoder(path.resolve() if path.exists() else path, device=job.cfg.device)
        corpus = job.corpus()
        job.timed(f"encode passages ({name})", encode_corpus, p_enc, corpus, emb_dir, question_encoder=q_enc,
                   batch_size=job.cfg.passage_batch_size, show_progress=job.show_progress)  # fmt: skip
        index = DenseIndex.build(Embeddings.open(emb_dir, corpus))
        index.save(d_index)
        index.bind(corpus)
        job.log(f"built exact FAISS index ({len(index)} x {index.dim}) in {d_index}")
        return index

    return Stage(name, build, lambda: DenseIndex.load(d_index, corpus=job.corpus()), settings, ("passages", *upstream), [d_index])


# -- tuning and evaluation


def _tune_sets(job: Job) -> list[QASet]:
    if job.plan is not None:  # the held-out dev questions: never trained on
        from densepr.train.mining import heldout_path

        return [job.data.resolve_qa(str(heldout_path(job.cfg.out_dir / "train-data" / "train-dev.json")), limit=job.cfg.tune_limit)]
    return load_sets(job.data, job.cfg.tune_sets, job.cfg.tune_limit)


def tune(job: Job) -> Stage:
    index_dir, cfg = IndexDir(job.cfg.out_dir), job.cfg
    path = index_dir.hybrid
    sets = _tune_sets(job)
    names = [s.name for s in sets] if job.plan else list(cfg.tune_sets)

    def build() -> tuple[float, dict]:
        best, grid = tune_lambda(job.retriever(), job.matcher(), sets, show_progress=job.show_progress)
        index_dir.write_hybrid(best, grid, names, cfg.tune_limit, "top-20 accuracy")
        return best, grid

    def load() -> tuple[float, dict]:
        saved = read_json(path)
        return saved["lambda"], saved["grid"]

    settings = {"sets": names, "questions": [q.fingerprint() for q in sets], "limit": cfg.tune_limit, "depth": cfg.depth}
    upstream = ("passages", "bm25", "dense", *(("mine",) if job.plan else ()))
    return Stage("tune", build, load, settings, upstream, [path])


def evaluate(job: Job, qas: QASet) -> Stage:
    """Retrieve one test set with every method, score it, write its TREC runs (and its scores)."""
    cfg, out, methods = job.cfg, job.cfg.out_dir, [str(m) for m in job.methods]
    scores = out / "evaluation" / f"{file_name(qas.name)}.json"
    runs = out / "runs"
    outputs = [scores] + [runs / f"{qas.name}.{m}.trec" for m in methods]
    outputs += [runs / f"{qas.name}.{m}.json" for m in methods] if cfg.save_dpr_json else []
    others = [m.removeprefix("dense-") for m in methods if m.startswith("dense-")]

    def build() -> tuple[dict, dict]:
        retriever, corpus, matcher = job.retriever(), job.corpus(), job.matcher()
        t0 = time.perf_counter()
        found = retriever.retrieve_all(qas.questions, cfg.k, tuple(Mode), job.show_progress, also_lambdas=(PAPER_LAMBDA,))
        found.update({f"dense-{m}": job.dense_only(m).retrieve(qas.questions, cfg.k, Mode.DENSE, job.show_progress) for m in others})
        ranked = {m: found[m] for m in methods}
        job.timings["retrieve " + qas.name] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        answerable = matcher.answerable(qas)
        entry = {"n_all": len(qas), "n_answerable": int(answerable.sum()), "match": qas.match, "methods": {}}
        curves = {}
        all_hits = matcher.hits_many([res.rows for res in ranked.values()], qas)
        for (method, res), hits in zip(ranked.items(), all_hits):
            entry["methods"][method] = accuracy_report(hits, answerable)
            curves[method] = {
                "all": np.round(100 * topk_curve(hits, cfg.k), 2).tolist(),
                "answerable": np.round(100 * topk_curve(hits[answerable], cfg.k), 2).tolist(),
            }
            qids = [str(i) for i in range(len(qas))]
            write_trec_run(runs / f"{qas.name}.{method}.trec", qids, res, corpus.ids, tag=f"densepr-{method}")
            if cfg.save_dpr_json:
                write_dpr_results(runs / f"{qas.name}.{method}.json", qas.questions,
                                  [q.answers for q in qas.items], res, corpus, hits)  # fmt: skip
        write_json(scores, {"set": qas.name, "results": entry, "curves": curves})
        job.timings["evaluate " + qas.name] = round(time.perf_counter() - t0, 2)
        return entry, curves

    def load() -> tuple[dict, dict]:
        saved = read_json(scores)
        return saved["results"], saved["curves"]

    settings = {"set": qas.name, "questions": qas.fingerprint(), "limit": cfg.limit, "k": cfg.k, "depth": cfg.depth,
                "methods": methods, "dpr_json": cfg.save_dpr_json}  # fmt: skip
    name = f"evaluate-{file_name(qas.name)}"
    upstream = ("passages", "bm25", "dense", "tune", *(f"dense-{m}" for m in others))
    return Stage(name, build, load, settings, upstream, outputs, group="evaluate")
