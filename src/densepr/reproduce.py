"""The main job: DPR's retrieval evaluation end to end on the embedded benchmark.

fetch -> passages -> BM25 index -> passage encoding -> FAISS index -> tune the hybrid
lambda on dev questions -> retrieve each test set with every method -> DPR top-k accuracy
(all questions and the answerable subset) -> markdown table, JSON, plot -> regression check
against the committed figures.

Every stage's output lands in the output directory (an index directory, see
:mod:`densepr.retrieve.retriever`) and runs on :mod:`densepr.stages`: a stage whose output is
complete, intact and made from the same inputs and settings is skipped, so a killed run resumes
where it stopped; a changed input reruns that stage and every later one; ``--from STAGE`` forces
a rerun. ``<out>/stages/<stage>.json`` records each finished stage.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
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
from densepr.fileio import atomic_write, read_json, sha256_file, write_json
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import Embeddings, encode_corpus
from densepr.machine import machine_info
from densepr.models.encoder import Encoder, load_biencoder
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.fusion import PAPER_LAMBDA
from densepr.retrieve.modes import Mode
from densepr.retrieve.retriever import Retriever
from densepr.stages import Stage, StageRunner

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
    force_from: str | None = None  # rerun this stage and all after it (see STAGES)
    limit: int | None = field(default=None, init=False)
    tune_limit: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise DenseprError(f"unknown profile {self.profile!r}; choose from {', '.join(PROFILES)}")
        self.limit, self.tune_limit = PROFILES[self.profile]
        self.out_dir = Path(self.out_dir)
        if self.force_from is not None and self.force_from not in STAGES:
            raise DenseprError(f"--from {self.force_from!r}: no such stage; stages: {', '.join(STAGES)}")




# The main job's stages, in order (``densepr reproduce --from STAGE`` reruns one and all after it).
# ``evaluate`` is one stage per test set (``evaluate-<set>``: retrieve with every method, score,
# write the TREC runs); ``report`` writes curves.json, results.md and topk.png. results.json
# (date, machine, timings) is written by every run.
STAGES = ("passages", "bm25", "dense", "tune", "evaluate", "report")


def qa_fingerprint(qas: QASet) -> str:
    """sha256 of a QA set's questions, answers and matching: an evaluation stage's input."""
    items = [[q.question, list(q.answers)] for q in qas.items]
    return hashlib.sha256(json.dumps([qas.match, items], ensure_ascii=False).encode()).hexdigest()


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class Job:
    """The main job's stages on a :class:`~densepr.stages.StageRunner`: each skipped when current,
    and a skipped stage's artefact is loaded only when a stage that runs reads it."""

    def __init__(self, cfg: ReproduceConfig, log: Callable[[str], None], show_progress: bool) -> None:
        self.cfg, self.log, self.show_progress = cfg, log, show_progress
        self.timings: dict[str, float] = {}  # steps inside stages (encode passages, retrieve <set>, ...)
        self.data = EmbeddedData(cfg.cache_dir)
        self.runner = StageRunner(cfg.out_dir, STAGES, cfg.force_from, log=log)
        self.encoder_path = cfg.encoder or str(self.data.model_dir)
        self._encoders: tuple[Encoder, Encoder] | None = None
        self._retriever: Retriever | None = None

    def timed(self, name: str, fn: Callable, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.timings[name] = round(time.perf_counter() - t0, 2) + self.timings.get(name, 0.0)
        return out

    def encoders(self) -> tuple[Encoder, Encoder]:
        if self._encoders is None:
            self._encoders = load_biencoder(self.encoder_path, device=self.cfg.device)
        return self._encoders

    def corpus(self) -> Corpus:
        return self.runner.done["passages"].get()

    def retriever(self) -> Retriever:
        """BM25 + dense + E_Q with the tuned lambda (loaded on first use)."""
        if self._retriever is None:
            done = self.runner.done
            self._retriever = Retriever(self.corpus(), done["bm25"].get(), done["dense"].get(), self.encoders()[0], depth=self.cfg.depth)
        if "tune" in self.runner.done:
            self._retriever.hybrid_lambda = self.runner.done["tune"].get()[0]
        return self._retriever

    def matcher(self) -> AnswerMatcher:
        return AnswerMatcher(self.corpus().texts)

    def passages(self) -> Stage:
        path = self.cfg.out_dir / "passages.tsv"

        def build() -> Corpus:
            corpus = load_wiki_summaries(self.data.summaries)
            write_passages_tsv(corpus, path)
            self.log(f"wrote {len(corpus)} passages to {path}")
            return corpus

        return Stage("passages", build, lambda: load_corpus(path), {"summaries": sha256_file(self.data.summaries)}, (), [path])

    def bm25(self) -> Stage:
        d = self.cfg.out_dir / "bm25"

        def build() -> BM25Index:
            index = BM25Index.build(self.corpus())
            index.save(d)
            self.log(f"built BM25 index (k1={index.k1}, b={index.b}) in {d}")
            return index

        return Stage("bm25", build, lambda: BM25Index.load(d, corpus=self.corpus()), {}, ("passages",), [d])

    def dense(self) -> Stage:
        d_index, emb_dir = self.cfg.out_dir / "dense", self.cfg.out_dir / "embeddings"
        root = Path(self.encoder_path)
        weights = {str(f.relative_to(root)): sha256_file(f) for f in sorted(root.rglob("*")) if f.suffix in (".safetensors", ".bin")}

        def build() -> DenseIndex:
            q_enc, p_enc = self.encoders()
            corpus = self.corpus()
            self.timed("encode passages", encode_corpus, p_enc, corpus, emb_dir, question_encoder=q_enc.name,
                       batch_size=self.cfg.passage_batch_size, show_progress=self.show_progress)  # fmt: skip
            index = DenseIndex.build(Embeddings.open(emb_dir, corpus))
            index.save(d_index)
            index.bind(corpus)
            self.log(f"built exact FAISS index ({len(index)} x {index.dim}) in {d_index}")
            return index

        settings = {"encoder": self.encoder_path, "weights": weights, "batch_size": self.cfg.passage_batch_size}
        return Stage("dense", build, lambda: DenseIndex.load(d_index, corpus=self.corpus()), settings, ("passages",), [d_index])

    def tune(self) -> Stage:
        path, cfg = self.cfg.out_dir / "hybrid.json", self.cfg
        sets = _sets(self.data, cfg.tune_sets, cfg.tune_limit)

        def build() -> tuple[float, dict]:
            best, grid = tune_lambda(self.retriever(), self.matcher(), sets)
            write_json(path, {"lambda": best, "tuned_on": list(cfg.tune_sets), "questions_per_set": cfg.tune_limit,
                              "metric": "top-20 accuracy", "grid": grid})  # fmt: skip
            return best, grid

        def load() -> tuple[float, dict]:
            saved = read_json(path)
            return saved["lambda"], saved["grid"]

        settings = {"sets": list(cfg.tune_sets), "questions": [qa_fingerprint(q) for q in sets], "limit": cfg.tune_limit, "depth": cfg.depth}
        return Stage("tune", build, load, settings, ("passages", "bm25", "dense"), [path])

    def evaluate(self, qas: QASet) -> Stage:
        """Retrieve one test set with every method, score it, write its TREC runs (and its scores)."""
        cfg, out = self.cfg, self.cfg.out_dir
        scores = out / "evaluation" / f"{_file_name(qas.name)}.json"
        runs = out / "runs"
        outputs = [scores] + [runs / f"{qas.name}.{m}.trec" for m in METHODS]
        outputs += [runs / f"{qas.name}.{m}.json" for m in METHODS] if cfg.save_dpr_json else []

        def build() -> tuple[dict, dict]:
            retriever, corpus, matcher = self.retriever(), self.corpus(), self.matcher()
            t0 = time.perf_counter()
            found = retriever.retrieve_all(qas.questions, cfg.k, tuple(Mode), self.show_progress, also_lambdas=(PAPER_LAMBDA,))
            ranked = {str(m): found[str(m)] for m in METHODS}
            self.timings["retrieve " + qas.name] = round(time.perf_counter() - t0, 2)
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
            self.timings["evaluate " + qas.name] = round(time.perf_counter() - t0, 2)
            return entry, curves

        def load() -> tuple[dict, dict]:
            saved = read_json(scores)
            return saved["results"], saved["curves"]

        settings = {"set": qas.name, "questions": qa_fingerprint(qas), "limit": cfg.limit, "k": cfg.k, "depth": cfg.depth,
                    "methods": [str(m) for m in METHODS], "dpr_json": cfg.save_dpr_json}  # fmt: skip
        name = f"evaluate-{_file_name(qas.name)}"
        return Stage(name, build, load, settings, ("passages", "bm25", "dense", "tune"), outputs, group="evaluate")

    def report(self, evaluated: dict[str, str]) -> Stage:
        """curves.json, results.md and topk.png from the evaluated sets (``{set: its stage}``)."""
        out, cfg = self.cfg.out_dir, self.cfg
        dense_name = "all-MiniLM-L6-v2, zero-shot" if cfg.encoder is None else str(cfg.encoder)

        def build() -> None:
            done = self.runner.done
            best = done["tune"].get()[0]
            results = {n: done[s].get()[0] for n, s in evaluated.items()}
            curves = {n: done[s].get()[1] for n, s in evaluated.items()}
            write_json(out / "curves.json", curves, indent=None)
            title = f"densepr on the embedded benchmark ({len(self.corpus())} Wikipedia summaries; dense = {dense_name})"
            with atomic_write(out / "results.md") as fh:
                fh.write(f"# {title}\n\nhybrid λ = {best} (tuned on dev)\n\n" + markdown_table(results, names=METHOD_NAMES))
            plot_topk(curves, out / "topk.png", METHOD_NAMES, title)

        upstream = ("passages", "tune", *evaluated.values())
        return Stage("report", build, settings={"sets": list(evaluated), "dense": dense_name}, upstream=upstream,
                     outputs=[out / "curves.json", out / "results.md", out / "topk.png"])  # fmt: skip


def _sets(data: EmbeddedData, names: Sequence[str], limit: int | None) -> list[QASet]:
    """Embedded sets by name, or QA files by path (e.g. a held-out slice written by build-train)."""
    return [data.resolve_qa(n, limit=limit) for n in names]


def run(cfg: ReproduceConfig, log: Callable[[str], None] = print, show_progress: bool = False) -> dict:
    """Run the main job; returns (and writes to ``<out>/results.json``) the full results.

    Each stage is skipped when its output is current (see :mod:`densepr.stages`); ``cfg.force_from``
    reruns one and all after it.
    """
    t_start = time.perf_counter()
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    job = Job(cfg, log, show_progress)
    runner = job.runner
    runner.timed("fetch", fetch_embedded, cfg.cache_dir, verify=False, log=log)
    runner.run(job.passages())
    runner.run(job.bm25())
    runner.run(job.dense())
    best, grid_scores = runner.run(job.tune()).get()
    log(f"hybrid lambda tuned on {', '.join(cfg.tune_sets)}: {best} (dev top-20 {grid_scores[str(best)]}%)")

    results, evaluated = {}, {}
    for qas in _sets(job.data, cfg.datasets, cfg.limit):
        done = runner.run(job.evaluate(qas))
        entry = results[qas.name] = done.get()[0]
        evaluated[qas.name] = done.stage.name
        log(f"{qas.name}: {len(qas)} questions, {entry['n_answerable']} answerable; top-20 "
            + ", ".join(f"{m} {r['all']['top20']:.1f}" for m, r in entry["methods"].items()))  # fmt: skip
    runner.run(job.report(evaluated))

    total = round(time.perf_counter() - t_start, 1)
    q_name = read_json(out / "dense" / "manifest.json").get("question_encoder") if cfg.encoder else "embedded:all-MiniLM-L6-v2"
    summary = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("cache_dir", "out_dir", "device", "force_from")},
                   "encoder": q_name, "hybrid_lambda": best},
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "timings_s": {**runner.timings(), **job.timings, "total": total},
        "stages": runner.rows,
        "results": results,
    }  # fmt: skip
    write_json(out / "results.json", summary)
    log("stages:\n" + runner.table().rstrip())
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

