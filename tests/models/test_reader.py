"""The DPR reader: distant supervision, windows, span decoding, loss, training, resume, pipeline, EM/F1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from densepr.errors import DenseprError, InputError
from densepr.evaluate.answers import AnswerMatcher, has_answer
from densepr.evaluate.qa import exact_match, f1_score
from densepr.models.reader import Reader, ReaderConfig, Reading, best_reading, find_answer_spans
from densepr.pipeline import Pipeline, evaluate_qa
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.retriever import Retriever
from densepr.train.config import ReaderTrainConfig
from densepr.train.reader import build_batch, load_reader_examples, train_reader
from tests.support.tiny import PASSAGES, QUESTIONS, make_tiny_bert

SMALL = ReaderConfig(max_length=96, stride=16, max_answer_length=10, top_k=3)


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("reader-init"), seed=3, dropout=0.0)


@pytest.fixture
def reader(reader_dir) -> Reader:
    return Reader.load(reader_dir, "cpu", SMALL)


def _dpr_results(path: Path, questions=QUESTIONS, ctxs_per_q: int = 12) -> Path:
    """A DPR result file: every question retrieves all passages, rotated so positives vary in rank."""
    recs = []
    for i, (q, answers) in enumerate(questions):
        order = [(i + j) % len(PASSAGES) for j in range(ctxs_per_q)]
        recs.append({"question": q, "answers": answers, "ctxs": [
            {"id": str(j), "title": PASSAGES[j][0], "text": PASSAGES[j][1], "score": float(-r),
             "has_answer": has_answer(answers, PASSAGES[j][1])} for r, j in enumerate(order)]})  # fmt: skip
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path


# -- answer normalisation and EM / F1 ------------------------------------------------------------
def test_exact_match_and_f1_follow_squad_normalisation():
    assert exact_match("The Saint Lawrence River.", ["Saint Lawrence River"])
    assert exact_match("  saint   LAWRENCE river ", ["the Saint Lawrence River"])
    assert not exact_match("Lawrence River", ["Saint Lawrence River"])
    assert exact_match("Röntgen", ["Ro\u0308ntgen"])  # NFC vs NFD spellings
    assert f1_score("Lawrence River", ["Saint Lawrence River"]) == pytest.approx(0.8)
    assert f1_score("", ["x"]) == 0.0 and not exact_match("", ["x"])
    # CuratedTREC: DrQA's regex rule (match at the start, case-insensitive); F1 falls back to EM
    assert exact_match("1969", [r"19[0-9]{2}"], "regex") and not exact_match("in 1969", [r"19[0-9]{2}"], "regex")
    assert f1_score("1969", [r"19[0-9]{2}"], "regex") == 1.0
    assert not exact_match("x", ["(unclosed"], "regex")


# -- distant supervision and windows ---------------------------------------------------------------
def test_answer_spans_by_token_match_and_regex(reader):
    text = "python is a programming language; python was created by guido van rossum in 1991."
    tok = reader.tokenize_texts([text])[0]
    spans = find_answer_spans(reader, tok, text, ["Python", "Guido van Rossum"])
    pieces = {text[tok.offsets[a][0] : tok.offsets[b][1]] for a, b in spans}
    assert pieces == {"python", "guido van rossum"} and len(spans) == 3  # both occurrences of "python"
    assert find_answer_spans(reader, tok, text, ["Monty"]) == []
    r = find_answer_spans(reader, tok, text, [r"19\d\d", "(bad"], "regex")
    assert [text[tok.offsets[a][0] : tok.offsets[b][1]] for a, b in r] == ["1991"]


def test_long_passages_are_windowed_with_overlap(reader):
    text = " ".join(PASSAGES[k % 12][1] for k in range(8))  # ~170 tokens, more than one window of 96
    tok = reader.tokenize_texts([text])[0]
    q = reader.question_ids("who created python")
    title = reader.tokenizer("Python", add_special_tokens=False)["input_ids"]
    wins = reader.windows(q, title, tok, 0)
    assert len(wins) >= 2
    covered = set()
    for w in wins:
        assert len(w.ids) <= SMALL.max_length
        assert w.ids[: len(q) + 1] == [reader.tokenizer.cls_token_id, *q]
        assert w.ids[w.text_start : w.text_start + w.n] == tok.ids[w.first : w.first + w.n]
        covered |= set(range(w.first, w.first + w.n))
    assert covered == set(range(len(tok.ids)))
    assert all(b.first < a.first + a.n for a, b in zip(wins, wins[1:]))  # consecutive windows overlap


def test_bad_questions_and_mismatched_checkpoints(tmp_path, reader):
    with pytest.raises(DenseprError, match="empty question"):
        reader.question_ids("   ")
    with pytest.raises(DenseprError, match="question is .* tokens"):
        reader.question_ids("python " * 200)
    with pytest.raises(DenseprError, match="exceeds the model's 128 positions"):
        Reader.load(reader.name, "cpu", ReaderConfig(max_length=512))
    # a tokenizer from a bigger vocabulary than the model
    d = make_tiny_bert(tmp_path / "m", seed=1)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 50
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DenseprError):
        Reader.load(d, "cpu", SMALL)
    with pytest.raises(DenseprError, match="not a Hugging Face model directory"):
        Reader.load(tmp_path, "cpu")


# -- decoding --------------------------------------------------------------------------------------
def test_best_span_obeys_the_length_cap(reader):
    start = np.full(14, -10.0)
    start[1] = 5.0
    end = np.zeros_like(start)
    end[13], end[3] = 9.0, 2.0  # 1..13 is 13 tokens long: over the cap of 10
    score, i, j = reader._best_span(start, end)
    assert (i, j) == (1, 3) and score == 7.0
    reader.config.max_answer_length = 13
    assert reader._best_span(start, end)[1:] == (1, 13)


def test_best_reading_is_the_top_selection_score_among_the_first_k():
    rd = [Reading(1.0, 3.0, 0, 2, "ab"), Reading(5.0, 1.0, 0, 1, "a"), Reading(9.0)]  # the last has no span
    assert best_reading(rd, 1) == 0 and best_reading(rd, 2) == 1 and best_reading(rd) == 1
    assert best_reading([], 5) is None and best_reading([Reading(1.0)]) is None


def test_selection_fuses_the_readers_and_the_retrievers_scores():
    from densepr.models.reader import Selection

    rd = [Reading(1.0, 3.0, 0, 2, "ab"), Reading(5.0, 1.0, 0, 1, "a"), Reading(9.0, 9.0)]  # the last has no span
    scores = [10.0, 2.0, 50.0]
    assert best_reading(rd, None, Selection(), scores) == 1  # DPR's rule: the selection logit alone
    assert best_reading(rd, None, Selection(1.0, 0.0, 1.0), scores) == 0  # 1 + 10 > 5 + 2; a spanless passage never wins
    assert best_reading(rd, None, Selection(0.0, 1.0, 0.0), scores) == 0  # span score alone: 3 > 1
    assert best_reading(rd, 1, Selection(0.0, 0.0, 1.0), scores) == 0 and best_reading(rd, None, Selection(1.0, 0.0, 1.0)) == 1


def test_aggregation_lets_an_answer_several_passages_agree_on_beat_the_best_single_passage():
    from densepr.models.reader import Selection

    # "Paris" from passages 1 and 2 (1.8 + 1.8) against "London" from passage 0 (2.0)
    rd = [Reading(2.0, 0.0, 0, 6, "London"), Reading(1.8, 0.0, 0, 5, "Paris"), Reading(1.8, 0.0, 0, 5, "paris"), Reading(9.0)]
    assert best_reading(rd) == 0  # DPR's rule: the best passage
    assert best_reading(rd, None, Selection(aggregate=1.0)) == 1  # log(2 e^1.8) = 2.49 > 2.0; the first of the group
    assert best_reading(rd, None, Selection(aggregate=0.1)) == 0  # 1.8 + 0.1 log 2 = 1.87 < 2.0: close to the best passage
    assert best_reading(rd, 2, Selection(aggregate=1.0)) == 0  # only the first k are read
    # groups are the given keys (exact match's normalisation), else the lower-cased text
    keys = ["london", "paris", "rome", ""]
    assert best_reading(rd, None, Selection(aggregate=1.0), answer_keys=keys) == 0
    # in a group, the best-scoring reading stands for the answer; ties between answers keep retrieval order
    rd2 = [Reading(1.0, 0.0, 0, 1, "a"), Reading(1.0, 0.0, 0, 1, "b"), Reading(3.0, 0.0, 0, 1, "b")]
    assert best_reading(rd2, None, Selection(aggregate=1.0)) == 2
    assert best_reading(rd2[:2], None, Selection(aggregate=1.0)) == 0
    assert best_reading([Reading(1.0)], None, Selection(aggregate=1.0)) is None
    assert not Selection(aggregate=1.0).is_paper


def test_the_tuned_aggregation_is_stored_and_read_back(tmp_path):
    cfg = ReaderConfig(selection={"dense": {"relevance": 1.0, "span": 0.5, "retriever": 0.0, "aggregate": 3.0, "k": 10}})
    cfg.save(tmp_path)
    sel, k = ReaderConfig.from_dir(tmp_path).selection_for("dense")
    assert (sel.relevance, sel.span, sel.aggregate, k) == (1.0, 0.5, 3.0, 10)
    old = ReaderConfig(selection={"bm25": {"relevance": 1.0, "span": 0.0, "retriever": 0.3, "k": 5}})  # before aggregation
    assert old.selection_for("bm25")[0].aggregate == 0.0


def test_choose_selection_finds_the_fusion_that_answers_and_keeps_dpr_rule_on_ties():
    from densepr.data.qa import QA, QASet
    from densepr.pipeline import choose_selection

    # question 0: the right passage has the higher retrieval score but the lower selection logit
    qas = QASet("t", [QA("q0", ("paris",)), QA("q1", ("rome",))])
    readings = [[Reading(2.0, 1.0, 0, 5, "london"), Reading(1.0, 1.0, 0, 5, "paris")],
                [Reading(3.0, 1.0, 0, 4, "rome"), Reading(0.0, 1.0, 0, 4, "oslo")]]  # fmt: skip
    scores = [[5.0, 9.0], [8.0, 7.0]]
    best = choose_selection(readings, scores, qas, ks=(1, 2))
    assert best["paper_em"] == 50.0 and best["paper_k"] == 1  # k=1 and k=2 tie at 50: the smaller k is kept
    assert best["em"] == 100.0 and best["k"] == 2 and best["retriever"] > 0
    # when nothing beats DPR's rule, DPR's rule is kept
    same = choose_selection([[Reading(2.0, 1.0, 0, 5, "paris")]], [[1.0]], QASet("t", [QA("q", ("paris",))]), ks=(1,))
    assert (same["relevance"], same["span"], same["retriever"], same["aggregate"], same["em"]) == (1.0, 0.0, 0.0, 0.0, 100.0)
    # three passages, two agreeing on the answer: only aggregation answers it
    qas3 = QASet("t", [QA("q", ("Paris",))])
    agree = [[Reading(2.0, 0.0, 0, 6, "London"), Reading(1.8, 0.0, 0, 5, "Paris"), Reading(1.8, 0.0, 0, 6, "Paris.")]]
    best3 = choose_selection(agree, [[1.0, 1.0, 1.0]], qas3, ks=(1, 3))
    assert best3["em"] == 100.0 and best3["aggregate"] > 0 and best3["k"] == 3 and best3["paper_em"] == 0.0


def test_reading_gives_offsets_into_the_text_and_does_not_depend_on_batching(reader):
    qs = [q for q, _ in QUESTIONS[:3]]
    ps = [[(t, x) for t, x in PASSAGES[i : i + 4]] for i in range(3)]
    ps[1].append(("Empty", ""))  # a passage without text: read, but has no span
    a = reader.read(qs, ps, batch_size=64)
    b = reader.read(qs, ps, batch_size=1)
    assert [len(x) for x in a] == [4, 5, 4]
    for ra, rb, plist in zip(a, b, ps):
        for x, y, (_, text) in zip(ra, rb, plist):
            assert x.relevance == pytest.approx(y.relevance, abs=1e-4) and (x.start, x.end) == (y.start, y.end)
            if text:
                assert x.has_span and text[x.start : x.end] == x.text and x.text.strip() == x.text
                assert x.start == 0 or not text[x.start - 1].isalnum()  # widened to whole words
                assert x.end == len(text) or not text[x.end].isalnum()
            else:
                assert not x.has_span
    assert reader.read(["who created python"], [[]]) == [[]]


def test_bf16_reading_is_for_inference_and_close_to_float32(tmp_path, reader, monkeypatch):
    import densepr.models.hf as hf

    qs = [q for q, _ in QUESTIONS[:3]]
    ps = [[(t, x) for t, x in PASSAGES[i : i + 4]] for i in range(3)]
    reader.save(tmp_path / "r")  # a reader directory: the same heads at both precisions
    reader = Reader.load(tmp_path / "r", "cpu")
    half = Reader.load(tmp_path / "r", "cpu", precision="bf16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    a, b = reader.read(qs, ps), half.read(qs, ps)
    rel_a = np.array([x.relevance for rd in a for x in rd])
    rel_b = np.array([x.relevance for rd in b for x in rd])
    assert np.all(np.isfinite(rel_b)) and np.abs(rel_a - rel_b).max() < 0.05 * max(1.0, np.abs(rel_a).max())
    assert all(x.has_span and t[x.start : x.end] == x.text for rd, pl in zip(b, ps) for x, (_, t) in zip(rd, pl))
    # auto: bf16 only where the CPU has it natively; GPUs keep float32 weights (autocast does their half precision)
    for native, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(hf, "cpu_has_bf16", lambda native=native: native)
        assert hf.inference_dtype(torch.device("cpu"), "auto") == dtype
    assert hf.inference_dtype(torch.device("cuda"), "bf16") == torch.float32
    with pytest.raises(DenseprError, match="fp32, bf16, auto"):
        Reader.load(tmp_path / "r", "cpu", precision="fp16")


# -- the loss --------------------------------------------------------------------------------------
def test_forward_in_length_sorted_pieces_equals_one_padded_forward(reader):
    q = reader.question_ids("who created python")
    texts = reader.tokenize_texts(["short text", "a much longer passage text " * 8, "medium length passage text here", "x"])
    titles = reader.tokenizer(["t1", "t2", "t3", "t4"], add_special_tokens=False)["input_ids"]
    wins = [reader.windows(q, titles[i], texts[i], i)[0] for i in range(4)]
    with torch.no_grad():
        inputs, text = reader.collate(wins)
        start, end, rel = reader(**inputs)
        s2, e2, r2, t2 = reader.forward_windows(wins, piece=2)
    assert torch.equal(text, t2) and s2.shape == start.shape
    torch.testing.assert_close(r2, rel, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s2[text], start[text], atol=1e-5, rtol=1e-4)  # every text position, in the windows' order
    torch.testing.assert_close(e2[text], end[text], atol=1e-5, rtol=1e-4)


def test_loss_is_selection_ce_plus_marginal_span_likelihood():
    torch.manual_seed(0)
    n, m, seq = 2, 3, 7
    start, end, rel = torch.randn(n * m, seq), torch.randn(n * m, seq), torch.randn(n * m)
    text = torch.zeros(n * m, seq, dtype=torch.bool)
    text[:, 2:6] = True
    pmask = torch.tensor([[True, True, True], [True, True, False]])
    spans = [[(2, 3), (4, 4)], [(3, 5)]]
    sel, span = Reader.loss(start, end, rel, text, pmask, spans)
    exp_sel = (-torch.log_softmax(rel.view(n, m)[0], 0)[0] - torch.log_softmax(rel.view(n, m)[1, :2], 0)[0]) / 2
    assert float(sel) == pytest.approx(float(exp_sel), rel=1e-5)
    terms = []
    for q, sp in enumerate(spans):
        ps = torch.softmax(start[q * m, 2:6], 0)
        pe = torch.softmax(end[q * m, 2:6], 0)
        terms.append(-torch.log(sum(ps[a - 2] * pe[b - 2] for a, b in sp)))
    assert float(span) == pytest.approx(float(sum(terms) / 2), rel=1e-5)


def test_shared_span_loss_normalises_over_every_real_passage_of_a_question():
    torch.manual_seed(1)
    n, m, seq = 2, 3, 7
    start = torch.randn(n * m, seq, requires_grad=True)
    end = torch.randn(n * m, seq)
    rel = torch.randn(n * m)
    text = torch.zeros(n * m, seq, dtype=torch.bool)
    text[:, 2:6] = True
    pmask = torch.tensor([[True, True, True], [True, True, False]])
    spans = [[(2, 3), (4, 4)], [(3, 5)]]
    sel_p, _ = Reader.loss(start, end, rel, text, pmask, spans)
    sel, span = Reader.loss(start, end, rel, text, pmask, spans, shared=True)
    assert float(sel) == pytest.approx(float(sel_p))  # the selection loss is the same either way
    terms = []
    for q, sp in enumerate(spans):
        real = [q * m + j for j in range(m) if pmask[q, j]]  # the padding passage of question 1 is left out
        zs = torch.logsumexp(torch.cat([start[i, 2:6] for i in real]), 0)
        ze = torch.logsumexp(torch.cat([end[i, 2:6] for i in real]), 0)
        terms.append(-torch.logsumexp(torch.stack([start[q * m, a] - zs + end[q * m, b] - ze for a, b in sp]), 0))
    assert span.item() == pytest.approx(float(sum(terms) / 2), rel=1e-5)
    span.backward()
    assert start.grad[1, 2:6].abs().sum() > 0  # negatives' start logits are pushed down
    assert start.grad[5].abs().sum() == 0 and start.grad[0, :2].abs().sum() == 0  # padding passage, question tokens


# -- training --------------------------------------------------------------------------------------
def _cfg(tmp_path, train, reader_dir, **kw) -> ReaderTrainConfig:
    base = dict(train_files=[str(train)], output_dir=str(tmp_path / "run"), init=str(reader_dir), dev_file=str(train),
                passages=4, batch_size=2, epochs=3, lr=1e-3, max_length=96, save_every=2, dev_limit=None, depth=12)  # fmt: skip
    return ReaderTrainConfig(**{**base, **kw})


def test_training_examples_positives_negatives_and_batches(tmp_path, reader, reader_dir):
    train = _dpr_results(tmp_path / "r.json")
    held = tmp_path / "held.tsv"
    held.write_text(f"{QUESTIONS[0][0]}\t{QUESTIONS[0][1]!r}\n", encoding="utf-8")
    cfg = _cfg(tmp_path, train, reader_dir, holdout=[str(held)])
    ex, stats = load_reader_examples(cfg, reader)
    # question 0 is held out, the Mars question has no answer anywhere: 4 remain
    assert stats["held_out"] == 1 and stats["no_positive"] == 1 and len(ex) == 4
    for e in ex:
        assert all(has_answer(e.answers, t) for _, t in e.positives) and not any(has_answer(e.answers, t) for _, t in e.negatives)
    windows, mask, spans = build_batch(reader, ex, [0, 1], 0, cfg)
    assert len(windows) == 8 and mask.all()
    for q in range(2):
        w = windows[q * 4]
        for a, b in spans[q]:
            piece = reader.tokenizer.decode(w.ids[a : b + 1])
            assert has_answer(ex[q].answers, piece)
    # fewer negatives than M - 1: padding passages are masked out
    windows, mask, _ = build_batch(reader, ex, [0], 0, _cfg(tmp_path, train, reader_dir, passages=20))
    assert len(windows) == 20 and mask.sum() == 1 + len(ex[0].negatives)


def test_reader_training_learns_and_resumes_to_the_same_weights(tmp_path, reader_dir):
    train = _dpr_results(tmp_path / "r.json")
    kw = dict(epochs=30, batch_size=5, lr=1e-2)
    full = train_reader(_cfg(tmp_path / "a", train, reader_dir, **kw), device="cpu", show_progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m["kind"] == "train"]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert full["em"] >= 50.0  # it learned to answer its own training questions
    best = tmp_path / "a/run/best"
    assert (best / "model.safetensors").is_file() and json.loads((best / "densepr_reader.json").read_text())["top_k"] in (1, 5, 10, 20, 50)
    assert not list((tmp_path / "a").rglob("*.bin")) and not list((tmp_path / "a").rglob("*.pt"))
    import transformers

    assert isinstance(transformers.DPRReader.from_pretrained(best), transformers.DPRReader)

    cfg = _cfg(tmp_path / "b", train, reader_dir, **kw)
    assert train_reader(cfg, device="cpu", show_progress=False, stop_after=5) == {"stopped_at": 5}
    with pytest.raises(DenseprError, match="already holds a run"):
        train_reader(cfg, device="cpu", show_progress=False)
    with pytest.raises(DenseprError, match="different configuration"):
        train_reader(_cfg(tmp_path / "b", train, reader_dir, **{**kw, "lr": 0.5}), resume=True, device="cpu", show_progress=False)
    # a run saved before a config field existed (here: precision) had its default, and resumes
    saved = json.loads((tmp_path / "b/run/config.json").read_text())
    del saved["precision"]
    (tmp_path / "b/run/config.json").write_text(json.dumps(saved))
    with pytest.raises(DenseprError, match=r"different configuration \(precision\)"):
        train_reader(_cfg(tmp_path / "b", train, reader_dir, **{**kw, "precision": "bf16"}), resume=True, device="cpu", show_progress=False)
    train_reader(cfg, resume=True, device="cpu", show_progress=False)
    a = load_file(str(tmp_path / "a/run/checkpoint/reader/model.safetensors"))
    b = load_file(str(tmp_path / "b/run/checkpoint/reader/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_reader_run_killed_before_its_first_checkpoint_starts_over_on_resume(tmp_path, reader_dir):
    train = _dpr_results(tmp_path / "r.json")
    kw = dict(epochs=2, batch_size=2, lr=1e-2, save_every=2)
    train_reader(_cfg(tmp_path / "a", train, reader_dir, **kw), device="cpu", show_progress=False)
    cfg = _cfg(tmp_path / "b", train, reader_dir, **kw)
    assert train_reader(cfg, device="cpu", show_progress=False, stop_after=1) == {"stopped_at": 1}
    assert (tmp_path / "b/run/config.json").is_file() and not (tmp_path / "b/run/checkpoint").exists()
    logged: list[str] = []
    train_reader(cfg, resume=True, device="cpu", show_progress=False, log=logged.append)
    assert any("starting it over" in m for m in logged), logged
    a = load_file(str(tmp_path / "a/run/checkpoint/reader/model.safetensors"))
    b = load_file(str(tmp_path / "b/run/checkpoint/reader/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shared_span_loss_and_head_learning_rate_train(tmp_path, reader_dir):
    """The shared span loss and a separate head rate train, resume-safely, and pick the positive more often."""
    train = _dpr_results(tmp_path / "r.json")
    kw = dict(epochs=12, batch_size=5, lr=1e-3, span_loss="shared", head_lr=1e-2)
    train_reader(_cfg(tmp_path / "a", train, reader_dir, **kw), device="cpu", show_progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    acc = [m["selection_accuracy"] for m in metrics if m["kind"] == "train"]
    assert np.mean(acc[-3:]) > np.mean(acc[:3])
    with pytest.raises(DenseprError, match="span-loss"):
        train_reader(_cfg(tmp_path / "b", train, reader_dir, span_loss="global"), device="cpu", show_progress=False)
    # bf16 autocast on the CPU: the same recipe trains (weights stay float32), within a few % of float32's first loss
    train_reader(_cfg(tmp_path / "c", train, reader_dir, **{**kw, "epochs": 1}), device="cpu", show_progress=False)
    train_reader(_cfg(tmp_path / "d", train, reader_dir, **{**kw, "epochs": 1, "precision": "bf16"}), device="cpu", show_progress=False)
    first = [json.loads((tmp_path / x / "run/metrics.jsonl").read_text().splitlines()[0])["loss"] for x in ("c", "d")]
    assert first[1] == pytest.approx(first[0], rel=0.05) and first[1] != first[0]
    assert {v.dtype for v in load_file(str(tmp_path / "d/run/best/model.safetensors")).values()} == {torch.float32}
    with pytest.raises(DenseprError, match="precision 'half'"):
        train_reader(_cfg(tmp_path / "e", train, reader_dir, precision="half"), device="cpu", show_progress=False)


def test_retrieval_files_without_passages_are_refused(tmp_path, reader_dir):
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps([{"question": q, "answers": a, "ctxs": []} for q, a in QUESTIONS]), encoding="utf-8")
    with pytest.raises(InputError, match="ctxs"):
        train_reader(_cfg(tmp_path, empty, reader_dir), device="cpu", show_progress=False)
    missing = tmp_path / "m.json"
    missing.write_text(json.dumps([{"question": "q", "answers": ["a"]}]), encoding="utf-8")
    with pytest.raises(InputError, match="record 1.*ctxs"):
        train_reader(_cfg(tmp_path, missing, reader_dir), device="cpu", show_progress=False)


# -- pipeline and end-to-end evaluation ------------------------------------------------------------
@pytest.fixture
def retriever(corpus) -> Retriever:
    return Retriever(corpus, bm25=BM25Index.build(corpus))


def test_pipeline_answers_from_the_top_passages(retriever, reader):
    p = Pipeline(retriever, reader, k=3, mode="bm25")
    a = p.answer("who created python")
    assert a.found and 1 <= len(a.passages) <= 3 and a.passage in a.passages  # BM25: only passages sharing a term
    assert a.passage.text[a.start : a.end] == a.text and a.mode == "bm25" and a.k == 3
    many = p.answer_many(["who created python", "when did apollo 11 land on the moon"])
    assert many[0].text == a.text and many[0].passage.id == a.passage.id
    with pytest.raises(DenseprError, match="empty question"):
        p.answer_many(["who created python", ""])
    # nothing retrieved: an explicit "no answer", not an exception
    none = p.answer("zzzz qqqq")
    assert not none.found and none.text == "" and none.passage is None and none.passages == []


def test_evaluate_qa_reads_once_and_equals_reading_each_k_separately(retriever, reader, corpus):
    from densepr.data.qa import QA, QASet

    qas = QASet("tiny", [QA(q, tuple(a)) for q, a in QUESTIONS])
    res = evaluate_qa(retriever, reader, qas, modes=["bm25"], ks=[1, 3, 5], matcher=AnswerMatcher(corpus.texts))
    assert res["n_all"] == 6 and res["n_answerable"] == 5 and res["gold"]["questions"] == 5
    pipe = Pipeline(retriever, reader, mode="bm25")
    for k in (1, 3, 5):
        preds = [a.text for a in pipe.answer_many(qas.questions, k=k)]
        em = 100 * np.mean([exact_match(p, a) for p, (_, a) in zip(preds, QUESTIONS)])
        assert res["modes"]["bm25"]["k"][str(k)]["em"] == pytest.approx(round(em, 2))
        assert res["modes"]["bm25"]["k"][str(k)]["em_answerable"] >= res["modes"]["bm25"]["k"][str(k)]["em"]
    assert "fused" not in res["modes"]["bm25"]  # no selection tuned: DPR's rule only
    # a tuned selection for bm25 is reported beside DPR's rule, and the pipeline answers with it
    from densepr.pipeline import tune_selection

    tuned = tune_selection(retriever, reader, qas, "bm25", ks=(1, 3))
    assert tuned["em"] >= tuned["paper_em"] and tuned["k"] in (1, 3)
    reader.config.selection["bm25"] = {"relevance": 0.0, "span": 0.0, "retriever": 1.0, "k": 1}
    res = evaluate_qa(retriever, reader, qas, modes=["bm25"], ks=[1], matcher=AnswerMatcher(corpus.texts))
    top1 = [a.text for a in Pipeline(retriever, reader, mode="bm25").answer_many(qas.questions)]  # k from the selection: 1
    assert res["modes"]["bm25"]["fused"]["k"]["1"]["em"] == pytest.approx(round(100 * np.mean([exact_match(p, a) for p, (_, a) in zip(top1, QUESTIONS)]), 2))
    assert res["modes"]["bm25"]["fused"]["k"]["1"] == res["modes"]["bm25"]["k"]["1"]  # k=1: one passage, any rule picks it
    # answer aggregation (normalised answers computed once per passage there) reads as the pipeline answers
    reader.config.selection["bm25"] = {"relevance": 1.0, "span": 1.0, "retriever": 0.0, "aggregate": 1.0, "k": 5}
    res = evaluate_qa(retriever, reader, qas, modes=["bm25"], ks=[5], matcher=AnswerMatcher(corpus.texts))
    agg = [a.text for a in Pipeline(retriever, reader, mode="bm25").answer_many(qas.questions)]  # k from the selection: 5
    assert res["modes"]["bm25"]["fused"]["selection"]["aggregate"] == 1.0
    assert res["modes"]["bm25"]["fused"]["k"]["5"]["em"] == pytest.approx(round(100 * np.mean([exact_match(p, a) for p, (_, a) in zip(agg, QUESTIONS)]), 2))


def test_evaluate_qa_in_pieces_resumes_and_gives_the_same_figures(tmp_path, retriever, reader, corpus, monkeypatch):
    from densepr.data.qa import QA, QASet
    from densepr.pipeline import read_in_pieces

    qas = QASet("tiny", [QA(q, tuple(a)) for q, a in QUESTIONS])
    kw = dict(modes=["bm25"], ks=[1, 3, 5], matcher=AnswerMatcher(corpus.texts))
    whole = evaluate_qa(retriever, reader, qas, **kw)
    monkeypatch.setattr("densepr.pipeline.PIECE_QUESTIONS", 4)  # 6 questions: pieces of 4 and 2
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    first = evaluate_qa(retriever, reader, qas, pieces=pieces, **kw)
    assert sorted(p.name for p in pieces.iterdir()) == ["readings-0000000.json", "readings-0000004.json"]
    assert first["modes"] == whole["modes"] and first["gold"] == whole["gold"]
    # the second piece is lost (a killed run) and the first damaged by hand: both are read again, the rest reused
    (pieces / "readings-0000004.json").unlink()
    read = []
    real = reader.read
    monkeypatch.setattr(reader, "read", lambda qs, ps, *a, **k: read.append(len(qs)) or real(qs, ps, *a, **k))
    again = evaluate_qa(retriever, reader, qas, pieces=pieces, **kw)
    assert read == [2] and again["modes"] == whole["modes"]  # only the missing piece was read
    # the kept piece's reading time counts in the resumed set's seconds (what it cost in all)
    took = json.loads((pieces / "readings-0000000.json").read_text())["seconds"]
    assert again["resumed"] == {"pieces_kept": 1, "their_seconds": round(took, 1)}
    assert again["seconds"] >= round(took, 1) and again["reading_seconds"] >= round(took, 1) and "resumed" not in first
    # a piece without its key (a bare list, as written before pieces held their time and key) is read again, and said so
    (pieces / "readings-0000004.json").write_text(json.dumps(json.loads((pieces / "readings-0000004.json").read_text())["readings"]))
    logged: list[str] = []
    old = evaluate_qa(retriever, reader, qas, pieces=pieces, log=logged.append, **kw)
    assert read == [2, 2] and old["modes"] == whole["modes"] and old["resumed"]["pieces_kept"] == 1
    assert any("readings-0000004.json: made from other inputs" in m and "reading its questions again" in m for m in logged), logged
    (pieces / "readings-0000000.json").write_text('[["not", "a reading"]]')
    assert evaluate_qa(retriever, reader, qas, pieces=pieces, **kw)["modes"] == whole["modes"] and read == [2, 2, 4]
    # readings survive the trip through JSON exactly, spans and "no span" (-inf) included
    read[:] = []
    one = (["who created python"], [[("Python", "Python was created by Guido van Rossum."), ("Empty", "")]])
    got = read_in_pieces(reader, *one, tmp_path / "pieces")
    back = read_in_pieces(reader, *one, tmp_path / "pieces")  # read back, not read
    assert read == [1] and back == got and got[0][1].span_score == float("-inf")
    # the same piece for other passages of the same shape is read again, never used for them
    assert read_in_pieces(reader, ["who created python"], [[("x", "y"), ("x", "y")]], tmp_path / "pieces") != got and read == [1, 1]


def test_a_kept_piece_of_another_reader_is_read_again(tmp_path, retriever, reader, corpus, monkeypatch):
    """Pieces are keyed to the reader's weights, not its path or the pieces' shape: a directory of pieces
    another reader left (same questions, same passages, same shape) is never used for this one."""
    from densepr.data.qa import QA, QASet

    qas = QASet("tiny", [QA(q, tuple(a)) for q, a in QUESTIONS])
    kw = dict(modes=["bm25"], ks=[1, 3], matcher=AnswerMatcher(corpus.texts))
    other = Reader.load(make_tiny_bert(tmp_path / "other", seed=4, dropout=0.0), "cpu", SMALL)
    monkeypatch.setattr("densepr.pipeline.PIECE_QUESTIONS", 4)
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    theirs = evaluate_qa(retriever, other, qas, pieces=pieces, **kw)
    mine = evaluate_qa(retriever, reader, qas, **kw)
    assert theirs["modes"] != mine["modes"]  # two readers that answer differently
    logged: list[str] = []
    got = evaluate_qa(retriever, reader, qas, pieces=pieces, log=logged.append, **kw)
    assert got["modes"] == mine["modes"] and got["gold"] == mine["gold"] and "resumed" not in got
    assert sum("made from other inputs (another reader" in m for m in logged) == 2, logged
    # and this reader's own pieces, now written, are used on the next resume
    assert evaluate_qa(retriever, reader, qas, pieces=pieces, **kw)["resumed"]["pieces_kept"] == 2


def test_cli_evaluate_qa_resumes_a_killed_set_and_keeps_finished_ones(tmp_path, capsys, passages_tsv, qa_tsv, reader, monkeypatch):
    """A killed ``evaluate-qa`` run, started again with the same command, reads only what is missing; its
    figures equal a fresh run's; other inputs (here another ks) read again; pieces go once a set is done."""
    import shutil

    from densepr.data.qa import QA, QASet
    from tests.support.cli import run

    idx = tmp_path / "index"
    idx.mkdir()
    shutil.copy(passages_tsv, idx / "passages.tsv")
    assert run(capsys, "index", "bm25", str(idx / "passages.tsv"), str(idx / "bm25"))[0] == 0
    reader.save(tmp_path / "rd")
    monkeypatch.setattr("densepr.pipeline.PIECE_QUESTIONS", 4)  # 6 questions: pieces of 4 and 2
    read, real = [], Reader.read

    def counted(self, qs, *a, **kw):
        read.append(len(qs))
        if len(read) == 2 and kill:
            raise KeyboardInterrupt  # killed while reading the second piece
        return real(self, qs, *a, **kw)

    monkeypatch.setattr(Reader, "read", counted)
    args = ("evaluate-qa", "--qa", str(qa_tsv), "--index", str(idx), "--reader", str(tmp_path / "rd"), "--modes", "bm25",
            "--ks", "1,3", "--device", "cpu", "-o")  # fmt: skip
    kill = True
    assert run(capsys, *args, str(tmp_path / "qa"))[0] == 130  # interrupted
    assert len(list((tmp_path / "qa" / "pieces").rglob("readings-*.json"))) == 1 and not (tmp_path / "qa" / "qa-results.json").exists()
    kill, read[:] = False, []
    code, _, err = run(capsys, *args, str(tmp_path / "qa"))
    assert code == 0 and read == [2] and "resuming; 1 finished piece" in err, err  # only the missing piece was read
    assert "qa.tsv: read 6 of 6 questions (" in err and "min left)" in err  # progress a log file shows
    assert not (tmp_path / "qa" / "pieces").exists()
    read[:] = []
    code, _, err = run(capsys, *args, str(tmp_path / "qa"))
    assert code == 0 and read == [] and "already read" in err  # a finished set is kept
    code, _, err = run(capsys, *args, str(tmp_path / "fresh"), "--no-resume")
    assert code == 0 and read == [4, 2]
    got, fresh = (json.loads((tmp_path / d / "qa-results.json").read_text())["sets"]["qa.tsv"] for d in ("qa", "fresh"))
    assert got["modes"] == fresh["modes"] and got["gold"] == fresh["gold"] and got["key"] == fresh["key"]
    read[:] = []
    code, _, err = run(capsys, *args[:-5], "--ks", "1,2", "--device", "cpu", "-o", str(tmp_path / "qa"))
    assert code == 0 and read == [4, 2]  # other inputs: read again
    from densepr.pipeline import reading_key

    key = json.loads((tmp_path / "qa" / "qa-results.json").read_text())["sets"]["qa.tsv"]["key"]
    qas = QASet("qa.tsv", [QA(q, tuple(a)) for q, a in QUESTIONS])
    assert reading_key(tmp_path / "rd", idx, qas, ["bm25"], [1, 2], True, "fp32") == key
    assert reading_key(f"{tmp_path / 'rd'}#int8", idx, qas, ["bm25"], [1, 2], True, "fp32") != key  # an ONNX export's int8 model


# -- command line ----------------------------------------------------------------------------------
def test_cli_train_reader_answer_and_evaluate_qa(tmp_path, capsys, passages_tsv, qa_tsv, reader_dir):
    import shutil

    from tests.support.cli import run

    idx = tmp_path / "index"
    idx.mkdir()
    shutil.copy(passages_tsv, idx / "passages.tsv")
    assert run(capsys, "index", "bm25", str(idx / "passages.tsv"), str(idx / "bm25"))[0] == 0
    res = tmp_path / "res.json"
    code, _, err = run(capsys, "retrieve", "--qa", str(qa_tsv), "--index", str(idx), "--mode", "bm25", "-k", "12", "-o", str(res))
    assert code == 0, err
    code, out, err = run(capsys, "train-reader", "--train", str(res), "--dev", str(res), "-o", str(tmp_path / "run"), "--init", str(reader_dir),
                         "--passages", "4", "--batch-size", "2", "--epochs", "2", "--max-length", "96", "--lr", "1e-3", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert "reader in" in out and (tmp_path / "run/best/model.safetensors").is_file()
    reader = str(tmp_path / "run/best")

    code, out, err = run(capsys, "answer", "who created python", "--index", str(idx), "--reader", reader, "-k", "3", "--device", "cpu")
    assert code == 0, err
    assert "read top-3 bm25" in out
    code, out, err = run(capsys, "answer", "who created python", "--index", str(idx), "--reader", reader, "--json", "--device", "cpu")
    a = json.loads(out)
    assert code == 0 and a["found"] and a["passage"]["text"][a["start"] : a["end"]] == a["text"]
    code, out, err = run(capsys, "answer", "who created python", "--index", str(idx), "--reader", reader, "--json", "--precision", "bf16")
    assert code == 0 and json.loads(out)["found"], err
    code, out, _ = run(capsys, "answer", "zzzz qqqq", "--index", str(idx), "--reader", reader, "--device", "cpu")
    assert code == 0 and "no answer" in out

    code, out, err = run(capsys, "evaluate-qa", "--qa", str(qa_tsv), "--index", str(idx), "--reader", reader, "--modes", "bm25",
                         "--ks", "1,3", "-o", str(tmp_path / "qa"), "--device", "cpu")  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "qa/qa-results.json").read_text())
    entry = results["sets"]["qa.tsv"]
    assert set(entry["modes"]["bm25"]["k"]) == {"1", "3"} and entry["n_all"] == 6 and "gold" in entry
    assert "EM@1" in (tmp_path / "qa/qa-results.md").read_text() and (tmp_path / "qa/qa-em.png").stat().st_size > 1000
    # tune the passage selection on (here: the same) questions; it is stored with the reader and reported by evaluate-qa
    validation = (tmp_path / "run/best/validation.json").read_bytes()
    code, out, err = run(capsys, "tune-reader", "--qa", str(qa_tsv), "--index", str(idx), "--reader", reader, "--modes", "bm25",
                         "--ks", "1,3", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "run/best/validation.json").read_bytes() == validation  # the run's record of its best checkpoint stays
    stored = json.loads((tmp_path / "run/best/densepr_reader.json").read_text())["selection"]["bm25"]
    assert stored["k"] in (1, 3) and stored["em"] >= stored["paper_em"] and "DPR's rule" in out and stored["precision"] == "fp32"
    # tuned on bf16 weights (as `evaluate-qa --precision bf16` reads): the choice says so, the saved weights stay float32
    from safetensors import safe_open

    code, out, err = run(capsys, "tune-reader", "--qa", str(qa_tsv), "--index", str(idx), "--reader", reader, "--modes", "bm25",
                         "--ks", "1,3", "--device", "cpu", "--precision", "bf16")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "run/best/densepr_reader.json").read_text())["selection"]["bm25"]["precision"] == "bf16"
    with safe_open(tmp_path / "run/best/model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    code, out, err = run(capsys, "tune-reader", "--qa", str(qa_tsv), "--index", str(idx), "--reader", reader, "--modes", "bm25",
                         "--ks", "1,3", "--device", "cpu")  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "run/best/densepr_reader.json").read_text())["selection"]["bm25"] == stored, err
    code, _, err = run(capsys, "evaluate-qa", "--qa", str(qa_tsv), "--index", str(idx), "--reader", reader, "--modes", "bm25",
                       "--ks", "1,3", "-o", str(tmp_path / "qa2"), "--device", "cpu")  # fmt: skip
    assert code == 0, err  # the reader directory still verifies against its manifest after tuning
    fused = json.loads((tmp_path / "qa2/qa-results.json").read_text())["sets"]["qa.tsv"]["modes"]["bm25"].get("fused")
    assert (fused is None) == ((stored["relevance"], stored["span"], stored["retriever"]) == (1.0, 0.0, 0.0))  # DPR's rule: no fused row

    # out of the box: a reader stored beside the index (what `make reproduce-dpr` leaves in runs/dpr/reader) is found
    # without --reader, and an index at runs/dpr (the trained retriever) is found without --index
    code, _, err = run(capsys, "answer", "who created python", "--index", str(idx), "--device", "cpu")
    assert code == 1 and "no reader" in err and "reproduce-dpr" in err and "Traceback" not in err
    shutil.copytree(reader, idx / "reader")
    assert Pipeline.load(idx, device="cpu").answer("who created python").text == a["text"]
    code, out, err = run(capsys, "answer", "who created python", "--index", str(idx), "--json", "--device", "cpu")
    assert code == 0 and json.loads(out)["text"] == a["text"], err
    from densepr.cli import DEFAULT_INDEX, TRAINED_INDEX, _index

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        code, _, err = run(capsys, "answer", "who created python", "--device", "cpu")
        assert code == 1 and str(DEFAULT_INDEX) in err and "Traceback" not in err, err  # nothing here: the default, named
        assert _index(None) == DEFAULT_INDEX and _index(idx) == idx
        (TRAINED_INDEX / "dense").mkdir(parents=True)
        (TRAINED_INDEX / "dense" / "manifest.json").write_text("{}")
        assert _index(None) == TRAINED_INDEX  # `make reproduce-dpr`'s trained retriever, when present
    finally:
        os.chdir(cwd)

    bad = [
        (("answer", "  ", "--index", str(idx), "--reader", reader), "empty question"),
        (("answer", "who " * 300, "--index", str(idx), "--reader", reader, "--device", "cpu"), "question is"),
        (("evaluate-qa", "--qa", str(qa_tsv), "--index", str(idx), "--reader", reader, "--ks", "0", "-o", str(tmp_path / "x")), "--ks"),
        (("evaluate-qa", "--qa", str(qa_tsv), "--index", str(idx), "--reader", reader, "--modes", "dense", "-o", str(tmp_path / "x")), "needs"),
        (("train-reader", "--train", str(tmp_path / "nope.json"), "-o", str(tmp_path / "r2"), "--init", str(reader_dir), "--max-length", "96"), "nope.json"),
        (("answer", "who created python", "--index", str(idx), "--reader", str(tmp_path)), "not a Hugging Face model directory"),
        (("answer", "who created python", "--index", str(idx), "--reader", reader, "--precision", "half"), "precision 'half'"),
    ]
    for args, message in bad:
        code, _, err = run(capsys, *args)
        assert code == 1 and message in err and "Traceback" not in err, (args, err)
