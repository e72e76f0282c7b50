"""``densepr train``: the DPR bi-encoder (the reader's training is in :mod:`densepr.cli.qa`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from densepr.cli.common import CacheOpt, DeviceOpt, TrainPrecisionOpt, _check_output, _default, _log, out
from densepr.train.config import TrainConfig


def train_cmd(
    train_file: Annotated[Path, typer.Option("--train", help="DPR retriever JSON (what `data build-train` writes, or biencoder-*.json), or Tevatron JSON lines (query, positive_passages, negative_passages).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory (checkpoint/, best/, metrics.jsonl).")],
    dev_file: Annotated[Optional[Path], typer.Option("--dev", help="Held-out DPR retriever JSON for validation each epoch.")] = _default(TrainConfig, "dev_file"),
    init: Annotated[Optional[Path], typer.Option(help="Initial model directory or bi-encoder checkpoint (default: embedded all-MiniLM-L6-v2).")] = None,
    shared: Annotated[bool, typer.Option("--shared", help="One encoder for questions and passages.")] = _default(TrainConfig, "shared"),
    pooling: Annotated[Optional[str], typer.Option(help="cls or mean (default: the model's own).")] = _default(TrainConfig, "pooling"),
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise vectors (DPR: no, raw dot product).")] = _default(TrainConfig, "normalize"),
    scale: Annotated[float, typer.Option(help="Multiply similarities by this in the loss (DPR: 1; ~20 with --normalize, as sentence-transformers).")] = _default(TrainConfig, "scale"),
    batch_size: Annotated[int, typer.Option(help="Questions per step over all processes.")] = _default(TrainConfig, "batch_size"),
    hard_negatives: Annotated[int, typer.Option(help="BM25 hard negatives per question (0 = in-batch negatives only).")] = _default(TrainConfig, "hard_negatives"),
    random_negatives: int = _default(TrainConfig, "random_negatives"),
    epochs: int = _default(TrainConfig, "epochs"),
    lr: float = _default(TrainConfig, "lr"),
    warmup_steps: int = _default(TrainConfig, "warmup_steps"),
    weight_decay: float = _default(TrainConfig, "weight_decay"),
    max_grad_norm: float = _default(TrainConfig, "max_grad_norm"),
    max_length: Annotated[int, typer.Option(help="Tokens per question or passage.")] = _default(TrainConfig, "max_length"),
    grad_cache_chunk: Annotated[int, typer.Option(help="Gradient caching with chunks of this many sequences (0 = off).")] = _default(TrainConfig, "grad_cache_chunk"),
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (and one per epoch).")] = _default(TrainConfig, "save_every"),
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps.")] = _default(TrainConfig, "max_steps"),
    precision: TrainPrecisionOpt = _default(TrainConfig, "precision"),
    seed: int = _default(TrainConfig, "seed"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log to <output>/tensorboard.")] = _default(TrainConfig, "tensorboard"),
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip (and count) invalid training records instead of stopping.")] = _default(TrainConfig, "skip_bad"),
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Train a DPR bi-encoder: NLL of the positive against in-batch and hard negatives.
    Several processes: `torchrun --nproc-per-node N -m densepr train ...`."""
    _check_output(output, "dir", "run directory", inputs=(init, train_file, dev_file))
    from densepr.data import EmbeddedData
    from densepr.train.config import TrainConfig
    from densepr.train.retriever import train

    cfg = TrainConfig(
        train_file=str(train_file), output_dir=str(output), init=str(init or EmbeddedData(cache_dir).model_dir),
        dev_file=str(dev_file) if dev_file else None, shared=shared, pooling=pooling, normalize=normalize, scale=scale,
        max_length=max_length, batch_size=batch_size, hard_negatives=hard_negatives, random_negatives=random_negatives,
        epochs=epochs, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        seed=seed, grad_cache_chunk=grad_cache_chunk, save_every=save_every, max_steps=max_steps,
        tensorboard=tensorboard, skip_bad=skip_bad, precision=precision,
    )  # fmt: skip
    result = train(cfg, resume=resume, device=device, log=_log)
    best = output / ("best" if (output / "best").is_dir() else "final")
    out.print(f"trained {result.get('step')} steps; encoders in {best} (question_encoder/, passage_encoder/)")
