"""``densepr retrieve``, ``tune-hybrid``, ``evaluate`` and ``search``: rank passages and score the rankings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from densepr.cli.common import (
    _MODES,
    DEFAULT_INDEX,
    CacheOpt,
    DeviceOpt,
    IndexOpt,
    ModeOpt,
    RegexOpt,
    _check_output,
    _check_outputs_differ,
    _index,
    _load_qa,
    _log,
    out,
)
from densepr.errors import DenseprError
from densepr.retrieve.modes import Mode


def retrieve(
    qa: Annotated[Optional[str], typer.Option("--qa", help="QA file (DPR TSV, JSON lines or parquet) or an embedded set: nq-test, trivia-test, wq-test, curated-test, squad-test, nq-dev, trivia-dev.")] = None,
    queries: Annotated[Optional[Path], typer.Option(help="Instead of --qa: queries without answers (BEIR queries.jsonl or qid<TAB>text).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="DPR result JSON to write.")] = None,
    trec: Annotated[Optional[Path], typer.Option(help="TREC run file to write.")] = None,
    index: IndexOpt = None,
    mode: Annotated[str, typer.Option(help=f"Retrieval mode: {_MODES}.")] = Mode.HYBRID.value,
    k: Annotated[int, typer.Option("--k", "-k", help="Passages per question.")] = 100,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions.")] = None,
    hybrid_lambda: Annotated[Optional[float], typer.Option("--lambda", help="Hybrid weight of BM25 (default: tuned value in the index, else 1.1).")] = None,
    regex: RegexOpt = None,
    device: DeviceOpt = None,
    question_encoder: Annotated[Optional[str], typer.Option(help="Another question encoder than the index's: a model directory, or a `densepr export-onnx` output (append #int8 for its int8 model).")] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Retrieve top-k passages; write DPR's result JSON (with has_answer for QA sets) and/or a TREC run."""
    index = _index(index)
    _check_output(output, "file", "DPR result JSON")
    _check_output(trec, "file", "TREC run")
    _check_outputs_differ(output, trec)
    from densepr.data import read_queries
    from densepr.data.runs import write_dpr_results, write_trec_run
    from densepr.evaluate.answers import AnswerMatcher
    from densepr.evaluate.topk import accuracy_report
    from densepr.retrieve.retriever import Retriever

    if (qa is None) == (queries is None):
        raise DenseprError("give exactly one of --qa (questions with answers) or --queries")
    if output is None and trec is None:
        raise DenseprError("give --output (DPR result JSON) and/or --trec (TREC run)")
    if k <= 0:
        raise DenseprError("--k must be positive")
    if qa is not None:
        qas = _load_qa(qa, limit, regex, cache_dir)
        qids, texts, answers = [str(i) for i in range(len(qas))], qas.questions, [q.answers for q in qas.items]
    else:
        qmap = read_queries(queries)
        qids = list(qmap)[:limit] if limit else list(qmap)
        texts, answers = [qmap[q] for q in qids], [[] for _ in qids]
    r = Retriever.load(index, question_encoder=question_encoder, device=device, hybrid_lambda=hybrid_lambda)
    res = r.retrieve(texts, k, mode, show_progress=True)
    hits = AnswerMatcher(r.corpus.texts).hits(res.rows, qas) if qa is not None else None
    if output:
        write_dpr_results(output, texts, answers, res, r.corpus, hits)
    if trec:
        write_trec_run(trec, qids, res, r.corpus.ids, tag=f"densepr-{mode}")
    if hits is not None:
        rep = accuracy_report(hits, ks=[x for x in (1, 5, 20, 100) if x <= k])
        out.print(f"{len(qids)} questions, mode {mode}: " + ", ".join(f"{m} {v:.1f}" for m, v in rep["all"].items() if m != "n"))
    out.print(f"results for {len(qids)} queries written to " + " and ".join(str(p) for p in (output, trec) if p))


def tune_hybrid(
    qa: Annotated[list[str], typer.Option("--qa", help="Dev QA set(s) to tune on (repeat the option); never a test set.")],
    index: Annotated[Path, typer.Option(help="Index directory with bm25/ and dense/; hybrid.json is written there.")] = DEFAULT_INDEX,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions of each set.")] = 1000,
    k: Annotated[int, typer.Option("--k", "-k", help="Tune top-k accuracy at this k.")] = 20,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Choose the hybrid weight lambda (dense + lambda * BM25) on dev questions; saves it for retrieval."""
    from densepr.retrieve.index_dir import IndexDir

    hybrid_json = IndexDir(index).hybrid
    _check_output(hybrid_json, "file", "tuned weight")
    from densepr.evaluate.answers import AnswerMatcher
    from densepr.evaluate.tuning import tune_lambda
    from densepr.retrieve.fusion import PAPER_LAMBDA
    from densepr.retrieve.retriever import Retriever

    sets = [_load_qa(q, limit, None, cache_dir) for q in qa]
    r = Retriever.load(index, device=device)
    best, grid = tune_lambda(r, AnswerMatcher(r.corpus.texts), sets, k=k, show_progress=True)
    IndexDir(index).write_hybrid(best, grid, [s.name for s in sets], limit, f"top-{k} accuracy")
    out.print(f"lambda = {best} (top-{k} {grid[str(best)]:.2f}% on {', '.join(s.name for s in sets)}; lambda={PAPER_LAMBDA}: {grid[str(PAPER_LAMBDA)]:.2f}%)")
    out.print(f"saved to {hybrid_json}")


def evaluate(
    results: Annotated[Path, typer.Argument(help="DPR result JSON, or a TREC run with --qa and --index, or with --qrels.")],
    qa: Annotated[Optional[str], typer.Option("--qa", help="For a TREC run: the QA file or embedded set it answers.")] = None,
    qrels: Annotated[Optional[Path], typer.Option(help="For a TREC run: relevance judgements (BEIR qrels TSV or TREC qrels); reports nDCG@10, recall@20/100, MRR@10.")] = None,
    index: Annotated[Optional[Path], typer.Option(help="Index directory whose passages.tsv gives passage texts, and the answerable subset.")] = None,
    regex: RegexOpt = None,
    ks: Annotated[str, typer.Option(help="Comma-separated k values to report.")] = "1,5,20,100",
    cache_dir: CacheOpt = None,
    answerable_opt: Annotated[Optional[bool], typer.Option("--answerable/--no-answerable", help="With --index: report the answerable subset (questions with an answer in some passage: "
                              "a scan of every passage, cached in INDEX/answerable/). Default: when cached, or when the corpus holds at most 1,000,000 passages.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object on stdout instead of text (shape: densepr.evaluate.summary).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the results JSON to this file.")] = None,
    per_query: Annotated[bool, typer.Option("--per-query", help="In the JSON: each question's values too (top-k hits and first hit; or each trec_eval metric).")] = False,
) -> None:
    """Top-k accuracy as DPR computes it (has_answer recomputed from passage text), on all questions
    and, when --index is given, on the answerable subset; or, with --qrels, trec_eval metrics.

    Every scored list is ranked by score descending, then docid descending (trec_eval's order;
    a TREC run's rank column is ignored); a DPR result JSON is judged in its own order, as DPR does."""
    from densepr.data.runs import read_trec_run, trec_run_rows
    from densepr.evaluate.answers import ANSWERABLE_SCAN_MAX, AnswerMatcher, answerable_subset, judge_dpr_results
    from densepr.evaluate.report import rich_table
    from densepr.evaluate.summary import topk_summary
    from densepr.retrieve.index_dir import IndexDir

    try:
        k_list = sorted({int(x) for x in ks.split(",") if x.strip()})
    except ValueError:
        raise DenseprError(f"--ks must be comma-separated integers, got {ks!r}") from None
    if not k_list or k_list[0] <= 0:
        raise DenseprError("--ks values must be positive")
    if per_query and not (as_json or output):
        raise DenseprError("--per-query needs --json or --output (per-question values are written as JSON)")
    _check_output(output, "file", "results JSON", (results, qrels))
    if qrels is not None:
        from densepr.data import read_qrels_tsv
        from densepr.evaluate.qrels import check_overlap
        from densepr.evaluate.summary import qrels_summary

        run = {q: dict(docs) for q, docs in read_trec_run(results).items()}
        judged = read_qrels_tsv(qrels)
        check_overlap(run, judged, results, qrels)
        summary = qrels_summary(run, judged, results, qrels, per_query=per_query)
        if _emit_json(summary, as_json, output):
            return
        out.print(f"{results.name}: {summary['judged']} judged queries ({summary['in_run']} in the run)")
        out.print("  " + ", ".join(f"{m} {v:.4f}" for m, v in summary["metrics"].items()))
        return
    if index:
        from densepr.retrieve.retriever import open_corpus

        corpus = open_corpus(index)  # its passage store: only the texts read are decoded
    else:
        corpus = None
    if results.suffix == ".json":
        qas, hits = judge_dpr_results(results, None if regex is None else ("regex" if regex else "string"))
    else:
        if qa is None or corpus is None:
            raise DenseprError("a TREC run needs --qa (its questions) and --index (its passages)")
        qas = _load_qa(qa, None, regex, cache_dir)
        rows = trec_run_rows(results, len(qas), corpus, qa, IndexDir(index).passages)
        hits = AnswerMatcher(corpus.texts).hits(rows, qas)
    answerable = answerable_subset(corpus, qas, index, answerable_opt, show_progress=True) if corpus is not None else None
    summary = topk_summary(hits, k_list, results, qas.name, qas.match, answerable, per_query=per_query)
    rep = {s: summary[s] for s in ("all", "answerable") if s in summary}
    if answerable is None and corpus is not None and answerable_opt is None:
        (_log if as_json else out.print)(f"answerable subset skipped: {len(corpus):,} passages (over {ANSWERABLE_SCAN_MAX:,}) would all be "
                                         f"scanned; --answerable computes it once (cached in {index / 'answerable'})")  # fmt: skip
    if _emit_json(summary, as_json, output):
        return
    if answerable is None:
        out.print(f"{qas.name}: {rep['all']['n']} questions ({qas.match} match)")
        out.print("  " + ", ".join(f"top-{k} {rep['all'][f'top{k}']:.2f}" for k in k_list))
    else:
        table = {qas.name: {"n_all": len(qas), "n_answerable": int(answerable.sum()), "methods": {results.stem: rep}}}
        out.print(rich_table(table, k_list))


def _emit_json(summary: dict, as_json: bool, output: Optional[Path]) -> bool:
    """Write ``summary`` to ``output`` (atomically) and/or stdout; True when stdout got it (no text wanted)."""
    import json

    from densepr.fileio import write_json

    if output is not None:
        write_json(output, summary)
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False, indent=2))
    elif output is not None:
        _log(f"results written to {output}")
    return as_json


def search(
    question: Annotated[str, typer.Argument(help="The question.")],
    index: IndexOpt = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Passages to show.")] = 5,
    mode: ModeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Print the top passages for one question."""
    index = _index(index)
    from rich.panel import Panel

    from densepr.retrieve.retriever import Retriever

    if k <= 0:
        raise DenseprError("--k must be positive")
    r = Retriever.load(index, device=device)
    for h in r.search(question, k, mode):
        text = h.text if len(h.text) <= 400 else h.text[:400] + "…"
        out.print(Panel(text, title=f"#{h.rank}  {h.title}  [dim](id {h.id}, score {h.score:.3f})[/dim]", title_align="left"))
