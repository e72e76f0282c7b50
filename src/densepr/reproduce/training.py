"""Training stages (profiles dpr, dpr-smoke): mining, re-mining, DPR training and encoding with each model.

Also the training runs' settings from the plan, resuming a killed run, and the notice when this machine
has less memory than the plan's measured peak.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from densepr.data.qa import QASet
from densepr.errors import DenseprError
from densepr.fileio.atomic import read_json
from densepr.fileio.dirs import remove_tree
from densepr.reproduce.context import Job, load_sets
from densepr.reproduce.profiles import TrainPlan, dense_stage
from densepr.reproduce.retrieval import dense
from densepr.stages import Done, Stage


def mining_sets(job: Job) -> list[QASet]:
    return load_sets(job.data, job.plan.sets, job.plan.questions)


def _mine(job: Job, name: str, prefix: str, upstream: Sequence[str], negatives_from: Callable[[], Callable] | None) -> Stage:
    """Mine ``train-data/<prefix>.json`` + ``<prefix>-dev.json`` (+ ``.qa.tsv``, ``.stats.json``)."""
    from densepr.train.mining import build_training_data, heldout_path, stats_path

    plan, d = job.plan, job.cfg.out_dir / "train-data"
    train_file, dev_file = d / f"{prefix}.json", d / f"{prefix}-dev.json"
    sets = mining_sets(job)
    outputs = [train_file, dev_file, heldout_path(dev_file), stats_path(train_file)]

    def build() -> dict:
        rank = negatives_from() if negatives_from is not None else None
        report = build_training_data(sets, job.corpus(), job.runner.done["bm25"].get(), train_file, dev_file,
                                     val_fraction=plan.val_fraction, depth=plan.depth, hard_negatives=plan.mined_hard,
                                     negatives_from=rank, negatives_name=plan.remine_mode, skip_top=plan.skip_top)  # fmt: skip
        r = report["train"]
        job.log(f"{name}: {r['records']} training questions kept of {sum(r['questions'].values())}; positives from {r['positive_from']}")
        return report

    settings = {"sets": list(plan.sets), "questions": [q.fingerprint() for q in sets], "val_fraction": plan.val_fraction,
                "depth": plan.depth, "hard": plan.mined_hard, **({"mode": plan.remine_mode, "skip_top": plan.skip_top} if negatives_from else {})}  # fmt: skip
    return Stage(name, build, lambda: read_json(stats_path(train_file)), settings, ("passages", "bm25", *upstream), outputs)


def mine(job: Job) -> Stage:
    """Round 1's data: BM25's best answer-bearing passage is the positive, its answerless ones the hard negatives."""
    return _mine(job, "mine", "train", (), None)


def remine(job: Job) -> Stage:
    """Round 2's data: hard negatives from round 1's own dense top-k, positives from its or BM25's."""

    def ranking() -> Callable:
        model = job.dense_only("round1")
        return lambda questions, k: model.retrieve(questions, k, job.plan.remine_mode)

    return _mine(job, "remine", "round2", ("dense-round1",), ranking)


def train(job: Job, model: str, data: str, hard_negatives: int, epochs: int, init: str | None = None) -> Stage:
    """Train one DPR model into ``models/<model>/``; its ``best/`` (by validation) is the stage's output.

    A killed training stage resumes from the run's last checkpoint when the settings are the same.
    """
    from densepr.train.config import TrainConfig

    plan, run_dir = job.plan, job.cfg.out_dir / "models" / model
    prefix = {"mine": "train", "remine": "round2"}[data]
    init_dir = job.model_dir(plan.model) if init is None else None

    def config() -> TrainConfig:
        d = job.cfg.out_dir / "train-data"
        start = init_dir or str(job.runner.done[f"train-{init}"].get())
        return TrainConfig(train_file=str(d / f"{prefix}.json"), dev_file=str(d / f"{prefix}-dev.json"), output_dir=str(run_dir),
                           init=start, **_plan_settings(plan, hard_negatives, epochs))  # fmt: skip

    def build() -> Path:
        from densepr.train.retriever import train

        cfg, runner = config(), job.runner
        resume = None
        if runner.rank == 0:
            resume = (run_dir / "config.json").is_file() and same_run(read_json(run_dir / "config.json"), cfg)
            if not resume:
                remove_tree(run_dir)  # a run of other settings (or none): start afresh
        resume = runner.sync(resume)
        job.timed(f"train {model}", train, cfg, resume=resume, device=_train_device(job.cfg.device), show_progress=job.show_progress, log=job.log)
        runner.sync(None)  # rank 0 has written best/
        return _trained(run_dir)

    settings = {k: v for k, v in asdict(_placeholder_config(plan, hard_negatives, epochs)).items()
                if k not in ("train_file", "dev_file", "output_dir", "init")}  # fmt: skip
    settings["init"] = plan.model if init is None else f"train-{init}"  # "embedded" (MiniLM): as before models existed
    upstream = (data, *(() if init is None else (f"train-{init}",)))
    return Stage(f"train-{model}", build, lambda: _trained(run_dir), settings, upstream, [run_dir / "best"], distributed=True,
                 added={"precision": "fp32"})  # fmt: skip


def train_and_encode(job: Job, model: str, data: str, hard_negatives: int, epochs: int, init: str | None, index: str,
                     slot: str | None = None) -> Done:  # fmt: skip
    """Run :func:`train` and then :func:`~densepr.reproduce.retrieval.dense` with the trained passage encoder into ``<out>/<index>``;
    returns the training stage's :class:`Done`. ``slot``: a DPR model whose places in the stage order
    these take (``"round2"`` for a round-2 variant), so ``--from`` treats them alike."""
    stage = train(job, model, data, hard_negatives, epochs, init)
    enc = dense(job, index, model=lambda: str(done.get()), upstream=(stage.name,))
    if slot is not None:
        stage, enc = replace(stage, group=f"train-{slot}"), replace(enc, group=dense_stage(slot))
    done = job.runner.run(stage)
    job.runner.run(enc)
    return done


def _train_device(device: str | None) -> str | None:
    """Under torchrun each process trains on its own GPU (``cuda`` means ``cuda:LOCAL_RANK``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device in (None, "cuda"):
        return None  # densepr.train picks cuda:LOCAL_RANK, or the CPU
    return device


def same_run(saved: dict, cfg) -> bool:
    """Whether a training run directory holds a run of these settings (so it may be resumed)."""
    from densepr.train.checkpoint import config_diff

    return not config_diff(saved, cfg)


def _trained(run_dir: Path) -> Path:
    """The model a training run produced: ``best/`` (by validation), else ``final/``."""
    for name in ("best", "final"):
        if (run_dir / name / "question_encoder").is_dir():
            return run_dir / name
    raise DenseprError(f"{run_dir}: the training run left no model (best/ or final/)")


def _placeholder_config(plan: TrainPlan, hard_negatives: int, epochs: int):
    """A run's settings before the model it starts from exists (the paths are not settings)."""
    from densepr.train.config import TrainConfig

    return TrainConfig(train_file="", output_dir="", init="", dev_file="", **_plan_settings(plan, hard_negatives, epochs))


def _plan_settings(plan: TrainPlan, hard_negatives: int, epochs: int) -> dict:
    """The training configuration's settings that come from the plan."""
    return dict(batch_size=plan.batch_size, hard_negatives=hard_negatives, epochs=epochs, lr=plan.lr, warmup_steps=plan.warmup_steps,
                max_steps=plan.max_steps, save_every=plan.save_every, normalize=plan.normalize, scale=plan.scale,
                grad_cache_chunk=plan.grad_cache_chunk, precision=plan.precision)  # fmt: skip


def memory_notice(plan: TrainPlan | None, available_gib: float | None) -> str | None:
    """What to do when this machine has less memory available than the plan's measured peak
    (training with the full graph); ``None`` when it fits, is unknown, or gradient caching is on."""
    if plan is None or plan.grad_cache_chunk or plan.full_graph_peak_gib is None or available_gib is None:
        return None
    if available_gib >= plan.full_graph_peak_gib:
        return None
    return (f"note: this machine has {available_gib:.1f} GiB of memory available; this experiment peaked at {plan.full_graph_peak_gib} GiB "
            f"(training batches of {plan.batch_size} with the full graph). Pass --grad-cache-chunk 8 to train with gradient caching "
            "(the same loss; training's peak ~2.3 GiB, ~15% slower).")  # fmt: skip


def trains_on_cpu(device: str | None) -> bool:
    import torch

    from densepr.models.hf import default_device

    return (torch.device(device) if device else default_device()).type == "cpu"


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), in GiB; ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            kib = next(int(ln.split()[1]) for ln in fh if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return kib / 2**20
