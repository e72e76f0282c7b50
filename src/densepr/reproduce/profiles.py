"""Profiles and plans: what a ``densepr reproduce`` run does, before anything runs.

The table's methods, the profiles (``full``, ``smoke``: zero-shot; ``dpr``, ``dpr-smoke``: the paper's
experiment; ``dpr-gpu``: the same at the paper's sizes on a GPU), the training and reader recipes (:class:`TrainPlan`, :class:`ReaderPlan`, every default
defined once), :class:`ReproduceConfig` (a run's settings, checked up front) and each profile's stage
order (what ``--from`` accepts).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from densepr.data.fetch import EmbeddedData
from densepr.errors import DenseprError
from densepr.models.hf import check_precision
from densepr.retrieve.fusion import PAPER_LAMBDA
from densepr.retrieve.modes import Mode
from densepr.train.config import MINING

METHODS = (Mode.BM25, Mode.DENSE, Mode.HYBRID, f"hybrid-{PAPER_LAMBDA}", Mode.RRF)
METHOD_NAMES = {**{m.value: m.label for m in Mode}, "hybrid": "hybrid (tuned λ)", f"hybrid-{PAPER_LAMBDA}": f"hybrid (λ={PAPER_LAMBDA})"}
# Profile dpr: the models it trains (besides the zero-shot encoder), in training order; the last
# is the final retriever (``dense``), the others are evaluated dense-only as ``dense-<model>``.
DPR_MODELS = ("inbatch", "round1", "round2")


def dense_stage(model: str) -> str:
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

    # the model both towers start from: "embedded" (all-MiniLM-L6-v2), a model `densepr data fetch --model NAME`
    # fetches ("mpnet": all-mpnet-base-v2, 12 layers x 768, BERT-base size), or a model directory
    model: str = "embedded"
    sets: tuple[str, ...] = ("nq-dev", "trivia-dev")
    questions: int | None = None  # per mining set; None: all
    val_fraction: float = MINING.val_fraction  # held out of each set: validation, and the hybrid lambda is tuned on them
    depth: int = MINING.depth  # passages of each ranked list mined per question
    mined_hard: int = MINING.hard_negatives  # hard negatives mined per question (a step samples ``hard_negatives`` of them)
    batch_size: int = 128
    hard_negatives: int = 1
    # 30 steps of 128 on the embedded data: 730 s on 2 CPU cores with one hard negative (sixth run). Three epochs
    # (benchmarks/training/round2_init.py --round1-epochs 3): NQ / TriviaQA answerable top-20 after round 2 61.0 / 62.4
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
    skip_top: int = MINING.skip_top
    round2_init: str = "round1"  # or "initial": 1.2 top-20 points lower on NQ and TriviaQA (docs/training.md, round2_init.py)
    # >0: gradient caching in chunks of this many sequences (the same loss; training's peak memory 11.6 -> 2.3 GiB
    # at batch 128, ~15% slower: benchmarks/training/train_bench.py). Off: the whole run's peak below, the larger of two runs
    # measured with /usr/bin/time on 2026-12-05; below that much available memory the job says how to fit (memory_notice).
    grad_cache_chunk: int = 0
    full_graph_peak_gib: float | None = 13.7
    # fp32, or bf16 autocast for both retrievers' and the reader's training (models.hf.autocast: 1.4x a step on CPUs
    # with native bf16, benchmarks/training/train_precision.py); the committed figures are float32 runs'
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

    model: str = "embedded"  # the encoder the reader starts from (new heads), as TrainPlan.model
    depth: int = 20  # retrieved passages per training question: positives and negatives come from these
    passages: int = 2  # M per question per step: 1 answer-bearing + M-1 answerless
    batch_size: int = 32
    max_length: int = 192  # window tokens ([CLS] question [SEP] title [SEP] text)
    lr: float = 1e-4
    head_lr: float | None = 1e-3  # the new start/end/selection heads learn from zero: their own, higher rate
    span_loss: str = "shared"  # or "positive": start/end softmax within the positive passage (DPR's loss)
    warmup_steps: int = 10
    dropout: float = 0.0  # off: on 2 CPU cores dropout doubled the reader's step time (docs/reader.md, reader recipes)
    epochs: int = 3  # the checkpoint with the best held-out EM is kept (measured: the end of epoch 2 of 3)
    max_steps: int | None = None  # None: ``epochs`` over the usable mining questions (~4-5 k; ~5 s a step on 2 cores)
    save_every: int = 10
    dev_limit: int = 100  # held-out questions validated at the end of training
    tune_limit: int | None = 150  # held-out questions the selection and k are tuned on
    qa_limit: int | None = 100  # test questions read end to end per set (~1.5 min each on 2 cores); None: all
    read_precision: str = "fp32"  # the reader's weights in the qa stages (models.hf.inference_dtype; bf16: 1.64x on bf16 CPUs)
    # the reader's training precision; None: the retrievers' (TrainPlan.precision), so --train-precision sets both, and
    # --reader-train-precision retrains the reader alone in bf16 (an MPNet reader on a run whose retrievers trained in fp32)
    train_precision: str | None = None
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
    gpu: bool = False  # sized for a GPU: refused where the run's device is the CPU
    expected: str = ""  # the expected wall time, said when the run starts


# Profile dpr-gpu (`densepr reproduce --profile dpr-gpu --device cuda`): the paper's sizes on one GPU. Both towers and the
# reader start from all-mpnet-base-v2 (12 layers x 768, 110M parameters: BERT-base size; fetched by the job), the retriever
# at batch 128 with one BM25 hard negative for 40 epochs (Section 5.2; round 2 another 40 from round 1's weights, the
# in-batch ablation 40 too) at the paper's lr 1e-5 with warm-up, the reader at M = 24 passages x 16 questions and windows
# of 350 tokens (Section 6.1) with this project's measured recipe (shared normalisation, heads at 1e-3), bf16 autocast,
# every test question read end to end. Still cosine similarity at scale 20: MPNet was trained for it, as MiniLM.
GPU_TRAIN = TrainPlan(model="mpnet", batch_size=128, hard_negatives=1, epochs=40, round2_epochs=40, lr=1e-5, warmup_steps=100,
                      save_every=1000, precision="bf16", full_graph_peak_gib=None)  # fmt: skip
GPU_READER = ReaderPlan(model="mpnet", passages=24, batch_size=16, max_length=350, lr=2e-5, head_lr=1e-3, warmup_steps=50, dropout=0.1,
                        epochs=3, save_every=1000, dev_limit=500, tune_limit=None, qa_limit=None)  # fmt: skip
# Not measured (no GPU was lent to the session that wrote it): estimated from the FLOPs at ~35% of an H100's 989 bf16
# TFLOP/s, with the embedded data's sizes (docs/training.md: 3,923 round-1 and 5,206 round-2 training questions; MPNet's
# tokenizer: 107 tokens a passage on average, 189 at the 95th percentile, so a batch of 256 pads to ~250; questions 12).
# Retriever: 6 x 85M weights x ~67k tokens a step = 3.4e16 FLOPs, ~0.15 s with its overheads; 1,200 + 1,200 + 1,600
# steps ~ 10 min, plus 120 epoch ends (validation, a 2.6 GB checkpoint each) ~ 10 min. Reader:
# ~750 steps of 16 x 24 windows ~ 2 min, tuning and 28k test questions x 20 passages x 2 modes read ~ 8 min. BM25,
# mining and evaluation on the host CPUs (16 cores) ~ 10 min. Disk: ~13 GB of checkpoints under the output. GPU memory:
# ~0.5 MB of bf16 activations a token over 12 layers (Korthikanti et al., 2022) x ~70k tokens a step ~ 35 GB, without
# gradient caching (--grad-cache-chunk 32 for a smaller GPU).
GPU_EXPECTED = "about 45 min on one H100-class GPU (an estimate from FLOPs, not yet measured), ~13 GB of disk"

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
    "dpr-gpu": Profile(None, None, tolerance=2.0, gpu=True, train=GPU_TRAIN, reader=GPU_READER, expected=GPU_EXPECTED),
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
    reader_train_precision: str | None = None  # profiles with a reader: override ReaderPlan.train_precision (the reader's alone)
    reader_epochs: int | None = None  # profiles with a reader: override ReaderPlan.epochs
    reader_cloze: int | None = None  # profile dpr: override ReaderPlan.cloze (cloze questions to pre-train the reader on; 0: off)
    # the training profiles: override ReaderPlan.model / TrainPlan.model (both towers): "embedded", "mpnet" or a model directory.
    # Profile dpr with an MPNet reader on 2 CPU cores, estimated (not measured): its reader stages measured 2,388 s with MiniLM
    # (train-reader 1,852 + tune-reader 136 + qa 400; docs/training.md, sixth run) and MPNet costs ~8x a token (2x the layers,
    # 4x the width squared): ~19,100 s, so the whole run ~6.2 h instead of 95 min (fp32); ~4.5 h with --train-precision bf16
    # and --read-precision bf16 (1.4x a training step, 1.64x reading, measured on CPUs with native bf16)
    reader_model: str | None = None
    retriever_model: str | None = None
    limit: int | None = field(default=None, init=False)
    tune_limit: int | None = field(default=None, init=False)
    plan: TrainPlan | None = field(default=None, init=False)
    reader: ReaderPlan | None = field(default=None, init=False)

    def _needs_training(self, flag: str) -> None:
        """Refuse ``flag`` (a TrainPlan override) on a profile that trains nothing."""
        if self.plan is None:
            raise DenseprError(f"{flag} applies to the training profiles (dpr, dpr-smoke, dpr-gpu), not {self.profile!r}")

    def _needs_reader(self, flag: str) -> None:
        """Refuse ``flag`` (a ReaderPlan override) on a profile without a reader."""
        if self.reader is None:
            raise DenseprError(f"{flag} applies to the profiles with a reader (dpr, dpr-smoke, dpr-gpu), not {self.profile!r}")

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
            self._needs_training(flag)
            if name == "grad_cache_chunk" and value < 0:
                raise DenseprError(f"{flag} must be 0 (off) or a positive number of sequences, not {value}")
            if name in ("epochs", "round2_epochs") and value < 1:
                raise DenseprError(f"{flag} must be a positive number of epochs, not {value}")
            self.plan = replace(self.plan, **{name: value})
        self.reader = prof.reader if self.plan is not None else None
        if self.qa_limit != -1:
            self._needs_reader("--qa-limit")
            if self.qa_limit is not None and self.qa_limit < 1:
                raise DenseprError(f"--qa-limit must be a positive number of questions (or 'all'), not {self.qa_limit}")
            self.reader = replace(self.reader, qa_limit=self.qa_limit)
        if self.reader_cloze is not None:
            self._needs_reader("--reader-cloze")
            if self.reader_cloze < 0:
                raise DenseprError(f"--reader-cloze must be 0 (off) or a number of cloze questions, not {self.reader_cloze}")
            self.reader = replace(self.reader, cloze=self.reader_cloze)
        if self.train_precision is not None:
            self._needs_training("--train-precision")
            self.plan = replace(self.plan, precision=check_precision(self.train_precision, "--train-precision"))
        if self.reader_epochs is not None:
            self._needs_reader("--reader-epochs")
            if self.reader_epochs < 1:
                raise DenseprError(f"--reader-epochs must be a positive number of epochs, not {self.reader_epochs}")
            self.reader = replace(self.reader, epochs=self.reader_epochs)
        if self.reader_train_precision is not None:
            self._needs_reader("--reader-train-precision")
            self.reader = replace(self.reader, train_precision=check_precision(self.reader_train_precision, "--reader-train-precision"))
        if self.read_precision is not None:
            self._needs_reader("--read-precision")
            # a bad value: one clear error before any stage runs
            self.reader = replace(self.reader, read_precision=check_precision(self.read_precision, "--read-precision"))
        if self.retriever_model is not None:
            self._needs_training("--retriever-model")
            self.plan = replace(self.plan, model=check_model(self.retriever_model, "--retriever-model"))
        if self.reader_model is not None:
            self._needs_reader("--reader-model")
            self.reader = replace(self.reader, model=check_model(self.reader_model, "--reader-model"))
        if self.plan is not None and self.encoder is not None:
            raise DenseprError("the training profiles train from TrainPlan.model (--retriever-model); --encoder applies to the zero-shot profiles")
        if prof.gpu and _device_type(self.device) != "cuda":
            raise DenseprError(f"profile {self.profile} is sized for a GPU ({prof.expected}); the device here is "
                               f"{self.device or 'the CPU'}: run it with --device cuda on a GPU machine, or use --profile dpr")  # fmt: skip
        self.out_dir = Path(self.out_dir)
        order = stage_order(self.profile)
        if self.force_from is not None and self.force_from not in order:
            raise DenseprError(f"--from {self.force_from!r}: no such stage; stages: {', '.join(order)}")




def check_model(name: str, flag: str) -> str:
    """A starting model named on the command line (``--reader-model``, ``--retriever-model``): ``embedded``, a model
    ``densepr data fetch --model NAME`` fetches (the job fetches it), or a model directory (made absolute, so the
    stage settings name the same one from any working directory)."""
    from densepr.data.pretrained import MODELS

    if name == "embedded" or name in MODELS:
        return name
    path = Path(name).expanduser()
    if not path.exists():
        raise DenseprError(f"{flag} {name!r}: no such model directory, nor a model name ({', '.join(('embedded', *MODELS))})")
    if not (path / "config.json").is_file():
        raise DenseprError(f"{flag} {name!r}: not a model directory (no config.json in it)")
    return str(path.resolve())


def model_label(name: str) -> str:
    """What a plan's starting model is, for the run's summary: ``embedded:all-MiniLM-L6-v2``, ``mpnet:all-mpnet-base-v2``, or the directory."""
    from densepr.data.pretrained import MODELS

    if name == "embedded":
        return "embedded:all-MiniLM-L6-v2"
    return f"{name}:{MODELS[name].folder}" if name in MODELS else name


def _device_type(device: str | None) -> str:
    import torch

    from densepr.models.hf import default_device

    return (torch.device(device) if device else default_device()).type


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
