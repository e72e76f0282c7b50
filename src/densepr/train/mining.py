"""Training data from question/answer pairs without gold passages (DPR Section 4.2, Section 5.2).

For TriviaQA, WebQuestions and CuratedTREC the paper takes BM25's top 100 passages per
question: the highest-ranked passage that contains an answer (``has_answer``) is the
positive, and the question is dropped when none does; the BM25 passages without any
answer are the hard negatives; random passages are the plain negatives. The output is DPR's
retriever JSON (see :mod:`densepr.data.training`), so the official ``biencoder-*.json``
files and ours feed the same trainer.

Re-mining (the DPR follow-ups' "adversarial" negatives, ANCE's idea): ``negatives_from`` gives
a trained model's own ranking; its answerless passages become the hard negatives (after
``skip_top`` ranks, where unlabelled positives are likeliest), and the positive is the model's
best answer-bearing passage, else BM25's (or other ``positives_also`` lists'), so questions
either list answers survive. ``MiningStats`` counts where each positive came from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from densepr.data.passages import Corpus
from densepr.data.qa import QASet, write_qa_tsv
from densepr.data.training import TrainRecord, write_train_records
from densepr.errors import DenseprError
from densepr.evaluate.answers import AnswerMatcher
from densepr.fileio.atomic import write_json
from densepr.ranking import SearchResult
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.index_dir import IndexDir
from densepr.retrieve.modes import Mode
from densepr.train.config import MINING, MiningConfig

Ranking = Callable[[Sequence[str], int], SearchResult] | Sequence[SearchResult]
"""A ranked list per question: a search function ``(questions, k) -> SearchResult``, or one
precomputed :class:`SearchResult` per set (rows in the set's question order)."""




@dataclass
class MiningStats:
    """How many questions each set gave, why the others were dropped, and which list gave the positives."""

    questions: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    no_positive: dict[str, int] = field(default_factory=dict)
    hard_negatives: int = 0
    positive_from: dict[str, int] = field(default_factory=dict)  # list name -> positives taken from it
    answer_in: dict[str, int] = field(default_factory=dict)  # list name -> questions with an answer in its top depth
    rescued_by: dict[str, int] = field(default_factory=dict)  # list name -> questions only it answered (kept thanks to it)

    def as_dict(self) -> dict:
        return {"questions": self.questions, "kept": self.kept, "dropped_no_positive_in_bm25_top": self.no_positive,
                "hard_negatives_total": self.hard_negatives, "positive_from": self.positive_from,
                "answer_in": self.answer_in, "rescued_by": self.rescued_by}  # fmt: skip


def _ranked(ranking: Ranking, s: int, qas: QASet, depth: int) -> SearchResult:
    """The ranking's lists for set number ``s``, cut to ``depth``."""
    if callable(ranking):
        res = ranking(qas.questions, depth)
    elif len(ranking) <= s:
        raise ValueError(f"a precomputed ranking has {len(ranking)} results; set {s + 1} ({qas.name}) has none")
    else:
        res = ranking[s]
    if len(res.rows) != len(qas):
        raise ValueError(f"{qas.name}: {len(res.rows)} ranked lists for {len(qas)} questions")
    return res.top(depth)


def mine(
    sets: Sequence[QASet],
    corpus: Corpus,
    bm25: BM25Index,
    *,
    depth: int = MINING.depth,
    hard_negatives: int = MINING.hard_negatives,
    random_negatives: int = MINING.random_negatives,
    seed: int = MINING.seed,
    stats: MiningStats | None = None,
    negatives_from: Ranking | None = None,
    positives_also: Mapping[str, Ranking] | None = None,
    skip_top: int = MINING.skip_top,
) -> Iterator[TrainRecord]:
    """Yield one :class:`TrainRecord` per question with an answer-bearing passage in one of the lists.

    The *negatives list* (``negatives_from``, named ``"model"``; BM25's by default) gives the hard
    negatives, its answerless passages best first from rank ``skip_top`` on, and the positive: its
    highest-ranked answer-bearing passage. When it holds none, the positive is the best answer-bearing
    passage of the first of ``positives_also`` that holds one; else the question is dropped.

    Args:
        sets: question/answer sets (the match type of each decides string or regex matching).
        corpus: the passages.
        bm25: a BM25 index over ``corpus``.
        depth: how many passages of each list to look at (the paper: 100).
        hard_negatives: keep up to this many answerless passages of the negatives list, best first.
        random_negatives: random answerless passages per question.
        seed: for the random negatives.
        stats: filled with counts as records are produced.
        negatives_from: a trained model's ranking (a search function or one result per set); None:
            BM25's, the paper's rule.
        positives_also: name -> ranking, lists searched (in this order) only for a positive when the
            negatives list has none; None: BM25's when ``negatives_from`` is given, else none.
        skip_top: answerless passages ranked above this (0-based) are not used as hard negatives.
    """
    if skip_top < 0:
        raise ValueError("skip_top must be >= 0")
    stats = stats if stats is not None else MiningStats()
    matcher = AnswerMatcher(corpus.texts)
    rng = np.random.default_rng(seed)
    sources: list[tuple[str, Ranking]] = [("bm25", bm25.search)] if negatives_from is None else [("model", negatives_from)]
    if positives_also is None:
        positives_also = {} if negatives_from is None else {"bm25": bm25.search}
    sources += list(positives_also.items())
    if len({n for n, _ in sources}) < len(sources):
        raise ValueError(f"ranking names must differ: {[n for n, _ in sources]}")
    for s, qas in enumerate(sets):
        stats.questions[qas.name] = len(qas)
        stats.kept[qas.name] = stats.no_positive[qas.name] = 0
        lists = [_ranked(r, s, qas, depth) for _, r in sources]
        all_hits = matcher.hits_many([r.rows for r in lists], qas)
        for name, hits in zip((n for n, _ in sources), all_hits):
            stats.answer_in[name] = stats.answer_in.get(name, 0) + int(hits.any(axis=1).sum())
        for i, qa in enumerate(qas.items):
            rows, h = lists[0].rows[i], all_hits[0][i]
            valid = rows >= 0
            answered = [j for j, hits in enumerate(all_hits) if hits[i].any()]
            if not answered:
                stats.no_positive[qas.name] += 1
                continue
            source = answered[0]
            pos = int(lists[source].rows[i][np.argmax(all_hits[source][i])])
            stats.positive_from[sources[source][0]] = stats.positive_from.get(sources[source][0], 0) + 1
            if len(answered) == 1 and len(sources) > 1:
                stats.rescued_by[sources[source][0]] = stats.rescued_by.get(sources[source][0], 0) + 1
            hard = [int(r) for rank, (r, v, a) in enumerate(zip(rows, valid, h)) if v and not a and rank >= skip_top][:hard_negatives]
            taken = set(rows[valid].tolist()) | {pos}
            rand: list[int] = []
            for r in rng.choice(len(corpus), size=min(len(corpus), 4 * random_negatives + 8), replace=False).tolist():
                if len(rand) == random_negatives:
                    break
                if r not in taken and not matcher.has_answer(r, qa.answers, qas.match):
                    rand.append(r)
                    taken.add(r)
            stats.kept[qas.name] += 1
            stats.hard_negatives += len(hard)
            yield TrainRecord(
                question=qa.question,
                answers=list(qa.answers),
                positive_ctxs=[corpus[pos]],
                negative_ctxs=[corpus[r] for r in rand],
                hard_negative_ctxs=[corpus[r] for r in hard],
                dataset=qas.name,
            )


def split_holdout(qas: QASet, fraction: float, seed: int = 0) -> tuple[QASet, QASet]:
    """Split questions into (train, validation) at random; ``fraction`` goes to validation."""
    if not 0 <= fraction < 1:
        raise ValueError("the validation fraction must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(qas))
    n_val = int(round(fraction * len(qas)))
    val, train = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    return (QASet(qas.name, [qas.items[i] for i in train], qas.match), QASet(f"{qas.name}-heldout", [qas.items[i] for i in val], qas.match))


def stats_path(output: str | os.PathLike[str]) -> Path:
    """Where :func:`build_training_data` writes its mining statistics: ``<output>.stats.json``."""
    return Path(output).with_suffix(".stats.json")


def heldout_path(val_output: str | os.PathLike[str]) -> Path:
    """Where :func:`build_training_data` writes the held-out questions: ``<val_output>.qa.tsv``."""
    return Path(val_output).with_suffix(".qa.tsv")


def refuse_test_sets(sets: Sequence[QASet], allow_test: bool = False) -> None:
    """Training data is never mined from a *test* set (its questions would then be trained on), unless ``allow_test``."""
    tests = [s.name for s in sets if "test" in s.name.lower()]
    if tests and not allow_test:
        raise DenseprError(f"refusing to build training data from test set(s) {', '.join(tests)}; train on dev/train sets (or --allow-test)")


REMINE_MODES = (Mode.DENSE, Mode.HYBRID)  # a trained model's rankings re-mined with (BM25 is mining's default)


def check_remine_mode(mode: str) -> None:
    """Refuse a mode a trained model's ranking cannot be re-mined with (before anything is loaded)."""
    if mode not in REMINE_MODES:
        raise DenseprError(f"--mode must be dense or hybrid, not {mode!r} (BM25 mining is the default without --negatives-from)")


def model_ranking(
    model_dir: str | os.PathLike[str], index: str | os.PathLike[str], corpus: Corpus, bm25: BM25Index, mode: str, device: str | None = None
) -> tuple[Callable[[Sequence[str], int], SearchResult], str]:
    """Re-mining with a trained model: the ranking of index directory ``model_dir`` in ``mode`` (dense
    or hybrid), a :data:`Ranking` for :func:`mine`, and the mode's name.

    Its passages must be ``corpus`` (index directory ``index``'s, that ``bm25`` indexes): its rows
    then name the same passages; else a clear error. Hybrid borrows ``bm25`` when the model's
    index has none (the same corpus). A mode its index cannot run is refused by name.
    """
    from densepr.retrieve.retriever import Retriever  # here: loading a model needs torch

    check_remine_mode(mode)
    model = Retriever.load(model_dir, device=device)
    if model.corpus.fingerprint() != corpus.fingerprint():
        raise DenseprError(f"{model_dir}: its passages.tsv differs from {IndexDir(index).passages} (corpus fingerprints differ); "
                           "re-mine with a model index over the same corpus")  # fmt: skip
    if model.bm25 is None:
        model.bm25 = bm25
    name = model.check_mode(mode).value

    def rank(questions: Sequence[str], k: int) -> SearchResult:
        return model.retrieve(questions, k, name)

    return rank, name


def build_training_data(
    sets: Sequence[QASet],
    corpus: Corpus,
    bm25: BM25Index,
    output: str | os.PathLike[str],
    val_output: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = MINING.val_fraction,
    depth: int = MINING.depth,
    hard_negatives: int = MINING.hard_negatives,
    random_negatives: int = MINING.random_negatives,
    seed: int = MINING.seed,
    negatives_from: Ranking | None = None,
    negatives_name: str = "bm25",
    skip_top: int = MINING.skip_top,
    record: Mapping[str, object] | None = None,
) -> dict:
    """Mine training data (what ``densepr data build-train`` does): hold out ``val_fraction`` of each
    set's questions, mine the rest into ``output`` and the held-out part into ``val_output``.

    Writes (each atomically): ``output`` and ``val_output`` (DPR retriever JSON), the held-out
    questions as ``<val_output>.qa.tsv`` (to tune or validate on questions never trained on) and
    ``<output>.stats.json`` (the returned report: counts per set, where positives came from, the
    configuration). ``negatives_from``/``skip_top`` as :func:`mine`; ``negatives_name`` labels
    that ranking in the report (e.g. ``"dense"``); ``record``: more settings for the report's configuration.
    """
    MiningConfig(val_fraction, depth, hard_negatives, random_negatives, seed, skip_top)  # checks them
    splits = [split_holdout(s, val_fraction, seed) for s in sets]
    if val_output is not None and val_fraction > 0 and any(v.match != "string" for _, v in splits):
        raise DenseprError("held-out questions of regex-matched sets cannot be pooled; mine them separately")
    kw = dict(depth=depth, hard_negatives=hard_negatives, random_negatives=random_negatives, seed=seed,
              negatives_from=negatives_from, skip_top=skip_top)  # fmt: skip
    train_stats, val_stats = MiningStats(), MiningStats()
    n_train = write_train_records(mine([t for t, _ in splits], corpus, bm25, stats=train_stats, **kw), output)
    config = {**{k: v for k, v in kw.items() if k != "negatives_from"}, "val_fraction": val_fraction,
              "sets": [s.name for s in sets], "mode": negatives_name if negatives_from is not None else "bm25", **(record or {})}  # fmt: skip
    report = {"train": {"file": str(output), "records": n_train, **train_stats.as_dict()}, "config": config}
    if val_output is not None and val_fraction > 0:
        n_val = write_train_records(mine([v for _, v in splits], corpus, bm25, stats=val_stats, **kw), val_output)
        write_qa_tsv(QASet("heldout", [q for _, v in splits for q in v.items], "string"), heldout_path(val_output))
        report["validation"] = {"file": str(val_output), "records": n_val, "qa_file": str(heldout_path(val_output)),
                                **val_stats.as_dict()}  # fmt: skip
    write_json(stats_path(output), report)
    return report
