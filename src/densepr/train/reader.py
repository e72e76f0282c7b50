"""Training DPR's reader (Section 6.1) on retrieval results.

Input: DPR result JSON files (``densepr retrieve -o``, or DPR's ``dense_retriever.py``
output): per question its answers and retrieved ``ctxs`` with ``has_answer``. For each
question, the answer-bearing passages among the first ``depth`` retrieved (at most
``max_positives``) whose text contains an answer span (DPR's token match; regex for
CuratedTREC) are its positives; the others (at most ``max_negatives``) its negatives.
Questions without a positive are dropped. Each step reads, per question, one positive and
``passages - 1`` negatives sampled from those (the paper: M = 24).

Output directory (like the retriever's)::

    checkpoint/   # latest: reader/ (DPRReader, or encoder + heads: models.reader_model), optimizer.safetensors, trainer_state.json
    best/         # the reader with the best validation EM; densepr_reader.json holds the tuned top-k
    metrics.jsonl, config.json
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from densepr.data.runs import iter_dpr_results
from densepr.errors import DenseprError, InputError
from densepr.evaluate.answers import has_answer
from densepr.evaluate.qa import exact_match, f1_score
from densepr.fileio.atomic import write_json
from densepr.models.hf import autocast, check_precision
from densepr.models.reader import Reader, Window, best_reading, find_answer_spans
from densepr.models.reader_model import reader_heads
from densepr.progress import console, progress_bar
from densepr.train.checkpoint import append_metrics, restore, save_best, save_checkpoint, save_models_dir, start_run
from densepr.train.config import SPAN_LOSSES, ReaderTrainConfig, span_loss_name
from densepr.train.optim import adamw, linear_schedule, optimizer_step

EVAL_KS = (1, 5, 10, 20, 50)


def _heads(reader: Reader) -> list[torch.nn.Module]:
    """The selection and span heads (new, randomly initialised weights at the start)."""
    return reader_heads(reader.model)




@dataclass
class ReaderExample:
    question: str
    answers: list[str]
    positives: list[tuple[str, str]]  # (title, text), each with an answer span
    negatives: list[tuple[str, str]]


def _holdout_questions(paths: Sequence[str]) -> set[str]:
    from densepr.data import load_qa

    return {q.question.strip().lower() for p in paths for q in load_qa(p).items}


def load_reader_examples(cfg: ReaderTrainConfig, reader: Reader, log: Callable[[str], None] = lambda m: None) -> tuple[list[ReaderExample], dict]:
    """Read the training result files into examples (see module docstring); returns them and counts."""
    held = _holdout_questions(cfg.holdout)
    stats = {"questions": 0, "held_out": 0, "no_passages": 0, "no_positive": 0, "kept": 0, "positives": 0, "negatives": 0}
    out: list[ReaderExample] = []
    for path in cfg.train_files:
        for r in iter_dpr_results(path):
            stats["questions"] += 1
            if r.question.strip().lower() in held:
                stats["held_out"] += 1
                continue
            ctxs = r.ctxs[: cfg.depth]
            if not ctxs:
                stats["no_passages"] += 1
                continue
            pos, neg = [], []
            for c in ctxs:
                hit = c["has_answer"] if isinstance(c.get("has_answer"), bool) else has_answer(r.answers, c["text"], cfg.match)
                (pos if hit else neg).append((str(c.get("title") or ""), c["text"]))
            pos = pos[: cfg.max_positives]
            if pos:  # keep positives whose answer the tokenizer can locate (DPR drops the rest)
                toks = reader.tokenize_texts([t for _, t in pos])
                pos = [p for p, tk in zip(pos, toks) if find_answer_spans(reader, tk, p[1], r.answers, cfg.match)]
            if not pos:
                stats["no_positive"] += 1
                continue
            out.append(ReaderExample(r.question, list(r.answers), pos, neg[: cfg.max_negatives]))
            stats["positives"] += len(pos)
            stats["negatives"] += len(out[-1].negatives)
            if cfg.max_questions and len(out) >= cfg.max_questions:
                break
        if cfg.max_questions and len(out) >= cfg.max_questions:
            break
    stats["kept"] = len(out)
    if stats["questions"] and stats["no_passages"] == stats["questions"]:
        raise InputError(cfg.train_files[0], "no question has retrieved passages ('ctxs' are all empty)", field="ctxs")
    if not out:
        raise DenseprError(f"{', '.join(cfg.train_files)}: no usable question (none has an answer-bearing passage "
                           f"in its first {cfg.depth} retrieved)")  # fmt: skip
    log(f"{stats['kept']} of {stats['questions']} questions usable ({stats['held_out']} held out, "
        f"{stats['no_positive']} without an answer-bearing passage, {stats['no_passages']} without passages)")  # fmt: skip
    return out, stats


def build_batch(reader: Reader, examples: Sequence[ReaderExample], ids: Sequence[int], epoch: int, cfg: ReaderTrainConfig):
    """Windows for N questions x M passages (positive first, padding passages masked) and answer spans."""
    m = cfg.passages
    windows: list[Window] = []
    mask = torch.zeros((len(ids), m), dtype=torch.bool)
    spans: list[list[tuple[int, int]]] = []
    filler = None
    for qn, i in enumerate(ids):
        ex = examples[i]
        rng = np.random.default_rng([cfg.seed, epoch, int(i)])
        title, text = ex.positives[int(rng.integers(len(ex.positives)))]
        negs = [ex.negatives[j] for j in rng.permutation(len(ex.negatives))[: m - 1]]
        q_ids = reader.question_ids(ex.question)
        tt = reader.tokenize_texts([text, *[t for _, t in negs]])
        titles = reader.tokenizer([title, *[t for t, _ in negs]], add_special_tokens=False)["input_ids"]
        found = find_answer_spans(reader, tt[0], text, ex.answers, cfg.match)
        cands = []
        for w in reader.windows(q_ids, titles[0], tt[0], 0):
            inside = [(w.text_start + s - w.first, w.text_start + e - w.first) for s, e in found if s >= w.first and e < w.first + w.n]
            if inside:
                cands.append((w, inside))
        w, inside = cands[int(rng.integers(len(cands)))]
        windows.append(w)
        spans.append(inside)
        for j in range(1, m):
            if j <= len(negs):
                windows.append(reader.windows(q_ids, titles[j], tt[j], j)[0])
                mask[qn, j] = True
            else:  # fewer negatives than M-1: pad with a copy, masked out of the loss
                filler = filler or windows[-1]
                windows.append(filler)
        mask[qn, 0] = True
    return windows, mask, spans


@torch.no_grad()
def validate(reader: Reader, dev_file: str, limit: int | None, ks: Sequence[int] = EVAL_KS, match: str = "string") -> dict:
    """End-to-end EM/F1 on a DPR result file, reading its first max(ks) passages per question."""
    recs = []
    for r in iter_dpr_results(dev_file):
        recs.append(r)
        if limit and len(recs) >= limit:
            break
    kmax = max(ks)
    was_training = reader.training
    reader.eval()
    readings = reader.read([r.question for r in recs], [[(str(c.get("title") or ""), c["text"]) for c in r.ctxs[:kmax]] for r in recs])
    if was_training:
        reader.train()
    out: dict = {"questions": len(recs)}
    for k in ks:
        em = f1 = 0.0
        for r, rd in zip(recs, readings):
            b = best_reading(rd, k)
            pred = rd[b].text if b is not None else ""
            em += exact_match(pred, r.answers, match)
            f1 += f1_score(pred, r.answers, match)
        out[f"em@{k}"] = round(100 * em / max(1, len(recs)), 2)
        out[f"f1@{k}"] = round(100 * f1 / max(1, len(recs)), 2)
    best_k = max(ks, key=lambda k: (out[f"em@{k}"], -k))
    out["best_k"], out["em"] = best_k, out[f"em@{best_k}"]
    return out


def train_reader(cfg: ReaderTrainConfig, resume: bool = False, device: str | None = None, show_progress: bool = True,
                 log: Callable[[str], None] = lambda m: console.print(f"[dim]{m}[/dim]"),
                 stop_after: int | None = None) -> dict:  # fmt: skip
    """Train (or resume) a reader; returns the last validation (or the step reached).

    ``stop_after``: stop, as if killed, after this many steps of this invocation (for tests).
    """
    from densepr.models.reader import ReaderConfig

    out = Path(cfg.output_dir)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.passages < 1 or cfg.batch_size < 1:
        raise DenseprError("--passages and --batch-size must be positive")
    if span_loss_name(cfg.span_loss) not in SPAN_LOSSES:
        raise DenseprError(f"--span-loss {cfg.span_loss!r}: choose one of {', '.join(SPAN_LOSSES)}")
    check_precision(cfg.precision, "--precision")
    ckpt = start_run(out, cfg, resume, log=log)
    torch.manual_seed(cfg.seed)
    rcfg = ReaderConfig(max_length=cfg.max_length, max_answer_length=cfg.max_answer_length)
    src = ckpt / "reader" if ckpt else Path(cfg.init)
    try:
        reader = Reader.load(src, dev, rcfg)
    except DenseprError as e:
        raise DenseprError(f"cannot load {'checkpoint ' + str(ckpt) if ckpt else 'the initial model'}: {e}") from None
    if not isinstance(reader.model, torch.nn.Module):
        raise DenseprError(f"{src}: an ONNX reader is for inference; train from a DPRReader or an encoder directory (BERT, MPNet, ...)")
    if cfg.dropout is not None:
        for mod in reader.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = cfg.dropout
    examples, data_stats = load_reader_examples(cfg, reader, log)
    steps_per_epoch = len(examples) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DenseprError(f"{len(examples)} usable questions, fewer than one batch of {cfg.batch_size}")
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    params = [p for p in reader.parameters() if p.requires_grad]
    heads = {id(p) for m in _heads(reader) for p in m.parameters()} if cfg.head_lr is not None else set()
    opt = adamw([p for p in params if id(p) not in heads], cfg.lr, cfg.weight_decay, cfg.adam_eps)
    if heads:  # the heads start from random weights: their own rate, the same schedule
        opt.add_param_group({"params": [p for p in params if id(p) in heads], "lr": cfg.head_lr, "weight_decay": 0.0})
    sched = linear_schedule(opt, cfg.warmup_steps, total)
    state = {"step": 0, "epoch": 0, "batch": 0, "best_em": None}
    if ckpt is not None:
        st = restore(ckpt, opt, sched, state, dev)
        state = {k: st[k] for k in state}
        log(f"resumed from {ckpt} at step {state['step']}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(cfg))
        write_json(out / "data.json", data_stats)
        (out / "metrics.jsonl").unlink(missing_ok=True)

    record = partial(append_metrics, out)

    last_val: dict = {}

    def run_validation() -> None:
        nonlocal last_val
        if not cfg.dev_file:
            return
        last_val = validate(reader, cfg.dev_file, cfg.dev_limit, match=cfg.match)
        record({"kind": "validation", "step": state["step"], "epoch": state["epoch"], **last_val})
        log(f"validation at step {state['step']}: " + ", ".join(f"EM@{k} {last_val[f'em@{k}']:.1f}" for k in EVAL_KS))
        if state["best_em"] is None or last_val["em"] > state["best_em"]:
            state["best_em"] = last_val["em"]
            reader.config.top_k = int(last_val["best_k"])
            reader.config.tuned = {"on": cfg.dev_file, "questions": last_val["questions"], "step": state["step"],
                                   **{f"em@{k}": last_val[f"em@{k}"] for k in EVAL_KS}}  # fmt: skip
            save_best(out, reader.save, {**last_val, "step": state["step"]}, "reader")
            log(f"new best (EM {last_val['em']:.1f} at top-{last_val['best_k']}) saved to {out / 'best'}")

    log(f"{len(examples)} training questions, {steps_per_epoch} steps/epoch of {cfg.batch_size} questions x {cfg.passages} passages")
    reader.train()
    done_here = 0
    with progress_bar(total, "train reader", show_progress, unit="step") as advance:
        advance(state["step"])
        while state["step"] < total and state["epoch"] < cfg.epochs:
            order = np.random.default_rng([cfg.seed, state["epoch"]]).permutation(len(examples))
            while state["batch"] < steps_per_epoch and state["step"] < total:
                t0 = time.perf_counter()
                ids = order[state["batch"] * cfg.batch_size : (state["batch"] + 1) * cfg.batch_size]
                windows, mask, spans = build_batch(reader, examples, ids, state["epoch"], cfg)
                with autocast(dev, training=True, precision=cfg.precision):  # length-sorted pieces: padding only to each piece's longest window
                    start, end, rel, text_mask = reader.forward_windows(windows, cfg.piece)
                sel_loss, span_loss = Reader.loss(start.float(), end.float(), rel.float(), text_mask, mask.to(dev), spans,
                                                  shared=cfg.span_loss == "shared")  # fmt: skip
                (sel_loss + span_loss).backward()
                picked = float((rel.detach().float().view(len(ids), -1).masked_fill(~mask.to(dev), float("-inf")).argmax(1) == 0).float().mean())
                sel_loss, span_loss = sel_loss.item(), span_loss.item()
                loss = sel_loss + span_loss
                grad_norm = optimizer_step(params, opt, sched, cfg.max_grad_norm)
                state["step"] += 1
                state["batch"] += 1
                done_here += 1
                dt = time.perf_counter() - t0
                record({"kind": "train", "step": state["step"], "epoch": state["epoch"] + 1, "loss": round(loss, 5),
                        "selection_loss": round(sel_loss, 5), "span_loss": round(span_loss, 5), "selection_accuracy": round(picked, 4),
                        "lr": sched.get_last_lr()[0], "grad_norm": round(grad_norm, 4), "questions_per_s": round(len(ids) / dt, 3)})  # fmt: skip
                advance(1)
                if show_progress:
                    console.print(f"[dim]step {state['step']}/{total} loss {loss:.4f} (selection {sel_loss:.3f}, "
                                  f"span {span_loss:.3f}) {len(ids) / dt:.2f} q/s[/dim]", highlight=False)  # fmt: skip
                if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < total:
                    run_validation()
                if state["batch"] < steps_per_epoch and state["step"] % cfg.save_every == 0 and state["step"] < total:
                    save_checkpoint(out / "checkpoint", lambda d: reader.save(d / "reader"), opt, sched, state, dev)
                if stop_after is not None and done_here >= stop_after:
                    return {"stopped_at": state["step"]}
            if state["batch"] == steps_per_epoch:
                state["epoch"] += 1
                state["batch"] = 0
            run_validation()
            save_checkpoint(out / "checkpoint", lambda d: reader.save(d / "reader"), opt, sched, state, dev)
    if not cfg.dev_file:
        save_models_dir(out / "final", reader.save, "reader")
    return {"step": state["step"], **last_val}

