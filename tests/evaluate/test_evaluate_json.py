"""`densepr evaluate --json/--per-query`, trec_eval's tie-breaking for every metric, and qrels that match no query."""

from __future__ import annotations

import json
import random

import pytest

from densepr.data.runs import read_trec_run
from densepr.evaluate.qrels import qrels_metrics, qrels_per_query
from tests.support.cli import run

pytrec_eval = pytest.importorskip("pytrec_eval")


def _straddling_run(path, relevant_first: bool):
    """q1: nine passages above, then a relevant 'a' and an irrelevant 'b' tied at rank 10/11."""
    lines = [f"q1 Q0 d{i} {i} {20 - i}.0 t" for i in range(1, 10)]
    tied = ["q1 Q0 a 10 1.0 t", "q1 Q0 b 11 1.0 t"]
    path.write_text("\n".join(lines + (tied if relevant_first else tied[::-1])) + "\n")


@pytest.mark.parametrize("relevant_first", [True, False])
def test_a_tie_straddling_rank_10_is_broken_as_trec_eval_does_for_every_metric(tmp_path, relevant_first):
    """Was: nDCG@10 0.0 (pytrec_eval: docid 'b' > 'a' ranks b 10th) but MRR@10 0.1 (file order put 'a' 10th)."""
    _straddling_run(tmp_path / "run.trec", relevant_first)
    run_ = {q: dict(d) for q, d in read_trec_run(tmp_path / "run.trec").items()}
    assert [d for d, _ in read_trec_run(tmp_path / "run.trec")["q1"][9:]] == ["b", "a"]  # docid descending, whatever the file order
    qrels = {"q1": {"a": 1}}
    ours = qrels_metrics(run_, qrels, ("ndcg_cut_10", "mrr_10", "recall_10"))
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut", "recall", "recip_rank"}).evaluate(run_)["q1"]
    assert ours["ndcg_cut_10"] == ref["ndcg_cut_10"] == 0.0
    assert ours["recall_10"] == ref["recall_10"] == 0.0
    assert ours["mrr_10"] == 0.0 and ref["recip_rank"] == pytest.approx(1 / 11)


def test_metrics_match_pytrec_eval_on_random_runs_full_of_ties():
    """MRR@10 is pytrec_eval's reciprocal rank where the first relevant passage is in its top 10, else 0."""
    rng = random.Random(0)
    docs = [f"d{i:02d}" for i in range(40)]
    run_ = {f"q{q}": {d: float(rng.randint(0, 4)) for d in rng.sample(docs, 25)} for q in range(30)}
    qrels = {f"q{q}": {d: rng.randint(1, 2) for d in rng.sample(docs, 3)} for q in range(30)}
    ours = qrels_per_query(run_, qrels, ("ndcg_cut_10", "recall_20", "mrr_10"))
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut", "recall", "recip_rank"}).evaluate(run_)
    for q in qrels:
        assert ours[q]["ndcg_cut_10"] == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-12)
        assert ours[q]["recall_20"] == pytest.approx(ref[q]["recall_20"], abs=1e-12)
        rr = ref[q]["recip_rank"]
        assert ours[q]["mrr_10"] == pytest.approx(rr if rr >= 0.1 - 1e-12 else 0.0, abs=1e-12), q


def test_evaluate_qrels_json_and_per_query(tmp_path, capsys):
    _straddling_run(tmp_path / "run.trec", True)
    with open(tmp_path / "run.trec", "a") as fh:
        fh.write("q2 Q0 x 1 3.0 t\nq2 Q0 y 2 2.0 t\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta\t1\nq2\ty\t1\nq3\tz\t1\n")
    args = ("evaluate", str(tmp_path / "run.trec"), "--qrels", str(tmp_path / "qrels.tsv"), "--json", "--per-query")
    code, out, err = run(capsys, *args, "-o", str(tmp_path / "res.json"))
    assert code == 0, err
    got = json.loads(out)  # stdout is the JSON alone
    assert got == json.loads((tmp_path / "res.json").read_text())
    assert got["metric"] == "qrels" and got["judged"] == 3 and got["in_run"] == 2 and "docid descending" in got["tie_break"]
    assert got["per_query"]["q1"]["mrr_10"] == 0.0 and got["per_query"]["q2"]["mrr_10"] == 0.5
    assert got["per_query"]["q3"] == {"ndcg_cut_10": 0.0, "recall_20": 0.0, "recall_100": 0.0, "mrr_10": 0.0}  # judged, not run
    for m, v in got["metrics"].items():
        assert v == pytest.approx(sum(p[m] for p in got["per_query"].values()) / 3)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run.trec"), "--qrels", str(tmp_path / "qrels.tsv"), "--json")
    assert code == 0 and "per_query" not in json.loads(out)


def test_evaluate_topk_json_and_per_query(tmp_path, capsys):
    ctx = lambda i, text: {"id": str(i), "title": "t", "text": text, "score": 10.0 - i}  # noqa: E731
    recs = [{"question": "capital of france", "answers": ["Paris"], "ctxs": [ctx(1, "Berlin is big"), ctx(2, "Paris is the capital")]},
            {"question": "capital of spain", "answers": ["Madrid"], "ctxs": [ctx(1, "Madrid, Spain"), ctx(2, "Rome")]},
            {"question": "capital of peru", "answers": ["Lima"], "ctxs": [ctx(1, "Quito"), ctx(2, "Bogota")]}]  # fmt: skip
    (tmp_path / "res.json").write_text(json.dumps(recs))
    code, out, err = run(capsys, "evaluate", str(tmp_path / "res.json"), "--ks", "1,2", "--json", "--per-query")
    assert code == 0, err
    got = json.loads(out)
    assert got["metric"] == "topk" and got["ks"] == [1, 2] and got["set"] == "res.json"
    assert got["all"] == {"n": 3, "top1": 33.33, "top2": 66.67}
    assert got["per_query"] == [{"qid": "0", "first_hit": 2, "top1": 0, "top2": 1}, {"qid": "1", "first_hit": 1, "top1": 1, "top2": 1},
                                {"qid": "2", "first_hit": None, "top1": 0, "top2": 0}]  # fmt: skip
    code, out, err = run(capsys, "evaluate", str(tmp_path / "res.json"), "--per-query")
    assert code == 1 and "--per-query needs --json or --output" in err


def test_qrels_sharing_no_query_with_the_run_is_an_error_naming_both_files(tmp_path, capsys):
    """Was: every metric 0.0000 and exit 0."""
    (tmp_path / "run.trec").write_text("q1 Q0 a 1 1.0 t\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n101\ta\t1\n")
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run.trec"), "--qrels", str(tmp_path / "qrels.tsv"))
    assert code == 1 and out == ""
    line = err.strip()
    assert "\n" not in line and "run.trec" in line and "qrels.tsv" in line and "share no query id" in line


def test_evaluate_trec_run_topk_json_ranks_ties_as_trec_eval(tmp_path, capsys):
    """A TREC run judged for top-k accuracy: tied passages in trec_eval's order (docid descending), not the file's."""
    from densepr.data import Passage, write_passages_tsv

    write_passages_tsv([Passage("1", "Paris", "Paris is the capital of France"), Passage("2", "Rome", "Rome is in Italy"),
                        Passage("3", "X", "nothing here")], tmp_path / "passages.tsv")  # fmt: skip
    (tmp_path / "qa.tsv").write_text("capital of france\t['Paris']\nwhere is rome\t['Italy']\nmars\t['Olympus']\n")
    (tmp_path / "run.trec").write_text("0 Q0 1 1 2.0 t\n0 Q0 3 2 2.0 t\n1 Q0 2 1 5.0 t\n")  # q0: '1' listed first, tied with '3'
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run.trec"), "--qa", str(tmp_path / "qa.tsv"), "--index", str(tmp_path),
                         "--ks", "1,2", "--json", "--per-query")  # fmt: skip
    assert code == 0, err
    got = json.loads(out)
    assert got["all"] == {"n": 3, "top1": 33.33, "top2": 66.67} and got["answerable"] == {"n": 2, "top1": 50.0, "top2": 100.0}
    assert [(q["qid"], q["first_hit"], q["answerable"]) for q in got["per_query"]] == [("0", 2, True), ("1", 1, True), ("2", None, False)]
