"""The reader and end-to-end QA: ``densepr cloze-data``, ``train-reader``, ``answer``, ``tune-reader``
and ``evaluate-qa``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from densepr.cli.common import (
    _MODES,
    CacheOpt,
    DeviceOpt,
    IndexOpt,
    ModeOpt,
    PrecisionOpt,
    RegexOpt,
    TrainPrecisionOpt,
    _check_output,
    _default,
    _index,
    _int_list,
    _load_qa,
    _log,
    out,
)
from densepr.errors import DenseprError
from densepr.train.config import ReaderTrainConfig


def cloze_data(
    output: Annotated[Path, typer.Option("--output", "-o", help="DPR result JSON to write (what `train-reader --train` reads).")],
    index: IndexOpt = None,
    questions: Annotated[int, typer.Option("--questions", "-n", help="Cloze questions to make (a seeded sample; at most one per sentence).")] = 8000,
    depth: Annotated[int, typer.Option(help="Passages per question: the positive context, then BM25's top for the question.")] = 20,
    seed: int = _default(ReaderTrainConfig, "seed"),
) -> None:
    """Reader pre-training questions made from the index's own passages (cloze questions; no QA set used)."""
    index = _index(index)
    _check_output(output, "file", "DPR result JSON")
    from densepr.train.cloze import index_cloze_records, write_cloze

    records, passages = index_cloze_records(index, questions, seed, depth)
    write_cloze(records, output)
    out.print(f"{len(records)} cloze questions from {passages} passages written to {output}; e.g. "
              f"{records[0]['question']!r} -> {records[0]['answers'][0]!r}")  # fmt: skip


def train_reader_cmd(
    train_files: Annotated[list[Path], typer.Option("--train", help="DPR result JSON with ctxs and has_answer (`densepr retrieve -o`); repeat for several.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory (checkpoint/, best/, metrics.jsonl).")],
    dev_file: Annotated[Optional[Path], typer.Option("--dev", help="DPR result JSON of held-out questions: EM each epoch, best kept, top-k tuned.")] = _default(ReaderTrainConfig, "dev_file"),
    holdout: Annotated[Optional[list[Path]], typer.Option("--holdout", help="QA file(s) whose questions are never trained on (e.g. the --dev questions).")] = None,
    init: Annotated[Optional[Path], typer.Option(help="Encoder directory (BERT, MiniLM, MPNet, ...), trained reader or DPRReader checkpoint (default: embedded all-MiniLM-L6-v2).")] = None,
    passages: Annotated[int, typer.Option(help="M: passages per question per step, 1 positive + M-1 negatives (the paper: 24).")] = _default(ReaderTrainConfig, "passages"),
    batch_size: Annotated[int, typer.Option(help="Questions per step.")] = _default(ReaderTrainConfig, "batch_size"),
    epochs: int = _default(ReaderTrainConfig, "epochs"),
    lr: Annotated[float, typer.Option(help="Learning rate (DPR: 1e-5).")] = 1e-5,
    warmup_steps: int = _default(ReaderTrainConfig, "warmup_steps"),
    max_length: Annotated[int, typer.Option(help="Tokens per window (question + title + text).")] = _default(ReaderTrainConfig, "max_length"),
    max_answer_length: Annotated[int, typer.Option(help="Longest answer span in tokens.")] = _default(ReaderTrainConfig, "max_answer_length"),
    dropout: Annotated[Optional[float], typer.Option(help="Dropout (default: the model's own, BERT 0.1).")] = _default(ReaderTrainConfig, "dropout"),
    depth: Annotated[int, typer.Option(help="Retrieved passages looked at per question for positives and negatives.")] = _default(ReaderTrainConfig, "depth"),
    regex: Annotated[bool, typer.Option("--regex", help="Answers are regexes (CuratedTREC).")] = False,
    dev_limit: Annotated[Optional[int], typer.Option(help="Validate on the first N dev questions.")] = _default(ReaderTrainConfig, "dev_limit"),
    eval_every: Annotated[int, typer.Option(help="Also validate every N steps (0: once per epoch).")] = _default(ReaderTrainConfig, "eval_every"),
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (and one per epoch).")] = _default(ReaderTrainConfig, "save_every"),
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps.")] = _default(ReaderTrainConfig, "max_steps"),
    max_questions: Annotated[Optional[int], typer.Option(help="Train on the first N usable questions only.")] = _default(ReaderTrainConfig, "max_questions"),
    span_loss: Annotated[str, typer.Option(help="positive: DPR's span loss within the positive passage; shared: normalised over all M passages (span scores then compare across passages).")] = _default(ReaderTrainConfig, "span_loss"),
    head_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the selection and span heads (default: --lr).")] = _default(ReaderTrainConfig, "head_lr"),
    precision: TrainPrecisionOpt = _default(ReaderTrainConfig, "precision"),
    seed: int = _default(ReaderTrainConfig, "seed"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint.")] = False,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Train DPR's extractive reader (passage selection + answer span) on retrieval results."""
    _check_output(output, "dir", "run directory", inputs=(init, dev_file, *train_files))
    from densepr.data import EmbeddedData
    from densepr.train.config import ReaderTrainConfig
    from densepr.train.reader import train_reader

    cfg = ReaderTrainConfig(
        train_files=[str(f) for f in train_files], output_dir=str(output), init=str(init or EmbeddedData(cache_dir).model_dir),
        dev_file=str(dev_file) if dev_file else None, holdout=[str(h) for h in holdout or []],
        match="regex" if regex else "string", passages=passages, depth=depth, batch_size=batch_size, epochs=epochs, lr=lr,
        warmup_steps=warmup_steps, seed=seed, max_length=max_length, max_answer_length=max_answer_length,
        dropout=dropout, save_every=save_every, eval_every=eval_every, dev_limit=dev_limit, max_steps=max_steps, max_questions=max_questions,
        span_loss=span_loss, head_lr=head_lr, precision=precision,
    )  # fmt: skip
    result = train_reader(cfg, resume=resume, device=device, log=_log)
    best = output / ("best" if (output / "best").is_dir() else "final")
    em = f", validation EM {result['em']:.1f} at top-{result['best_k']}" if "em" in result else ""
    out.print(f"trained {result.get('step')} steps{em}; reader in {best}")


def _default_reader(reader: Optional[Path], index: Path) -> Path:
    """--reader, else the reader beside the index (``<index>/reader/``, what `make reproduce-dpr` trains),
    else a manual `densepr train-reader -o runs/reader` run's."""
    if reader is not None:
        return reader
    from densepr.pipeline import find_reader

    found = find_reader(index)
    if found is not None:
        return found
    for cand in (Path("runs/reader/best"), Path("runs/reader/final")):
        if cand.is_dir():
            return cand
    raise DenseprError(f"no reader: {index} has no reader/ (`make reproduce-dpr` trains one into runs/dpr/reader); "
                       "or give --reader DIR (a `densepr train-reader` output's best/ or a DPRReader checkpoint)")  # fmt: skip


def answer_cmd(
    question: Annotated[str, typer.Argument(help="The question.")],
    index: IndexOpt = None,
    reader: Annotated[Optional[Path], typer.Option(help="Reader directory (default: <index>/reader, else runs/reader/best).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Passages to read (default: the reader's tuned top-k).")] = None,
    mode: ModeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
) -> None:
    """Answer a question: retrieve, read, print the answer and its passage with the span highlighted."""
    index = _index(index)
    import json

    from rich.panel import Panel
    from rich.text import Text

    from densepr.pipeline import Pipeline

    if k is not None and k <= 0:
        raise DenseprError("--k must be positive")
    if not question.strip():
        raise DenseprError("empty question")
    p = Pipeline.load(index, _default_reader(reader, index), device=device, k=k, mode=mode, precision=precision)
    a = p.answer(question)
    if as_json:
        out.print_json(json.dumps({**a.as_dict(), "passages": [h.__dict__ for h in a.passages[:5]]}, ensure_ascii=False))
        return
    if not a.found:
        out.print(f"no answer (read {len(a.passages)} passages, mode {a.mode})")
        return
    h = a.passage
    body = Text(h.text[: a.start]) + Text(h.text[a.start : a.end], style="bold black on yellow") + Text(h.text[a.end :])
    out.print(f"[bold]{a.text}[/bold]  [dim](span score {a.score:.2f}, passage score {a.passage_score:.2f}, "
              f"read top-{a.k} {a.mode})[/dim]", highlight=False)  # fmt: skip
    out.print(Panel(body, title=f"#{h.rank}  {h.title}  [dim](id {h.id})[/dim]", title_align="left"))


def _retriever_for(index: Path, modes: str, device: str | None):
    """The index's retriever and the comma-separated ``--modes``, each checked against what it holds."""
    from densepr.retrieve.retriever import Retriever

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    r = Retriever.load(index, device=device)
    for m in mode_list:
        r.check_mode(m)
    return r, mode_list


def tune_reader_cmd(
    qa: Annotated[str, typer.Option("--qa", help="Held-out questions (a QA file or set name) never trained on, e.g. runs/dpr/train-data/train-dev.qa.tsv.")],
    reader: Annotated[Optional[Path], typer.Option(help="Reader directory to tune; the choice is stored in its densepr_reader.json (default: <index>/reader, else runs/reader/best).")] = None,
    index: IndexOpt = None,
    modes: Annotated[str, typer.Option(help=f"Comma-separated retrieval modes to tune for ({_MODES}).")] = "bm25,dense,hybrid",
    ks: Annotated[str, typer.Option(help="Comma-separated numbers of passages read.")] = "1,5,10,20,50",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions.")] = None,
    regex: RegexOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    cache_dir: CacheOpt = None,
) -> None:
    """Tune how the answer's passage is chosen (reader selection logit, span score, retriever score; BERTserini's fusion)
    and how many passages to read, per retrieval mode, on held-out questions; stored with the reader."""
    index = _index(index)
    from densepr.models.onnx import OnnxReaderModel
    from densepr.models.reader import Reader
    from densepr.pipeline import tune_selection

    k_list = _int_list(ks, "--ks")
    r, mode_list = _retriever_for(index, modes, device)
    path = _default_reader(reader, index)
    rd = Reader.load(path, device, precision=precision)
    if isinstance(rd.model, OnnxReaderModel):  # refused before the reading, not after it
        raise DenseprError(f"{path}: an ONNX reader is not tuned in place; tune the reader it was exported from, then export it again")
    qas = _load_qa(qa, limit, regex, cache_dir)
    for m in mode_list:
        best = tune_selection(r, rd, qas, m, k_list, show_progress=True)
        rd.config.selection[m] = {**best, "tuned_on": str(qa), "precision": precision}
        out.print(f"{m}: EM {best['em']:.1f} at k={best['k']} with selection x{best['relevance']:g} + span x{best['span']:g} "
                  f"+ retriever x{best['retriever']:g}, aggregation {best['aggregate']:g} "
                  f"(DPR's rule: EM {best['paper_em']:.1f} at k={best['paper_k']}; {best['questions']} questions)")  # fmt: skip
    import shutil

    from densepr.fileio.dirs import atomic_dir
    from densepr.models.hf import MODEL_FILES

    # tuned on the weights read in `precision` (as evaluate-qa --precision reads them); saved as trained, float32
    keep = rd if precision == "fp32" else Reader.load(path, device)
    keep.config.selection = rd.config.selection
    with atomic_dir(path, "reader", MODEL_FILES) as tmp:  # built beside, swapped in: a killed save leaves the reader as it was
        keep.save(tmp)
        for f in path.iterdir():  # what the save does not write (a run's best/validation.json) stays, as an in-place save kept it
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
    out.print(f"stored in {path / 'densepr_reader.json'}; `densepr answer`, `serve` and `evaluate-qa` use it")


def evaluate_qa_cmd(
    qa: Annotated[list[str], typer.Option("--qa", help="QA set(s) (repeat): embedded names (nq-test, ...) or files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for qa-results.json, .md and qa-em.png.")],
    reader: Annotated[Optional[Path], typer.Option(help="Reader directory (default: <index>/reader, else runs/reader/best).")] = None,
    index: IndexOpt = None,
    modes: Annotated[str, typer.Option(help=f"Comma-separated retrieval modes ({_MODES}).")] = "bm25,dense,hybrid",
    ks: Annotated[str, typer.Option(help="Comma-separated numbers of passages read.")] = "1,5,10,20,50",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions of each set.")] = None,
    gold: Annotated[bool, typer.Option("--gold/--no-gold", help="Also the reader's upper bound: EM given an answer-bearing passage.")] = True,
    batch_size: Annotated[int, typer.Option(help="Windows per reader batch.")] = 64,
    regex: RegexOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Keep sets already read into --output with the same inputs, and resume a killed set from its finished pieces (250 questions each).")] = True,
    cache_dir: CacheOpt = None,
) -> None:
    """End-to-end QA: exact match and F1 (SQuAD normalisation; regex for CuratedTREC) per retrieval mode and k.

    A killed run, started again with the same command, keeps the sets it finished and resumes the set it
    was reading from its last finished piece of 250 questions (kept in <output>/pieces/ until the set is done)."""
    index = _index(index)
    _check_output(output, "dir", "QA results", inputs=(index, reader))
    from densepr.evaluate.answers import AnswerMatcher
    from densepr.evaluate.pieces import PIECES, SetPieces
    from densepr.evaluate.report import QA_RESULTS, qa_markdown, read_qa_results, write_qa_results
    from densepr.fileio.dirs import writable_dir
    from densepr.models.reader import Reader
    from densepr.pipeline import evaluate_qa, reading_key

    writable_dir(output, "QA results", (*QA_RESULTS, f"{PIECES}/"))  # a user's folder: refused, untouched

    k_list = _int_list(ks, "--ks")
    r, mode_list = _retriever_for(index, modes, device)
    reader_dir = _default_reader(reader, index)
    rd = Reader.load(reader_dir, device, precision=precision)
    matcher = AnswerMatcher(r.corpus.texts)
    results = {"reader": rd.name, "precision": precision, "index": str(index), "ks": k_list, "modes": mode_list, "limit": limit, "sets": {}}
    before = read_qa_results(output, _log) if resume else {}
    for spec in qa:
        qas = _load_qa(spec, limit, regex, cache_dir)
        key = reading_key(reader_dir, index, qas, mode_list, k_list, gold, precision)
        if before.get(qas.name, {}).get("key") == key:
            results["sets"][qas.name] = before[qas.name]
            _log(f"{qas.name}: already read into {output} with the same inputs; kept (--no-resume reads it again)")
            continue
        set_pieces = SetPieces(output, qas.name, key)
        pieces = set_pieces.directory
        if kept := set_pieces.open(resume):  # pieces of other inputs (another reader, k, ...), or --no-resume, removed
            _log(f"{qas.name}: resuming; {kept} finished piece(s) of questions kept in {pieces}")
        res = evaluate_qa(r, rd, qas, mode_list, k_list, matcher, gold, batch_size, pieces=pieces,
                          log=lambda m, name=qas.name: _log(f"{name}: {m}"), answerable_cache=index, show_progress=True)  # fmt: skip
        results["sets"][qas.name] = {**res, "key": key}
        best = {m: max(res["modes"][m]["k"].values(), key=lambda v: v["em"])["em"] for m in mode_list}
        kept_note = ""
        if resumed := res.get("resumed"):
            kept_note = f" ({resumed['pieces_kept']} kept piece(s) included)"
        _log(f"{qas.name}: {len(qas)} questions, {res['passages_read']} passages read in {res['seconds']:.0f} s{kept_note}; best EM "
             + ", ".join(f"{m} {v:.1f}" for m, v in best.items()))  # fmt: skip
        write_qa_results(output, results)  # after every set: a long run keeps what it finished
        set_pieces.close()  # the set's result is written: its pieces are no longer needed
    out.print(qa_markdown(results))
    out.print(f"written to {output}/qa-results.json, qa-results.md, qa-em.png")
