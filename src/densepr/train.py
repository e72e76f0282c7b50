"""DPR training (Karpukhin et al., 2020, Section 3.2): learn E_Q and E_P with in-batch negatives.

Each step takes B questions; each brings its positive passage and ``hard_negatives`` BM25
passages without the answer. Every passage of the batch is a negative for every other
question, and the loss is the NLL of each question's positive among all of them
(:meth:`densepr.encoder.BiEncoder.loss`).

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

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .data.passages import Passage
from .data.training import iter_train_records
from .encoder import BiEncoder, Encoder, EncoderConfig
from .errors import DenseprError
from .evaluate import has_answer
from .fileio import atomic_path, check_dir_manifest, read_json, remove_tree, write_dir_manifest, write_json
from .progress import console, progress_bar


@dataclass
class TrainConfig:
    """Everything a run depends on (saved as ``config.json``; a resumed run must match it)."""

    train_file: str
    output_dir: str
    init: str  # a Hugging Face model directory, or a checkpoint with question_encoder/ + passage_encoder/
    dev_file: str | None = None
    shared: bool = False  # one encoder for questions and passages
    pooling: str | None = None  # default: the model's own setting
    normalize: bool = False  # DPR: raw dot product
    max_length: int = 256
    batch_size: int = 128  # questions per step, over all processes
    hard_negatives: int = 1
    random_negatives: int = 0
    epochs: int = 2
    lr: float = 2e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 2.0  # DPR's
    adam_eps: float = 1e-8
    seed: int = 12345
    grad_cache_chunk: int = 0  # >0: gradient caching with chunks of this many sequences
    save_every: int = 50  # steps between checkpoints (and at each epoch end)
    val_hard_negatives: int = 5  # validation pool: each question's positive + this many hard negatives
    max_steps: int | None = None  # stop after this many steps in total (for tests and smoke runs)
    log_every: int = 1
    tensorboard: bool = False
    skip_bad: bool = False


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


# -- processes -------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place among ``world`` processes (world 1: no torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Dist:
        """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...), if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())


def _gather_rows(x: torch.Tensor, d: Dist) -> tuple[torch.Tensor, list[int]]:
    """All-gather a [n_r, ...] tensor whose n_r may differ per process; returns the concatenation
    (no gradient) and every process's row count."""
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes_i), *x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: len(x)] = x
    parts = [torch.zeros_like(pad) for _ in range(d.world)]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)]), sizes_i


def global_batch(q: torch.Tensor, p: torch.Tensor, positive: torch.Tensor, d: Dist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice, slice]:
    """Questions and passages of all processes, this process's slices kept differentiable.

    Returns ``(Q, P, positive, my_q_rows, my_p_rows)`` where ``positive`` indexes ``P``
    (each process's positions shifted by the passages of the processes before it).
    """
    if d.world == 1:
        return q, p, positive, slice(0, len(q)), slice(0, len(p))
    q_all, q_sizes = _gather_rows(q.detach(), d)
    p_all, p_sizes = _gather_rows(p.detach(), d)
    pos_all, _ = _gather_rows(positive, d)
    q_off, p_off = sum(q_sizes[: d.rank]), sum(p_sizes[: d.rank])
    mine_q, mine_p = slice(q_off, q_off + len(q)), slice(p_off, p_off + len(p))
    # Put the local, differentiable embeddings back in place of their gathered copies.
    q_all = torch.cat([q_all[:q_off], q, q_all[mine_q.stop :]])
    p_all = torch.cat([p_all[:p_off], p, p_all[mine_p.stop :]])
    shift = torch.repeat_interleave(torch.tensor(np.cumsum([0, *p_sizes[:-1]]), device=q.device), torch.tensor(q_sizes, device=q.device))
    return q_all, p_all, pos_all + shift, mine_q, mine_p


def sum_gradients(params: Sequence[torch.nn.Parameter], d: Dist) -> None:
    """Sum gradients over processes: each holds the global loss's gradient through its own slice."""
    if d.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# -- one optimisation step ---------------------------------------------------------------------------
class RandState:
    """The RNG state at a point, to replay a forward pass with the same dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):  # the global RNG is untouched afterwards
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


# Sequences per forward piece when no gradient cache is asked for. Measured on the 2-core CPU
# (all-MiniLM-L6-v2, train mode, length-sorted): 12.0 passages/s fwd+bwd at 8, 6.5 at 32,
# 2.3 at 128; GPUs want larger pieces.
FORWARD_CHUNK = {"cpu": 8, "cuda": 64}


def chunks(inputs: dict[str, torch.Tensor], size: int) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Split a padded batch into chunks of similar length, each trimmed to its longest sequence.

    Sorting by length first means little padding per chunk: in train mode, BERT's attention
    dropout costs grow with the square of the padded length (3-4x faster here on CPU).

    Returns:
        The chunks (in length order) and ``inverse``: ``torch.cat(outputs)[inverse]`` puts the
        per-sequence outputs back in the batch's order.
    """
    lengths = inputs["attention_mask"].sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    size = size if size > 0 else len(order)
    out = []
    for s in range(0, len(order), size):
        idx = order[s : s + size]
        width = int(lengths[idx].max())
        out.append({k: v[idx, :width] for k, v in inputs.items()})
    return out, torch.argsort(order)


def amp(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_and_backward(model: BiEncoder, q_in: dict, p_in: dict, positive: torch.Tensor, d: Dist, chunk: int = 0) -> tuple[float, float]:
    """Forward, loss over the global batch, backward into the local parameters' ``.grad``.

    Args:
        chunk: 0 for a plain step (one graph for the whole batch, built in length-sorted
            pieces); >0 for gradient caching with chunks of this many sequences.

    Returns:
        ``(loss, in-batch accuracy)``: the accuracy is the fraction of questions whose positive
        scores highest in the batch (DPR's "correct predictions ratio", not top-k accuracy).
    """
    device = q_in["input_ids"].device
    piece = chunk or FORWARD_CHUNK.get(device.type, 64)
    (q_chunks, q_inv), (p_chunks, p_inv) = chunks(q_in, piece), chunks(p_in, piece)
    if chunk <= 0:
        with amp(device):
            q = torch.cat([model.encode_query(**c) for c in q_chunks]).float()[q_inv]
            p = torch.cat([model.encode_passage(**c) for c in p_chunks]).float()[p_inv]
        Q, P, pos, _, _ = global_batch(q, p, positive, d)
        loss = BiEncoder.loss(Q, P, pos)
        loss.backward()
        return float(loss.detach()), float((BiEncoder.similarity(Q.detach(), P.detach()).argmax(1) == pos).float().mean())
    # Gradient caching: 1) embed every chunk without a graph, remembering its RNG state.
    states, reps = [], []
    with torch.no_grad():
        for encode, parts in ((model.encode_query, q_chunks), (model.encode_passage, p_chunks)):
            for c in parts:
                states.append(RandState(device))
                with amp(device):
                    reps.append(encode(**c).float())
    nq = len(q_chunks)
    q, p = torch.cat(reps[:nq])[q_inv], torch.cat(reps[nq:])[p_inv]
    # 2) the loss on the embeddings alone, and its gradient with respect to them.
    Q, P, pos, mine_q, mine_p = global_batch(q, p, positive, d)
    Q, P = Q.detach().requires_grad_(), P.detach().requires_grad_()
    loss = BiEncoder.loss(Q, P, pos)
    loss.backward()
    acc = float((BiEncoder.similarity(Q.detach(), P.detach()).argmax(1) == pos).float().mean())
    # Back to chunk order: row i of a chunk is sequence order[i], i.e. where inverse points.
    q_order, p_order = torch.argsort(q_inv), torch.argsort(p_inv)
    grads = list(torch.split(Q.grad[mine_q][q_order], [len(c["input_ids"]) for c in q_chunks]))
    grads += list(torch.split(P.grad[mine_p][p_order], [len(c["input_ids"]) for c in p_chunks]))
    # 3) replay each chunk with a graph and the same dropout, and push the cached gradient through.
    encoders = [model.encode_query] * nq + [model.encode_passage] * len(p_chunks)
    for encode, c, state, g in zip(encoders, q_chunks + p_chunks, states, grads):
        with state.replay(), amp(device):
            rep = encode(**c).float()
        rep.backward(g)
    return float(loss.detach()), acc


# -- checkpoints -----------------------------------------------------------------------------------
def _params(model: BiEncoder) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():  # a shared encoder appears once
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for i, st in sd["state"].items() for k, v in st.items()}  # fmt: skip
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, st in state.items():  # load_state_dict checks counts, not shapes
        if i >= len(params) or any(v.dim() and v.shape != params[i].shape for v in st.values()):
            raise ValueError(f"parameter {i}: saved state of shape {next(iter(st.values())).shape}, model has "
                             f"{tuple(params[i].shape) if i < len(params) else 'no such parameter'}")  # fmt: skip
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_encoders(model: BiEncoder, directory: Path) -> None:
    model.question.save(directory / "question_encoder")
    model.passage.save(directory / "passage_encoder")


def save_checkpoint(directory: Path, model: BiEncoder, opt, sched, state: dict) -> None:
    """Write a complete checkpoint beside ``directory``, then swap it in (never a half checkpoint)."""
    tmp = directory.with_name(directory.name + ".tmp")
    remove_tree(tmp)
    save_encoders(model, tmp)
    tensors, meta = optimizer_tensors(opt)
    tensors["rng.cpu"] = torch.get_rng_state()
    dev = model.question.device
    if dev.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(dev)
    with atomic_path(tmp / "optimizer.safetensors") as path:
        save_file(tensors, path)
    sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    write_json(tmp / "trainer_state.json", {**state, "optimizer": meta, "scheduler": sched_state})
    write_dir_manifest(tmp, "checkpoint")  # last: a checkpoint with a manifest is complete
    old = directory.with_name(directory.name + ".old")
    remove_tree(old)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    remove_tree(old)


def find_checkpoint(output_dir: Path) -> Path | None:
    """The last complete checkpoint (also one left as ``.old`` by a crash mid-swap)."""
    for name in ("checkpoint", "checkpoint.old"):
        c = output_dir / name
        if (c / "trainer_state.json").is_file() and (c / "optimizer.safetensors").is_file():
            check_dir_manifest(c, ("checkpoint",))  # refuse a truncated or altered checkpoint, clearly
            return c
    return None


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


# -- the loop --------------------------------------------------------------------------------------
def linear_schedule(opt, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _load_model(cfg: TrainConfig, device: torch.device, source: Path | None = None) -> BiEncoder:
    src = Path(source or cfg.init)
    pair = (src / "question_encoder").is_dir() and (src / "passage_encoder").is_dir()
    q_dir, p_dir = (src / "question_encoder", src / "passage_encoder") if pair else (src, src)
    base = EncoderConfig.from_dir(q_dir)
    enc_cfg = EncoderConfig(cfg.pooling or base.pooling, cfg.normalize, cfg.max_length)
    q = Encoder.load(q_dir, enc_cfg, device)
    p = q if cfg.shared else Encoder.load(p_dir, enc_cfg, device)
    return BiEncoder(q, p)


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

    ckpt = find_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise DenseprError(f"{out}: no checkpoint to resume from")
    if ckpt is None and d.main and (out / "checkpoint").exists():
        raise DenseprError(f"{out} already holds a run; use --resume to continue it or another --output")
    if ckpt is not None:
        saved = read_json(out / "config.json")
        mine = json.loads(json.dumps(asdict(cfg)))
        diff = sorted(k for k in mine if k not in ("max_steps",) and saved.get(k) != mine[k])
        if diff:
            raise DenseprError(f"{out}: --resume with a different configuration ({', '.join(diff)}); use the same options")

    torch.manual_seed(cfg.seed)
    try:
        model = _load_model(cfg, dev, ckpt)
    except DenseprError as e:
        raise DenseprError(f"cannot load {'checkpoint ' + str(ckpt) if ckpt else 'the initial model'}: {e}") from None
    model.train()
    params = _params(model)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and LayerNorm, as usual for BERT
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, eps=cfg.adam_eps)  # fmt: skip
    sched = linear_schedule(opt, cfg.warmup_steps, total)
    state = {"step": 0, "epoch": 0, "batch": 0, "best_avg_rank": None, "world": d.world}
    if ckpt is not None:
        st = read_json(ckpt / "trainer_state.json")
        if st.get("world") != d.world:
            raise DenseprError(f"{ckpt} was written by {st.get('world')} process(es); resume with the same number")
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        try:
            load_optimizer(opt, {k: v.to(dev) if k.startswith("state.") else v for k, v in tensors.items()}, st["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise DenseprError(f"cannot load checkpoint {ckpt}: its optimizer state does not match the model ({e})") from None
        sched.load_state_dict({**sched.state_dict(), **st["scheduler"]})
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and dev.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], dev)
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
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        if writer is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    writer.add_scalar(f"{entry.get('kind', 'train')}/{k}", v, entry["step"])

    def checkpoint() -> None:
        if d.main:
            save_checkpoint(out / "checkpoint", model, opt, sched, state)
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
                loss, acc = loss_and_backward(model, q_in, p_in, torch.tensor(positive, device=dev), d, cfg.grad_cache_chunk)
                sum_gradients(params, d)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
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
                    tmp = out / "best.tmp"
                    remove_tree(tmp)
                    save_encoders(model, tmp)
                    write_json(tmp / "validation.json", {**last_val, "step": state["step"], "epoch": state["epoch"]})
                    remove_tree(out / "best")
                    tmp.rename(out / "best")
                    log(f"new best (average rank {last_val['avg_rank']}) saved to {out / 'best'}")
            checkpoint()
    if d.main and not dev_examples:
        remove_tree(out / "final")
        save_encoders(model, out / "final")
    if writer is not None:
        writer.close()
    return {"step": state["step"], **last_val}

