"""``densepr reproduce``: the main job, and its regression check against the committed figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from densepr.cli.common import DEFAULT_INDEX, CacheOpt, DeviceOpt, _check_output, _log, out
from densepr.errors import DenseprError
from densepr.progress import console


def parse_qa_limit(value: str | None) -> int | None:
    """--qa-limit: a positive number, 'all' (None) or absent (-1: the profile's)."""
    if value is None:
        return -1
    if value.strip().lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise DenseprError(f"--qa-limit {value!r}: a number of questions or 'all'") from None


def reproduce(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output (index) directory.")] = DEFAULT_INDEX,
    profile: Annotated[str, typer.Option(help="full: zero-shot, every test question; smoke: 300 per test set (CI); dpr: the paper's experiment "
                                             "(mine, train DPR, re-mine, train round 2, a reader, evaluate; 95 min measured in one run on 2 CPU cores); dpr-smoke: the same in minutes (CI); dpr-gpu: the paper's sizes with the 12-layer all-mpnet-base-v2 "
                                             "(batch 128, 40 epochs, bf16; needs --device cuda; ~45 min on one H100, estimated).")] = "full",
    encoder: Annotated[Optional[Path], typer.Option(help="Encoder or bi-encoder checkpoint (default: embedded all-MiniLM-L6-v2, zero-shot).")] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Compare with the committed figures (runs on the defaults only).")] = True,
    expected: Annotated[Optional[Path], typer.Option(help="Committed figures to compare with (default: densepr's packaged ones, for the embedded defaults; given explicitly, compared whatever the setup, e.g. a fine-tuned encoder's).")] = None,
    write_expected: Annotated[Optional[Path], typer.Option(help="Record this run's figures as the expected ones in this file.")] = None,
    tolerance: Annotated[Optional[float], typer.Option(help="With --write-expected: allowed difference in points (default: the profile's).")] = None,
    save_dpr_json: Annotated[bool, typer.Option(help="Also write DPR result JSON per test set and method (large).")] = False,
    tune_on: Annotated[Optional[list[str]], typer.Option("--tune-on", help="Sets to tune the hybrid lambda on (repeat; names or QA files; default nq-dev, trivia-dev). Use held-out questions for a model trained on dev.")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Rerun this stage and every later one even if current: passages, bm25, dense, tune, evaluate or report "
                                                   "(profile dpr also: dense-zeroshot, mine, train-inbatch, dense-inbatch, train-round1, dense-round1, remine, train-round2, "
                                                   "reader-data, reader-cloze, train-reader, tune-reader, qa).")] = None,
    round2_init: Annotated[Optional[str], typer.Option(help="Profile dpr: round 2 starts from 'round1' weights (default) or the 'initial' ones.")] = None,
    grad_cache_chunk: Annotated[Optional[int], typer.Option(help="Profile dpr: train with gradient caching in chunks of this many sequences "
                                                               "(8: training's peak memory ~2.3 GiB instead of ~12, ~15% slower; 0: off, the default).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Profile dpr: epochs of round 1 and of the in-batch ablation (default 1; 3 measured: "
                                                     "NQ answerable top-20 61.0 after round 2 instead of 59.1, ~40 min more on 2 CPU cores, estimated from round 1's measured time; docs/training.md).")] = None,
    round2_epochs: Annotated[Optional[int], typer.Option(help="Profile dpr: epochs of round 2 from round 1's weights (default 1).")] = None,
    qa_limit: Annotated[Optional[str], typer.Option(help="Profile dpr: test questions per set read end to end by the reader, a number or 'all' "
                                                        "(default: the profile's, 100; all five full sets take hours on 2 CPU cores, minutes on a GPU).")] = None,
    read_precision: Annotated[Optional[str], typer.Option(help="Profile dpr: the reader's weights when reading the test sets: fp32 (default), bf16 or auto "
                                                              "(bf16 on CPUs with native bf16: 1.64x faster reading measured, same answers within a question in 200; "
                                                              "such a run is not compared with the committed figures).")] = None,
    train_precision: Annotated[Optional[str], typer.Option(help="Profile dpr: fp32 (default), bf16 or auto: bf16 autocast when training the retrievers and "
                                                               "the reader (1.4x a step on CPUs with native bf16; weights stay float32; such a run is not "
                                                               "compared with the committed figures).")] = None,
    reader_train_precision: Annotated[Optional[str], typer.Option(help="Profiles with a reader: fp32, bf16 or auto for the reader's training alone "
                                                                      "(default: --train-precision's). Retrains the reader and what follows, not the retrievers: "
                                                                      "e.g. --reader-model mpnet --reader-train-precision bf16 on a finished fp32 run.")] = None,
    reader_epochs: Annotated[Optional[int], typer.Option(help="Profiles with a reader: epochs of the reader's training (default: the profile's, 3 for dpr; "
                                                             "the checkpoint with the best held-out EM is kept). Retrains the reader and what follows.")] = None,
    reader_cloze: Annotated[Optional[int], typer.Option(help="Profile dpr: pre-train the reader one epoch on this many cloze questions made from the corpus "
                                                            "(no QA set used; stage reader-cloze) before the labelled ones; 0: off, the default "
                                                            "(8,000 measured: +1.4 EM given the answer passage over the default reader, within noise, for ~21 min more; docs/reader.md).")] = None,
    reader_model: Annotated[Optional[str], typer.Option(help="Profiles with a reader: the encoder the reader starts from (new heads): 'embedded' (all-MiniLM-L6-v2, "
                                                            "profile dpr's default), 'mpnet' (all-mpnet-base-v2, 12 layers x 768; the job fetches it, as `densepr data fetch "
                                                            "--model mpnet`) or a model directory. Changing it reruns the reader's training and what follows only; "
                                                            "with --reader-train-precision bf16 it trains in bf16. MPNet on 2 CPU cores, measured with --reader-train-precision bf16 "
                                                            "--reader-epochs 2: 45 min of reader training (MiniLM's 3 float32 epochs: ~31), ~10 GiB RAM (MiniLM: ~2.5), tuning and reading ~3x slower (docs/mpnet.md).")] = None,
    retriever_model: Annotated[Optional[str], typer.Option(help="Training profiles: the model both retriever towers start from, as --reader-model "
                                                               "(the zero-shot row encodes with it too; every training stage and what follows reruns).")] = None,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """The main job: fetch, index, retrieve and evaluate NQ, TriviaQA, WQ, CuratedTREC and SQuAD test
    sets with BM25, dense and hybrid retrieval; write a table, a plot and JSON."""
    _check_output(output, "dir", "index and results")
    _check_output(write_expected, "file", "expected figures")
    from densepr.evaluate.report import rich_table
    from densepr.reproduce import ReproduceConfig, record_expected, regression_check, run

    cfg = ReproduceConfig(out_dir=output, cache_dir=cache_dir, encoder=str(encoder) if encoder else None, profile=profile,
                          save_dpr_json=save_dpr_json, device=device, force_from=from_stage, round2_init=round2_init, grad_cache_chunk=grad_cache_chunk,
                          epochs=epochs, round2_epochs=round2_epochs, qa_limit=parse_qa_limit(qa_limit), read_precision=read_precision,
                          train_precision=train_precision, reader_train_precision=reader_train_precision, reader_epochs=reader_epochs, reader_cloze=reader_cloze, reader_model=reader_model,
                          retriever_model=retriever_model)  # fmt: skip
    if tune_on:
        cfg.tune_sets = tuple(tune_on)
    summary = run(cfg, log=_log, show_progress=True)
    if not summary:  # another torchrun process than rank 0: rank 0 reports
        return
    out.print(rich_table(summary["results"], names=summary["method_names"], title=f"top-k accuracy (%), profile {profile}"))
    if write_expected:
        record_expected(summary, write_expected, profile, tolerance)
        out.print(f"recorded as the expected figures for profile {profile!r} in {write_expected}")
    elif check:
        result = regression_check(summary, cfg, expected)
        if not result.compared:
            out.print("[yellow]not compared with the committed figures: the run does not use the embedded defaults "
                      "(pass --expected FILE to compare with figures recorded for this setup)[/yellow]")  # fmt: skip
            return
        if result.em_unchecked:
            out.print("[yellow]end-to-end EM not compared: the committed figures were recorded with another reader recipe "
                      "(ReaderPlan); record this run's with --write-expected[/yellow]")  # fmt: skip
        problems = result.problems
        if problems:
            console.print(f"[red]regression check failed[/red] ({len(problems)} differences):")
            for p in problems[:30]:
                console.print(f"  {p}")
            raise typer.Exit(3)
        out.print(f"[green]regression check passed[/green]: every figure within the committed tolerance (profile {profile})")
