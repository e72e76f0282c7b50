"""Training configurations: every setting a run depends on, each default defined here once.

Saved as the run's ``config.json``; a resumed run must match it (``max_steps`` may change). The
CLI's options take their defaults from these classes. Torch-free, so reading a
default does not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from densepr.errors import ConfigError


@dataclass(kw_only=True)
class OptimConfig:
    """What both trainers share: AdamW with a linear schedule, clipping, seeding, checkpoints."""

    epochs: int = 2
    lr: float = 2e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 2.0  # DPR's
    adam_eps: float = 1e-8
    seed: int = 12345
    max_length: int = 256  # tokens per sequence
    save_every: int = 50  # steps between checkpoints (and one at each epoch end)
    max_steps: int | None = None  # stop after this many steps in total (for tests and smoke runs)
    precision: str = "fp32"  # bf16: bf16 autocast on the CPU (1.4x a step on CPUs with native bf16; weights stay float32)


@dataclass(kw_only=True)
class TrainConfig(OptimConfig):
    """A DPR retriever run (:func:`densepr.train.retriever.train`)."""

    train_file: str
    output_dir: str
    init: str  # a Hugging Face model directory, or a checkpoint with question_encoder/ + passage_encoder/
    dev_file: str | None = None
    shared: bool = False  # one encoder for questions and passages
    pooling: str | None = None  # default: the model's own setting
    normalize: bool = False  # DPR: raw dot product
    scale: float = 1.0  # similarities x this in the loss (DPR: 1; with normalize, ~20 as sentence-transformers)
    batch_size: int = 128  # questions per step, over all processes
    hard_negatives: int = 1
    random_negatives: int = 0
    grad_cache_chunk: int = 0  # >0: gradient caching with chunks of this many sequences
    val_hard_negatives: int = 5  # validation pool: each question's positive + this many hard negatives
    log_every: int = 1
    tensorboard: bool = False
    skip_bad: bool = False


@dataclass(kw_only=True)
class ReaderTrainConfig(OptimConfig):
    """A reader run (:func:`densepr.train.reader.train_reader`)."""

    train_files: list[str]
    output_dir: str
    init: str  # an encoder directory (BERT, MiniLM, MPNet, ...), a trained reader or a DPRReader checkpoint
    dev_file: str | None = None
    holdout: list[str] = field(default_factory=list)  # QA files whose questions must not be trained on
    match: str = "string"  # how answers are located: string, or regex (CuratedTREC)
    passages: int = 24  # M: passages read per question per step (the paper: 24)
    depth: int = 100  # retrieved passages looked at per question
    max_positives: int = 10
    max_negatives: int = 50
    batch_size: int = 16  # questions per step
    lr: float = 1e-5  # DPR's
    warmup_steps: int = 0
    max_answer_length: int = 10
    dropout: float | None = None  # None: the model's own (BERT: 0.1); 0 makes CPU training ~2x faster
    eval_every: int = 0  # >0: also validate every this many steps
    dev_limit: int | None = 500  # validation questions (the first N of the dev file)
    max_questions: int | None = None  # use only the first N usable training questions
    piece: int = 16  # windows per forward piece (length-sorted, each padded to its own longest)
    span_loss: str = "positive"  # positive: DPR's (span softmax within the positive); shared: over all M passages
    head_lr: float | None = None  # learning rate of the two heads (default: lr); new heads learn faster


SPAN_LOSSES = ("positive", "shared")  # ReaderTrainConfig.span_loss (and reproduce's ReaderPlan.span_loss)
SPAN_LOSS_ALIASES = {"dpr": "positive"}  # the name reproduce once gave DPR's loss (recorded configs may hold it)


def span_loss_name(name: str) -> str:
    """A span loss's one name (:data:`SPAN_LOSSES`), an old alias mapped to it; unknown names are returned as given."""
    return SPAN_LOSS_ALIASES.get(name, name)


@dataclass(frozen=True)
class MiningConfig:
    """How questions are mined into training data: the one home of the defaults of :func:`mine`,
    :func:`build_training_data`, ``densepr data build-train`` and reproduce's ``TrainPlan``."""

    val_fraction: float = 0.1  # of each set's questions held out for validation
    depth: int = 100  # passages of each ranked list looked at per question (the paper: 100)
    hard_negatives: int = 30  # answerless passages of the negatives list kept per question, best first
    random_negatives: int = 10  # random answerless passages per question
    seed: int = 0
    skip_top: int = 0  # answerless passages ranked above this (0-based) are not hard negatives

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", "must be in [0, 1)")
        if not 0 <= self.skip_top < self.depth:
            raise ConfigError("skip_top", f"must be between 0 and depth ({self.depth}) - 1")


MINING = MiningConfig()  # the defaults
