"""Checkpoints and resuming, for both trainers (retriever and reader).

A checkpoint directory holds the model directories (Hugging Face format), the optimizer state
and RNG states (safetensors) and trainer_state.json (step, epoch, batch, scheduler); never
pickle. It is written complete beside its final name, then swapped in, so a killed run always
finds its last complete checkpoint and, resumed, ends with the same weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from densepr.errors import DenseprError
from densepr.fileio.atomic import atomic_path, read_json, write_json
from densepr.fileio.dirs import atomic_dir, writable_dir
from densepr.fileio.manifest import check_dir_manifest, write_dir_manifest


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


# What a run directory holds (both trainers; .tmp/.old: the fixed names earlier versions swapped through):
# a new run, or a resumed one, may write only into a directory that is new, empty or holds only these.
RUN_FILES = ("config.json", "data.json", "metrics.jsonl", "checkpoint/", "checkpoint.tmp/", "checkpoint.old/", "best/",
             "best.tmp/", "best.old/", "final/", "tensorboard/")
CHECKPOINT_FILES = ("optimizer.safetensors", "trainer_state.json", "question_encoder/", "passage_encoder/", "reader/")
# best/ and final/ of the retriever: two encoder directories (each with its manifest) and the validation
BIENCODER_FILES = ("question_encoder/", "passage_encoder/", "validation.json")


def check_run_dir(out: Path) -> None:
    """Refuse, before anything is written or deleted, a run directory that holds what a run does not
    write (a user's folder, another artefact; a symbolic link is judged by its target)."""
    writable_dir(out, "training run", RUN_FILES)


def save_checkpoint(directory: Path, save_models: Callable[[Path], None], opt, sched, state: dict, device: torch.device) -> None:
    """Write a complete checkpoint beside ``directory``, then swap it in (``fileio.atomic_dir``: never a
    half checkpoint, and never a sibling it did not create deleted).

    ``save_models(dir)`` writes the model directories; the rest is the same for every trainer.
    """
    with atomic_dir(directory, "checkpoint", CHECKPOINT_FILES) as tmp:
        save_models(tmp)
        tensors, meta = optimizer_tensors(opt)
        tensors["rng.cpu"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        with atomic_path(tmp / "optimizer.safetensors") as path:
            save_file(tensors, path)
        sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
        write_json(tmp / "trainer_state.json", {**state, "optimizer": meta, "scheduler": sched_state})
        write_dir_manifest(tmp, "checkpoint")  # last: a checkpoint with a manifest is complete


def save_models_dir(directory: Path, save_models: Callable[[Path], None], kind: str | None = None, extra: dict | None = None) -> None:
    """Replace ``directory`` (a run's ``best/`` or ``final/``) with the models now, plus ``validation.json``
    (``extra``), complete or not at all. ``kind``: the manifest ``save_models`` writes at the top (a reader's);
    None: a bi-encoder's two encoder directories, each with its own."""
    own = BIENCODER_FILES if kind is None else ("validation.json",)
    with atomic_dir(directory, kind or "bi-encoder", own, manifest=kind is not None) as tmp:
        save_models(tmp)
        if extra is not None:
            write_json(tmp / "validation.json", extra)


def save_best(out: Path, save_models: Callable[[Path], None], validation: dict, kind: str | None = None) -> None:
    """Replace ``out/best`` with the models now, plus ``validation.json``, complete or not at all."""
    save_models_dir(out / "best", save_models, kind, validation)


def config_diff(saved: dict, cfg: Any) -> list[str]:
    """The fields (but ``max_steps``, which a resume may change) where a saved ``config.json`` differs from
    the config dataclass ``cfg``; a config saved before a field existed had that field's default."""
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(cfg) if f.default is not MISSING}))
    saved, mine = {**defaults, **saved}, json.loads(json.dumps(asdict(cfg)))
    return sorted(k for k in mine if k != "max_steps" and saved.get(k) != mine[k])


def _run_config(out: Path, cfg: Any) -> dict | None:
    """``out/config.json`` when it is a training configuration of ``cfg``'s kind (it has every field
    without a default), else None: a directory that is not a run of this trainer."""
    path = out / "config.json"
    saved = read_json(path) if path.is_file() else None
    required = [f.name for f in fields(cfg) if f.default is MISSING and f.default_factory is MISSING]
    return saved if isinstance(saved, dict) and all(k in saved for k in required) else None


def start_run(out: Path, cfg: Any, resume: bool, main: bool = True, log: Callable[[str], None] = lambda m: None) -> Path | None:
    """The checkpoint to resume from (None for a fresh run), after the checks every trainer makes.

    Refuses ``--resume`` in a directory that holds no run of this trainer, a fresh run over an
    existing checkpoint, and a resume whose configuration differs from the saved ``config.json``
    (``max_steps`` may change). ``--resume`` of a run killed before its first checkpoint (its
    ``config.json``, the same configuration, no checkpoint) starts it over: nothing was kept to
    continue from, and a killed run must go on when started again.
    """
    check_run_dir(out)
    ckpt = find_checkpoint(out) if resume else None
    if not resume and main and (out / "checkpoint").exists():
        raise DenseprError(f"{out} already holds a run; use --resume to continue it or another --output")
    if resume:
        saved = _run_config(out, cfg)
        if saved is None:  # not a training directory of this trainer: never written over
            raise DenseprError(f"{out}: no checkpoint to resume from" if ckpt is None else
                               f"{out / 'config.json'}: missing or not a training configuration; cannot resume")  # fmt: skip
        if ckpt is None and (out / "checkpoint").exists():
            raise DenseprError(f"{out / 'checkpoint'}: not a complete checkpoint (no trainer_state.json or optimizer.safetensors)")
        diff = config_diff(saved, cfg)
        if diff:
            raise DenseprError(f"{out}: --resume with a different configuration ({', '.join(diff)}); use the same options")
        if ckpt is None:
            log(f"{out}: the run stopped before its first checkpoint; starting it over")
    return ckpt


def restore(ckpt: Path, opt, sched, state: dict, device: torch.device) -> dict:
    """Load optimizer, scheduler and RNG states from ``ckpt``; returns the saved ``state`` keys."""
    st = read_json(ckpt / "trainer_state.json")
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    try:
        load_optimizer(opt, {k: v.to(device) if k.startswith("state.") else v for k, v in tensors.items()}, st["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise DenseprError(f"cannot load checkpoint {ckpt}: its optimizer state does not match the model ({e})") from None
    sched.load_state_dict({**sched.state_dict(), **st["scheduler"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return {k: st.get(k) for k in (*state, "world")}


def append_metrics(out: Path, entry: dict) -> None:
    """One JSON line in ``metrics.jsonl``."""
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def find_checkpoint(output_dir: Path) -> Path | None:
    """The last complete checkpoint (also one left as ``.old`` by a crash mid-swap)."""
    for name in ("checkpoint", "checkpoint.old"):
        c = output_dir / name
        if (c / "trainer_state.json").is_file() and (c / "optimizer.safetensors").is_file():
            check_dir_manifest(c, ("checkpoint",))  # refuse a truncated or altered checkpoint, clearly
            return c
    return None
