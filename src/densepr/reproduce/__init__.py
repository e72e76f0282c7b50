"""The main job: DPR's retrieval evaluation end to end on the embedded benchmark.

Profiles ``full``/``smoke`` (zero-shot): fetch -> passages -> BM25 index -> passage encoding ->
FAISS index -> tune the hybrid lambda on dev questions -> retrieve each test set with every
method -> DPR top-k accuracy (all questions and the answerable subset) -> markdown table, JSON,
plot -> regression check against the committed figures.

Profiles ``dpr``/``dpr-smoke`` (the paper's experiment, :class:`TrainPlan`): the same, with the
retriever trained in between: mine training data from nq-dev + trivia-dev with BM25 (10% of the
questions held out) -> train DPR with in-batch negatives only (the ablation) and with in-batch +
one BM25 hard negative (round 1) -> re-mine hard negatives with round 1's own dense top-k
(positives from its or BM25's lists) -> train round 2 -> encode with every model -> tune the
hybrid lambda (round 2 + BM25) on the held-out questions -> evaluate BM25, the zero-shot encoder,
the three DPR models and the fusions on the five test sets -> a table laid out like the paper's
Table 2 plus the ablation rows. The final model's index is the output directory's ``dense/``, so
``densepr search/answer/serve --index <out>`` use the trained retriever.

Every stage's output lands in the output directory (an index directory, see
:mod:`densepr.retrieve.retriever`) and runs on :mod:`densepr.stages`: a stage whose output is
complete, intact and made from the same inputs and settings is skipped, so a killed run resumes
where it stopped; a changed input reruns that stage and every later one; ``--from STAGE`` forces
a rerun. ``<out>/stages/<stage>.json`` records each finished stage.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from densepr.data.fetch import EmbeddedData, fetch_embedded
from densepr.data.passages import Corpus, write_passages_tsv
from densepr.data.qa import QASet
from densepr.data.runs import write_dpr_results, write_trec_run
from densepr.data.summaries import load_wiki_summaries
from densepr.errors import DenseprError
from densepr.evaluate.answers import AnswerMatcher
from densepr.evaluate.report import ablation_table, markdown_table, paper_table, plot_qa, plot_topk, qa_markdown
from densepr.evaluate.topk import accuracy_report, topk_curve
from densepr.evaluate.tuning import tune_lambda
from densepr.fileio import atomic_write, dir_lock, file_name, read_json, remove_tree, sha256_file, writable_dir, write_json
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import Embeddings, encode_corpus
from densepr.machine import machine_info
from densepr.models.encoder import Encoder, load_biencoder
from densepr.models.hf import check_precision
from densepr.progress import progress_bar
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.fusion import PAPER_LAMBDA
from densepr.retrieve.modes import Mode
from densepr.retrieve.retriever import Retriever, open_corpus
from densepr.stages import RECORDS, Done, Stage, StageRunner

# Table rows: every retrieval mode, the hybrid with the tuned lambda and with the paper's 1.1.
METHODS = (Mode.BM25, Mode.DENSE, Mode.HYBRID, f"hybrid-{PAPER_LAMBDA}", Mode.RRF)
METHOD_NAMES = {**{m.value: m.label for m in Mode}, "hybrid": "hybrid (tuned λ)", f"hybrid-{PAPER_LAMBDA}": f"hybrid (λ={PAPER_LAMBDA})"}
# Profile dpr: the models it trains (besides the zero-shot encoder), in training order; the last
# is the final retriever (``dense``), the others are evaluated dense-only as ``dense-<model>``.
DPR_MODELS = ("inbatch", "round1", "round2")


def _dense_stage(model: str) -> str:
    """The index (and stage) a DPR model's passages are encoded into: ``dense`` for the final one."""
    return "dense" if model == DPR_MODELS[-1] else f"dense-{model}"


DPR_METHODS = (Mode.BM25, "dense-zeroshot", "dense-inbatch", "dense-round1", Mode.DENSE, Mode.HYBRID, f"hybrid-{PAPER_LAMBDA}", Mode.RRF)
DPR_NAMES = {**METHOD_NAMES, "dense-zeroshot": "dense (MiniLM, zero-shot)", "dense-inbatch": "DPR, in-batch negatives only",
             "dense-round1": "DPR, + BM25 hard negatives (round 1)", "dense": "DPR, + re-mined hard negatives (round 2)",
             "hybrid": "hybrid: BM25 + DPR round 2 (tuned λ)", f"hybrid-{PAPER_LAMBDA}": f"hybrid: BM25 + DPR round 2 (λ={PAPER_LAMBDA})",
             "rrf": "RRF: BM25 + DPR round 2"}  # fmt: skip


@dataclass(frozen=True)
class TrainPlan:
    """The DPR experiment's training (profiles dpr, dpr-smoke); every default defined here once.

    Round 1 is the paper's recipe (in-batch negatives + ``hard_negatives`` BM25 negative per
    question, shared across the batch); the ablation trains the same without hard negatives;
    round 2 trains on negatives re-mined with round 1's own ranking (``remine_mode``, skipping
    ``skip_top`` ranks), from round 1's weights (``round2_init="round1"``) or the initial ones.
    """

    sets: tuple[str, ...] = ("nq-dev", "trivia-dev")
    questions: int | None = None  # per mining set; None: all
    val_fraction: float = 0.1  # held out of each set: validation, and the hybrid lambda is tuned on them
    depth: int = 100  # passages of each ranked list mined per question
    mined_hard: int = 30  # hard negatives mined per question (a step samples ``hard_negatives`` of them)
    batch_size: int = 128
    hard_negatives: int = 1
    # 30 steps of 128 on the embedded data: 730 s on 2 CPU cores with one hard negative (sixth run). Three epochs
    # (benchmarks/round2_init.py --round1-epochs 3): NQ / TriviaQA answerable top-20 after round 2 61.0 / 62.4
    # instead of 59.1 / 61.1, for 1,570 s more training here (and the ablation's): past the 2-hour aim, so 1.
    epochs: int = 1
    round2_epochs: int = 1  # from round 1's weights (from the initial ones: ``epochs``)
    lr: float = 3e-5
    warmup_steps: int = 6
    # The initial weights (all-MiniLM-L6-v2) were trained for cosine similarity: keeping it, with
    # sentence-transformers' scale 20, beat DPR's raw dot product after 8 steps on the held-out
    # validation pool (top-1 38.6 vs 35.3, average rank 88 vs 99; docs/training.md). BERT-base DPR: False, 1.
    normalize: bool = True
    scale: float = 20.0
    max_steps: int | None = None  # per training run (smoke)
    save_every: int = 10
    remine_mode: str = "dense"
    skip_top: int = 0
    round2_init: str = "round1"  # or "initial": 1.2 top-20 points lower on NQ and TriviaQA (docs/training.md, round2_init.py)
    # >0: gradient caching in chunks of this many sequences (the same loss; training's peak memory 11.6 -> 2.3 GiB
    # at batch 128, ~15% slower: benchmarks/train_bench.py). Off: the whole run's peak below, the larger of two runs
    # measured with /usr/bin/time on 2026-12-05; below that much available memory the job says how to fit (memory_notice).
    grad_cache_chunk: int = 0
    full_graph_peak_gib: float | None = 13.7
    # fp32, or bf16 autocast for both retrievers' and the reader's training (models.hf.autocast: 1.4x a step on CPUs
    # with native bf16, benchmarks/train_precision.py); the committed figures are float32 runs'
    precision: str = "fp32"

    def round2(self) -> tuple[int, str | None]:
        """Round 2's epochs and the model it starts from: ``round2_epochs`` more from round 1's weights,
        or from the initial weights as many as round 1 (``epochs``), so that it differs from round 1
        only in its training data."""
        return (self.round2_epochs, "round1") if self.round2_init == "round1" else (self.epochs, None)

    def __post_init__(self) -> None:
        if self.round2_init not in ("round1", "initial"):
            raise DenseprError(f"round 2 starts from 'round1' or 'initial' weights, not {self.round2_init!r}")
        if self.remine_mode != Mode.DENSE.value:
            raise DenseprError("the experiment re-mines with the model's dense ranking (remine_mode='dense')")


@dataclass(frozen=True)
class ReaderPlan:
    """The reader stages (profile dpr): DPR's reader (Section 6.1) trained on the final retriever's
    top ``depth`` for the mining questions (minus the held-out ones), its passage selection and k
    tuned on held-out questions (DPR's rule or fused with the retriever score), then exact match
    end to end on the test sets; every default defined here once.

    Sized for 2 CPU cores (docs/reader.md): the paper reads M = 24 passages per question and step with a
    BERT-base reader. Here, measured on 400 held-out NQ/TriviaQA test questions (docs/reader.md, reader
    recipes): M = 2 with 32 questions a step, start/end normalised over all M passages (Clark &
    Gardner's shared normalisation) and the new heads at lr 1e-3 read EM@1 15.0 after 94 steps
    (7 min), against 11.5 for DPR's per-passage loss at M = 8, 16 questions x 100 steps (32 min).
    Three epochs of it (best held-out checkpoint: the second) read EM@1 19.0 and EM@20 18.0 under
    DPR's rule (one epoch: 14.2, 6.2), 41.0 given the answer passage (33.8).
    """

    depth: int = 20  # retrieved passages per training question: positives and negatives come from these
    passages: int = 2  # M per question per step: 1 answer-bearing + M-1 answerless
    batch_size: int = 32
    max_length: int = 192  # window tokens ([CLS] question [SEP] title [SEP] text)
    lr: float = 1e-4
    head_lr: float | None = 1e-3  # the new start/end/selection heads learn from zero: their own, higher rate
    span_loss: str = "shared"  # or "dpr": start/end softmax within each passage (DPR's loss)
    warmup_steps: int = 10
    dropout: float = 0.0  # off: on 2 CPU cores dropout doubled the reader's step time (docs/reader.md, reader recipes)
    epochs: int = 3  # the checkpoint with the best held-out EM is kept (measured: the end of epoch 2 of 3)
    max_steps: int | None = None  # None: ``epochs`` over the usable mining questions (~4-5 k; ~5 s a step on 2 cores)
    save_every: int = 10
    dev_limit: int = 100  # held-out questions validated at the end of training
    tune_limit: int | None = 150  # held-out questions the selection and k are tuned on
    qa_limit: int | None = 100  # test questions read end to end per set (~1.5 min each on 2 cores); None: all
    read_precision: str = "fp32"  # the reader's weights in the qa stages (models.hf.inference_dtype; bf16: 1.64x on bf16 CPUs)
    modes: tuple[str, ...] = ("dense", "bm25")  # the trained retriever and the paper's baseline
    ks: tuple[int, ...] = (1, 5, 10, 20)
    # >0: pre-train the reader one epoch on this many cloze questions made from the corpus (train.cloze; no QA
    # set's question or answer) before the labelled ones; off by default: 8,000 gave +1.4 EM given the answer passage
    # (41.4 vs 40.0 on 435 held-out questions, within noise) for ~21 min more on 2 cores (docs/reader.md)
    cloze: int = 0


@dataclass(frozen=True)
class Profile:
    """How much of the benchmark a profile runs."""

    limit: int | None  # questions per test set; None: all
    tune_limit: int | None  # questions per tuning set; None: all
    corpus_limit: int | None = None  # the first N passages only (CI's smoke of the training experiment)
    train: TrainPlan | None = None  # None: the zero-shot encoder only
    reader: ReaderPlan | None = None  # None: no reader stages (needs ``train``)
    tolerance: float = 0.5  # regression tolerance when recording expected figures
    qa_tolerance: float = 3.0  # the same for end-to-end EM (a few hundred questions; reader training on CPU)


PROFILES = {
    "full": Profile(None, 1000),
    "smoke": Profile(300, 300, tolerance=1.0),
    "dpr": Profile(None, None, train=TrainPlan(), reader=ReaderPlan(), tolerance=2.0),  # CPU training is not bit-reproducible across machines
    # CI: the whole training path on real data in minutes: 2,000 passages, 600 questions per mining set, 4 steps per run
    # tolerance: answerable subsets of 59-120 questions (one question = 0.8-1.7 points) and 4 training steps, which
    # magnify float differences between CPUs; the check is there to catch a broken pipeline, not a 1-point drift.
    # EM is on 30 questions per set, ~8 answerable: one answer is 12.5 points there.
    "dpr-smoke": Profile(300, None, corpus_limit=2000, tolerance=5.0, qa_tolerance=13.0,
                         train=TrainPlan(questions=600, batch_size=8, epochs=1, round2_epochs=1, max_steps=4, warmup_steps=1, save_every=2, full_graph_peak_gib=None),
                         reader=ReaderPlan(passages=4, batch_size=4, epochs=1, max_steps=3, warmup_steps=1, save_every=2, dev_limit=20,
                                           tune_limit=40, qa_limit=30, ks=(1, 5))),
}  # fmt: skip


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
    force_from: str | None = None  # rerun this stage and all after it (see stage_order)
    round2_init: str | None = None  # profile dpr: override TrainPlan.round2_init
    grad_cache_chunk: int | None = None  # profile dpr: override TrainPlan.grad_cache_chunk
    epochs: int | None = None  # profile dpr: override TrainPlan.epochs (round 1 and the in-batch ablation)
    round2_epochs: int | None = None  # profile dpr: override TrainPlan.round2_epochs
    qa_limit: int | None = -1  # profile dpr: override ReaderPlan.qa_limit (None: every test question; -1: the profile's)
    read_precision: str | None = None  # profile dpr: override ReaderPlan.read_precision
    train_precision: str | None = None  # profile dpr: override TrainPlan.precision (retrievers' and reader's training)
    reader_cloze: int | None = None  # profile dpr: override ReaderPlan.cloze (cloze questions to pre-train the reader on; 0: off)
    limit: int | None = field(default=None, init=False)
    tune_limit: int | None = field(default=None, init=False)
    plan: TrainPlan | None = field(default=None, init=False)
    reader: ReaderPlan | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise DenseprError(f"unknown profile {self.profile!r}; choose from {', '.join(PROFILES)}")
        prof = PROFILES[self.profile]
        self.limit, self.tune_limit, self.plan = prof.limit, prof.tune_limit, prof.train
        # the training profiles' settings a run may override (TrainPlan fields; a changed one reruns its stages)
        for name, value in (("round2_init", self.round2_init), ("grad_cache_chunk", self.grad_cache_chunk),
                            ("epochs", self.epochs), ("round2_epochs", self.round2_epochs)):  # fmt: skip
            if value is None:
                continue
            flag = "--" + name.replace("_", "-")
            if self.plan is None:
                raise DenseprError(f"{flag} applies to the training profiles (dpr, dpr-smoke), not {self.profile!r}")
            if name == "grad_cache_chunk" and value < 0:
                raise DenseprError(f"{flag} must be 0 (off) or a positive number of sequences, not {value}")
            if name in ("epochs", "round2_epochs") and value < 1:
                raise DenseprError(f"{flag} must be a positive number of epochs, not {value}")
            self.plan = replace(self.plan, **{name: value})
        self.reader = prof.reader if self.plan is not None else None
        if self.qa_limit != -1:
            if self.reader is None:
                raise DenseprError(f"--qa-limit applies to the profiles with a reader (dpr, dpr-smoke), not {self.profile!r}")
            if self.qa_limit is not None and self.qa_limit < 1:
                raise DenseprError(f"--qa-limit must be a positive number of questions (or 'all'), not {self.qa_limit}")
            self.reader = replace(self.reader, qa_limit=self.qa_limit)
        if self.reader_cloze is not None:
            if self.reader is None:
                raise DenseprError(f"--reader-cloze applies to the profiles with a reader (dpr, dpr-smoke), not {self.profile!r}")
            if self.reader_cloze < 0:
                raise DenseprError(f"--reader-cloze must be 0 (off) or a number of cloze questions, not {self.reader_cloze}")
            self.reader = replace(self.reader, cloze=self.reader_cloze)
        if self.train_precision is not None:
            if self.plan is None:
                raise DenseprError(f"--train-precision applies to the training profiles (dpr, dpr-smoke), not {self.profile!r}")
            self.plan = replace(self.plan, precision=check_precision(self.train_precision, "--train-precision"))
        if self.read_precision is not None:
            if self.reader is None:
                raise DenseprError(f"--read-precision applies to the profiles with a reader (dpr, dpr-smoke), not {self.profile!r}")
            # a bad value: one clear error before any stage runs
            self.reader = replace(self.reader, read_precision=check_precision(self.read_precision, "--read-precision"))
        if self.plan is not None and self.encoder is not None:
            raise DenseprError("profile dpr trains from the embedded encoder; --encoder applies to the zero-shot profiles")
        self.out_dir = Path(self.out_dir)
        order = stage_order(self.profile)
        if self.force_from is not None and self.force_from not in order:
            raise DenseprError(f"--from {self.force_from!r}: no such stage; stages: {', '.join(order)}")




# The main job's stages, in order (``densepr reproduce --from STAGE`` reruns one and all after it).
# ``evaluate`` is one stage per test set (``evaluate-<set>``: retrieve with every method, score,
# write the TREC runs); ``report`` writes curves.json, results.md and topk.png. results.json
# (date, machine, timings) is written by every run.
STAGES = ("passages", "bm25", "dense", "tune", "evaluate", "report")
# Profile dpr adds mining and training; ``dense`` is the final (round 2) model's index.
# With a reader plan: ``reader-data`` (the final retriever's top-k for the mining questions),
# ``reader-cloze`` (only with ReaderPlan.cloze: the reader pre-trained on cloze questions), ``train-reader``, ``tune-reader`` (selection and k on held-out questions; the result is ``<out>/reader/``)
# and ``qa`` (one stage per test set: ``qa-<set>``, EM/F1 end to end).
DPR_STAGES = ("passages", "bm25", "dense-zeroshot", "mine", "train-inbatch", "dense-inbatch", "train-round1", "dense-round1",
              "remine", "train-round2", "dense", "tune", "evaluate", "reader-data", "reader-cloze", "train-reader", "tune-reader", "qa", "report")  # fmt: skip


def stage_order(profile: str) -> tuple[str, ...]:
    """The stages a profile runs, in order (what ``--from`` accepts)."""
    prof = PROFILES[profile]
    if prof.train is None:
        return STAGES
    return DPR_STAGES if prof.reader is not None else tuple(s for s in DPR_STAGES if s not in READER_STAGES)


READER_STAGES = ("reader-data", "reader-cloze", "train-reader", "tune-reader", "qa")


class Job:
    """The main job's stages on a :class:`~densepr.stages.StageRunner`: each skipped when current,
    and a skipped stage's artefact is loaded only when a stage that runs reads it."""

    def __init__(self, cfg: ReproduceConfig, log: Callable[[str], None], show_progress: bool,
                 rank: int = 0, sync: Callable | None = None) -> None:  # fmt: skip
        self.cfg, self.log, self.show_progress = cfg, log, show_progress
        self.timings: dict[str, float] = {}  # steps inside stages (encode passages, retrieve <set>, ...)
        self.data = EmbeddedData(cfg.cache_dir)
        self.runner = StageRunner(cfg.out_dir, stage_order(cfg.profile), cfg.force_from, log=log, rank=rank, sync=sync or (lambda v: v))
        self.plan = cfg.plan
        self.methods = DPR_METHODS if self.plan else METHODS
        self.names = DPR_NAMES if self.plan else METHOD_NAMES
        self.reader_plan = cfg.reader
        self._retriever: Retriever | None = None
        self._reader = None
        self._dense_only: dict[str, Retriever] = {}

    @property
    def encoder_path(self) -> str:
        # Looked up when a stage needs it: the job fetches the embedded data first, so on a fresh
        # machine the model is not there yet when the job is set up.
        return self.cfg.encoder or str(self.data.model_dir)

    def timed(self, name: str, fn: Callable, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.timings[name] = round(time.perf_counter() - t0, 2) + self.timings.get(name, 0.0)
        return out

    def corpus(self) -> Corpus:
        return self.runner.done["passages"].get()

    def _question_encoder(self, index: DenseIndex) -> Encoder:
        return Encoder.load(index.manifest["question_encoder"], device=self.cfg.device)

    def retriever(self) -> Retriever:
        """BM25 + the final dense index + its E_Q, with the tuned lambda (loaded on first use)."""
        if self._retriever is None:
            done = self.runner.done
            dense = done["dense"].get()
            self._retriever = Retriever(self.corpus(), done["bm25"].get(), dense, self._question_encoder(dense), depth=self.cfg.depth)
        if "tune" in self.runner.done:
            self._retriever.hybrid_lambda = self.runner.done["tune"].get()[0]
        return self._retriever

    def dense_only(self, model: str) -> Retriever:
        """A dense-only retriever over ``dense-<model>/`` (profile dpr's other encoders)."""
        if model not in self._dense_only:
            dense = self.runner.done[_dense_stage(model)].get()
            self._dense_only[model] = Retriever(self.corpus(), None, dense, self._question_encoder(dense), depth=self.cfg.depth)
        return self._dense_only[model]

    def matcher(self) -> AnswerMatcher:
        return AnswerMatcher(self.corpus().texts)

    def passages(self) -> Stage:
        path, limit = self.cfg.out_dir / "passages.tsv", PROFILES[self.cfg.profile].corpus_limit

        def build() -> Corpus:
            corpus = load_wiki_summaries(self.data.summaries)
            n = write_passages_tsv(iter(corpus) if limit is None else itertools.islice(corpus, limit), path)
            self.log(f"wrote {n} passages to {path}")
            return open_corpus(self.cfg.out_dir)  # what later stages read: the store beside it, as a rerun loads it

        settings = {"summaries": sha256_file(self.data.summaries), **({"first": limit} if limit is not None else {})}
        return Stage("passages", build, lambda: open_corpus(self.cfg.out_dir), settings, (), [path])

    def bm25(self) -> Stage:
        d = self.cfg.out_dir / "bm25"

        def build() -> BM25Index:
            index = BM25Index.build(self.corpus())
            index.save(d)
            self.log(f"built BM25 index (k1={index.k1}, b={index.b}) in {d}")
            return index

        return Stage("bm25", build, lambda: BM25Index.load(d, corpus=self.corpus()), {}, ("passages",), [d])

    def dense(self, name: str = "dense", model: Callable[[], str] | None = None, upstream: Sequence[str] = ()) -> Stage:
        """Encode the passages with a (bi-)encoder and build the exact FAISS index ``<out>/<name>/``.

        ``model`` gives the encoder's directory once the stages before have run (default: ``--encoder``
        or the embedded MiniLM, whose weights' sha256 are then part of the settings; a trained
        model's are covered by its training stage's fingerprint, in ``upstream``).
        """
        suffix = name.removeprefix("dense")
        d_index, emb_dir = self.cfg.out_dir / name, self.cfg.out_dir / f"embeddings{suffix}"
        settings: dict = {"batch_size": self.cfg.passage_batch_size}
        if model is None:
            root = Path(self.encoder_path)
            settings.update(encoder=self.encoder_path, weights={str(f.relative_to(root)): sha256_file(f) for f in sorted(root.rglob("*"))
                                                                 if f.suffix in (".safetensors", ".bin")})  # fmt: skip
            model = lambda: self.encoder_path  # noqa: E731

        def build() -> DenseIndex:
            path = Path(model())
            q_enc, p_enc = load_biencoder(path.resolve() if path.exists() else path, device=self.cfg.device)
            corpus = self.corpus()
            self.timed(f"encode passages ({name})", encode_corpus, p_enc, corpus, emb_dir, question_encoder=q_enc.name,
                       batch_size=self.cfg.passage_batch_size, show_progress=self.show_progress)  # fmt: skip
            index = DenseIndex.build(Embeddings.open(emb_dir, corpus))
            index.save(d_index)
            index.bind(corpus)
            self.log(f"built exact FAISS index ({len(index)} x {index.dim}) in {d_index}")
            return index

        return Stage(name, build, lambda: DenseIndex.load(d_index, corpus=self.corpus()), settings, ("passages", *upstream), [d_index])

    # -- profile dpr: mining and training ----------------------------------------------------------
    def _mining_sets(self) -> list[QASet]:
        return _sets(self.data, self.plan.sets, self.plan.questions)

    def _mine(self, name: str, prefix: str, upstream: Sequence[str], negatives_from: Callable[[], Callable] | None) -> Stage:
        """Mine ``train-data/<prefix>.json`` + ``<prefix>-dev.json`` (+ ``.qa.tsv``, ``.stats.json``)."""
        from densepr.train.mining import build_training_data, heldout_path, stats_path

        plan, d = self.plan, self.cfg.out_dir / "train-data"
        train_file, dev_file = d / f"{prefix}.json", d / f"{prefix}-dev.json"
        sets = self._mining_sets()
        outputs = [train_file, dev_file, heldout_path(dev_file), stats_path(train_file)]

        def build() -> dict:
            rank = negatives_from() if negatives_from is not None else None
            report = build_training_data(sets, self.corpus(), self.runner.done["bm25"].get(), train_file, dev_file,
                                         val_fraction=plan.val_fraction, depth=plan.depth, hard_negatives=plan.mined_hard,
                                         negatives_from=rank, negatives_name=plan.remine_mode, skip_top=plan.skip_top)  # fmt: skip
            r = report["train"]
            self.log(f"{name}: {r['records']} training questions kept of {sum(r['questions'].values())}; positives from {r['positive_from']}")
            return report

        settings = {"sets": list(plan.sets), "questions": [q.fingerprint() for q in sets], "val_fraction": plan.val_fraction,
                    "depth": plan.depth, "hard": plan.mined_hard, **({"mode": plan.remine_mode, "skip_top": plan.skip_top} if negatives_from else {})}  # fmt: skip
        return Stage(name, build, lambda: read_json(stats_path(train_file)), settings, ("passages", "bm25", *upstream), outputs)

    def mine(self) -> Stage:
        """Round 1's data: BM25's best answer-bearing passage is the positive, its answerless ones the hard negatives."""
        return self._mine("mine", "train", (), None)

    def remine(self) -> Stage:
        """Round 2's data: hard negatives from round 1's own dense top-k, positives from its or BM25's."""

        def ranking() -> Callable:
            model = self.dense_only("round1")
            return lambda questions, k: model.retrieve(questions, k, self.plan.remine_mode)

        return self._mine("remine", "round2", ("dense-round1",), ranking)

    def train(self, model: str, data: str, hard_negatives: int, epochs: int, init: str | None = None) -> Stage:
        """Train one DPR model into ``models/<model>/``; its ``best/`` (by validation) is the stage's output.

        A killed training stage resumes from the run's last checkpoint when the settings are the same.
        """
        from densepr.train.config import TrainConfig

        plan, run_dir = self.plan, self.cfg.out_dir / "models" / model
        prefix = {"mine": "train", "remine": "round2"}[data]
        init_dir = str(self.data.model_dir) if init is None else None

        def config() -> TrainConfig:
            d = self.cfg.out_dir / "train-data"
            start = init_dir or str(self.runner.done[f"train-{init}"].get())
            return TrainConfig(train_file=str(d / f"{prefix}.json"), dev_file=str(d / f"{prefix}-dev.json"), output_dir=str(run_dir),
                               init=start, **_plan_settings(plan, hard_negatives, epochs))  # fmt: skip

        def build() -> Path:
            from densepr.train.retriever import train

            cfg, runner = config(), self.runner
            resume = None
            if runner.rank == 0:
                resume = (run_dir / "config.json").is_file() and _same_run(read_json(run_dir / "config.json"), cfg)
                if not resume:
                    remove_tree(run_dir)  # a run of other settings (or none): start afresh
            resume = runner.sync(resume)
            self.timed(f"train {model}", train, cfg, resume=resume, device=_train_device(self.cfg.device), show_progress=self.show_progress, log=self.log)
            runner.sync(None)  # rank 0 has written best/
            return _trained(run_dir)

        settings = {k: v for k, v in asdict(_placeholder_config(plan, hard_negatives, epochs)).items()
                    if k not in ("train_file", "dev_file", "output_dir", "init")}  # fmt: skip
        settings["init"] = "embedded" if init is None else f"train-{init}"
        upstream = (data, *(() if init is None else (f"train-{init}",)))
        return Stage(f"train-{model}", build, lambda: _trained(run_dir), settings, upstream, [run_dir / "best"], distributed=True,
                     added={"precision": "fp32"})  # fmt: skip

    def train_and_encode(self, model: str, data: str, hard_negatives: int, epochs: int, init: str | None, index: str,
                         slot: str | None = None) -> Done:  # fmt: skip
        """Run :meth:`train` and then :meth:`dense` with the trained passage encoder into ``<out>/<index>``;
        returns the training stage's :class:`Done`. ``slot``: a DPR model whose places in the stage order
        these take (``"round2"`` for a round-2 variant), so ``--from`` treats them alike."""
        stage = self.train(model, data, hard_negatives, epochs, init)
        enc = self.dense(index, model=lambda: str(done.get()), upstream=(stage.name,))
        if slot is not None:
            stage, enc = replace(stage, group=f"train-{slot}"), replace(enc, group=_dense_stage(slot))
        done = self.runner.run(stage)
        self.runner.run(enc)
        return done

    # -- tuning, evaluation, report ----------------------------------------------------------------
    def _tune_sets(self) -> list[QASet]:
        if self.plan is not None:  # the held-out dev questions: never trained on
            from densepr.train.mining import heldout_path

            return [self.data.resolve_qa(str(heldout_path(self.cfg.out_dir / "train-data" / "train-dev.json")), limit=self.cfg.tune_limit)]
        return _sets(self.data, self.cfg.tune_sets, self.cfg.tune_limit)

    def tune(self) -> Stage:
        path, cfg = self.cfg.out_dir / "hybrid.json", self.cfg
        sets = self._tune_sets()
        names = [s.name for s in sets] if self.plan else list(cfg.tune_sets)

        def build() -> tuple[float, dict]:
            best, grid = tune_lambda(self.retriever(), self.matcher(), sets)
            write_json(path, {"lambda": best, "tuned_on": names, "questions_per_set": cfg.tune_limit,
                              "metric": "top-20 accuracy", "grid": grid})  # fmt: skip
            return best, grid

        def load() -> tuple[float, dict]:
            saved = read_json(path)
            return saved["lambda"], saved["grid"]

        settings = {"sets": names, "questions": [q.fingerprint() for q in sets], "limit": cfg.tune_limit, "depth": cfg.depth}
        upstream = ("passages", "bm25", "dense", *(("mine",) if self.plan else ()))
        return Stage("tune", build, load, settings, upstream, [path])

    def evaluate(self, qas: QASet) -> Stage:
        """Retrieve one test set with every method, score it, write its TREC runs (and its scores)."""
        cfg, out, methods = self.cfg, self.cfg.out_dir, [str(m) for m in self.methods]
        scores = out / "evaluation" / f"{file_name(qas.name)}.json"
        runs = out / "runs"
        outputs = [scores] + [runs / f"{qas.name}.{m}.trec" for m in methods]
        outputs += [runs / f"{qas.name}.{m}.json" for m in methods] if cfg.save_dpr_json else []
        others = [m.removeprefix("dense-") for m in methods if m.startswith("dense-")]

        def build() -> tuple[dict, dict]:
            retriever, corpus, matcher = self.retriever(), self.corpus(), self.matcher()
            t0 = time.perf_counter()
            found = retriever.retrieve_all(qas.questions, cfg.k, tuple(Mode), self.show_progress, also_lambdas=(PAPER_LAMBDA,))
            found.update({f"dense-{m}": self.dense_only(m).retrieve(qas.questions, cfg.k, Mode.DENSE, self.show_progress) for m in others})
            ranked = {m: found[m] for m in methods}
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

        settings = {"set": qas.name, "questions": qas.fingerprint(), "limit": cfg.limit, "k": cfg.k, "depth": cfg.depth,
                    "methods": methods, "dpr_json": cfg.save_dpr_json}  # fmt: skip
        name = f"evaluate-{file_name(qas.name)}"
        upstream = ("passages", "bm25", "dense", "tune", *(f"dense-{m}" for m in others))
        return Stage(name, build, load, settings, upstream, outputs, group="evaluate")

    # -- profile dpr: the reader ------------------------------------------------------------------
    def _heldout(self, limit: int | None) -> QASet:
        from densepr.train.mining import heldout_path

        return self.data.resolve_qa(str(heldout_path(self.cfg.out_dir / "train-data" / "train-dev.json")), limit=limit)

    def _reader_files(self) -> tuple[list[Path], Path]:
        """``reader-data/``'s files: one per mining set (training) and the held-out questions' (validation)."""
        d = self.cfg.out_dir / "reader-data"
        return [d / f"{file_name(s)}.json" for s in self.plan.sets], d / "heldout.json"

    def reader_data(self) -> Stage:
        """The final retriever's (dense) top ``depth`` for every mining question, with ``has_answer``:
        ``reader-data/<set>.json`` (DPR's result JSON; the trainer drops the held-out questions) and
        ``reader-data/heldout.json`` (the held-out questions: validation)."""
        rp, sets = self.reader_plan, [*self._mining_sets(), self._heldout(None)]
        files = [*self._reader_files()[0], self._reader_files()[1]]

        def build() -> list[Path]:
            retriever, corpus, matcher = self.retriever(), self.corpus(), self.matcher()
            for qas, path in zip(sets, files):
                res = retriever.retrieve(qas.questions, rp.depth, Mode.DENSE, self.show_progress)
                write_dpr_results(path, qas.questions, [q.answers for q in qas.items], res, corpus, matcher.hits(res.rows, qas))
            self.log(f"reader data: top {rp.depth} of the trained retriever for {', '.join(f'{len(q)} {q.name}' for q in sets)}")
            return files

        settings = {"depth": rp.depth, "questions": [q.fingerprint() for q in sets], "mode": Mode.DENSE.value}
        return Stage("reader-data", build, lambda: files, settings, ("passages", "dense", "mine"), files)

    def _reader_config(self, train_files: Sequence[Path], run_dir: Path, init: str, **kw):
        """The reader recipe (ReaderPlan) as a training config: ``train-reader``'s and ``reader-cloze``'s."""
        from densepr.train.config import ReaderTrainConfig

        rp = self.reader_plan
        return ReaderTrainConfig(train_files=[str(f) for f in train_files], output_dir=str(run_dir), init=init,
                                 passages=rp.passages, depth=rp.depth, batch_size=rp.batch_size, max_length=rp.max_length, lr=rp.lr,
                                 warmup_steps=rp.warmup_steps, max_steps=rp.max_steps, save_every=rp.save_every, dropout=rp.dropout,
                                 span_loss=rp.span_loss, head_lr=rp.head_lr, precision=self.plan.precision, **kw)  # fmt: skip

    def _train_reader_run(self, cfg, timer: str) -> None:
        """Train reader config ``cfg``, resuming a killed run of the same settings from its last checkpoint."""
        from densepr.train.reader import train_reader

        run_dir = Path(cfg.output_dir)
        resume = (run_dir / "config.json").is_file() and _same_run(read_json(run_dir / "config.json"), cfg)
        if not resume:
            remove_tree(run_dir)  # a run of other settings (or none): start afresh
        self.timed(timer, train_reader, cfg, resume=resume, device=self.cfg.device, show_progress=self.show_progress, log=self.log)

    def reader_cloze(self) -> Stage:
        """The reader pre-trained on cloze questions (run only when ``ReaderPlan.cloze`` > 0; Dhingra et al.,
        NAACL 2018; Lewis et al., ACL 2019): ``cloze/cloze.json``, questions made from the corpus's own sentences
        by :mod:`densepr.train.cloze` (no QA set's question or answer; BM25's top passages as negatives), then one
        epoch of the reader recipe from the embedded weights into ``models/reader-cloze/``, whose ``final/`` is
        where ``train-reader`` starts."""
        from densepr.train.cloze import CLOZE_SEED, cloze_records, write_cloze

        rp, run_dir, data = self.reader_plan, self.cfg.out_dir / "models" / "reader-cloze", self.cfg.out_dir / "cloze" / "cloze.json"
        cfg = self._reader_config([data], run_dir, str(self.data.model_dir), epochs=1)

        def build() -> Path:
            bm25 = self.runner.done["bm25"].get()
            records = self.timed("cloze questions", cloze_records, self.corpus(), bm25, rp.cloze, CLOZE_SEED, rp.depth)
            write_cloze(records, data)
            self.log(f"reader pre-training: {len(records)} cloze questions from {len(self.corpus())} passages")
            self._train_reader_run(cfg, "train reader (cloze)")
            return run_dir / "final"

        settings = {"questions": rp.cloze, "seed": CLOZE_SEED, **{k: v for k, v in asdict(cfg).items() if k not in ("train_files", "output_dir", "init")}}
        return Stage("reader-cloze", build, lambda: run_dir / "final", settings, ("passages", "bm25"), [data, run_dir / "final"])

    def train_reader(self) -> Stage:
        """DPR's reader from the embedded MiniLM weights (new heads; or from ``reader-cloze``'s reader when
        ``ReaderPlan.cloze`` > 0) into ``models/reader/``; its ``best/`` (by held-out EM) is the output. A
        killed run resumes from its last checkpoint."""
        from densepr.train.mining import heldout_path

        rp, run_dir = self.reader_plan, self.cfg.out_dir / "models" / "reader"
        train_files, dev_file = self._reader_files()
        held = heldout_path(self.cfg.out_dir / "train-data" / "train-dev.json")
        cloze = rp.cloze > 0
        init = self.cfg.out_dir / "models" / "reader-cloze" / "final" if cloze else self.data.model_dir
        cfg = self._reader_config(train_files, run_dir, str(init), dev_file=str(dev_file), holdout=[str(held)], epochs=rp.epochs,
                                  dev_limit=rp.dev_limit)  # fmt: skip

        def build() -> Path:
            self._train_reader_run(cfg, "train reader")
            return run_dir / "best"

        settings = {k: v for k, v in asdict(cfg).items() if k not in ("train_files", "output_dir", "dev_file", "holdout", "init")}
        settings["init"] = "reader-cloze" if cloze else "embedded"
        upstream = ("reader-data", "reader-cloze") if cloze else ("reader-data",)
        return Stage("train-reader", build, lambda: run_dir / "best", settings, upstream, [run_dir / "best"],
                     added={"precision": "fp32"})  # fmt: skip

    def tune_reader(self) -> Stage:
        """Per retrieval mode, the passage selection (DPR's rule or fused with the retriever score) and k
        with the best EM on held-out questions, stored with a copy of the trained reader: ``<out>/reader/``,
        which ``densepr answer/serve`` and ``Pipeline.load`` find beside the index."""
        from densepr.models.reader import Reader
        from densepr.pipeline import tune_selection

        rp, dst = self.reader_plan, self.cfg.out_dir / "reader"
        held = self._heldout(rp.tune_limit)

        def build() -> dict:
            reader = Reader.load(self.runner.done["train-reader"].get(), self.cfg.device)
            choices = {}
            with progress_bar(None, "read held-out questions", self.show_progress, unit="window") as advance:
                for mode in rp.modes:
                    best = self.timed("tune reader", tune_selection, self.retriever(), reader, held, mode, rp.ks, progress=advance)
                    reader.config.selection[mode] = choices[mode] = {**best, "tuned_on": held.name}
                    self.log(f"reader, {mode}: EM {best['em']:.1f} at k={best['k']} with selection x{best['relevance']:g} + span "
                             f"x{best['span']:g} + retriever x{best['retriever']:g}, aggregation {best['aggregate']:g} "
                             f"(DPR's rule: {best['paper_em']:.1f} at k={best['paper_k']})")  # fmt: skip
            from densepr.fileio import atomic_dir
            from densepr.models.hf import MODEL_FILES

            with atomic_dir(dst, "reader", MODEL_FILES) as tmp:  # built beside, swapped in; no fixed-name sibling deleted
                reader.save(tmp)
            return choices

        from densepr.pipeline import SELECTION_GRID

        settings = {"questions": held.fingerprint(), "limit": rp.tune_limit, "modes": list(rp.modes), "ks": list(rp.ks),
                    "grid": [list(astuple(s)) for s in SELECTION_GRID]}  # a changed grid changes the choice: rerun
        return Stage("tune-reader", build, lambda: read_json(dst / "densepr_reader.json").get("selection", {}), settings,
                     ("passages", "bm25", "dense", "train-reader"), [dst])  # fmt: skip

    def reader(self):
        """The tuned reader (``<out>/reader/``), loaded once."""
        from densepr.models.reader import Reader

        if self._reader is None:
            self._reader = Reader.load(self.cfg.out_dir / "reader", self.cfg.device, precision=self.reader_plan.read_precision)
        return self._reader

    def qa(self, qas: QASet) -> Stage:
        """End-to-end exact match and F1 of one test set (its first ``qa_limit`` questions) with the
        tuned reader over BM25's and the trained retriever's top k (each passage read once)."""
        from densepr.pipeline import evaluate_qa

        rp, path = self.reader_plan, self.cfg.out_dir / "qa" / f"{file_name(qas.name)}.json"

        def build(pieces: Path) -> dict:  # a killed read resumes from its finished pieces of questions
            with progress_bar(None, f"read {qas.name}", self.show_progress, unit="window") as advance:
                res = self.timed(f"qa {qas.name}", evaluate_qa, self.retriever(), self.reader(), qas, rp.modes, rp.ks,
                                 self.matcher(), progress=advance, pieces=pieces, log=lambda m: self.log(f"qa {qas.name}: {m}"))  # fmt: skip
            write_json(path, res)
            return res

        settings = {"set": qas.name, "questions": qas.fingerprint(), "limit": rp.qa_limit, "modes": list(rp.modes), "ks": list(rp.ks),
                    "precision": rp.read_precision}  # fmt: skip
        return Stage(f"qa-{file_name(qas.name)}", build, lambda: read_json(path), settings,
                     ("passages", "bm25", "dense", "tune", "tune-reader"), [path], group="qa", resumable=True, added={"precision": "fp32"})  # fmt: skip

    def report(self, evaluated: dict[str, str], qa: dict[str, str] | None = None) -> Stage:
        """curves.json, results.md and topk.png from the evaluated sets (``{set: its stage}``)."""
        out, cfg = self.cfg.out_dir, self.cfg
        if self.plan is not None:
            dense_name = "DPR trained here (all-MiniLM-L6-v2 initial weights)"
        else:
            dense_name = "all-MiniLM-L6-v2, zero-shot" if cfg.encoder is None else str(cfg.encoder)

        def build() -> None:
            done = self.runner.done
            best = done["tune"].get()[0]
            results = {n: done[s].get()[0] for n, s in evaluated.items()}
            curves = {n: done[s].get()[1] for n, s in evaluated.items()}
            write_json(out / "curves.json", curves, indent=None)
            title = f"densepr on the embedded benchmark ({len(self.corpus())} Wikipedia summaries; dense = {dense_name})"
            parts = [f"# {title}\n\nhybrid λ = {best} (tuned on {'held-out dev questions' if self.plan else 'dev'})\n"]
            if self.plan is not None:
                methods = [str(m) for m in self.methods if str(m) != "rrf"]
                mined = {"round 1 (BM25)": done["mine"].get(), "round 2 (re-mined)": done["remine"].get()}
                parts += [
                    "## Top-20 / top-100 accuracy, all questions (laid out like the paper's Table 2)\n",
                    paper_table(results, methods, self.names, "all"),
                    "## The same on the answerable subset\n",
                    paper_table(results, methods, self.names, "answerable"),
                    "## Ablation (top-20, all / answerable)\n",
                    ablation_table(results, ["dense-inbatch", "dense-round1", "dense"], self.names),
                    "## Training data\n",
                    mining_table(mined),
                    "## Every method, top-1/5/20/100\n",
                ]
            parts.append(markdown_table(results, names=self.names))
            if qa:
                qa_results = self.qa_results(qa)
                limit = self.reader_plan.qa_limit
                parts += [f"## End to end: exact match of the reader over the top k ({'the first ' + str(limit) if limit else 'all'} "
                          "questions of each set)\n",
                          "DPR's rule: the passage with the best selection logit; fused: selection tuned on held-out questions "
                          "(`tune-reader`).\n", qa_markdown(qa_results)]  # fmt: skip
                plot_qa(qa_results, out / "qa-em.png")
            with atomic_write(out / "results.md") as fh:
                fh.write("\n".join(parts))
            plot_topk(curves, out / "topk.png", self.names, title)

        qa = qa or {}
        upstream = ("passages", "tune", *(("mine", "remine") if self.plan else ()), *evaluated.values(), *qa.values())
        outputs = [out / "curves.json", out / "results.md", out / "topk.png", *([out / "qa-em.png"] if qa else [])]
        return Stage("report", build, settings={"sets": list(evaluated), "qa": list(qa), "dense": dense_name}, upstream=upstream,
                     outputs=outputs)  # fmt: skip

    def qa_results(self, qa: dict[str, str]) -> dict:
        """The qa stages' results in ``densepr evaluate-qa``'s layout (``{"ks", "modes", "limit", "sets"}``)."""
        rp = self.reader_plan
        return {"ks": list(rp.ks), "modes": list(rp.modes), "limit": rp.qa_limit,
                "sets": {n: self.runner.done[s].get() for n, s in qa.items()}}  # fmt: skip


def mining_table(mined: dict[str, dict]) -> str:
    """Questions kept per mining round and where their positives came from (``{round: build_training_data report}``)."""
    lines = ["| training data | questions kept | of | positives from BM25 / the model |", "|---|---:|---:|---|"]
    for name, rep in mined.items():
        r = rep["train"]
        lines.append(f"| {name} | {r['records']} | {sum(r['questions'].values())} | "
                     f"{r['positive_from'].get('bm25', 0)} / {r['positive_from'].get('model', 0)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _train_device(device: str | None) -> str | None:
    """Under torchrun each process trains on its own GPU (``cuda`` means ``cuda:LOCAL_RANK``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device in (None, "cuda"):
        return None  # densepr.train picks cuda:LOCAL_RANK, or the CPU
    return device


def process_group(device: str | None) -> tuple[int, Callable]:
    """Under torchrun: join the process group; returns this rank and a broadcast-from-rank-0 (a barrier).

    Rank 0 builds every stage but training while the others wait, so the wait must outlast a stage.
    """
    import datetime

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, lambda value: value
    long = datetime.timedelta(hours=24)
    if not dist.is_initialized():
        gpu = torch.cuda.is_available() and device != "cpu"
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if gpu else "gloo", timeout=long)
    control = dist.new_group(backend="gloo", timeout=long)  # small messages between stages, on the CPU

    def sync(value):
        box = [value]
        dist.broadcast_object_list(box, src=0, group=control)
        return box[0]

    return dist.get_rank(), sync


def _same_run(saved: dict, cfg) -> bool:
    """Whether a training run directory holds a run of these settings (so it may be resumed)."""
    from densepr.train.checkpoint import config_diff

    return not config_diff(saved, cfg)


def _trained(run_dir: Path) -> Path:
    """The model a training run produced: ``best/`` (by validation), else ``final/``."""
    for name in ("best", "final"):
        if (run_dir / name / "question_encoder").is_dir():
            return run_dir / name
    raise DenseprError(f"{run_dir}: the training run left no model (best/ or final/)")


def _placeholder_config(plan: TrainPlan, hard_negatives: int, epochs: int):
    """A run's settings before the model it starts from exists (the paths are not settings)."""
    from densepr.train.config import TrainConfig

    return TrainConfig(train_file="", output_dir="", init="", dev_file="", **_plan_settings(plan, hard_negatives, epochs))


def _plan_settings(plan: TrainPlan, hard_negatives: int, epochs: int) -> dict:
    """The training configuration's settings that come from the plan."""
    return dict(batch_size=plan.batch_size, hard_negatives=hard_negatives, epochs=epochs, lr=plan.lr, warmup_steps=plan.warmup_steps,
                max_steps=plan.max_steps, save_every=plan.save_every, normalize=plan.normalize, scale=plan.scale,
                grad_cache_chunk=plan.grad_cache_chunk, precision=plan.precision)  # fmt: skip


def memory_notice(plan: TrainPlan | None, available_gib: float | None) -> str | None:
    """What to do when this machine has less memory available than the plan's measured peak
    (training with the full graph); ``None`` when it fits, is unknown, or gradient caching is on."""
    if plan is None or plan.grad_cache_chunk or plan.full_graph_peak_gib is None or available_gib is None:
        return None
    if available_gib >= plan.full_graph_peak_gib:
        return None
    return (f"note: this machine has {available_gib:.1f} GiB of memory available; this experiment peaked at {plan.full_graph_peak_gib} GiB "
            f"(training batches of {plan.batch_size} with the full graph). Pass --grad-cache-chunk 8 to train with gradient caching "
            "(the same loss; training's peak ~2.3 GiB, ~15% slower).")  # fmt: skip


def _trains_on_cpu(device: str | None) -> bool:
    import torch

    from densepr.models.hf import default_device

    return (torch.device(device) if device else default_device()).type == "cpu"


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), in GiB; ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            kib = next(int(ln.split()[1]) for ln in fh if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return kib / 2**20


def _training_summary(job: Job) -> dict:
    """Profile dpr: questions mined per round and each model's training run (steps, wall time, last validation)."""
    done, out = job.runner.done, job.cfg.out_dir
    runs = {}
    for model in DPR_MODELS:
        run_dir = out / "models" / model
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [m for m in metrics if m.get("kind") == "train"]
        vals = [m for m in metrics if m.get("kind") == "validation"]
        runs[model] = {"init": read_json(run_dir / "config.json")["init"], "steps": len(steps),
                       "questions_per_s": round(float(np.median([m["questions_per_s"] for m in steps])), 2) if steps else None,
                       "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
                       "validation": vals[-1] if vals else None}  # fmt: skip
    mined = {stage: {"records": done[stage].get()["train"]["records"], "questions": done[stage].get()["train"]["questions"],
                     "positive_from": done[stage].get()["train"]["positive_from"]} for stage in ("mine", "remine")}  # fmt: skip
    return {"mined": mined, "runs": runs}


def _sets(data: EmbeddedData, names: Sequence[str], limit: int | None) -> list[QASet]:
    """Embedded sets by name, or QA files by path (e.g. a held-out slice written by build-train)."""
    return [data.resolve_qa(n, limit=limit) for n in names]


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
    if _trains_on_cpu(cfg.device) and (notice := memory_notice(job.plan, available_memory_gib())) is not None:
        log(notice)  # the measured peak is host memory for CPU training; on a GPU the activations live there
    runner.timed("fetch", fetch_embedded, cfg.cache_dir, verify=False, log=log)
    runner.run(job.passages())
    runner.run(job.bm25())
    if job.plan is None:
        runner.run(job.dense())
    else:
        plan = job.plan
        runner.run(job.dense("dense-zeroshot"))
        runner.run(job.mine())
        for model, data, hard, epochs, init in (("inbatch", "mine", 0, plan.epochs, None), ("round1", "mine", plan.hard_negatives, plan.epochs, None),
                                                ("round2", "remine", plan.hard_negatives, *plan.round2())):
            if data == "remine":
                runner.run(job.remine())
            job.train_and_encode(model, data, hard, epochs, init, _dense_stage(model))
    best, grid_scores = runner.run(job.tune()).get()
    tuned_on = "the held-out dev questions" if job.plan else ", ".join(cfg.tune_sets)
    log(f"hybrid lambda tuned on {tuned_on}: {best} (dev top-20 {grid_scores[str(best)]}%)")

    results, evaluated = {}, {}
    for qas in _sets(job.data, cfg.datasets, cfg.limit):
        done = runner.run(job.evaluate(qas))
        entry = results[qas.name] = done.get()[0]
        evaluated[qas.name] = done.stage.name
        log(f"{qas.name}: {len(qas)} questions, {entry['n_answerable']} answerable; top-20 "
            + ", ".join(f"{m} {r['all']['top20']:.1f}" for m, r in entry["methods"].items()))  # fmt: skip
    qa_done: dict[str, str] = {}
    if job.reader_plan is not None:
        rp = job.reader_plan
        runner.run(job.reader_data())
        if rp.cloze:
            runner.run(job.reader_cloze())
        runner.run(job.train_reader())
        for mode, c in runner.run(job.tune_reader()).get().items():
            log(f"reader ({mode}): k={c['k']}, held-out EM {c['em']} (DPR's rule: {c['paper_em']} at k={c['paper_k']})")
        sets = _sets(job.data, cfg.datasets, rp.qa_limit)
        for qas in sorted(sets, key=len):  # smallest first: in a long full-set run the finished sets come soonest
            done = runner.run(job.qa(qas))
            qa_done[qas.name] = done.stage.name
            res = done.get()
            log(f"{qas.name}: {len(qas)} questions read end to end; best EM "
                + ", ".join(f"{m} {max(v['em'] for v in res['modes'][m]['k'].values()):.1f}" for m in rp.modes))  # fmt: skip
        qa_done = {qas.name: qa_done[qas.name] for qas in sets}  # reported in the sets' order
    runner.run(job.report(evaluated, qa_done))
    if rank != 0:
        return {}  # rank 0 writes and returns the results
    training = _training_summary(job) if job.plan else None

    total = round(time.perf_counter() - t_start, 1)
    q_name = read_json(out / "dense" / "manifest.json").get("question_encoder") if cfg.encoder else "embedded:all-MiniLM-L6-v2"
    if job.plan:
        q_name = "trained here from embedded:all-MiniLM-L6-v2"
    summary = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("cache_dir", "out_dir", "device", "force_from")},
                   "encoder": q_name, "hybrid_lambda": best, **({"train": asdict(job.plan)} if job.plan else {}),
                   **({"reader": asdict(job.reader_plan)} if job.reader_plan else {})},
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "timings_s": {**runner.timings(), **job.timings, "total": total},
        "stages": runner.rows,
        "method_names": {str(m): job.names.get(str(m), str(m)) for m in job.methods},
        "results": results,
        **({"training": training} if training else {}),
        **({"qa": job.qa_results(qa_done)} if qa_done else {}),
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
    if "qa" in expected[profile] and not reader_recipe_changed(summary, expected, profile):
        qa_tol, got_qa = float(expected[profile].get("qa_tolerance", tol)), qa_figures(summary.get("qa"))
        for key, value in expected[profile]["qa"].items():
            now = got_qa.get(key)
            if now is None or abs(now - value) > qa_tol:
                problems.append(f"qa {key}: {now} vs committed {value} (tolerance ±{qa_tol})")
    return problems


# What a committed config without these ReaderPlan fields trained: the recipe before each field was added.
READER_PLAN_BEFORE = {"head_lr": None, "span_loss": "dpr", "epochs": 1, "dropout": 0.0, "read_precision": "fp32", "cloze": 0}


def reader_recipe_changed(summary: dict, expected: dict, profile: str) -> bool:
    """True when the committed EM figures were recorded with another reader recipe (``ReaderPlan``) than
    this run's: they measure another reader, so :func:`check_against` leaves EM unchecked (the caller
    says so) until they are recorded again; retrieval figures are checked either way."""
    recorded = expected.get(profile, {}).get("config", {}).get("reader")
    now = summary.get("config", {}).get("reader")
    if recorded is None or now is None:
        return False
    # JSON has lists, not tuples; a field recorded before it existed had the value it now names explicitly
    return json.loads(json.dumps({**READER_PLAN_BEFORE, **recorded})) != json.loads(json.dumps({**READER_PLAN_BEFORE, **now}))


def qa_figures(qa: dict | None) -> dict[str, float]:
    """End-to-end EM of a run's reader stages, flat: ``{"<set> <mode> <rule> @<k> <all|answerable>": EM}``,
    rule ``paper`` (DPR's selection) or ``fused`` (the tuned one)."""
    flat: dict[str, float] = {}
    for ds, res in ((qa or {}).get("sets") or {}).items():
        for mode, rep in res["modes"].items():
            for rule, per_k in (("paper", rep["k"]), ("fused", rep.get("fused", {}).get("k", {}))):
                for k, m in per_k.items():
                    flat[f"{ds} {mode} {rule} @{k} all"] = m["em"]
                    flat[f"{ds} {mode} {rule} @{k} answerable"] = m["em_answerable"]
    return flat


def expected_entry(summary: dict, tolerance: float, qa_tolerance: float | None = None) -> dict:
    """The part of a run's summary that is committed as the expected figures (EM too, when the run read)."""
    qa = qa_figures(summary.get("qa"))
    return {"tolerance": tolerance, "date": summary["date"], "machine": summary["machine"], "config": summary["config"],
            "results": summary["results"], **({"qa_tolerance": qa_tolerance or tolerance, "qa": qa} if qa else {})}  # fmt: skip


def uses_defaults(cfg: ReproduceConfig) -> bool:
    """Only a run on the embedded defaults can be compared with the committed figures."""
    default = ReproduceConfig(profile=cfg.profile)
    # gradient caching computes the same loss in pieces: its run is checked against the same figures
    plan = replace(cfg.plan, grad_cache_chunk=0) if cfg.plan is not None else None
    return cfg.encoder is None and plan == default.plan and cfg.datasets == default.datasets and cfg.tune_sets == default.tune_sets and cfg.k == default.k and cfg.depth == default.depth and cfg.reader == default.reader

