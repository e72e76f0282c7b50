"""Re-mining with a trained model's own ranking (hard negatives from its top-k, positives from it or BM25)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import numpy as np
import pytest

from densepr.data import load_corpus, load_qa, load_wiki_summaries
from densepr.data.training import TrainRecord
from densepr.evaluate.answers import AnswerMatcher, has_answer
from densepr.ranking import SearchResult
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.modes import Mode
from densepr.retrieve.retriever import Retriever
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


def _bm25_mine_before_remining(sets, corpus, bm25, *, depth, hard_negatives, random_negatives, seed) -> Iterator[TrainRecord]:
    """``mine`` as it was before re-mining (commit b3b276f), the reference BM25 mining must still match."""
    matcher = AnswerMatcher(corpus.texts)
    rng = np.random.default_rng(seed)
    for qas in sets:
        res = bm25.search(qas.questions, depth)
        hits = matcher.hits(res.rows, qas)
        for i, qa in enumerate(qas.items):
            rows, h = res.rows[i], hits[i]
            valid = rows >= 0
            if not h.any():
                continue
            pos = int(rows[np.argmax(h)])
            hard = [int(r) for r, v, a in zip(rows, valid, h) if v and not a][:hard_negatives]
            taken = set(rows[valid].tolist())
            rand: list[int] = []
            for r in rng.choice(len(corpus), size=min(len(corpus), 4 * random_negatives + 8), replace=False).tolist():
                if len(rand) == random_negatives:
                    break
                if r not in taken and not matcher.has_answer(r, qa.answers, qas.match):
                    rand.append(r)
                    taken.add(r)
            yield TrainRecord(qa.question, list(qa.answers), [corpus[pos]], [corpus[r] for r in rand], [corpus[r] for r in hard], qas.name)


@pytest.mark.parametrize("depth,hard,rand,seed", [(12, 3, 2, 0), (3, 30, 4, 7), (1, 1, 0, 1), (100, 30, 10, 3)])
def test_bm25_mining_is_unchanged(corpus, qa_tsv, depth, hard, rand, seed):
    qas, bm25 = load_qa(qa_tsv), BM25Index.build(corpus)
    kw = dict(depth=depth, hard_negatives=hard, random_negatives=rand, seed=seed)
    new = [r.to_json() for r in mine([qas, qas], corpus, bm25, **kw)]
    assert new and new == [r.to_json() for r in _bm25_mine_before_remining([qas, qas], corpus, bm25, **kw)]
    assert json.dumps(new) == json.dumps([r.to_json() for r in _bm25_mine_before_remining([qas, qas], corpus, bm25, **kw)])


@pytest.mark.data
def test_bm25_mining_is_unchanged_on_the_embedded_data(embedded):
    corpus = load_wiki_summaries(embedded.summaries)
    sets = [embedded.resolve_qa("nq-dev", 150), embedded.resolve_qa("trivia-dev", 150)]
    bm25 = BM25Index.build(corpus)
    kw = dict(depth=100, hard_negatives=30, random_negatives=10, seed=0)
    new = [r.to_json() for r in mine(sets, corpus, bm25, **kw)]
    assert len(new) > 30 and new == [r.to_json() for r in _bm25_mine_before_remining(sets, corpus, bm25, **kw)]


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
            expected = [corpus.texts[x] for rank, x in enumerate(reverse) if rank >= skip and not has_answer(qa.answers, corpus.texts[x])][
                :3
            ]
            assert [p.text for p in r.hard_negative_ctxs] == expected
            # the positive: the model's best answer-bearing passage
            assert r.positive_ctxs[0].text == next(corpus.texts[x] for x in reverse if has_answer(qa.answers, corpus.texts[x]))


def test_dense_negatives_are_the_models_answerless_top_k_after_skip_top(corpus, qa_tsv, index_dir):
    qas, bm25 = load_qa(qa_tsv), BM25Index.build(corpus)
    model = Retriever.load(index_dir, device="cpu")
    depth = 8
    ranked = model.retrieve(qas.questions, depth, Mode.DENSE)
    by_question = {q: [corpus.ids[r] for r in ranked.rows[i] if r >= 0] for i, q in enumerate(qas.questions)}
    hard_by_skip = {}
    for skip in (0, 1, 3):
        recs = list(mine([qas], corpus, bm25, depth=depth, hard_negatives=depth, random_negatives=0,
                         negatives_from=lambda q, k: model.retrieve(q, k, Mode.DENSE), skip_top=skip))  # fmt: skip
        assert recs
        for r in recs:
            ids = by_question[r.question]
            answerless = [pid for pid in ids if not has_answer(r.answers, corpus[corpus.row(pid)].text)]
            hard = [p.id for p in r.hard_negative_ctxs]
            assert all(not has_answer(r.answers, p.text) for p in r.hard_negative_ctxs)
            # exactly the model's answerless passages from rank `skip` on, in the model's order
            assert hard == [pid for rank, pid in enumerate(ids) if rank >= skip and pid in answerless]
            hard_by_skip.setdefault(r.question, {})[skip] = hard
    for q, by in hard_by_skip.items():  # skipping removes exactly the answerless passages of the first ranks
        first = by_question[q]
        for skip, hard in by.items():
            assert by[0] == [pid for pid in by[0] if pid in first[:skip]] + hard


def test_a_precomputed_ranking_mines_as_the_search_function(corpus, qa_tsv):
    qas, bm25 = load_qa(qa_tsv), BM25Index.build(corpus)
    model = _ranking(corpus, lambda q: list(range(len(corpus)))[::-1])
    kw = dict(depth=6, hard_negatives=3, random_negatives=2, seed=5, skip_top=1)
    a, b = MiningStats(), MiningStats()
    from_search = list(mine([qas, qas], corpus, bm25, negatives_from=model, stats=a, **kw))
    from_results = list(mine([qas, qas], corpus, bm25, negatives_from=[model(qas.questions, 20)] * 2, stats=b, **kw))
    assert from_search == from_results and a == b
    with pytest.raises(ValueError, match="has 1 results"):
        list(mine([qas, qas], corpus, bm25, negatives_from=[model(qas.questions, 6)], **kw))


def test_the_union_of_lists_rescues_questions_and_is_counted(corpus, qa_tsv):
    with qa_tsv.open("a", encoding="utf-8") as f:  # no word in common with its passage: BM25 misses it
        f.write("who thought up the snake-named code\t['Guido van Rossum']\n")
    qas, bm25 = load_qa(qa_tsv), BM25Index.build(corpus)
    answers = {q.question: q.answers for q in qas.items}
    answerable = sum(any(has_answer(a, t) for t in corpus.texts) for a in answers.values())
    # an oracle model: answer-bearing passages first
    oracle = _ranking(corpus, lambda q: sorted(range(len(corpus)), key=lambda r: not has_answer(answers[q], corpus.texts[r])))
    plain, remined = MiningStats(), MiningStats()
    n_bm25 = len(list(mine([qas], corpus, bm25, depth=1, stats=plain)))
    n_union = len(list(mine([qas], corpus, bm25, depth=1, stats=remined, negatives_from=oracle)))
    assert n_union == answerable == remined.positive_from["model"] and n_bm25 < n_union
    # the questions only the model answers are the ones BM25 mining dropped
    assert remined.rescued_by.get("model", 0) == n_union - n_bm25 and remined.answer_in == {"model": answerable, "bm25": n_bm25}
    # a model that finds nothing: every positive comes from BM25, so nothing is lost...
    blind = _ranking(corpus, lambda q: [r for r in range(len(corpus)) if not has_answer(answers[q], corpus.texts[r])])
    rescued = MiningStats()
    assert len(list(mine([qas], corpus, bm25, depth=12, stats=rescued, negatives_from=blind))) == len(
        list(mine([qas], corpus, bm25, depth=12))
    )
    kept = rescued.kept["qa.tsv"]
    assert rescued.positive_from == {"bm25": kept} == rescued.rescued_by and rescued.answer_in["model"] == 0
    # ... while without the union (positives_also={}) the blind model's questions are all dropped
    alone = MiningStats()
    assert list(mine([qas], corpus, bm25, depth=12, stats=alone, negatives_from=blind, positives_also={})) == []
    assert alone.no_positive["qa.tsv"] == len(qas)


def test_extra_positive_lists_are_searched_in_order(corpus, qa_tsv):
    qas, bm25 = load_qa(qa_tsv), BM25Index.build(corpus)
    answers = {q.question: q.answers for q in qas.items}
    blind = _ranking(corpus, lambda q: [r for r in range(len(corpus)) if not has_answer(answers[q], corpus.texts[r])])
    last_first = _ranking(corpus, lambda q: list(range(len(corpus)))[::-1])
    stats = MiningStats()
    recs = list(
        mine([qas], corpus, bm25, depth=12, negatives_from=blind, positives_also={"other": last_first, "bm25": bm25.search}, stats=stats)
    )
    assert recs and stats.positive_from == {"other": len(recs)}
    for r in recs:  # the positive is the first list's (last_first's) best answer-bearing passage
        assert r.positive_ctxs[0].text == next(corpus.texts[x] for x in range(len(corpus))[::-1] if has_answer(r.answers, corpus.texts[x]))
    with pytest.raises(ValueError, match="must differ"):
        list(mine([qas], corpus, bm25, negatives_from=blind, positives_also={"model": blind}))


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
    assert "BM25's or the model's (dense)" in stdout
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["config"]["mode"] == "dense" and stats["config"]["skip_top"] == 1 and stats["config"]["negatives_from"] == str(index_dir)
    train = stats["train"]
    assert sum(train["positive_from"].values()) == train["records"] > 0 and set(train["answer_in"]) == {"model", "bm25"}
    records = json.loads(out.read_text())
    model = Retriever.load(index_dir, device="cpu")
    questions = [r["question"] for r in records]
    ranked = model.retrieve(questions, 10, Mode.DENSE)
    for i, rec in enumerate(records):
        ids = [model.corpus.ids[r] for r in ranked.rows[i] if r >= 0]
        assert all(not has_answer(rec["answers"], c["text"]) for c in rec["hard_negative_ctxs"])
        assert [c["passage_id"] for c in rec["hard_negative_ctxs"]] == [
            p for p in ids[1:] if not has_answer(rec["answers"], model.corpus[model.corpus.row(p)].text)
        ][:30]
    # without --negatives-from: BM25 mining, recorded as such
    plain = tmp_path / "plain.json"
    code, _, err = run(
        capsys, "data", "build-train", "--qa", str(qa_tsv), "--index", str(index_dir), "-o", str(plain), "--val-fraction", "0"
    )
    assert code == 0, err
    cfg = json.loads(plain.with_suffix(".stats.json").read_text())["config"]
    assert cfg["mode"] == "bm25" and cfg["negatives_from"] is None and cfg["skip_top"] == 0


def test_build_train_hybrid_borrows_bm25_from_the_index(tmp_path, capsys, qa_tsv, index_dir):
    model_dir = tmp_path / "model-only"  # passages.tsv + dense/, no bm25/
    model_dir.mkdir()
    shutil.copy(index_dir / "passages.tsv", model_dir / "passages.tsv")
    shutil.copytree(index_dir / "dense", model_dir / "dense")
    out = tmp_path / "hybrid.json"
    code, stdout, err = run(capsys, "data", "build-train", "--qa", str(qa_tsv), "--index", str(index_dir), "-o", str(out),
                            "--negatives-from", str(model_dir), "--mode", "hybrid", "--val-fraction", "0", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert json.loads(out.with_suffix(".stats.json").read_text())["config"]["mode"] == "hybrid"


def test_build_train_refuses_another_corpus_and_other_modes(tmp_path, capsys, qa_tsv, index_dir, tiny_bert):
    # a model index, consistent in itself, over the same ids but one other text
    from densepr.index.dense import DenseIndex
    from densepr.index.embeddings import encode_corpus
    from densepr.models.encoder import Encoder

    other = tmp_path / "other"
    other.mkdir()
    lines = (index_dir / "passages.tsv").read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace("\t", "\tchanged ", 1)
    (other / "passages.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    encode_corpus(Encoder.load(tiny_bert, device="cpu"), load_corpus(other / "passages.tsv"), tmp_path / "other-emb")
    DenseIndex.build(tmp_path / "other-emb").save(other / "dense")
    out = tmp_path / "x.json"
    code, stdout, err = run(capsys, "data", "build-train", "--qa", str(qa_tsv), "--index", str(index_dir), "-o", str(out),
                            "--negatives-from", str(other), "--device", "cpu")  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1 and "corpus fingerprints differ" in err, err
    assert not out.exists()
    code, stdout, err = run(capsys, "data", "build-train", "--qa", str(qa_tsv), "--index", str(index_dir), "-o", str(out),
                            "--negatives-from", str(index_dir), "--mode", "bm25")  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--mode must be dense or hybrid" in err, err
    # output paths are checked before anything is loaded
    out.mkdir()
    code, stdout, err = run(capsys, "data", "build-train", "--qa", str(qa_tsv), "--index", str(index_dir), "-o", str(out),
                            "--negatives-from", str(other), "--device", "cpu")  # fmt: skip
    assert code == 1 and "is a directory" in err and "fingerprint" not in err, err


def test_mining_defaults_have_one_home():
    """mine(), build_training_data(), `densepr data build-train` and reproduce's TrainPlan take their
    defaults from MiningConfig, and it refuses what cannot be mined."""
    import inspect

    from densepr.cli import data_build_train
    from densepr.errors import DenseprError
    from densepr.reproduce import TrainPlan
    from densepr.train.config import MINING, MiningConfig
    from densepr.train.mining import build_training_data

    want = {"val_fraction": MINING.val_fraction, "depth": MINING.depth, "hard_negatives": MINING.hard_negatives,
            "random_negatives": MINING.random_negatives, "seed": MINING.seed, "skip_top": MINING.skip_top}  # fmt: skip
    for fn in (mine, build_training_data, data_build_train):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in want if k in params} == {k: v for k, v in want.items() if k in params}, fn.__name__
    plan = TrainPlan()
    assert (plan.val_fraction, plan.depth, plan.mined_hard, plan.skip_top) == (MINING.val_fraction, MINING.depth, MINING.hard_negatives, MINING.skip_top)
    for bad in ({"val_fraction": 1.0}, {"skip_top": 100}, {"skip_top": -1}):
        with pytest.raises(DenseprError):
            MiningConfig(**bad)


def test_mining_guards_are_the_librarys_and_the_cli_names_its_options(tmp_path, capsys, qa_tsv, index_dir):
    """What may be mined is decided in train.mining / MiningConfig (any caller); build-train words it with its options."""
    from densepr.data import QA, QASet
    from densepr.errors import ConfigError, DenseprError
    from densepr.train.config import MiningConfig
    from densepr.train.mining import check_remine_mode, refuse_test_sets

    sets = [QASet("nq-test", [QA("who wrote python", ("guido",))], "string")]
    with pytest.raises(DenseprError, match="refusing to build training data from test set"):
        refuse_test_sets(sets)
    refuse_test_sets(sets, allow_test=True)
    for mode in ("dense", "hybrid"):
        check_remine_mode(mode)
    with pytest.raises(DenseprError, match="--mode must be dense or hybrid"):
        check_remine_mode("bm25")
    with pytest.raises(ConfigError) as e:
        MiningConfig(skip_top=100)
    assert e.value.field == "skip_top"
    for flags, want in ((("--val-fraction", "1"), "--val-fraction must be in [0, 1)"),
                        (("--skip-top", "10", "--depth", "10"), "--skip-top must be between 0 and depth (10) - 1")):  # fmt: skip
        code, _, err = run(capsys, "data", "build-train", "--qa", str(qa_tsv), "--index", str(index_dir), "-o", str(tmp_path / "t.json"), *flags)
        assert code == 1 and err.strip() == f"error: {want}", (flags, err)
    assert not (tmp_path / "t.json").exists()
