"""The main job: DPR's retrieval evaluation end to end on the embedded benchmark.

fetch -> passages -> BM25 index -> passage encoding -> FAISS index -> tune the hybrid
lambda on dev questions -> retrieve each test set with every method -> DPR top-k accuracy
(all questions and the answerable subset) -> markdown table, JSON, plot -> regression check
against the committed figures.

Every stage's output lands in the output directory (an index directory, see
:mod:`densepr.retrieve.retriever`) and is reused when already complete, so a killed run resumes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from densepr.data.fetch import EmbeddedData, fetch_embedded
from densepr.data.passages import Corpus, load_corpus, write_passages_tsv
from densepr.data.qa import QASet
from densepr.data.runs import write_dpr_results, write_trec_run
from densepr.data.summaries import load_wiki_summaries
from densepr.errors import DenseprError
from densepr.evaluate.answers import AnswerMatcher
from densepr.evaluate.report import markdown_table, plot_topk
from densepr.evaluate.topk import accuracy_report, topk_curve
from densepr.evaluate.tuning import tune_lambda
from densepr.fileio import read_json, write_json
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import Embeddings, encode_corpus
from densepr.machine import machine_info
from densepr.models.encoder import Encoder, load_biencoder
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.fusion import PAPER_LAMBDA
from densepr.retrieve.modes import Mode
from densepr.retrieve.retriever import Retriever

# Table rows: every retrieval mode, the hybrid with the tuned lambda and with the paper's 1.1.
METHODS = (Mode.BM25, Mode.DENSE, Mode.HYBRID, f"hybrid-{PAPER_LAMBDA}", Mode.RRF)
METHOD_NAMES = {**{m.value: m.label for m in Mode}, "hybrid": "hybrid (tuned λ)", f"hybrid-{PAPER_LAMBDA}": f"hybrid (λ={PAPER_LAMBDA})"}
PROFILES = {
    # name: (questions per test set, dev questions per tuning set); None = all
    "full": (None, 1000),
    "smoke": (300, 300),
}


@dataclass
class ReproduceConfig:
    """What the main job runs; the defaults are the embedded benchmark."""

    out_dir: Path = Path("runs/embedded")
    cache_dir: Path | None = None
    encoder: str | None = None  # a model or question_encoder/+passage_encoder/ dir; default: embedded MiniLM
    profile: str = "full"
    datasets: tuple[str, ...] = EmbeddedData.TEST_SETS
    tune_sets: tuple[str, ...] = ("nq-dev", "trivia-dev")
    k: int = 100
    depth: int = 1000
    passage_batch_size: int = 64
    question_batch_size: int = 128
    save_dpr_json: bool = False
    device: str | None = None
    limit: int | None = field(default=None, init=False)
    tune_limit: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise DenseprError(f"unknown profile {self.profile!r}; choose from {', '.join(PROFILES)}")
        self.limit, self.tune_limit = PROFILES[self.profile]
        self.out_dir = Path(self.out_dir)




class Stages:
    """Runs each stage once, reusing complete outputs; logs what it does and how long it took."""

    def __init__(self, cfg: ReproduceConfig, log: Callable[[str], None], show_progress: bool) -> None:
        self.cfg, self.log, self.show_progress = cfg, log, show_progress
        self.timings: dict[str, float] = {}
        self.data = EmbeddedData(cfg.cache_dir)

    def timed(self, name: str, fn: Callable, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.timings[name] = round(time.perf_counter() - t0, 2) + self.timings.get(name, 0.0)
        return out

    def corpus(self) -> Corpus:
        path = self.cfg.out_dir / "passages.tsv"
        corpus = load_wiki_summaries(self.data.summaries)
        if not path.is_file() or load_corpus(path).fingerprint() != corpus.fingerprint():
            write_passages_tsv(corpus, path)
            self.log(f"wrote {len(corpus)} passages to {path}")
        return corpus

    def bm25(self, corpus: Corpus) -> BM25Index:
        d = self.cfg.out_dir / "bm25"
        try:
            return BM25Index.load(d, corpus=corpus)
        except DenseprError:
            index = BM25Index.build(corpus)
            index.save(d)
            self.log(f"built BM25 index (k1={index.k1}, b={index.b}) in {d}")
            return index

    def dense(self, corpus: Corpus) -> tuple[DenseIndex, Encoder]:
        encoder_path = self.cfg.encoder or str(self.data.model_dir)
        q_enc, p_enc = load_biencoder(encoder_path, device=self.cfg.device)
        d_index = self.cfg.out_dir / "dense"
        try:
            index = DenseIndex.load(d_index, corpus=corpus)
            if index.manifest.get("encoder", {}).get("path") == p_enc.name:
                return index, q_enc
        except DenseprError:
            pass
        emb_dir = self.cfg.out_dir / "embeddings"
        self.timed("encode passages", encode_corpus, p_enc, corpus, emb_dir, question_encoder=q_enc.name,
                   batch_size=self.cfg.passage_batch_size, show_progress=self.show_progress)  # fmt: skip
        index = DenseIndex.build(Embeddings.open(emb_dir, corpus))
        index.save(d_index)
        index.bind(corpus)
        self.log(f"built exact FAISS index ({len(index)} x {index.dim}) in {d_index}")
        return index, q_enc


def _sets(data: EmbeddedData, names: Sequence[str], limit: int | None) -> list[QASet]:
    """Embedded sets by name, or QA files by path (e.g. a held-out slice written by build-train)."""
    return [data.resolve_qa(n, limit=limit) for n in names]


def run(cfg: ReproduceConfig, log: Callable[[str], None] = print, show_progress: bool = False) -> dict:
    """Run the main job; returns (and writes to ``<out>/results.json``) the full results."""
    t_start = time.perf_counter()
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(cfg, log, show_progress)
    st.timed("fetch", fetch_embedded, cfg.cache_dir, verify=False, log=log)
    corpus = st.timed("passages", st.corpus)
    bm25 = st.timed("bm25 index", st.bm25, corpus)
    dense, q_enc = st.timed("dense index", st.dense, corpus)
    retriever = Retriever(corpus, bm25, dense, q_enc, depth=cfg.depth)
    matcher = AnswerMatcher(corpus.texts)

    best, grid_scores = st.timed("tune lambda", tune_lambda, retriever, matcher, _sets(st.data, cfg.tune_sets, cfg.tune_limit))
    retriever.hybrid_lambda = best
    write_json(out / "hybrid.json", {"lambda": best, "tuned_on": list(cfg.tune_sets), "questions_per_set": cfg.tune_limit,
                                     "metric": "top-20 accuracy", "grid": grid_scores})  # fmt: skip
    log(f"hybrid lambda tuned on {', '.join(cfg.tune_sets)}: {best} (dev top-20 {grid_scores[str(best)]}%)")

    results, curves = {}, {}
    for qas in _sets(st.data, cfg.datasets, cfg.limit):
        t0 = time.perf_counter()
        found = retriever.retrieve_all(qas.questions, cfg.k, tuple(Mode), show_progress, also_lambdas=(PAPER_LAMBDA,))
        runs = {str(m): found[str(m)] for m in METHODS}
        st.timings["retrieve " + qas.name] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        answerable = matcher.answerable(qas)
        entry = {"n_all": len(qas), "n_answerable": int(answerable.sum()), "match": qas.match, "methods": {}}
        curves[qas.name] = {}
        all_hits = matcher.hits_many([res.rows for res in runs.values()], qas)
        for (method, res), hits in zip(runs.items(), all_hits):
            entry["methods"][method] = accuracy_report(hits, answerable)
            curves[qas.name][method] = {
                "all": np.round(100 * topk_curve(hits, cfg.k), 2).tolist(),
                "answerable": np.round(100 * topk_curve(hits[answerable], cfg.k), 2).tolist(),
            }
            qids = [str(i) for i in range(len(qas))]
            write_trec_run(out / "runs" / f"{qas.name}.{method}.trec", qids, res, corpus.ids, tag=f"densepr-{method}")
            if cfg.save_dpr_json:
                write_dpr_results(out / "runs" / f"{qas.name}.{method}.json", qas.questions,
                                  [q.answers for q in qas.items], res, corpus, hits)  # fmt: skip
        st.timings["evaluate " + qas.name] = round(time.perf_counter() - t0, 2)
        results[qas.name] = entry
        log(f"{qas.name}: {len(qas)} questions, {entry['n_answerable']} answerable; top-20 "
            + ", ".join(f"{m} {r['all']['top20']:.1f}" for m, r in entry["methods"].items()))  # fmt: skip

    total = round(time.perf_counter() - t_start, 1)
    summary = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("cache_dir", "out_dir", "device")},
                   "encoder": q_enc.name if cfg.encoder else "embedded:all-MiniLM-L6-v2", "hybrid_lambda": best},
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "timings_s": {**st.timings, "total": total},
        "results": results,
    }  # fmt: skip
    write_json(out / "results.json", summary)
    write_json(out / "curves.json", curves, indent=None)
    dense_name = "all-MiniLM-L6-v2, zero-shot" if cfg.encoder is None else str(cfg.encoder)
    title = f"densepr on the embedded benchmark ({len(corpus)} Wikipedia summaries; dense = {dense_name})"
    (out / "results.md").write_text(f"# {title}\n\nhybrid λ = {best} (tuned on dev)\n\n" + markdown_table(results, names=METHOD_NAMES), encoding="utf-8")
    plot_topk(curves, out / "topk.png", METHOD_NAMES, title)
    log(f"done in {total}s: {out / 'results.md'}, {out / 'topk.png'}, {out / 'results.json'}")
    return summary


# -- regression check against committed figures ---------------------------------------------
EXPECTED_RESOURCE = "expected-embedded.json"


def load_expected(path: str | os.PathLike[str] | None = None) -> dict:
    """The committed figures: ``{profile: {"tolerance": points, "results": {...}}}``."""
    if path is not None:
        return read_json(path)
    return json.loads(resources.files("densepr").joinpath("resources", EXPECTED_RESOURCE).read_text(encoding="utf-8"))


def check_against(summary: dict, expected: dict, profile: str) -> list[str]:
    """Every metric that differs from the committed figure by more than the tolerance.

    Returns:
        Human-readable differences (empty when everything is within tolerance).
    """
    if profile not in expected:
        return [f"no committed figures for profile {profile!r}"]
    ref, tol = expected[profile]["results"], float(expected[profile]["tolerance"])
    problems = []
    for ds, entry in ref.items():
        got = summary["results"].get(ds)
        if got is None:
            problems.append(f"{ds}: not evaluated")
            continue
        for key in ("n_all", "n_answerable"):
            if got[key] != entry[key]:
                problems.append(f"{ds}: {key} {got[key]} != committed {entry[key]}")
        for method, rep in entry["methods"].items():
            for subset, metrics in rep.items():
                for name, value in metrics.items():
                    if name == "n":
                        continue
                    now = got["methods"].get(method, {}).get(subset, {}).get(name)
                    if now is None or abs(now - value) > tol:
                        problems.append(f"{ds} {method} {subset} {name}: {now} vs committed {value} (tolerance ±{tol})")
    return problems


def expected_entry(summary: dict, tolerance: float) -> dict:
    """The part of a run's summary that is committed as the expected figures."""
    return {"tolerance": tolerance, "date": summary["date"], "machine": summary["machine"], "config": summary["config"],
            "results": summary["results"]}  # fmt: skip


def uses_defaults(cfg: ReproduceConfig) -> bool:
    """Only a run on the embedded defaults can be compared with the committed figures."""
    default = ReproduceConfig(profile=cfg.profile)
    return cfg.encoder is None and cfg.datasets == default.datasets and cfg.tune_sets == default.tune_sets and cfg.k == default.k and cfg.depth == default.depth

