"""The main job's regression check and lambda tuning (the full job itself runs in CI as a smoke run)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from densepr.data import load_qa
from densepr.evaluate.answers import AnswerMatcher
from densepr.evaluate.topk import topk_curve
from densepr.evaluate.tuning import tune_lambda
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import encode_corpus
from densepr.models.encoder import Encoder
from densepr.reproduce import ReproduceConfig, check_against, load_expected, uses_defaults
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.fusion import fuse_hybrid
from densepr.retrieve.retriever import Retriever


def _summary(top20: float) -> dict:
    rep = {"all": {"n": 10, "top1": 5.0, "top20": top20}, "answerable": {"n": 4, "top1": 12.5, "top20": 50.0}}
    return {"results": {"nq-test": {"n_all": 10, "n_answerable": 4, "methods": {"bm25": rep}}}}


def test_check_against_tolerance_and_counts():
    expected = {"smoke": {"tolerance": 0.5, **_summary(20.0)}}
    assert check_against(_summary(20.4), expected, "smoke") == []
    problems = check_against(_summary(21.0), expected, "smoke")
    assert problems == ["nq-test bm25 all top20: 21.0 vs committed 20.0 (tolerance ±0.5)"]
    changed = copy.deepcopy(_summary(20.0))
    changed["results"]["nq-test"]["n_answerable"] = 5
    assert "n_answerable 5 != committed 4" in check_against(changed, expected, "smoke")[0]
    assert check_against(_summary(20.0), expected, "full") == ["no committed figures for profile 'full'"]
    assert check_against({"results": {}}, expected, "smoke") == ["nq-test: not evaluated"]


def test_packaged_expected_figures_cover_both_profiles():
    expected = load_expected()
    for profile in ("full", "smoke"):
        entry = expected[profile]
        assert set(entry["results"]) == {"nq-test", "trivia-test", "wq-test", "curated-test", "squad-test"}
        assert entry["tolerance"] > 0 and entry["config"]["profile"] == profile


def test_only_default_runs_are_compared():
    assert uses_defaults(ReproduceConfig(profile="smoke"))
    assert not uses_defaults(ReproduceConfig(encoder="/some/checkpoint"))


def test_tune_lambda_picks_the_best_grid_point(corpus, qa_tsv, tiny_bert, tmp_path):
    enc = Encoder.load(tiny_bert, device="cpu")
    encode_corpus(enc, corpus, tmp_path / "emb")
    dense = DenseIndex.build(tmp_path / "emb")
    dense.bind(corpus)
    r = Retriever(corpus, BM25Index.build(corpus), dense, enc, depth=12)
    qas = load_qa(qa_tsv)
    m = AnswerMatcher(corpus.texts)
    grid = (0.0, 0.1, 1.0, 10.0)
    best, scores = tune_lambda(r, m, [qas], grid, k=1)
    both = r.retrieve_all(qas.questions, 12, ["bm25", "dense"])
    brute = {lam: round(100 * float(topk_curve(m.hits(fuse_hybrid(both["dense"], both["bm25"], lam, 1).rows, qas), 1)[-1]), 2) for lam in grid}
    assert scores == {str(k): v for k, v in brute.items()}
    assert scores[str(best)] == max(brute.values())
    assert best == min(lam for lam in grid if brute[lam] == max(brute.values()))
    assert np.isfinite(list(scores.values())).all()


@pytest.mark.data
@pytest.mark.slow  # the first run encodes 10k passages: minutes on a CPU
def test_smoke_profile_twice_skips_every_stage_the_second_time(embedded, tmp_path):
    from densepr.reproduce import STAGES, run

    cfg = ReproduceConfig(out_dir=tmp_path / "out", profile="smoke")
    first = run(cfg, log=lambda m: None)
    trec = {p.name: p.read_bytes() for p in (tmp_path / "out" / "runs").glob("*.trec")}
    second = run(ReproduceConfig(out_dir=tmp_path / "out", profile="smoke"), log=lambda m: None)
    assert second["results"] == first["results"]
    assert {r["stage"]: r["status"] for r in second["stages"] if r["status"] != "always"} == {r["stage"]: "skipped" for r in first["stages"] if r["status"] != "always"}
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "runs").glob("*.trec")} == trec
    assert check_against(second, load_expected(), "smoke") == []
    third = run(ReproduceConfig(out_dir=tmp_path / "out", profile="smoke", force_from="report"), log=lambda m: None)
    assert [r["stage"] for r in third["stages"] if r["status"] == "ran"] == ["report"] and "report" in STAGES


class _TinyData:
    """Stands in for the embedded benchmark: the test corpus, tiny_bert and one QA file under several names."""

    def __init__(self, root, corpus, qa_path, model_dir):
        self.summaries, self.model_dir, self._corpus, self._qa = root / "summaries.txt", model_dir, corpus, qa_path
        self.summaries.write_text("the test corpus")

    def resolve_qa(self, spec, limit=None, match=None):
        return load_qa(self._qa, name=spec, limit=limit)


def _tiny_job(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    import densepr.reproduce as rp

    data = _TinyData(tmp_path, corpus, qa_tsv, tiny_bert)
    monkeypatch.setattr(rp, "EmbeddedData", lambda cache_dir=None: data)
    monkeypatch.setattr(rp, "fetch_embedded", lambda *a, **kw: None)
    monkeypatch.setattr(rp, "load_wiki_summaries", lambda path: corpus)
    monkeypatch.setattr(rp, "plot_topk", lambda curves, path, *a: path.write_bytes(b"png"))

    def job(**kw):
        cfg = rp.ReproduceConfig(out_dir=tmp_path / "out", profile="smoke", datasets=("set-a", "set-b"), tune_sets=("dev",),
                                 k=5, depth=12, device="cpu", **kw)  # fmt: skip
        summary = rp.run(cfg, log=lambda m: None)
        return summary, {r["stage"]: r["status"] for r in summary["stages"]}

    return job


def test_the_main_job_skips_current_stages_and_reruns_from_a_stage(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    from densepr.reproduce import STAGES

    job = _tiny_job(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert)
    out = tmp_path / "out"
    first, ran = job()
    assert ran == {"fetch": "always", **dict.fromkeys(["passages", "bm25", "dense", "tune", "evaluate-set-a", "evaluate-set-b", "report"], "ran")}
    trec = {p.name: p.read_bytes() for p in (out / "runs").glob("*.trec")}
    assert len(trec) == 10 and (out / "results.md").is_file()
    second, ran = job()
    assert {s for s, status in ran.items() if status != "skipped"} == {"fetch"}
    assert second["results"] == first["results"] and second["config"] == first["config"]
    assert {p.name: p.read_bytes() for p in (out / "runs").glob("*.trec")} == trec
    assert set(second["timings_s"]) >= set(ran) | {"total"}
    # a flipped byte in one TREC run: that set's evaluation is rebuilt (same bytes again), nothing else
    run_file = out / "runs" / "set-b.dense.trec"
    data = bytearray(run_file.read_bytes())
    data[-2] ^= 1
    run_file.write_bytes(bytes(data))
    _, ran = job()
    assert {s for s, status in ran.items() if status == "ran"} == {"evaluate-set-b"}
    assert run_file.read_bytes() == trec["set-b.dense.trec"]
    # a changed setting of a stage reruns it and everything after it; --from forces
    _, ran = job(save_dpr_json=True)
    assert {s for s, status in ran.items() if status == "ran"} == {"evaluate-set-a", "evaluate-set-b", "report"}
    _, ran = job(save_dpr_json=True, force_from="tune")
    assert [s for s in ran if ran[s] == "ran"] == ["tune", "evaluate-set-a", "evaluate-set-b", "report"]
    assert STAGES.index("tune") < STAGES.index("evaluate") < STAGES.index("report")
