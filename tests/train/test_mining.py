"""Re-mining with a trained model's own ranking (hard negatives from its top-k, positives from it or BM25)."""

from __future__ import annotations

import json
import shutil

import numpy as np

from densepr.data import load_qa
from densepr.evaluate.answers import has_answer
from densepr.ranking import SearchResult
from densepr.retrieve.bm25 import BM25Index
from densepr.train.mining import MiningStats, mine
from tests.support.cli import run


def _ranking(corpus, order_for):
    """A stand-in model: ``order_for(question) -> corpus rows``, best first, scores descending."""

    def search(questions, k):
        rows = np.full((len(questions), k), -1, dtype=np.int64)
        for i, q in enumerate(questions):
            r = list(order_for(q))[:k]
            rows[i, : len(r)] = r
        return SearchResult(rows, -np.arange(k, dtype=np.float32)[None].repeat(len(questions), 0))

    return search


def test_hard_negatives_come_from_the_model_after_skip_top(corpus, qa_tsv):
    qas, bm25 = load_qa(qa_tsv), BM25Index.build(corpus)
    reverse = list(range(len(corpus)))[::-1]
    model = _ranking(corpus, lambda q: reverse)
    for skip in (0, 2):
        recs = list(mine([qas], corpus, bm25, depth=len(corpus), hard_negatives=3, random_negatives=0,
                         negatives_from=model, skip_top=skip))  # fmt: skip
        assert recs
        for r in recs:
            qa = next(q for q in qas.items if q.question == r.question)
            expected = [corpus.texts[x] for rank, x in enumerate(reverse) if rank >= skip and not has_answer(qa.answers, corpus.texts[x])][:3]
            assert [p.text for p in r.hard_negative_ctxs] == expected
            # the positive: the model's best answer-bearing passage
            assert r.positive_ctxs[0].text == next(corpus.texts[x] for x in reverse if has_answer(qa.answers, corpus.texts[x]))


def test_the_union_of_lists_rescues_questions_and_is_counted(corpus, qa_tsv):
    qas, bm25 = load_qa(qa_tsv), BM25Index.build(corpus)
    answers = {q.question: q.answers for q in qas.items}
    # an oracle model: answer-bearing passages first
    oracle = _ranking(corpus, lambda q: sorted(range(len(corpus)), key=lambda r: not has_answer(answers[q], corpus.texts[r])))
    plain, remined = MiningStats(), MiningStats()
    n_bm25 = len(list(mine([qas], corpus, bm25, depth=1, stats=plain)))
    n_union = len(list(mine([qas], corpus, bm25, depth=1, stats=remined, negatives_from=oracle)))
    answerable = sum(any(has_answer(a, t) for t in corpus.texts) for a in answers.values())
    assert n_union == answerable == remined.positive_from["model"] and n_union >= n_bm25
    # a model that finds nothing: every positive comes from BM25, so nothing is lost
    blind = _ranking(corpus, lambda q: [r for r in range(len(corpus)) if not has_answer(answers[q], corpus.texts[r])])
    rescued = MiningStats()
    assert len(list(mine([qas], corpus, bm25, depth=12, stats=rescued, negatives_from=blind))) == len(list(mine([qas], corpus, bm25, depth=12)))
    assert rescued.positive_from == {"bm25": rescued.kept["qa.tsv"]}


def test_remining_with_bm25_as_the_model_gives_bm25_mining(corpus, qa_tsv):
    qas, bm25 = load_qa(qa_tsv), BM25Index.build(corpus)
    kw = dict(depth=12, hard_negatives=3, random_negatives=2, seed=7)
    assert list(mine([qas], corpus, bm25, negatives_from=bm25.search, **kw)) == list(mine([qas], corpus, bm25, **kw))


def test_build_train_negatives_from_a_model_index(tmp_path, capsys, qa_tsv, index_dir):
    out = tmp_path / "remined.json"
    code, stdout, err = run(capsys, "data", "build-train", "--qa", str(qa_tsv), "--index", str(index_dir), "-o", str(out),
                            "--negatives-from", str(index_dir), "--mode", "dense", "--skip-top", "1", "--val-fraction", "0",
                            "--depth", "10", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["config"]["mode"] == "dense" and stats["config"]["skip_top"] == 1
    assert sum(stats["train"]["positive_from"].values()) == stats["train"]["records"] > 0
    records = json.loads(out.read_text())
    for rec in records:
        assert all(not has_answer(rec["answers"], c["text"]) for c in rec["hard_negative_ctxs"])
    # another corpus under the model's index: refused in one line
    other = tmp_path / "other"
    shutil.copytree(index_dir, other)
    lines = (other / "passages.tsv").read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace("\t", "\tchanged ", 1)
    (other / "passages.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, stdout, err = run(capsys, "data", "build-train", "--qa", str(qa_tsv), "--index", str(index_dir), "-o", str(tmp_path / "x.json"),
                            "--negatives-from", str(other), "--device", "cpu")  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1 and ("differs" in err or "other titles or texts" in err), err
