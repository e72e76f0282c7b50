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
    code, out, err = run(capsys, "index", "plan", "--nodes", "4", "--node-ram", "64", "--gpus", "8")
    assert code == 0 and "8.8 h on 8 GPUs" in out and "approximate per shard" in out, err
    code, _, err = run(capsys, "index", "plan", "--nodes", "0")
    assert code == 1 and "must be positive" in err
    assert "21,015,324 passages x 768 dims" in out and "60.1 GiB" in out  # 21M x 768 x 4 bytes, flat


# -- output paths: checked before any work ----------------------------------------------------------
# Every command that writes, with {out} where its output goes; its inputs do not exist, so an error
# about anything but {out} means the command started work before checking where it would write.
WRITERS = [
    ("file", ("data", "passages", "{out}", "--source", "{missing}.tsv")),
    ("file", ("data", "split", "{missing}.jsonl", "{out}")),
    ("file", ("data", "build-train", "--qa", "{missing}.tsv", "-o", "{out}", "--index", "{missing}")),
    ("file", ("data", "build-train", "--qa", "{missing}.tsv", "-o", "{tmp}/t.json", "--val-output", "{out}", "--index", "{missing}")),
    ("file", ("retrieve", "--qa", "{missing}.tsv", "-o", "{out}", "--index", "{missing}")),
    ("file", ("retrieve", "--queries", "{missing}.tsv", "--trec", "{out}", "--index", "{missing}")),
    ("file", ("cloze-data", "-o", "{out}", "--index", "{missing}")),
    ("file", ("evaluate", "{missing}.trec", "--qrels", "{missing}.tsv", "-o", "{out}")),
    ("file", ("reproduce", "-o", "{tmp}/repro", "--write-expected", "{out}", "--cache-dir", "{missing}")),
    ("dir", ("data", "fetch", "--cache-dir", "{out}")),
    ("dir", ("index", "bm25", "{missing}.tsv", "{out}")),
    ("dir", ("index", "dense", "{missing}", "{out}")),
    ("dir", ("encode", "{missing}.tsv", "{out}", "--encoder", "{missing}")),
    ("dir", ("export-onnx", "{missing}", "{out}")),
    ("dir", ("export-model", "{missing}", "{out}")),
    ("dir", ("convert", "{missing}", "-o", "{out}")),
    ("dir", ("export-index", "{missing}", "--format", "pyserini", "-o", "{out}")),
    ("file", ("export-index", "{missing}", "--format", "parquet", "-o", "{out}")),
    ("file", ("export-run", "{missing}.json", "-o", "{out}")),
    ("dir", ("train", "--train", "{missing}.json", "-o", "{out}", "--init", "{missing}")),
    ("dir", ("train-reader", "--train", "{missing}.json", "-o", "{out}", "--init", "{missing}")),
    ("dir", ("evaluate-qa", "--qa", "{missing}.tsv", "-o", "{out}", "--index", "{missing}", "--reader", "{missing}")),
    ("dir", ("reproduce", "-o", "{out}", "--cache-dir", "{missing}")),
]
BAD_OUTPUTS = {"file": ["an existing directory", "under a file"], "dir": ["an existing file", "the current directory", "above the current directory", "under a file"]}


@pytest.fixture
def no_work(monkeypatch):
    """Make every entry point into real work fail loudly: an output check must come before all of them."""
    import densepr.data
    import densepr.data.fetch
    import densepr.index.dense
    import densepr.models.encoder
    import densepr.reproduce
    import densepr.retrieve.retriever
    import densepr.train.reader
    import densepr.train.retriever

    def started(*a, **k):
        raise AssertionError("work started before the output path was checked")

    for module, name in [(densepr.data, "load_corpus"), (densepr.data, "load_qa"), (densepr.data, "read_queries"),
                         (densepr.data, "load_wiki_summaries"), (densepr.data.fetch, "fetch_embedded"), (densepr.models.encoder, "load_biencoder"),
                         (densepr.reproduce, "run"), (densepr.train.retriever, "train"), (densepr.train.reader, "train_reader")]:  # fmt: skip
        monkeypatch.setattr(module, name, started)
    monkeypatch.setattr(densepr.retrieve.retriever.Retriever, "load", classmethod(started))
    monkeypatch.setattr(densepr.index.dense.DenseIndex, "build", classmethod(started))


def _writer_id(cmd: tuple[str, ...]) -> str:
    words = [w for w in cmd[: next(i for i, w in enumerate(cmd) if w.startswith(("-", "{")))]]
    at = cmd.index("{out}")
    return " ".join(words + ([cmd[at - 1]] if cmd[at - 1].startswith("-") else ["OUTPUT"]))


@pytest.mark.parametrize("kind, cmd", WRITERS, ids=[_writer_id(c) for _, c in WRITERS])
def test_every_writing_command_checks_its_output_before_the_work(tmp_path, capsys, monkeypatch, no_work, kind, cmd):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    outs = {"an existing directory": str(tmp_path / "adir"), "under a file": str(tmp_path / "afile" / "out"),
            "an existing file": str(tmp_path / "afile"), "the current directory": ".", "above the current directory": ".."}  # fmt: skip
    for case in BAD_OUTPUTS[kind]:
        out = outs[case]
        args = [a.format(out=out, tmp=tmp_path, missing=tmp_path / "missing") for a in cmd]
        code, stdout, err = run(capsys, *args)
        assert code == 1, (case, args, stdout, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (case, args, err)
        assert err.startswith(f"error: {out}: "), (case, args, err)  # about the output, not a missing input
        assert "missing" not in err, (case, args, err)


def test_the_output_check_covers_every_writing_command():
    """A new command (or output option) must join WRITERS: this lists every one the CLI has."""
    import inspect

    from densepr.cli import app

    def walk(t, prefix=()):
        for c in t.registered_commands:
            yield prefix + (c.name,), c.callback
        for g in t.registered_groups:
            yield from walk(g.typer_instance, prefix + (g.name,))

    writes = {"output", "trec", "val_output", "write_expected"}
    found = {(" ".join(name), p) for name, cb in walk(app) for p in inspect.signature(cb).parameters if p in writes}
    option = {"-o": "output", "--trec": "trec", "--val-output": "val_output", "--write-expected": "write_expected", "OUTPUT": "output"}
    tested = {(" ".join(_writer_id(c).split()[:-1]), option[_writer_id(c).split()[-1]]) for _, c in WRITERS if "--cache-dir {out}" not in " ".join(c)}
    assert found == tested


def test_index_dense_into_the_current_directory_is_one_line(tmp_path, capsys, monkeypatch, corpus, tiny_bert):
    from densepr.index.embeddings import encode_corpus
    from densepr.models.encoder import Encoder

    encode_corpus(Encoder.load(tiny_bert, device="cpu"), corpus, tmp_path / "emb")
    monkeypatch.chdir(tmp_path)
    for out in (".", "emb", str(tmp_path)):  # was: ValueError traceback ('.' has an empty name); the input itself
        code, _, err = run(capsys, "index", "dense", "emb", out)
        assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {out}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]  # nothing written


def test_two_outputs_on_one_path_and_tune_hybrid_output(tmp_path, capsys, no_work):
    code, _, err = run(capsys, "retrieve", "--qa", "x.tsv", "-o", str(tmp_path / "r"), "--trec", str(tmp_path / "r"))
    assert code == 1 and "given as two outputs" in err
    (tmp_path / "hybrid.json").mkdir()
    code, _, err = run(capsys, "tune-hybrid", "--qa", "x.tsv", "--index", str(tmp_path))
    assert code == 1 and err.startswith(f"error: {tmp_path / 'hybrid.json'}: is a directory")


def test_serve_limits_are_checked_by_limits_and_named_by_their_option(tmp_path, capsys):
    """Limits refuses what would refuse every request (any front end); the CLI names its own option."""
    from densepr.errors import ConfigError
    from densepr.serve.limits import Limits

    with pytest.raises(ConfigError, match="^max_k must be positive"):
        Limits(max_k=0)
    with pytest.raises(ConfigError, match="^max_wait_ms must not be negative"):
        Limits(max_wait_ms=-1)
    Limits(max_wait_ms=0, max_connections_per_client=None)  # no waiting for company; no per-client cap
    for flags, want in ((("--max-k", "0"), "--max-k must be positive"), (("--timeout", "0"), "--timeout must be positive"),
                        (("--timeout-keep-alive", "-1"), "--timeout-keep-alive must be positive"),
                        (("--max-wait-ms", "-1"), "--max-wait-ms must not be negative")):  # fmt: skip
        code, _, err = run(capsys, "serve", "--index", str(tmp_path), *flags)
        assert code == 1 and err.strip() == f"error: {want}", (flags, err)


def test_unwritable_output_parent_is_refused_first(tmp_path, capsys, no_work, monkeypatch):
    import densepr.cli.common

    monkeypatch.setattr(densepr.cli.common.os, "access", lambda p, mode: False)  # as a non-root user on a read-only directory
    code, _, err = run(capsys, "index", "bm25", "p.tsv", str(tmp_path / "new" / "bm25"))
    assert code == 1 and err.strip() == f"error: {tmp_path / 'new' / 'bm25'}: cannot write in {tmp_path} (permission denied or read-only)"


def test_os_errors_name_the_file_in_one_line(tmp_path, capsys, monkeypatch, passages_tsv):
    import errno
    import os

    import densepr.data

    target = tmp_path / "out.tsv"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(densepr.data, "write_passages_tsv", full)
    code, _, err = run(capsys, "data", "passages", str(target), "--source", str(passages_tsv))
    assert code == 1 and err.strip() == f"error: {target}: No space left on device"

    def anonymous(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(densepr.data, "write_passages_tsv", anonymous)
    code, _, err = run(capsys, "data", "passages", str(target), "--source", str(passages_tsv))
    assert code == 1 and err.strip() == f"error: No space left on device (errno {errno.ENOSPC})" and "Traceback" not in err


def test_ids_that_trec_cannot_hold_are_refused_before_indexing(tmp_path, capsys):
    # was: accepted, then `retrieve --trec` wrote 7-column lines that `evaluate` refused
    for raw, line, what in ((b"id\ttext\ttitle\n1\tfine\tT\na b\ttext\tT\n", 3, "contains a space"),
                            (b'1\tfine\tT\n"a\tb"\ttext\tT\n', 2, "contains a tab")):  # fmt: skip
        (tmp_path / "p.tsv").write_bytes(raw)
        code, _, err = run(capsys, "index", "bm25", str(tmp_path / "p.tsv"), str(tmp_path / "bm25"))
        assert code == 1 and f"p.tsv, line {line}: field 'id': passage id" in err and what in err, err
    assert not (tmp_path / "bm25").exists()


def test_evaluate_answerable_subset_flag_size_limit_and_cache(tmp_path, capsys, monkeypatch):
    """Issue 34: the answerable subset scans every passage; above a size it is skipped unless cached or asked for."""
    from densepr.evaluate import answers

    idx = tmp_path / "index"
    idx.mkdir()
    (idx / "passages.tsv").write_text("id\ttext\ttitle\n1\tDenali is 20,310 feet tall.\tDenali\n2\tNothing here.\tX\n", encoding="utf-8")
    ctx = {"id": "2", "title": "X", "text": "Nothing here.", "score": 1.0, "has_answer": False}
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"question": "how tall is denali", "answers": ["20,310 feet"], "ctxs": [ctx]},
                               {"question": "where is mars", "answers": ["space"], "ctxs": [ctx]}]), encoding="utf-8")  # fmt: skip
    args = ("evaluate", str(res), "--index", str(idx), "--ks", "1")
    code, out, err = run(capsys, *args, "--no-answerable")
    assert code == 0, err
    assert "answerable" not in out and not (idx / "answerable").exists()
    monkeypatch.setattr(answers, "ANSWERABLE_SCAN_MAX", 1)  # as if the corpus were large
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "answerable subset skipped: 2 passages (over 1)" in out and "--answerable" in out and not (idx / "answerable").exists()
    for extra in (("--answerable",), ()):  # computed once when asked, then read from the index directory
        code, out, err = run(capsys, *args, *extra)
        assert code == 0, err
        assert "1 answerable" in out and len(list((idx / "answerable").glob("*.json"))) == 1


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_data_passages_converts_a_file_streamed_and_refuses_a_repeated_id_writing_nothing(tmp_path, capsys, monkeypatch, suffix):
    """`densepr data passages --source F` streams F block by block (at 21M a parsed corpus is ~17 GB): the same
    TSV as from the whole corpus; a repeated id, found once F is read through, leaves no output file."""
    import json

    from densepr.data import Corpus, Passage, load_corpus, write_passages_tsv

    rows = [Passage(f"p{i}", f"Title {i % 7}", f"text {i} about things") for i in range(120)]
    src = tmp_path / f"src{suffix}"
    if suffix == ".tsv":
        write_passages_tsv(rows, src)
    else:
        src.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in rows))
    write_passages_tsv(rows, tmp_path / "want.tsv")
    monkeypatch.setattr(Corpus, "from_passages", classmethod(lambda *a, **k: pytest.fail("the corpus was parsed whole")))
    code, _, err = run(capsys, "data", "passages", str(tmp_path / "out.tsv"), "--source", str(src))
    assert code == 0, err
    assert (tmp_path / "out.tsv").read_bytes() == (tmp_path / "want.tsv").read_bytes()
    monkeypatch.undo()
    assert [p.id for p in load_corpus(tmp_path / "out.tsv")] == [p.id for p in rows]
    bad = rows + [Passage("p3", "again", "a repeated id")]
    if suffix == ".tsv":
        write_passages_tsv(bad, src)
    else:
        src.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in bad))
    code, _, err = run(capsys, "data", "passages", str(tmp_path / "again.tsv"), "--source", str(src))
    assert code == 1 and "p3" in err and "Traceback" not in err
    assert not (tmp_path / "again.tsv").exists()
