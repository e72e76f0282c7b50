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

One file per phase (each function here builds one stage over the shared :class:`Job` context):

- :mod:`~densepr.reproduce.profiles`: the profiles (``full``, ``smoke``, ``dpr``, ``dpr-smoke``), the training and
  reader plans, :class:`ReproduceConfig`, and each profile's stage order;
- :mod:`~densepr.reproduce.context`: :class:`Job`, the state the stages share (config, stage runner, corpus,
  retrievers, reader, timings) and the torchrun process group;
- :mod:`~densepr.reproduce.retrieval`: passages, BM25, dense encoding, the hybrid lambda, evaluation of each test set;
- :mod:`~densepr.reproduce.training`: profile dpr's mining, re-mining and DPR training (and its memory notice);
- :mod:`~densepr.reproduce.reading`: profile dpr's reader: its data, cloze pre-training, training, tuning, end-to-end QA;
- :mod:`~densepr.reproduce.report`: results.md, curves and plots, and the training and QA summaries;
- :mod:`~densepr.reproduce.regression`: the check against the committed figures, and its policy;
- :mod:`~densepr.reproduce.main`: :func:`run`, every stage in order, and ``results.json``.
"""

from densepr.reproduce.context import Job, process_group
from densepr.reproduce.main import run
from densepr.reproduce.profiles import (
    DPR_METHODS,
    DPR_MODELS,
    DPR_NAMES,
    DPR_STAGES,
    METHOD_NAMES,
    METHODS,
    PROFILES,
    READER_STAGES,
    STAGES,
    Profile,
    ReaderPlan,
    ReproduceConfig,
    TrainPlan,
    stage_order,
)
from densepr.reproduce.regression import (
    EXPECTED_RESOURCE,
    READER_PLAN_BEFORE,
    RegressionCheck,
    check_against,
    expected_entry,
    load_expected,
    qa_figures,
    reader_recipe_changed,
    record_expected,
    regression_check,
    uses_defaults,
)
from densepr.reproduce.report import mining_table
from densepr.reproduce.training import available_memory_gib, memory_notice

__all__ = [
    "DPR_METHODS", "DPR_MODELS", "DPR_NAMES", "DPR_STAGES", "EXPECTED_RESOURCE", "METHODS", "METHOD_NAMES", "PROFILES",
    "READER_PLAN_BEFORE", "READER_STAGES", "STAGES", "Job", "Profile", "ReaderPlan", "RegressionCheck", "ReproduceConfig",
    "TrainPlan", "available_memory_gib", "check_against", "expected_entry", "load_expected", "memory_notice", "mining_table",
    "process_group", "qa_figures", "reader_recipe_changed", "record_expected", "regression_check", "run", "stage_order",
    "uses_defaults",
]  # fmt: skip
