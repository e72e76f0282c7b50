"""The job context: the state every stage shares.

:class:`Job` holds the config, the :class:`~densepr.stages.StageRunner`, the embedded data, the
timings, and the artefacts the stages load lazily (the corpus, the retrievers, the tuned reader);
the stages themselves are functions over it (:mod:`.retrieval`, :mod:`.training`, :mod:`.reading`,
:mod:`.report`). Also the torchrun process group the job runs under.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from densepr.data.fetch import EmbeddedData
from densepr.data.passages import Corpus
from densepr.data.qa import QASet
from densepr.evaluate.answers import AnswerMatcher
from densepr.index.dense import DenseIndex
from densepr.models.encoder import Encoder
from densepr.reproduce.profiles import DPR_METHODS, DPR_NAMES, METHOD_NAMES, METHODS, ReproduceConfig, dense_stage, stage_order
from densepr.retrieve.index_dir import IndexDir
from densepr.retrieve.retriever import Retriever
from densepr.stages import StageRunner


class Job:
    """The state the main job's stages share, on a :class:`~densepr.stages.StageRunner`: each stage is
    skipped when current, and a skipped stage's artefact is loaded only when a stage that runs reads it."""

    def __init__(self, cfg: ReproduceConfig, log: Callable[[str], None], show_progress: bool,
                 rank: int = 0, sync: Callable | None = None) -> None:  # fmt: skip
        self.cfg, self.log, self.show_progress = cfg, log, show_progress
        self.timings: dict[str, float] = {}  # steps inside stages (encode passages, retrieve <set>, ...)
        self.data = EmbeddedData(cfg.cache_dir)
        self.runner = StageRunner(cfg.out_dir, stage_order(cfg.profile), cfg.force_from, log=log, rank=rank, sync=sync or (lambda v: v))
        self.plan = cfg.plan
        self.methods = DPR_METHODS if self.plan else METHODS
        self.names = DPR_NAMES if self.plan else METHOD_NAMES
        if self.plan is not None and self.plan.model != "embedded":
            self.names = {**DPR_NAMES, "dense-zeroshot": f"dense ({Path(self.plan.model).name}, zero-shot)"}
        self.reader_plan = cfg.reader
        self._retriever: Retriever | None = None
        self._reader = None
        self._dense_only: dict[str, Retriever] = {}

    @property
    def encoder_path(self) -> str:
        # Looked up when a stage needs it: the job fetches the embedded data first, so on a fresh
        # machine the model is not there yet when the job is set up.
        if self.cfg.encoder:
            return self.cfg.encoder
        return self.model_dir(self.plan.model) if self.plan is not None else str(self.data.model_dir)

    def model_dir(self, name: str) -> str:
        """A plan's starting model (``TrainPlan.model``, ``ReaderPlan.model``): ``embedded`` (all-MiniLM-L6-v2),
        a model ``densepr data fetch --model NAME`` fetched (``mpnet``), or a model directory."""
        from densepr.data.pretrained import MODELS, pretrained_dir

        if name == "embedded":
            return str(self.data.model_dir)
        return str(pretrained_dir(name, self.cfg.cache_dir)) if name in MODELS else name

    def pretrained_models(self) -> list[str]:
        """The fetched models (``densepr data fetch --model``) this run's plans start from: the job fetches them."""
        from densepr.data.pretrained import MODELS

        names = [p.model for p in (self.plan, self.reader_plan) if p is not None]
        return sorted({n for n in names if n in MODELS})

    def timed(self, name: str, fn: Callable, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.timings[name] = round(time.perf_counter() - t0, 2) + self.timings.get(name, 0.0)
        return out

    def corpus(self) -> Corpus:
        return self.runner.done["passages"].get()

    def _question_encoder(self, index: DenseIndex, stage: str) -> Encoder:
        """The question encoder the dense index ``<out>/<stage>/`` records, looked for relative to that directory
        first (:func:`~densepr.index.encoder_ref.load_recorded`): a moved run directory, whose trained encoders
        moved with it, resumes."""
        from densepr.index.encoder_ref import load_recorded

        return load_recorded(index.manifest, self.cfg.out_dir / stage, self.cfg.device)

    def retriever(self) -> Retriever:
        """BM25 + the final dense index + its E_Q, with the tuned lambda (loaded on first use)."""
        if self._retriever is None:
            done = self.runner.done
            dense = done["dense"].get()
            self._retriever = Retriever(self.corpus(), done["bm25"].get(), dense, self._question_encoder(dense, "dense"), depth=self.cfg.depth)
        if "tune" in self.runner.done:
            self._retriever.hybrid_lambda = self.runner.done["tune"].get()[0]
        return self._retriever

    def dense_only(self, model: str) -> Retriever:
        """A dense-only retriever over ``dense-<model>/`` (profile dpr's other encoders)."""
        if model not in self._dense_only:
            dense = self.runner.done[dense_stage(model)].get()
            self._dense_only[model] = Retriever(self.corpus(), None, dense, self._question_encoder(dense, dense_stage(model)), depth=self.cfg.depth)
        return self._dense_only[model]

    def matcher(self) -> AnswerMatcher:
        return AnswerMatcher(self.corpus().texts)

    def reader(self):
        """The tuned reader (``<out>/reader/``), loaded once."""
        from densepr.models.reader import Reader

        if self._reader is None:
            self._reader = Reader.load(IndexDir(self.cfg.out_dir).reader_dir, self.cfg.device, precision=self.reader_plan.read_precision)
        return self._reader


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


def load_sets(data: EmbeddedData, names: Sequence[str], limit: int | None) -> list[QASet]:
    """Embedded sets by name, or QA files by path (e.g. a held-out slice written by build-train)."""
    return [data.resolve_qa(n, limit=limit) for n in names]
