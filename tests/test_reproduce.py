"""The main job's regression check and lambda tuning (the full job itself runs in CI as a smoke run)."""

from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
import pytest

from densepr.data import load_qa
from densepr.evaluate.answers import AnswerMatcher
from densepr.evaluate.topk import topk_curve
from densepr.evaluate.tuning import tune_lambda
from densepr.fileio.atomic import read_json
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import encode_corpus
from densepr.models.encoder import Encoder
from densepr.reproduce import ReproduceConfig, check_against, expected_entry, load_expected, reader_recipe_changed, uses_defaults
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


def test_check_against_end_to_end_em():
    def with_qa(em: float) -> dict:
        per_k = {"1": {"em": em, "em_answerable": em + 5}, "20": {"em": em + 1, "em_answerable": em + 5}}
        return {**_summary(20.0), "date": "d", "machine": {}, "config": {},
                "qa": {"sets": {"nq-test": {"modes": {"dense": {"k": per_k, "fused": {"k": per_k}}}}}}}  # fmt: skip

    entry = expected_entry(with_qa(10.0), 0.5, 3.0)
    assert entry["qa_tolerance"] == 3.0 and entry["qa"]["nq-test dense fused @20 all"] == 11.0 and len(entry["qa"]) == 8
    expected = {"dpr": entry}
    assert check_against(with_qa(12.0), expected, "dpr") == []
    problems = check_against(with_qa(14.0), expected, "dpr")
    assert "qa nq-test dense paper @1 all: 14.0 vs committed 10.0 (tolerance ±3.0)" in problems and len(problems) == 8
    assert len(check_against(_summary(20.0), expected, "dpr")) == 8  # the reader stages did not run: every EM missing
    assert "qa" not in expected_entry({**_summary(20.0), "date": "d", "machine": {}, "config": {}}, 0.5)  # a run without a reader commits no EM
    # EM recorded with another reader recipe measures another reader: left unchecked (and said so), retrieval still checked
    recorded = {"dpr": expected_entry({**with_qa(10.0), "config": {"reader": {"epochs": 1}}}, 0.5, 3.0)}
    other = {**with_qa(14.0), "config": {"reader": {"epochs": 3}}}
    assert reader_recipe_changed(other, recorded, "dpr") and check_against(other, recorded, "dpr") == []
    same = {**with_qa(14.0), "config": {"reader": {"epochs": 1}}}
    assert not reader_recipe_changed(same, recorded, "dpr") and len(check_against(same, recorded, "dpr")) == 8
    # a config recorded before a ReaderPlan field existed trained that field's earlier value (READER_PLAN_BEFORE)
    legacy = {"dpr": expected_entry({**with_qa(10.0), "config": {"reader": {"lr": 1e-4}}}, 0.5, 3.0)}
    assert not reader_recipe_changed({**same, "config": {"reader": {"lr": 1e-4, "head_lr": None, "span_loss": "dpr", "epochs": 1}}}, legacy, "dpr")
    assert reader_recipe_changed({**same, "config": {"reader": {"lr": 1e-4, "head_lr": 1e-3, "span_loss": "dpr", "epochs": 1}}}, legacy, "dpr")
    # DPR's span loss has one name, "positive" (train/reader.py); "dpr", reproduce's old name for it, is the same loss
    assert not reader_recipe_changed({**same, "config": {"reader": {"lr": 1e-4, "head_lr": None, "span_loss": "positive", "epochs": 1}}}, legacy, "dpr")
    other["results"]["nq-test"]["methods"]["bm25"]["all"]["top20"] = 25.0
    assert check_against(other, recorded, "dpr") == ["nq-test bm25 all top20: 25.0 vs committed 20.0 (tolerance ±0.5)"]


def test_the_regression_check_policy_compares_only_default_runs_unless_given_figures_and_records_per_profile(tmp_path):
    """The policy `densepr reproduce --check/--write-expected` applies, in the library (it was in cli.py)."""
    from densepr.reproduce import PROFILES, record_expected, regression_check

    summary = {**_summary(21.5), "date": "d", "machine": {}, "config": {}}
    figures = tmp_path / "expected.json"
    record_expected({**_summary(20.0), "date": "d", "machine": {}, "config": {}}, figures, "smoke")
    record_expected(summary, figures, "full", tolerance=2.0)
    recorded = load_expected(figures)
    assert recorded["smoke"]["tolerance"] == PROFILES["smoke"].tolerance and recorded["full"]["tolerance"] == 2.0  # both kept
    # another setup than the embedded defaults: not compared with the packaged figures, but with explicitly given ones
    custom = ReproduceConfig(profile="smoke", k=50)
    assert not regression_check(summary, custom).compared
    found = regression_check(summary, custom, figures)
    assert found.compared and not found.em_unchecked
    assert found.problems == ("nq-test bm25 all top20: 21.5 vs committed 20.0 (tolerance ±1.0)",)
    assert regression_check(summary, ReproduceConfig(profile="full", k=50), figures).problems == ()

def test_packaged_expected_figures_cover_the_profiles_ci_and_the_readme_run():
    from densepr.reproduce import PROFILES

    expected = load_expected()
    for profile in ("full", "smoke", "dpr-smoke", *(["dpr"] if "dpr" in expected else [])):
        entry = expected[profile]
        assert set(entry["results"]) == {"nq-test", "trivia-test", "wq-test", "curated-test", "squad-test"}
        assert entry["tolerance"] > 0 and entry["config"]["profile"] == profile
        if PROFILES[profile].reader is not None:  # the reader stages' end-to-end EM is committed and checked too
            rp = PROFILES[profile].reader
            per_rule = 5 * len(rp.modes) * len(rp.ks) * 2  # sets x modes x k x (all, answerable); fused rows where tuned
            assert per_rule <= len(entry["qa"]) <= 2 * per_rule and all(f"{ds} dense paper @1 all" in entry["qa"] for ds in entry["results"])
            assert entry["config"]["reader"]["ks"] == list(rp.ks)
    # CI's profile must keep its EM checked: its committed figures were recorded with its reader recipe
    from dataclasses import asdict

    assert not reader_recipe_changed({"config": {"reader": asdict(PROFILES["dpr-smoke"].reader)}}, expected, "dpr-smoke")


def test_only_default_runs_are_compared():
    assert uses_defaults(ReproduceConfig(profile="smoke"))
    assert not uses_defaults(ReproduceConfig(encoder="/some/checkpoint"))


def test_qa_limit_overrides_the_reader_plan_and_is_not_compared_with_the_defaults():
    from densepr.cli import parse_qa_limit
    from densepr.errors import DenseprError

    default = ReproduceConfig(profile="dpr")
    assert default.reader is not None and default.reader.qa_limit == 100 and uses_defaults(default)
    every = ReproduceConfig(profile="dpr", qa_limit=parse_qa_limit("all"))
    assert every.reader.qa_limit is None and not uses_defaults(every)
    assert ReproduceConfig(profile="dpr-smoke", qa_limit=parse_qa_limit("7")).reader.qa_limit == 7
    assert ReproduceConfig(profile="full").reader is None
    for bad in ({"profile": "full", "qa_limit": 5}, {"profile": "dpr", "qa_limit": 0}):
        with pytest.raises(DenseprError, match="qa-limit"):
            ReproduceConfig(**bad)
    with pytest.raises(DenseprError, match="'some'"):
        parse_qa_limit("some")


def test_read_precision_overrides_the_reader_plan_and_only_a_non_default_one_enters_the_qa_fingerprint(tmp_path):
    import densepr.reproduce as rp
    from densepr.data.qa import QA, QASet
    from densepr.errors import DenseprError

    assert ReproduceConfig(profile="dpr").reader.read_precision == "fp32"
    half = ReproduceConfig(profile="dpr", read_precision="bf16")
    assert half.reader.read_precision == "bf16" and not uses_defaults(half)
    for bad, message in (({"profile": "full", "read_precision": "bf16"}, "profiles with a reader"),
                         ({"profile": "dpr", "read_precision": "fp16"}, "fp32, bf16, auto")):  # fmt: skip
        with pytest.raises(DenseprError, match=message):
            ReproduceConfig(**bad)
    qas = QASet("set-a", [QA("who wrote hamlet", ("Shakespeare",))])
    settings = {p: rp.reading.qa(rp.Job(ReproduceConfig(out_dir=tmp_path, profile="dpr", read_precision=p), lambda m: None, False), qas).fingerprinted
                for p in ("fp32", "bf16")}  # fmt: skip
    assert "precision" not in settings["fp32"] and settings["bf16"]["precision"] == "bf16"  # float32 runs keep their records
    # a summary recorded before the field existed read in float32: its EM is still compared
    summary = {"config": {"reader": asdict(ReproduceConfig(profile="dpr").reader)}}
    recorded = {k: v for k, v in summary["config"]["reader"].items() if k != "read_precision"}
    assert not rp.reader_recipe_changed(summary, {"dpr": {"config": {"reader": recorded}}}, "dpr")


def test_train_precision_reaches_both_trainers_and_only_a_non_default_one_enters_their_fingerprints(tmp_path):
    import densepr.reproduce as rp
    from densepr.errors import DenseprError

    assert ReproduceConfig(profile="dpr").plan.precision == "fp32"
    half = ReproduceConfig(profile="dpr", train_precision="bf16")
    assert half.plan.precision == "bf16" and not uses_defaults(half)  # not compared with the committed float32 figures
    for bad, message in (({"profile": "full", "train_precision": "bf16"}, "training profiles"),
                         ({"profile": "dpr", "train_precision": "fp16"}, "fp32, bf16, auto")):  # fmt: skip
        with pytest.raises(DenseprError, match=message):
            ReproduceConfig(**bad)
    stages = {}
    for p in ("fp32", "bf16"):
        job = rp.Job(ReproduceConfig(out_dir=tmp_path, profile="dpr", train_precision=p), lambda m: None, False)
        stages[p] = rp.training.train(job, "round1", "mine", 1, 1)
        assert stages[p].settings["precision"] == p and rp.reading.train_reader(job).settings["precision"] == p
    assert "precision" not in stages["fp32"].fingerprinted and stages["bf16"].fingerprinted["precision"] == "bf16"
    assert ReproduceConfig(profile="dpr", reader_epochs=2).reader.epochs == 2 and ReproduceConfig(profile="dpr").reader.epochs == 3
    for bad, message in (({"profile": "full", "reader_epochs": 2}, "profiles with a reader"), ({"profile": "dpr", "reader_epochs": 0}, "positive")):
        with pytest.raises(DenseprError, match=message):
            ReproduceConfig(**bad)
    reader_only = ReproduceConfig(profile="dpr", reader_train_precision="bf16")
    assert reader_only.plan.precision == "fp32" and reader_only.reader.train_precision == "bf16" and not uses_defaults(reader_only)
    for bad, message in (({"profile": "full", "reader_train_precision": "bf16"}, "profiles with a reader"),
                         ({"profile": "dpr", "reader_train_precision": "fp16"}, "fp32, bf16, auto")):  # fmt: skip
        with pytest.raises(DenseprError, match=message):
            ReproduceConfig(**bad)


def test_gradient_caching_is_a_training_setting_still_checked_against_the_committed_figures():
    import densepr.reproduce as rp
    from densepr.errors import DenseprError

    default, cached = ReproduceConfig(profile="dpr"), ReproduceConfig(profile="dpr", grad_cache_chunk=8)
    assert default.plan.grad_cache_chunk == 0 and cached.plan.grad_cache_chunk == 8
    # it reaches every training run's settings (so its fingerprint), and the default's settings are unchanged
    assert rp.training._plan_settings(cached.plan, 1, 1)["grad_cache_chunk"] == 8
    assert rp.training._placeholder_config(default.plan, 1, 1).grad_cache_chunk == 0
    # the same loss computed in pieces: the run is still compared with the committed figures
    assert uses_defaults(cached) and not uses_defaults(ReproduceConfig(profile="dpr", round2_init="initial"))
    for bad in ({"profile": "full", "grad_cache_chunk": 8}, {"profile": "dpr", "grad_cache_chunk": -1}):
        with pytest.raises(DenseprError, match="grad-cache-chunk"):
            ReproduceConfig(**bad)


def test_epochs_are_training_settings_and_a_run_with_other_epochs_is_not_checked_against_the_defaults():
    import densepr.reproduce as rp
    from densepr.errors import DenseprError

    longer = ReproduceConfig(profile="dpr", epochs=3, round2_epochs=2)
    assert (longer.plan.epochs, longer.plan.round2_epochs) == (3, 2) and longer.plan.round2() == (2, "round1")
    assert ReproduceConfig(profile="dpr", epochs=3, round2_init="initial").plan.round2() == (3, None)
    assert rp.training._plan_settings(longer.plan, 1, longer.plan.epochs)["epochs"] == 3
    # other epochs give other figures: not compared with the committed ones
    assert uses_defaults(ReproduceConfig(profile="dpr")) and not uses_defaults(longer)
    assert not uses_defaults(ReproduceConfig(profile="dpr", round2_epochs=2))
    for bad, flag in (({"profile": "full", "epochs": 3}, "--epochs"), ({"profile": "dpr", "epochs": 0}, "--epochs"),
                      ({"profile": "dpr", "round2_epochs": -1}, "--round2-epochs")):  # fmt: skip
        with pytest.raises(DenseprError, match=flag):
            ReproduceConfig(**bad)


def test_a_machine_short_of_memory_is_told_how_to_fit_the_training():
    import densepr.reproduce as rp

    plan = ReproduceConfig(profile="dpr").plan
    notice = rp.memory_notice(plan, 7.5)
    assert notice is not None and "7.5 GiB" in notice and "--grad-cache-chunk 8" in notice
    assert rp.memory_notice(plan, plan.full_graph_peak_gib + 1) is None
    assert rp.memory_notice(ReproduceConfig(profile="dpr", grad_cache_chunk=8).plan, 1.0) is None
    assert rp.memory_notice(ReproduceConfig(profile="dpr-smoke").plan, 1.0) is None  # batch 8: no measured peak to warn about
    assert rp.memory_notice(None, 1.0) is None and rp.memory_notice(plan, None) is None
    available = rp.available_memory_gib()
    assert available is None or available > 0
    assert rp.training.trains_on_cpu("cpu") and not rp.training.trains_on_cpu("cuda")  # on a GPU the activations are not in host memory


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
        from pathlib import Path

        return load_qa(spec, limit=limit) if Path(spec).is_file() else load_qa(self._qa, name=spec, limit=limit)


def _tiny_job(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    import densepr.reproduce as rp

    data = _TinyData(tmp_path, corpus, qa_tsv, tiny_bert)
    monkeypatch.setattr(rp.context, "EmbeddedData", lambda cache_dir=None: data)
    monkeypatch.setattr(rp.main, "fetch_embedded", lambda *a, **kw: None)
    monkeypatch.setattr(rp.retrieval, "load_wiki_summaries", lambda path: corpus)
    monkeypatch.setattr(rp.report, "plot_topk", lambda curves, path, *a: path.write_bytes(b"png"))

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


def test_later_stages_read_the_passages_through_the_store(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    """The passages stage hands the stages after it out/store/ (built beside passages.tsv), not passages.tsv
    parsed whole, in the run that writes it and in a run that finds it current (issue 34)."""
    from densepr.data import Corpus, StoreCorpus

    job = _tiny_job(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert)
    built, real_build = [], BM25Index.build
    monkeypatch.setattr(BM25Index, "build", lambda c, *a, **k: built.append(c) or real_build(c, *a, **k))
    first, _ = job()
    assert [type(c) for c in built] == [StoreCorpus] and len(built[0]) == len(corpus)
    assert built[0].fingerprint() == corpus.fingerprint() and (tmp_path / "out" / "store" / "manifest.json").is_file()
    monkeypatch.setattr(Corpus, "from_passages", classmethod(lambda *a, **k: pytest.fail("passages.tsv was parsed whole")))
    second, ran = job(force_from="bm25")  # a later run: the passages stage is current, its corpus loaded
    assert ran["passages"] == "skipped" and ran["bm25"] == "ran" and type(built[1]) is StoreCorpus
    assert second["results"] == first["results"]


def test_the_main_job_on_a_fresh_machine_fetches_before_it_needs_the_model(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    """Nothing fetched yet: the job must not look the embedded model up before its fetch step has run."""
    import densepr.reproduce as rp
    from densepr.errors import DenseprError

    class Unfetched(_TinyData):
        fetched = False

        @property
        def model_dir(self):
            if not self.fetched:
                raise DenseprError("the embedded benchmark is not fetched")
            return self._model

        @model_dir.setter
        def model_dir(self, path):
            self._model = path

    data = Unfetched(tmp_path, corpus, qa_tsv, tiny_bert)
    job = _tiny_job(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert)
    monkeypatch.setattr(rp.context, "EmbeddedData", lambda cache_dir=None: data)
    monkeypatch.setattr(rp.main, "fetch_embedded", lambda *a, **kw: setattr(data, "fetched", True))
    summary, ran = job()
    assert data.fetched and ran["fetch"] == "always" and ran["dense"] == "ran"
    assert summary["results"]["set-a"]["methods"]["dense"]["all"]["top20"] >= 0


def _tiny_dpr(setattr, setitem, root, corpus, qa_tsv, model_dir, reader_kw=None, **plan_kw):
    """Profile ``dpr-tiny``: the training experiment on the test corpus, QA file and tiny BERT."""
    import densepr.reproduce as rp

    kw = dict(batch_size=2, val_fraction=0.34, epochs=1, round2_epochs=1, max_steps=2, warmup_steps=1, save_every=1, depth=12, mined_hard=3)
    plan = rp.TrainPlan(**{**kw, **plan_kw})
    reader = rp.ReaderPlan(**{**dict(depth=6, passages=2, batch_size=2, max_steps=2, max_length=96, warmup_steps=1, save_every=1, dev_limit=3,
                                     tune_limit=None, qa_limit=None, ks=(1, 3)), **(reader_kw or {})})  # fmt: skip
    setitem(rp.PROFILES, "dpr-tiny", rp.Profile(None, None, corpus_limit=10, train=plan, reader=reader))
    data = _TinyData(root, corpus, qa_tsv, model_dir)
    setattr(rp.context, "EmbeddedData", lambda cache_dir=None: data)
    setattr(rp.main, "fetch_embedded", lambda *a, **kw: None)
    setattr(rp.retrieval, "load_wiki_summaries", lambda path: corpus)
    setattr(rp.report, "plot_topk", lambda curves, path, *a: path.write_bytes(b"png"))
    return lambda out, **kw: rp.ReproduceConfig(out_dir=out, profile="dpr-tiny", datasets=("set-a",), k=5, depth=12, device="cpu", **kw)


def test_the_dpr_profile_trains_remines_and_evaluates_every_model(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    """Profile dpr end to end on the tiny corpus: mining, three trainings, re-mining, five indexes, the paper-style report."""
    import densepr.reproduce as rp
    from densepr.data import load_corpus

    config = _tiny_dpr(monkeypatch.setattr, monkeypatch.setitem, tmp_path, corpus, qa_tsv, tiny_bert)
    out = tmp_path / "out"

    def job(**kw):
        summary = rp.run(config(out, **kw), log=lambda m: None)
        return summary, {r["stage"]: r["status"] for r in summary["stages"]}

    first, ran = job()
    retrieval = rp.DPR_STAGES[: rp.DPR_STAGES.index("evaluate")]
    reader = ["reader-data", "train-reader", "tune-reader", "qa-set-a"]
    assert [s for s, status in ran.items() if status == "ran"] == [*retrieval, "evaluate-set-a", *reader, "report"]
    assert len(load_corpus(out / "passages.tsv")) == 10  # the profile's corpus limit
    methods = first["results"]["set-a"]["methods"]
    assert list(methods) == [str(m) for m in rp.DPR_METHODS]
    # each model is a real, different training run; round 2 started from round 1's weights on re-mined data
    cfg2 = read_json(out / "models" / "round2" / "config.json")
    assert cfg2["init"] == str(out / "models" / "round1" / "best") and cfg2["train_file"].endswith("round2.json")
    assert read_json(out / "models" / "inbatch" / "config.json")["hard_negatives"] == 0
    assert first["training"]["mined"]["remine"]["positive_from"].get("model", 0) > 0
    assert {m: r["steps"] for m, r in first["training"]["runs"].items()} == {"inbatch": 2, "round1": 2, "round2": 2}
    # the output directory's dense/ is round 2's index: search uses the trained retriever out of the box
    manifest = read_json(out / "dense" / "manifest.json")
    assert manifest["question_encoder"].startswith(str((out / "models" / "round2" / "best").resolve()))
    r = Retriever.load(out, device="cpu")
    assert r.modes == ["bm25", "dense", "hybrid", "rrf"] and r.search("who wrote hamlet", k=3)
    report = (out / "results.md").read_text()
    assert "laid out like the paper's Table 2" in report and "DPR, + re-mined hard negatives (round 2)" in report
    assert "round 2 (re-mined)" in report
    # the reader: trained on the trained retriever's results for the non-held-out questions, tuned, read end to end
    held = {q.question for q in load_qa(out / "train-data" / "train-dev.qa.tsv").items}
    reader_cfg = read_json(out / "models" / "reader" / "config.json")
    assert reader_cfg["holdout"] == [str(out / "train-data" / "train-dev.qa.tsv")] and reader_cfg["max_steps"] == 2
    assert held and {r["question"] for r in read_json(out / "reader-data" / "heldout.json")} == held
    tuned = read_json(out / "reader" / "densepr_reader.json")["selection"]
    assert set(tuned) == {"dense", "bm25"} and all(t["k"] in (1, 3) for t in tuned.values())
    qa = first["qa"]["sets"]["set-a"]
    assert qa["n_all"] == len(load_qa(out.parent / "qa.tsv").items) and set(qa["modes"]) == {"dense", "bm25"}
    assert set(qa["modes"]["dense"]["k"]) == {"1", "3"} and "End to end: exact match" in report
    assert (out / "qa-em.png").stat().st_size > 0
    assert not (out / "stages" / "qa-set-a.partial").exists()  # its pieces of readings went once it was recorded
    # a second run skips everything; --from train-round2 reruns round 2 and what follows, not round 1
    second, ran = job()
    assert {s for s, status in ran.items() if status == "ran"} == set() and second["results"] == first["results"]
    _, ran = job(force_from="train-round2")
    after = ["train-round2", "dense", "tune", "evaluate-set-a", *reader, "report"]
    assert [s for s, status in ran.items() if status == "ran"] == after
    _, ran = job(force_from="qa")  # the reader's own stages: only the end-to-end reading and the report
    assert [s for s, status in ran.items() if status == "ran"] == ["qa-set-a", "report"]
    # round 2 from the initial weights is a setting: round 2 and later rerun
    third, ran = job(round2_init="initial")
    assert [s for s, status in ran.items() if status == "ran"] == after
    assert read_json(out / "models" / "round2" / "config.json")["init"] == str(tiny_bert)
    # gradient caching (--grad-cache-chunk) is a training setting: every model retrains with it, mining does not rerun
    _, ran = job(round2_init="initial", grad_cache_chunk=2)
    assert [s for s, status in ran.items() if status == "ran"][:2] == ["train-inbatch", "dense-inbatch"] and ran["mine"] == "skipped"
    assert all(read_json(out / "models" / m / "config.json")["grad_cache_chunk"] == 2 for m in ("inbatch", "round1", "round2"))
    # --round2-epochs reruns round 2 and what follows, round 1 stays
    _, ran = job(grad_cache_chunk=2, round2_epochs=2)
    assert ran["train-round1"] == "skipped" and [s for s, status in ran.items() if status == "ran"] == after
    assert read_json(out / "models" / "round2" / "config.json")["epochs"] == 2


def test_a_killed_training_stage_resumes_from_its_checkpoint(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    import densepr.reproduce as rp
    import densepr.train.retriever as tr

    config = _tiny_dpr(monkeypatch.setattr, monkeypatch.setitem, tmp_path, corpus, qa_tsv, tiny_bert, max_steps=3)
    real_train, calls = tr.train, []

    def killed_in_round1(cfg, resume=False, **kw):
        calls.append((cfg.output_dir.split("/")[-1], resume))
        if cfg.output_dir.endswith("round1") and not resume:
            real_train(cfg, resume=resume, stop_after=2, **kw)  # two steps, checkpointed, then "killed"
            raise KeyboardInterrupt
        return real_train(cfg, resume=resume, **kw)

    monkeypatch.setattr(tr, "train", killed_in_round1)
    cfg = config(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        rp.run(cfg, log=lambda m: None)
    assert not (tmp_path / "out" / "stages" / "train-round1.json").exists()
    summary = rp.run(cfg, log=lambda m: None)
    assert ("round1", True) in calls  # continued from its checkpoint, not restarted
    ran = {r["stage"]: r["status"] for r in summary["stages"]}
    assert ran["train-inbatch"] == "skipped" and ran["train-round1"] == "ran"
    assert summary["training"]["runs"]["round1"]["steps"] == 3


def test_stages_killed_before_their_first_checkpoint_start_over_when_run_again(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    """Issue 33, item 2: `reproduce --profile dpr` killed in train-inbatch before its first checkpoint, run again, stopped
    with "no checkpoint to resume from". Here each training stage (retriever, cloze pre-training, reader) is killed in turn
    while its first checkpoint is written (config.json there, no checkpoint); each rerun goes on, and the last ends with
    an uninterrupted run's figures."""
    import densepr.reproduce as rp
    import densepr.train.reader as trd
    import densepr.train.retriever as tr
    from densepr.data import Corpus, Passage

    cloze = " The Treaty of Paris was signed in 1783 by Britain. Britain had lost 13 colonies by 1783."  # cloze questions' matter
    corpus = Corpus.from_passages(Passage(i, t, x + cloze * (n < 4)) for n, (i, t, x) in enumerate(zip(corpus.ids, corpus.titles, corpus.texts)))
    config = _tiny_dpr(monkeypatch.setattr, monkeypatch.setitem, tmp_path, corpus, qa_tsv, tiny_bert, reader_kw={"cloze": 8})
    straight = rp.run(config(tmp_path / "straight"), log=lambda m: None)
    kill: set[str] = set()

    def killed_at_first_checkpoint(real):
        def save(directory, *a, **kw):
            if directory.parent.name in kill and not directory.exists():
                kill.discard(directory.parent.name)
                (directory.parent / "checkpoint.tmp").mkdir()  # half written when the kill came
                raise KeyboardInterrupt
            return real(directory, *a, **kw)

        return save

    monkeypatch.setattr(tr, "save_checkpoint", killed_at_first_checkpoint(tr.save_checkpoint))
    monkeypatch.setattr(trd, "save_checkpoint", killed_at_first_checkpoint(trd.save_checkpoint))
    out = tmp_path / "out"
    for run_dir, stage in (("inbatch", "train-inbatch"), ("reader-cloze", "reader-cloze"), ("reader", "train-reader")):
        kill.add(run_dir)
        with pytest.raises(KeyboardInterrupt):
            rp.run(config(out), log=lambda m: None)
        assert not kill and (out / "models" / run_dir / "config.json").is_file() and not (out / "models" / run_dir / "checkpoint").exists()
        assert not (out / "stages" / f"{stage}.json").exists()
    logged: list[str] = []
    summary = rp.run(config(out), log=logged.append)
    ran = {r["stage"]: r["status"] for r in summary["stages"]}
    assert ran["train-inbatch"] == "skipped" and ran["reader-cloze"] == "skipped" and ran["train-reader"] == "ran"
    assert any("models/reader: the run stopped before its first checkpoint; starting it over" in m for m in logged), logged
    assert summary["results"] == straight["results"]
    for name, qa in straight["qa"]["sets"].items():  # the same end-to-end figures (times aside)
        assert summary["qa"]["sets"][name]["modes"] == qa["modes"] and summary["qa"]["sets"][name]["gold"] == qa["gold"]
    from safetensors.numpy import load_file

    for model in ("inbatch/best/question_encoder", "reader-cloze/final", "reader/best"):  # the same weights as uninterrupted runs
        a, b = (load_file(str(d / "models" / model / "model.safetensors")) for d in (tmp_path / "straight", out))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), model


def test_a_second_reproduce_run_into_the_same_directory_is_refused_until_the_first_ends(tmp_path):
    """Issue 33, item 14: two runs into one directory would overwrite each other's stages. A reproduce run holds a
    flock on its output directory; a second (here `densepr reproduce` itself, in another process) is refused at once,
    naming the directory and the first run's pid; once the first is killed, the directory is free again."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from densepr.fileio.dirs import dir_lock

    out, ready = tmp_path / "out", tmp_path / "ready"
    first = subprocess.Popen([sys.executable, "-c", f"""
import pathlib, time
import densepr.reproduce as rp
def fetch(*a, **kw):  # the first run is busy (holding its lock) until killed
    pathlib.Path({str(ready)!r}).write_text("x")
    time.sleep(600)
rp.main.fetch_embedded = fetch
rp.run(rp.ReproduceConfig(out_dir=pathlib.Path({str(out)!r}), profile="smoke"), log=lambda m: None)
"""], cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    try:
        t0 = time.monotonic()
        while not ready.exists():
            assert first.poll() is None and time.monotonic() - t0 < 120, "the first run never started"
            time.sleep(0.05)
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))  # the first run's own marks (stages/, its lock)
        second = subprocess.run([sys.executable, "-m", "densepr", "reproduce", "-o", str(out), "--profile", "smoke"],
                                capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
        assert second.returncode in (1, 2) and "Traceback" not in second.stderr, second.stderr
        assert f"error: {out}: another reproduce run is running in it (pid {first.pid} on " in second.stderr, second.stderr
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # the second run wrote nothing
        assert (out / ".densepr.lock").read_text().startswith(f"pid {first.pid} on ")  # nor took over the lock file
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with dir_lock(out, "reproduce run"):  # the kernel released the killed run's lock: a rerun may start
        pass


def _torchrun_worker(rank: int, world: int, port: int, root: str, qa_tsv: str, model_dir: str) -> None:
    import os
    from pathlib import Path

    import densepr.reproduce as rp
    from densepr.data import Corpus, Passage
    from tests.support.tiny import PASSAGES

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    corpus = Corpus.from_passages(Passage(str(i), t, x) for i, (t, x) in enumerate(PASSAGES, 1))
    config = _tiny_dpr(setattr, lambda d, k, v: d.__setitem__(k, v), Path(root), corpus, Path(qa_tsv), Path(model_dir), batch_size=4)
    summary = rp.run(config(Path(root) / "multi"), log=lambda m: None)
    assert (summary == {}) == (rank != 0)


@pytest.mark.slow  # two processes, each loading torch: ~1 min
def test_the_dpr_profile_under_torchrun_trains_on_every_process_and_matches_one_process(monkeypatch, tmp_path, corpus, qa_tsv):
    """``torchrun -m densepr reproduce --profile dpr`` in miniature: 2 gloo processes; training uses both (one global
    batch), everything else runs on rank 0; the trained weights equal a single process's on the same global batch."""
    import json

    import torch
    from safetensors.torch import load_file

    import densepr.reproduce as rp
    from tests.support.tiny import make_tiny_bert
    from tests.train.test_train import _free_port

    bert = make_tiny_bert(tmp_path / "bert", pooling="cls", dropout=0.0)  # no dropout: the two runs draw no random masks
    torch.multiprocessing.spawn(_torchrun_worker, args=(2, _free_port(), str(tmp_path), str(qa_tsv), str(bert)), nprocs=2, join=True)
    multi = tmp_path / "multi"
    records = sorted(p.stem for p in (multi / "stages").glob("*.json"))
    # every stage of the profile (with a reader) once, the per-set ones per set; reader-cloze is opt-in (off)
    per_set = {"evaluate": ["evaluate-set-a"], "qa": ["qa-set-a"], "reader-cloze": []}
    assert records == sorted(x for s in rp.DPR_STAGES for x in per_set.get(s, [s]))
    assert json.loads((multi / "models" / "round2" / "checkpoint" / "trainer_state.json").read_text())["world"] == 2
    config = _tiny_dpr(monkeypatch.setattr, monkeypatch.setitem, tmp_path, corpus, qa_tsv, bert, batch_size=4)
    rp.run(config(tmp_path / "single"), log=lambda m: None)
    for model in rp.DPR_MODELS:
        for tower in ("question_encoder", "passage_encoder"):
            a = load_file(str(multi / "models" / model / "best" / tower / "model.safetensors"))
            b = load_file(str(tmp_path / "single" / "models" / model / "best" / tower / "model.safetensors"))
            assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), (model, tower)
    assert read_json(multi / "results.json")["results"] == read_json(tmp_path / "single" / "results.json")["results"]


def test_cloze_pretraining_is_an_opt_in_reader_stage_that_train_reader_then_starts_from(monkeypatch, tmp_path, qa_tsv, tiny_bert):
    """``--reader-cloze N``: stage reader-cloze makes N cloze questions from the corpus and pre-trains the
    reader one epoch; train-reader starts from it. Off (the default), the reader's stages and fingerprints
    are what they were before the option existed."""
    import densepr.reproduce as rp
    from densepr.data.passages import Corpus, Passage
    from densepr.errors import DenseprError
    from densepr.evaluate.answers import has_answer
    from tests.support.tiny import PASSAGES

    # second sentences that repeat a name: what cloze questions are made from (the tiny corpus has none)
    extra = {"Wilhelm Röntgen": " In Munich, Röntgen held the chair of physics from 1900 to 1920.",
             "Python": " Guido van Rossum led the development of Python until 2018.",
             "Mount McKinley": " The name Denali was restored to the peak by the government in 2015."}  # fmt: skip
    corpus = Corpus.from_passages(Passage(str(i), t, x + extra.get(t, "")) for i, (t, x) in enumerate(PASSAGES, 1))
    config = _tiny_dpr(monkeypatch.setattr, monkeypatch.setitem, tmp_path, corpus, qa_tsv, tiny_bert)
    out = tmp_path / "out"

    def job(**kw):
        summary = rp.run(config(out, **kw), log=lambda m: None)
        return {r["stage"]: r["status"] for r in summary["stages"]}

    ran = job()
    assert "reader-cloze" not in ran and ran["train-reader"] == "ran"
    plain = read_json(out / "stages" / "train-reader.json")["fingerprint"]
    assert read_json(out / "models" / "reader" / "config.json")["init"] == str(tiny_bert)

    ran = job(reader_cloze=3)
    assert ran["reader-cloze"] == ran["train-reader"] == ran["tune-reader"] == "ran" and ran["train-round2"] == ran["reader-data"] == "skipped"
    made = read_json(out / "cloze" / "cloze.json")
    assert len(made) == 3 and all(r["ctxs"][0]["has_answer"] and has_answer(r["answers"], r["ctxs"][0]["text"]) for r in made)
    pre = read_json(out / "models" / "reader-cloze" / "config.json")
    assert pre["init"] == str(tiny_bert) and pre["epochs"] == 1 and pre["dev_file"] is None
    assert read_json(out / "models" / "reader" / "config.json")["init"] == str(out / "models" / "reader-cloze" / "final")
    assert read_json(out / "stages" / "train-reader.json")["settings"]["init"] == "reader-cloze"
    assert {s for s, status in job(reader_cloze=3).items() if status == "ran"} == set()  # current: nothing reruns

    ran = job()  # off again: the reader retrains from the embedded weights, with its old fingerprint
    assert "reader-cloze" not in ran and ran["train-reader"] == "ran"
    assert read_json(out / "stages" / "train-reader.json")["fingerprint"] == plain

    assert not rp.uses_defaults(rp.ReproduceConfig(profile="dpr", reader_cloze=8000))  # not compared with the committed figures
    assert rp.uses_defaults(rp.ReproduceConfig(profile="dpr", reader_cloze=0))
    for bad, message in (({"profile": "full", "reader_cloze": 5}, "profiles with a reader"), ({"profile": "dpr", "reader_cloze": -1}, "0 \\(off\\)")):
        with pytest.raises(DenseprError, match=message):
            rp.ReproduceConfig(**bad)
