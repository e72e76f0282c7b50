"""The prepared GPU script runs end to end at toy sizes on a CPU, so the one device run it gets works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"


def test_gpu_script_runs_every_measurement_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "gpu.py", "--tiny", "--device", "cpu", "--out", str(out)], cwd=BENCH / "scale",
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["tiny"] and res["device"] == "cpu"
    assert res["encode"]["passages"] == 64 and res["encode"]["passages_per_s"] > 0
    assert [s["vectors"] for s in res["search"]] == [2000, 5000] and all(s["questions_per_s"] > 0 for s in res["search"])
    assert res["train"]["batch_size"] == 8 and res["train"]["questions_per_s"] > 0
    assert res["reader"]["passages"] == 10 and res["reader"]["median_ms"] > 0


def test_torch_topk_is_exact():
    import numpy as np
    import torch

    from densepr.index.dense_search import torch_topk

    rng = np.random.default_rng(0)
    x, q = rng.standard_normal((1000, 16)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
    sc, ix = torch_topk(q, 10, [torch.from_numpy(x[:300]), torch.from_numpy(x[300:])], block=128)
    want = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert np.array_equal(ix, want) and np.allclose(sc, np.take_along_axis(q @ x.T, want, 1), atol=1e-5)


def test_reader_rules_script_reports_every_rule(tmp_path):
    from densepr.evaluate.answers import has_answer
    from densepr.models.reader import Reader, ReaderConfig
    from tests.support.tiny import PASSAGES, QUESTIONS, make_tiny_bert

    reader = tmp_path / "reader"
    Reader.load(make_tiny_bert(tmp_path / "init", seed=3, dropout=0.0), "cpu", ReaderConfig(max_length=64)).save(reader)
    recs = [{"question": q, "answers": a, "ctxs": [{"id": str(j), "title": t, "text": x, "has_answer": has_answer(a, x)}
                                                    for j, (t, x) in enumerate(PASSAGES[:6])]} for q, a in QUESTIONS[:3]]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(recs), encoding="utf-8")
    out = tmp_path / "rules.json"
    proc = subprocess.run([sys.executable, "reader_rules.py", str(tmp_path / "r.json"), str(reader), "--depth", "6", "-o", str(out)],
                          cwd=BENCH / "reader", capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())["readers"][str(reader)]
    assert row["questions"] == 3 and all(f"{r}@{k}" in row for r in ("paper", "span", "sel+span") for k in (1, 5, 10, 20))
    assert 0 <= row["given_passage_em"] <= 100 and row["with_answer_in_depth"] == sum(any(c["has_answer"] for c in r["ctxs"]) for r in recs)


def test_reader_errors_sorts_each_span_into_one_kind_and_compares_two_readers(tmp_path):
    sys.path.insert(0, str(BENCH / "reader"))
    try:
        from reader_errors import error_kind
    finally:
        sys.path.remove(str(BENCH / "reader"))
    answers = ["Barack Obama", "Obama"]
    assert error_kind("the Obama", answers) == "exact"  # SQuAD normalisation drops the article
    assert error_kind("President Barack Obama of", answers) == "too long"
    assert error_kind("Barack", ["Barack Obama"]) == "too short"
    assert error_kind("Barack Hussein", ["Barack Obama"]) == "overlap"
    assert error_kind("George Bush", answers) == "wrong span" and error_kind("", answers) == "wrong span"

    from densepr.evaluate.answers import has_answer
    from densepr.models.reader import Reader, ReaderConfig
    from tests.support.tiny import PASSAGES, QUESTIONS, make_tiny_bert

    readers = []
    for seed in (3, 4):
        readers.append(tmp_path / f"reader{seed}")
        Reader.load(make_tiny_bert(tmp_path / f"init{seed}", seed=seed, dropout=0.0), "cpu", ReaderConfig(max_length=64)).save(readers[-1])
    recs = [{"question": q, "answers": a, "ctxs": [{"id": str(j), "title": t, "text": x, "has_answer": has_answer(a, x)}
                                                    for j, (t, x) in enumerate(PASSAGES)]} for q, a in QUESTIONS]  # fmt: skip
    (tmp_path / "run" / "reader-data").mkdir(parents=True)
    (tmp_path / "run" / "reader-data" / "heldout.json").write_text(json.dumps(recs), encoding="utf-8")
    out = tmp_path / "errors.json"
    proc = subprocess.run([sys.executable, "reader_errors.py", "--run", str(tmp_path / "run"), "--reader", f"a={readers[0]}",
                           "--reader", f"b={readers[1]}", "--device", "cpu", "-o", str(out)],
                          cwd=BENCH / "reader", capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    n = sum(any(c["has_answer"] for c in r["ctxs"]) for r in recs)
    assert res["held_out_questions"] == n > 0
    for row in res["results"]:
        assert sum(row["counts"].values()) == n and row["em"] == round(100 * row["counts"]["exact"] / n, 2)
    agree = res["agreement"]
    assert agree["both"] + agree["only a"] + agree["only b"] + agree["neither"] == n
    assert agree["both"] + agree["only a"] == res["results"][0]["counts"]["exact"]


def test_qa_sets_collects_only_the_finished_sets_of_the_asked_limit(tmp_path):
    run = tmp_path / "run"
    (run / "stages" / "qa-b.partial").mkdir(parents=True)
    (run / "stages" / "qa-b.partial" / "readings-0000000.json").write_text("[]")
    (run / "qa").mkdir()
    cell = {"em": 10.0, "f1": 12.0, "em_answerable": 20.0, "f1_answerable": 24.0, "retrieval_topk": 50.0}
    for name, limit, n in (("a", None, 700), ("c", 100, 100), ("d", None, 2000)):
        res = {"n_all": n, "n_answerable": n // 2, "modes": {"dense": {"k": {"1": cell, "5": cell}}},
               "gold": {"questions": n // 3, "em": 30.0, "f1": 31.0}, "seconds": 60.0, "passages_read": 30 * n}  # fmt: skip
        (run / "qa" / f"{name}.json").write_text(json.dumps(res))
        (run / "stages" / f"qa-{name}.json").write_text(json.dumps({"settings": {"set": f"{name}-test", "limit": limit, "ks": [1, 5]},
                                                                    "finished": "2026-12-05T10:00:00", "seconds": 61.0}))  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "qa_sets.py", "--run", str(run), "-o", str(out)], cwd=BENCH / "reader", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "qa-results.json").read_text())
    assert list(res["sets"]) == ["d-test", "a-test"] and res["pending_pieces"] == {"b": 1}  # largest first; c was read at 100
    assert "d-test (2000 q, 1000 answerable)" in (out / "qa-results.md").read_text() and (out / "qa-em.png").stat().st_size > 0
    proc = subprocess.run([sys.executable, "qa_sets.py", "--run", str(run), "--limit", "5", "-o", str(out)], cwd=BENCH / "reader", capture_output=True, text=True)
    assert proc.returncode == 1 and "no end-to-end set recorded yet with --qa-limit 5" in proc.stderr
    # an evaluate-qa output of the same run adds the sets the run has not read (labelled with its precision)
    extra = tmp_path / "extra"
    extra.mkdir()
    res = {"n_all": 5000, "n_answerable": 2500, "modes": {"dense": {"k": {"1": cell, "5": cell}}}, "gold": {"questions": 9, "em": 1.0, "f1": 2.0},
           "seconds": 9.0, "passages_read": 9}  # fmt: skip
    (extra / "qa-results.json").write_text(json.dumps({"precision": "bf16", "ks": [1, 5], "limit": None,
                                                       "sets": {"e-test": {**res, "resumed": {"pieces_kept": 3, "their_seconds": 0.0, "pieces_without_seconds": 3}}, "a-test": res}}))  # fmt: skip
    (run / "stages" / "qa-e-test.partial").mkdir()  # the run's own unfinished read of a set evaluate-qa finished
    proc = subprocess.run([sys.executable, "qa_sets.py", "--run", str(run), "--add", str(extra), "-o", str(out)], cwd=BENCH / "reader", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "qa-results.json").read_text())["pending_pieces"] == {"b": 1}
    assert "| 9 | bf16 |" not in (out / "qa-results.md").read_text() and "≥ 9 (3 kept pieces untimed)" in (out / "qa-results.md").read_text()
    got = json.loads((out / "qa-results.json").read_text())["sets"]
    assert list(got) == ["e-test", "d-test", "a-test"] and got["e-test"]["precision"] == "bf16"
    assert got["a-test"]["n_all"] == 700 and got["a-test"]["precision"] == "fp32"  # the run's own reading is kept
    (extra / "qa-results.json").write_text(json.dumps({"precision": "bf16", "ks": [1, 20], "limit": None, "sets": {"e-test": res}}))
    proc = subprocess.run([sys.executable, "qa_sets.py", "--run", str(run), "--add", str(extra), "-o", str(out)], cwd=BENCH / "reader", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "read at ks [1, 20], the run at [1, 5]" in proc.stderr


def _fake_run(d, *, seconds, top20, em, late=()):
    """A reproduce output with results.json and stage records: two retrieval stages, one qa set."""
    (d / "stages").mkdir(parents=True)
    rep = {"all": {"n": 10, "top1": 1.0, "top5": 2.0, "top20": top20, "top100": 40.0}, "answerable": {"n": 5, "top1": 2.0, "top5": 4.0, "top20": 2 * top20, "top100": 80.0}}
    cell = {"em": em, "f1": em, "em_answerable": 2 * em, "f1_answerable": 2 * em, "retrieval_topk": top20}
    summary = {"stages": [{"stage": s} for s in ("train", "qa-x", "report")],
               "results": {"x-test": {"n_all": 10, "n_answerable": 5, "methods": {"bm25": rep, "dense": rep}}},
               "training": {"runs": {"round1": {"steps": 3, "questions_per_s": 1.5, "first_loss": 2.0, "last_loss": 1.0, "validation": {"avg_rank": 4.0, "top20": 90.0}}}},
               "qa": {"sets": {"x-test": {"modes": {"dense": {"k": {"1": cell, "20": cell}}}}}}}  # fmt: skip
    (d / "results.json").write_text(json.dumps(summary))
    for stage, s in zip(("train", "qa-x", "report"), seconds):
        when = "2026-12-05T12:00:00+00:00" if stage in late else "2026-12-05T10:00:00+00:00"
        (d / "stages" / f"{stage}.json").write_text(json.dumps({"seconds": s, "finished": when}))


def test_compare_runs_puts_seconds_as_ratios_and_figures_side_by_side(tmp_path):
    _fake_run(tmp_path / "a", seconds=(100.0, 50.0, 1.0), top20=30.0, em=10.0)
    _fake_run(tmp_path / "b", seconds=(60.0, 40.0, 1.0), top20=31.0, em=10.0, late=("qa-x",))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "compare_runs.py", "--run", f"fp32={tmp_path / 'a'}", "--run", f"bf16={tmp_path / 'b'}", "-o", str(out)],
                          cwd=BENCH / "training", capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((out / "compare.json").read_text())
    # b's qa stage was recorded after its report: not part of its results, left out of its total
    assert got["totals_s"] == {"fp32": 151.0, "bf16": 61.0} and "qa-x" not in got["seconds"]["bf16"]
    md = (out / "compare.md").read_text()
    assert "| train | 100 | 60 | 0.60x |" in md and "no seconds for qa-x" in md
    assert "| x-test | dense | 30.0 / 60.0 | 31.0 / 62.0 |" in md and "Largest top-k difference from `fp32`: 2.00 points" in md
    assert "| x-test | dense | paper | all | 10.0 / 10.0 | 10.0 / 10.0 |" in md and "equal to `fp32`'s: 4 of 4" in md
    proc = subprocess.run([sys.executable, "compare_runs.py", "--run", f"a={tmp_path / 'a'}", "--run", f"b={tmp_path}", "-o", str(out)], cwd=BENCH / "training", capture_output=True, text=True)
    assert proc.returncode != 0 and "DIR/results.json" in proc.stderr



def test_train_reader_once_reuses_a_finished_run_even_one_recorded_before_a_field_existed(tmp_path, monkeypatch):
    import dataclasses

    sys.path.insert(0, str(BENCH))
    try:
        from common import train_reader_once
    finally:
        sys.path.remove(str(BENCH))
    import densepr.train.reader
    from densepr.train.config import ReaderTrainConfig

    calls = []
    monkeypatch.setattr(densepr.train.reader, "train_reader", lambda cfg, **kw: calls.append(cfg) or {"step": 7})
    cfg = ReaderTrainConfig(train_files=["a.json"], output_dir=str(tmp_path / "run" / "reader"), init="m", epochs=2)
    first = train_reader_once(cfg, tmp_path / "run", "cpu", "x")
    assert len(calls) == 1 and first["steps"] == 7
    assert train_reader_once(cfg, tmp_path / "run", "cpu", "x") == first and len(calls) == 1  # finished: not trained again
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "precision"}  # a record from before `precision` existed
    (tmp_path / "run" / "done.json").write_text(json.dumps({**first, "config": old}))
    assert train_reader_once(cfg, tmp_path / "run", "cpu", "x")["config"] == old and len(calls) == 1
    other = dataclasses.replace(cfg, precision="bf16")  # but another value of the field is another run
    train_reader_once(other, tmp_path / "run", "cpu", "x")
    assert len(calls) == 2


def test_reader_models_reads_a_reader_trained_elsewhere_on_its_held_out_passages(tmp_path):
    """`reader_models.py --trained NAME=DIR` scores a finished reader on the benchmark's held-out answer passages
    (the best-ranked one in each question's top 20) without training anything."""
    from densepr.evaluate.answers import has_answer
    from densepr.models.reader import Reader, ReaderConfig
    from tests.support.tiny import PASSAGES, QUESTIONS, make_tiny_bert

    reader = tmp_path / "reader"
    Reader.load(make_tiny_bert(tmp_path / "init", seed=3, dropout=0.0), "cpu", ReaderConfig(max_length=64)).save(reader)
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    recs = [{"question": q, "answers": a, "ctxs": [{"id": str(j), "title": t, "text": x, "has_answer": has_answer(a, x)}
                                                    for j, (t, x) in enumerate(PASSAGES[:6])]} for q, a in QUESTIONS[:4]]  # fmt: skip
    for name in ("nq-dev.json", "trivia-dev.json", "heldout.json"):  # the data step's files, already written: not retrieved again
        (data / name).write_text(json.dumps(recs), encoding="utf-8")
    (data / "heldout.qa.tsv").write_text("".join(f"{q}\t{json.dumps(a)}\n" for q, a in QUESTIONS[:4]), encoding="utf-8")
    out = tmp_path / "models.json"
    cmd = [sys.executable, "reader_models.py", "--index", str(tmp_path / "unused"), "--trained", f"tiny={reader}", "--workdir",
           str(tmp_path / "work"), "--device", "cpu", "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=BENCH / "reader", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    gold = sum(any(c["has_answer"] for c in r["ctxs"]) for r in recs)
    assert res["held_out_questions"] == gold > 0 and not (tmp_path / "work" / "tiny-bf16-e1").exists()  # nothing trained
    [row] = res["results"]
    assert row["model"] == "tiny" and row["trained_elsewhere"] and row["steps"] is None and 0 <= row["em"] <= row["f1"] <= 100
    assert "trained elsewhere" in proc.stdout
    proc = subprocess.run(cmd[:4] + ["--device", "cpu"], cwd=BENCH / "reader", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--model NAME=DIR" in proc.stderr  # neither a model to train nor a reader to read


def _synthetic_corpus_module():
    import pytest

    from densepr.data import EmbeddedData

    if not EmbeddedData().available:
        pytest.skip("the embedded corpus is not fetched (densepr data fetch): synthetic_corpus.py fits its statistics on it")
    sys.path.insert(0, str(BENCH / "scale"))
    try:
        import synthetic_corpus
    finally:
        sys.path.remove(str(BENCH / "scale"))
    return synthetic_corpus


def test_synthetic_corpus_is_deterministic_100_word_passages_following_the_heaps_fit(tmp_path, monkeypatch):
    sc = _synthetic_corpus_module()
    from densepr.data import load_corpus

    corpus = sc.embedded_corpus()
    model, params = sc.fit(corpus)
    monkeypatch.setattr(sc, "CHUNK", 1000)  # 100,000 by default: smaller chunks, same properties, a faster test
    a, b, c, d = (tmp_path / f"{x}.tsv" for x in "abcd")
    sc.generate(model, 2000, a, seed=7, log=lambda m: None)
    loaded = load_corpus(a)
    assert len(loaded) == 2000 and loaded.ids == [str(i) for i in range(1, 2001)]
    assert all(len(t.split()) == 100 for t in loaded.texts) and all(1 <= len(t.split()) <= 3 for t in loaded.titles)
    sc.generate(model, 2000, b, seed=7, log=lambda m: None)
    sc.generate(model, 1500, c, seed=7, log=lambda m: None)
    sc.generate(model, 2000, d, seed=8, log=lambda m: None)
    assert a.read_bytes() == b.read_bytes()  # deterministic for a seed
    assert a.read_text().splitlines()[:1501] == c.read_text().splitlines()  # a corpus is a prefix of a larger one
    assert load_corpus(d).texts != loaded.texts
    # the vocabulary (lower-cased words without edge punctuation) follows the Heaps fit within 5% at 200,000 tokens
    res = sc.check(a, corpus, model, params)
    last = res["growth"][-1]
    assert last["tokens"] == 200_000 and abs(last["vocabulary"] / last["heaps"] - 1) < 0.05, last
    assert params["calibration"]["max_abs_log_error"] < 0.05  # the expected vocabulary follows Heaps up to 2.1 billion tokens
    assert 1e6 < params["heaps_at_paper_size"]["vocabulary"] < 1e8  # Wikipedia-sized, not capped at the embedded corpus's
    # killed after its second chunk (of 500 here), a run continues where it stopped and writes the same file
    monkeypatch.setattr(sc, "CHUNK", 500)
    whole, cut = tmp_path / "whole.tsv", tmp_path / "cut.tsv"
    sc.generate(model, 2000, whole, seed=7, log=lambda m: None)

    def kill(msg):
        if msg.strip().startswith("1,000 /"):
            raise KeyboardInterrupt

    import pytest

    with pytest.raises(KeyboardInterrupt):
        sc.generate(model, 2000, cut, seed=7, log=kill)
    assert not cut.exists() and (tmp_path / "cut.tsv.partial").exists()
    logs = []
    sc.generate(model, 2000, cut, seed=7, log=logs.append)
    assert logs[0].startswith("resuming") and "after 2 chunks" in logs[0] and len(logs) == 3
    assert cut.read_bytes() == whole.read_bytes() and not (tmp_path / "cut.tsv.partial").exists()


def test_synthetic_corpus_cli_writes_and_checks(tmp_path):
    _synthetic_corpus_module()
    out, res = tmp_path / "p.tsv", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "synthetic_corpus.py", "--passages", "300", "--output", str(out), "--check", "--results", str(res)],
                          cwd=BENCH / "scale", capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(res.read_text())
    assert got["check"]["passages"] == 300 and got["params"]["heaps"]["beta"] > 0 and "vocabulary growth" in proc.stdout
    proc = subprocess.run([sys.executable, "synthetic_corpus.py", "--passages", "0", "--output", str(out)], cwd=BENCH / "scale", capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --passages must be positive")


GROUPS = ("retrieval", "reader", "training", "serving", "scale")


def test_every_benchmark_is_in_a_group_folder_and_listed_in_the_readme():
    readme = (BENCH / "README.md").read_text(encoding="utf-8")
    loose = sorted(p.name for p in BENCH.glob("*") if p.suffix in (".py", ".sh") and p.name != "common.py")
    assert not loose, f"benchmarks outside a group folder ({', '.join(GROUPS)}): {loose}"
    scripts = [p for g in GROUPS for p in (BENCH / g).glob("*") if p.suffix in (".py", ".sh")]
    assert len(scripts) > 20
    unlisted = sorted(str(p.relative_to(BENCH)) for p in scripts if f"]({p.relative_to(BENCH)})" not in readme)
    assert not unlisted, f"benchmarks/README.md does not list {unlisted}"


def test_every_benchmark_script_starts_from_the_repository_root():
    """``python benchmarks/<group>/<script>.py --help`` from the root: each finds common.py and its siblings.
    One process for all (torch imported once), each script with only its own folder first on sys.path, as
    ``python script.py`` has it, and the benchmark modules an earlier script imported forgotten."""
    code = f"""
import runpy, sys
from pathlib import Path
bench, failed = Path({str(BENCH)!r}), []
base_path, base_modules = list(sys.path), set(sys.modules)
for script in sorted(p for g in {GROUPS!r} for p in (bench / g).glob("*.py")):
    sys.path[:] = [str(script.parent), *base_path[1:]]
    sys.argv = [str(script), "--help"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            failed.append(f"{{script.name}}: exit {{e.code}}")
    except Exception as e:
        failed.append(f"{{script.name}}: {{type(e).__name__}}: {{e}}")
    for name in set(sys.modules) - base_modules:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(bench)):
            del sys.modules[name]
print("FAILED", failed)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=BENCH.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("FAILED []"), proc.stdout[-2000:]
