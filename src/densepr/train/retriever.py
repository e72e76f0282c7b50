"""DPR training (Karpukhin et al., 2020, Section 3.2): learn E_Q and E_P with in-batch negatives.

Each step takes B questions; each brings its positive passage and ``hard_negatives`` BM25
passages without the answer. Every passage of the batch is a negative for every other
question, and the loss is the NLL of each question's positive among all of them
(:meth:`densepr.models.encoder.BiEncoder.loss`).

* **Gradient caching** (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under
  Memory Limited Setup"): embed the whole batch without a graph, compute the loss and its
  gradient with respect to the embeddings, then re-encode chunk by chunk with a graph and
  back-propagate those cached gradients. Dropout masks are replayed by restoring each chunk's
  RNG state, so the gradient equals the full-batch one while memory is that of one chunk.
* **Several processes** (``torchrun``; NCCL on GPUs, gloo on CPU): embeddings are all-gathered
  so every question sees the passages of all processes (the global batch); each process puts
  its own, differentiable slice back in the gathered tensor, and gradients are summed across
  processes, which gives exactly the single-process gradient of the global batch.
* **Checkpoints**: ``question_encoder/`` and ``passage_encoder/`` in Hugging Face format, plus
  trainer state (optimizer, scheduler, step, data position, RNG) in safetensors + JSON; never
  pickle. A killed run resumes from its last checkpoint and ends with the same weights.

Output directory::

    checkpoint/            # the latest: question_encoder/, passage_encoder/, trainer_state.json, optimizer.safetensors
    best/                  # the encoders with the best validation average rank, + validation.json
    metrics.jsonl          # one JSON object per logged step and per validation
    config.json            # the training configuration
    tensorboard/           # with --tensorboard
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from densepr.data.passages import Passage
from densepr.data.training import iter_train_records
from densepr.errors import DenseprError
from densepr.evaluate.answers import has_answer
from densepr.fileio.atomic import write_json
from densepr.models.encoder import BiEncoder, Encoder, EncoderConfig, tower_dirs
from densepr.models.hf import check_precision
from densepr.progress import console, progress_bar
from densepr.train.checkpoint import append_metrics, restore, save_best, save_checkpoint, save_models_dir, start_run
from densepr.train.config import TrainConfig
from densepr.train.distributed import Dist, sum_gradients
from densepr.train.gradcache import loss_and_backward
from densepr.train.optim import adamw, linear_schedule, optimizer_step

# -- data ------------------------------------------------------------------------------------------
POOL = 30  # hard and random negatives kept per question in memory (sampled from each epoch)


@dataclass
class Example:
    question: str
    answers: list[str]
    positives: list[Passage]
    hard: list[Passage]
    random: list[Passage]


def load_examples(path: str | os.PathLike[str], skip_bad: bool = False, log: Callable[[str], None] = lambda m: None) -> list[Example]:
    """Read a DPR retriever JSON into memory, keeping at most 30 negatives of each kind per question."""
    stats: dict = {}
    out = [Example(r.question, r.answers, r.positive_ctxs, r.hard_negative_ctxs[:POOL], r.negative_ctxs[:POOL])
           for r in iter_train_records(path, skip_bad=skip_bad, stats=stats)]  # fmt: skip
    if stats.get("skipped"):
        log(f"{path}: skipped {stats['skipped']} invalid record(s) (--skip-bad)")
    if not out:
        raise DenseprError(f"{path}: no usable training records")
    return out


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The question order of an epoch: a function of (seed, epoch) only, so resuming replays it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def build_batch(examples: Sequence[Example], ids: Sequence[int], epoch: int, cfg: TrainConfig) -> tuple[list[str], list[Passage], list[int]]:
    """Questions, their passages (positive first, then negatives) and the positive's position.

    As in DPR: the first positive; ``hard_negatives`` drawn from the BM25 negatives (shuffled
    per epoch), topped up with random negatives when a question has too few; plus
    ``random_negatives`` random ones.
    """
    questions, passages, positive = [], [], []
    for i in ids:
        ex = examples[i]
        rng = np.random.default_rng([cfg.seed, epoch, int(i)])
        hard = [ex.hard[j] for j in rng.permutation(len(ex.hard))][: cfg.hard_negatives]
        rand = [ex.random[j] for j in rng.permutation(len(ex.random))]
        fill = cfg.hard_negatives - len(hard)
        negs = hard + rand[: fill + cfg.random_negatives]
        questions.append(ex.question)
        positive.append(len(passages))
        passages += [ex.positives[0], *negs]
    return questions, passages, positive


















# -- checkpoints -----------------------------------------------------------------------------------
def _params(model: BiEncoder) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():  # a shared encoder appears once
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out






def save_encoders(model: BiEncoder, directory: Path) -> None:
    model.question.save(directory / "question_encoder")
    model.passage.save(directory / "passage_encoder")






# -- validation ------------------------------------------------------------------------------------
@torch.no_grad()
def validate(model: BiEncoder, examples: Sequence[Example], hard: int, ks: Sequence[int] = (1, 5, 20)) -> dict:
    """DPR's average-rank validation on a held-out slice, plus top-k accuracy in the same pool.

    The pool is every question's positive and ``hard`` BM25 negatives (deduplicated); each
    question ranks the whole pool. ``avg_rank`` is the mean 1-based rank of its own positive
    (lower is better); ``topk`` counts a hit with DPR's ``has_answer`` on the passage text.
    """
    model.eval()
    pool: dict[tuple[str, str, str], int] = {}
    own = []
    for ex in examples:
        for j, p in enumerate([ex.positives[0], *ex.hard[:hard]]):
            key = (p.id, p.title, p.text)
            pool.setdefault(key, len(pool))
            if j == 0:
                own.append(pool[key])
    keys = list(pool)
    P = model.passage.encode_passages([k[1] for k in keys], [k[2] for k in keys])
    Q = model.question.encode_questions([ex.question for ex in examples])
    scores = Q @ P.T
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.argmax(order == np.asarray(own)[:, None], axis=1) + 1
    kmax = max(ks)
    hits = np.array([[has_answer(ex.answers, keys[j][2]) for j in order[i, :kmax]] for i, ex in enumerate(examples)])
    first = np.where(hits.any(1), hits.argmax(1), kmax)
    model.train()
    return {"avg_rank": round(float(ranks.mean()), 3), "pool": len(keys), "questions": len(examples),
            **{f"top{k}": round(100 * float((first < k).mean()), 2) for k in ks}}  # fmt: skip




def _load_model(cfg: TrainConfig, device: torch.device, source: Path | None = None) -> BiEncoder:
    src = Path(source or cfg.init)
    q_dir, p_dir = tower_dirs(src)  # densepr's, Haystack's or Tevatron's two folders, else one model for both
    base = EncoderConfig.from_dir(q_dir)
    enc_cfg = EncoderConfig(cfg.pooling or base.pooling, cfg.normalize, cfg.max_length)
    q = Encoder.load(q_dir, enc_cfg, device)
    p = q if cfg.shared else Encoder.load(p_dir, enc_cfg, device)
    return BiEncoder(q, p, cfg.scale)


def train(cfg: TrainConfig, resume: bool = False, device: str | None = None, show_progress: bool = True,
          log: Callable[[str], None] = lambda m: console.print(f"[dim]{m}[/dim]"),
          stop_after: int | None = None) -> dict:  # fmt: skip
    """Train a DPR bi-encoder; returns the final validation (or training) metrics.

    Args:
        cfg: the configuration.
        resume: continue from ``<output_dir>/checkpoint`` (the configuration must match).
        device: torch device (default: the local GPU under torchrun, else cuda/cpu).
        stop_after: stop (as if killed) after this many steps of *this* invocation; for tests.
    """
    check_precision(cfg.precision, "--precision")
    out = Path(cfg.output_dir)
    dev = torch.device(device) if device else torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")  # fmt: skip
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    d = Dist.from_env(dev)
    if cfg.batch_size % d.world:
        raise DenseprError(f"batch size {cfg.batch_size} is not divisible by {d.world} processes")
    if d.world > 1 and dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    log = log if d.main else (lambda m: None)
    examples = load_examples(cfg.train_file, cfg.skip_bad, log)
    dev_examples = load_examples(cfg.dev_file, cfg.skip_bad, log) if cfg.dev_file else []
    steps_per_epoch = len(examples) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DenseprError(f"{cfg.train_file}: {len(examples)} questions, fewer than one batch of {cfg.batch_size}")
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)

    ckpt = start_run(out, cfg, resume, d.main, log)

    torch.manual_seed(cfg.seed)
    try:
        model = _load_model(cfg, dev, ckpt)
    except DenseprError as e:
        raise DenseprError(f"cannot load {'checkpoint ' + str(ckpt) if ckpt else 'the initial model'}: {e}") from None
    model.train()
    params = _params(model)
    opt = adamw(params, cfg.lr, cfg.weight_decay, cfg.adam_eps)
    sched = linear_schedule(opt, cfg.warmup_steps, total)
    state = {"step": 0, "epoch": 0, "batch": 0, "best_avg_rank": None, "world": d.world}
    if ckpt is not None:
        st = restore(ckpt, opt, sched, state, dev)
        if st["world"] != d.world:
            raise DenseprError(f"{ckpt} was written by {st['world']} process(es); resume with the same number")
        state = {k: st[k] for k in state}
        log(f"resumed from {ckpt} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
    elif d.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(cfg))
        (out / "metrics.jsonl").unlink(missing_ok=True)

    writer = None
    if cfg.tensorboard and d.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DenseprError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        writer = SummaryWriter(str(out / "tensorboard"))

    def record(entry: dict) -> None:
        if not d.main:
            return
        append_metrics(out, entry)
        if writer is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    writer.add_scalar(f"{entry.get('kind', 'train')}/{k}", v, entry["step"])

    def checkpoint() -> None:
        if d.main:
            save_checkpoint(out / "checkpoint", partial(save_encoders, model), opt, sched, state, dev)
        if d.world > 1:
            dist.barrier()

    local = cfg.batch_size // d.world
    done_here, last_val = 0, {}
    log(f"{len(examples)} training questions, {steps_per_epoch} steps/epoch of {cfg.batch_size} questions "
        f"x (1 + {cfg.hard_negatives} hard + {cfg.random_negatives} random) passages, {d.world} process(es)"
        + (f", gradient cache chunks of {cfg.grad_cache_chunk}" if cfg.grad_cache_chunk else ""))  # fmt: skip
    if dev_examples and d.main and state["step"] == 0:  # where training starts from, for comparison
        start_val = validate(model, dev_examples, cfg.val_hard_negatives)
        record({"kind": "validation", "step": 0, "epoch": 0, **start_val})
        log(f"validation before training: average rank {start_val['avg_rank']} of {start_val['pool']}, "
            + ", ".join(f"top-{k} {start_val[f'top{k}']:.1f}" for k in (1, 5, 20)))  # fmt: skip
    with progress_bar(total, "train", show_progress and d.main, unit="step") as advance:
        advance(state["step"])
        while state["step"] < total and state["epoch"] < cfg.epochs:
            order = epoch_order(len(examples), state["epoch"], cfg.seed)
            while state["batch"] < steps_per_epoch and state["step"] < total:
                t0 = time.perf_counter()
                ids = order[state["batch"] * cfg.batch_size : (state["batch"] + 1) * cfg.batch_size][d.rank * local : (d.rank + 1) * local]
                questions, passages, positive = build_batch(examples, ids, state["epoch"], cfg)
                q_in = model.question.collate(model.question.tokenize_questions(questions))
                p_in = model.passage.collate(model.passage.tokenize_passages([p.title for p in passages], [p.text for p in passages]))
                loss, acc = loss_and_backward(model, q_in, p_in, torch.tensor(positive, device=dev), d, cfg.grad_cache_chunk, cfg.precision)
                sum_gradients(params, d)
                grad_norm = optimizer_step(params, opt, sched, cfg.max_grad_norm)
                state["step"] += 1
                state["batch"] += 1
                done_here += 1
                dt = time.perf_counter() - t0
                if state["step"] % cfg.log_every == 0:
                    record({"kind": "train", "step": state["step"], "epoch": state["epoch"] + 1, "loss": round(loss, 5),
                            "in_batch_acc": round(acc, 4), "lr": sched.get_last_lr()[0], "grad_norm": round(grad_norm, 4),
                            "questions_per_s": round(cfg.batch_size / dt, 2)})  # fmt: skip
                advance(1)
                if show_progress and d.main and state["step"] % cfg.log_every == 0:
                    console.print(f"[dim]step {state['step']}/{total} loss {loss:.4f} in-batch acc {acc:.3f} {cfg.batch_size / dt:.1f} q/s[/dim]", highlight=False)
                epoch_end = state["batch"] == steps_per_epoch
                if not epoch_end and state["step"] % cfg.save_every == 0 and state["step"] < total:
                    checkpoint()
                if stop_after is not None and done_here >= stop_after:
                    return {"stopped_at": state["step"]}
            # End of epoch (or of max_steps): validate, keep the best, checkpoint.
            if state["batch"] == steps_per_epoch:
                state["epoch"] += 1
                state["batch"] = 0
            if dev_examples and d.main:
                last_val = validate(model, dev_examples, cfg.val_hard_negatives)
                record({"kind": "validation", "step": state["step"], "epoch": state["epoch"], **last_val})
                log(f"validation after step {state['step']}: average rank {last_val['avg_rank']} of {last_val['pool']}, "
                    + ", ".join(f"top-{k} {last_val[f'top{k}']:.1f}" for k in (1, 5, 20)))  # fmt: skip
                if state["best_avg_rank"] is None or last_val["avg_rank"] < state["best_avg_rank"]:
                    state["best_avg_rank"] = last_val["avg_rank"]
                    save_best(out, partial(save_encoders, model), {**last_val, "step": state["step"], "epoch": state["epoch"]})
                    log(f"new best (average rank {last_val['avg_rank']}) saved to {out / 'best'}")
            checkpoint()
    if d.main and not dev_examples:
        save_models_dir(out / "final", partial(save_encoders, model))
    if d.world > 1:  # no process returns (or tears the group down) before rank 0 has written the final model
        dist.barrier()
    if writer is not None:
        writer.close()
    return {"step": state["step"], **last_val}

