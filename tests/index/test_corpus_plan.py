"""densepr index plan: the passages' and BM25's measured costs, fitted linearly and extrapolated."""

from __future__ import annotations

import pytest

from densepr.index import corpus_plan as cp


def costs(sizes, per, fixed=0.0):
    return {"sizes": sizes, "fits": {k: {**cp.fit(sizes, [fixed + per * n for n in sizes]), "sizes": sizes} for k, _, _ in cp.ROWS},
            "queries": [], "source": "test"}  # fmt: skip


def test_fit_recovers_a_line_and_one_size_goes_through_zero():
    f = cp.fit([1_000_000, 5_000_000], [3e9 + 500 * 1e6, 3e9 + 500 * 5e6])
    assert f["fixed"] == pytest.approx(3e9) and f["per_passage"] == pytest.approx(500)
    assert cp.fit([2_000], [1_000.0]) == {"fixed": 0.0, "per_passage": 0.5}
    # a line crossing zero above N = 0 (build seconds: 27 s at 1M, 610 s at 21M) is fitted through zero instead
    f = cp.fit([1_000_000, 5_000_000, 21_000_000], [27.0, 136.0, 610.0])
    assert f["fixed"] == 0.0 and 28e-6 < f["per_passage"] < 30e-6


def test_plan_scales_every_row_and_marks_extrapolations():
    c = costs([1_000_000, 5_000_000], per=700, fixed=1e8)
    rows = cp.corpus_plan(21_015_324, c)
    assert [r["key"] for r in rows] == [k for k, _, _ in cp.ROWS]
    assert all(r["value"] == pytest.approx(1e8 + 700 * 21_015_324) and r["extrapolated"] for r in rows)
    assert not any(r["extrapolated"] for r in cp.corpus_plan(5_000_000, c))
    assert cp.corpus_plan(10, {}) == []


def test_the_cli_prints_the_measured_corpus_costs(monkeypatch, capsys):
    from tests.test_cli import run

    monkeypatch.setattr(cp, "measured_costs", lambda: {**costs([1_000_000], per=1024.0), "queries": [
        {"passages": 1_000_000, "batched_top100_qps": 300.0, "one_at_a_time_qps": 250.0, "top100_p50_ms": 3.5, "lucene_one_thread_qps": 90.0}],
        "dense": [{"passages": 1_000_000, "args": "--type ivf-pq --pq-m 96 --rerank 10", "build_s": 96.0, "build_peak_bytes": 2**31,
                   "vectors_bytes": 1.5 * 2**30, "index_bytes": 0.125 * 2**30, "top100_p50_ms": 3.6, "recall_at_10": 1.0,
                   "serve_rss_bytes": 3 * 2**30, "serve_dense_p50_ms": 64.4, "serve_hybrid_p50_ms": 1114.4}]})  # fmt: skip
    code, out, err = run(capsys, "index", "plan", "--num-passages", "2097152")
    assert code == 0, err
    assert "passages and BM25 at 2,097,152 passages" in out and "2.0 GiB *" in out  # 1 KiB x 2M, beyond the 1M measured
    assert "BM25 queries" in out and "90" in out
    assert "a dense index beside them" in out and "--type ivf-pq" in out and "1.6 min" in out and "64 / 1,114 ms" in out
