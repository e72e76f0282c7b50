"""The command line end to end on small files, and how it reports bad input."""

from __future__ import annotations

import json

import pytest

from densepr.cli import main
from tests.support.cli import run


def test_stage_by_stage_pipeline(tmp_path, capsys, corpus, qa_tsv, tiny_bert):
    articles = tmp_path / "articles.jsonl"
    articles.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in zip(corpus.titles, corpus.texts)), encoding="utf-8")
    idx = tmp_path / "index"
    steps = [
        ("data", "split", str(articles), str(idx / "passages.tsv"), "--words", "100"),
        ("index", "bm25", str(idx / "passages.tsv"), str(idx / "bm25")),
        ("encode", str(idx / "passages.tsv"), str(tmp_path / "emb"), "--encoder", str(tiny_bert), "--part-size", "5", "--device", "cpu"),
        ("index", "dense", str(tmp_path / "emb"), str(idx / "dense")),
    ]
    outputs = []
    for step in steps:
        code, out, err = run(capsys, *step)
        assert code == 0, err
        outputs.append(out)
    assert "12 passages" in outputs[0] and "in 3 part(s)" in outputs[2]

    code, out, err = run(capsys, "retrieve", "--qa", str(qa_tsv), "--index", str(idx), "--mode", "bm25", "-k", "5",
                         "-o", str(tmp_path / "res.json"), "--trec", str(tmp_path / "res.trec"))  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "res.json").read_text())
    assert results[0]["question"] == "who got the first nobel prize in physics"
    assert results[0]["ctxs"][0]["title"] == "Wilhelm Röntgen" and results[0]["ctxs"][0]["has_answer"] is True
    assert {"id", "title", "text", "score", "has_answer"} == set(results[0]["ctxs"][0])

    # evaluate the JSON, then the TREC run: both ways give the same top-1
    code, out_json, err = run(capsys, "evaluate", str(tmp_path / "res.json"), "--ks", "1,5")
    assert code == 0, err
    code, out_trec, err = run(capsys, "evaluate", str(tmp_path / "res.trec"), "--qa", str(qa_tsv), "--index", str(idx), "--ks", "1,5")
    assert code == 0, err
    top1 = sum(bool(r["ctxs"]) and r["ctxs"][0]["has_answer"] for r in results) / len(results) * 100
    assert f"top-1 {top1:.2f}" in out_json
    assert f"{top1:.1f}" in out_trec and "answerable" in out_trec

    code, out, err = run(capsys, "search", "who created python", "--index", str(idx), "-k", "2", "--mode", "hybrid")
    assert code == 0, err
    assert "#1" in out and "#2" in out


def test_bad_input_gets_one_line_and_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\ttext\ttitle\n1\tfine\tT\n2\tno title here\n", encoding="utf-8")
    code, out, err = run(capsys, "index", "bm25", str(bad), str(tmp_path / "bm25"))
    assert code == 1
    assert "bad.tsv, line 3: expected 3 tab-separated columns" in err
    assert "Traceback" not in err and not (tmp_path / "bm25" / "manifest.json").exists()


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    from densepr.errors import InputError

    with pytest.raises(InputError):
        main(["--debug", "index", "bm25", str(tmp_path / "missing.tsv"), str(tmp_path / "out")])


@pytest.mark.parametrize(
    "args, needle",
    [
        (("search", "q", "--index", "{tmp}/nowhere"), "not an index directory"),
        (("encode", "{tmp}/p.tsv", "{tmp}/emb", "--encoder", "{tmp}"), "not a Hugging Face model directory"),
        (("retrieve", "--qa", "{tmp}/none.tsv", "-o", "{tmp}/o.json", "--index", "{tmp}"), "none.tsv: file not found"),
        (("evaluate", "{tmp}/run.trec"), "needs --qa"),
        (("evaluate", "{tmp}/r.json", "--ks", "a,b"), "--ks must be comma-separated integers"),
    ],
)
def test_errors_name_what_is_wrong(tmp_path, capsys, args, needle):
    (tmp_path / "p.tsv").write_text("1\tt\tT\n", encoding="utf-8")
    (tmp_path / "run.trec").write_text("0 Q0 1 1 1.0 t\n", encoding="utf-8")
    (tmp_path / "r.json").write_text("[]", encoding="utf-8")
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 1 and needle in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "search")
    assert code == 2 and "Missing argument" in err


def test_beir_style_queries_qrels_and_hybrid_tuning(tmp_path, capsys, corpus, qa_tsv, tiny_bert):
    from densepr.data import write_passages_tsv
    from densepr.index.dense import DenseIndex
    from densepr.index.embeddings import encode_corpus
    from densepr.models.encoder import Encoder
    from densepr.retrieve.bm25 import BM25Index

    idx = tmp_path / "index"
    write_passages_tsv(corpus, idx / "passages.tsv")
    BM25Index.build(corpus).save(idx / "bm25")
    encode_corpus(Encoder.load(tiny_bert, device="cpu"), corpus, tmp_path / "emb")
    DenseIndex.build(tmp_path / "emb").save(idx / "dense")

    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "who created python"}\n{"_id": "q2", "text": "mozart birthplace"}\n')
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t8\t1\nq2\t12\t1\n")
    code, out, err = run(capsys, "retrieve", "--queries", str(tmp_path / "queries.jsonl"), "--index", str(idx), "--mode", "bm25",
                         "--trec", str(tmp_path / "run.trec"))  # fmt: skip
    assert code == 0, err
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert lines[0].split()[:4] == ["q1", "Q0", "8", "1"]  # passage 8 is Python
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run.trec"), "--qrels", str(tmp_path / "qrels.tsv"))
    assert code == 0, err
    assert "2 judged queries (2 in the run)" in out and "mrr_10 1.0000" in out  # both relevant passages ranked first

    code, out, err = run(capsys, "tune-hybrid", "--qa", str(qa_tsv), "--index", str(idx), "-k", "1", "--device", "cpu")
    assert code == 0, err
    tuned = json.loads((idx / "hybrid.json").read_text())
    assert tuned["grid"][str(tuned["lambda"])] == max(tuned["grid"].values()) and tuned["tuned_on"] == ["qa.tsv"]

    code, _, err = run(capsys, "retrieve", "--queries", str(tmp_path / "queries.jsonl"), "--qa", str(qa_tsv), "--index", str(idx), "-o", "x")
    assert code == 1 and "exactly one of --qa" in err
    code, _, err = run(capsys, "retrieve", "--qa", str(qa_tsv), "--index", str(idx))
    assert code == 1 and "give --output" in err


def test_build_train_then_train(tmp_path, capsys, corpus, qa_tsv, tiny_bert):
    from densepr.data import iter_train_records, load_qa, write_passages_tsv
    from densepr.retrieve.bm25 import BM25Index

    idx = tmp_path / "index"
    write_passages_tsv(corpus, idx / "passages.tsv")
    BM25Index.build(corpus).save(idx / "bm25")
    many = tmp_path / "qa-dev.tsv"  # 24 questions: the six, four times over
    many.write_text(qa_tsv.read_text() * 4, encoding="utf-8")
    code, out, err = run(capsys, "data", "build-train", "--qa", str(many), "--index", str(idx), "-o", str(tmp_path / "train.json"),
                         "--val-output", str(tmp_path / "val.json"), "--val-fraction", "0.25", "--depth", "12", "--hard-negatives", "2")  # fmt: skip
    assert code == 0, err
    stats = json.loads((tmp_path / "train.stats.json").read_text())
    assert stats["train"]["questions"] == {"qa-dev.tsv": 18} and stats["validation"]["questions"] == {"qa-dev.tsv-heldout": 6}
    assert stats["train"]["kept"]["qa-dev.tsv"] + stats["train"]["dropped_no_positive_in_bm25_top"]["qa-dev.tsv"] == 18
    assert len(list(iter_train_records(tmp_path / "train.json"))) == stats["train"]["records"] > 0
    assert len(load_qa(tmp_path / "val.qa.tsv")) == 6
    assert "train: " in out and "had no answer in BM25's top 12" in out

    code, out, err = run(capsys, "train", "--train", str(tmp_path / "train.json"), "--dev", str(tmp_path / "val.json"), "--init", str(tiny_bert),
                         "-o", str(tmp_path / "run"), "--batch-size", "4", "--epochs", "1", "--grad-cache-chunk", "3", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "run" / "best" / "question_encoder" / "model.safetensors").is_file()
    assert "trained" in out

    (tmp_path / "nq-test.tsv").write_text(qa_tsv.read_text(), encoding="utf-8")
    code, _, err = run(capsys, "data", "build-train", "--qa", str(tmp_path / "nq-test.tsv"), "--index", str(idx), "-o", str(tmp_path / "x.json"))
    assert code == 1 and "refusing to build training data from test set" in err


def test_sharded_encode_index_types_and_plan(tmp_path, capsys, corpus, tiny_bert):
    from densepr.data import write_passages_tsv

    write_passages_tsv(corpus, tmp_path / "p.tsv")
    for i in range(3):
        code, out, err = run(capsys, "encode", str(tmp_path / "p.tsv"), str(tmp_path / "emb"), "--encoder", str(tiny_bert),
                             "--part-size", "2", "--shard-id", str(i), "--num-shards", "3", "--device", "cpu")  # fmt: skip
        assert code == 0, err
    assert "other shards still to finish" not in out and "in 6 part(s)" in out
    code, out, err = run(capsys, "index", "dense", str(tmp_path / "emb"), str(tmp_path / "hnsw"), "--type", "hnsw", "--num-shards", "2")
    assert code == 0, err
    assert "hnsw index of 12 x 32 vectors in 2 shards" in out
    code, out, err = run(capsys, "index", "dense", str(tmp_path / "emb"), str(tmp_path / "bad"), "--type", "annoy")
    assert code == 1 and "unknown index type 'annoy'" in err
    code, out, err = run(capsys, "index", "plan", "--num-passages", "21015324", "--dim", "768")
    assert code == 0, err
    assert "21,015,324 passages x 768 dims" in out and "60.1 GiB" in out  # 21M x 768 x 4 bytes, flat
