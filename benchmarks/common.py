"""What every benchmark shares: what they ran on, and the reader benchmarks' held-out answer passages and
recipe. Scripts live in one folder per group (``benchmarks/<group>/<name>.py``, README.md) and write their
results beside them (``benchmarks/<group>/results/``); each puts this folder on ``sys.path`` before
``from common import ...``, so that works from any group and any working directory."""

from __future__ import annotations

import time
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from densepr.machine import machine_info

# Reader settings a benchmark decides itself (how long, what is validated), not taken from the run's recipe.
_NOT_RECIPE = ("epochs", "max_steps", "save_every", "dev_limit", "eval_every", "max_questions", "init")


def reader_recipe(run: Path) -> dict:
    """The reader training settings (ReaderTrainConfig fields) that ``densepr reproduce --profile dpr``
    used in ``run`` (its train-reader stage record), or today's :class:`densepr.reproduce.ReaderPlan`
    where the run has none; without the settings a benchmark sets itself (steps, epochs, validation)."""
    from densepr.fileio.atomic import read_json
    from densepr.reproduce import ReaderPlan
    from densepr.train.config import ReaderTrainConfig

    record = run / "stages" / "train-reader.json"
    fields = set(ReaderTrainConfig.__dataclass_fields__)
    settings = read_json(record).get("settings", {}) if record.is_file() else asdict(ReaderPlan())
    return {k: v for k, v in settings.items() if k in fields and k not in _NOT_RECIPE}


def gold_passages(path: Path, limit: int, depth: int | None = None) -> list[tuple[str, list[str], str, str]]:
    """(question, answers, title, text) of the best-ranked answer-bearing passage, for the first ``limit``
    questions of a DPR result file that have one in their first ``depth`` passages (None: any)."""
    from densepr.data.runs import iter_dpr_results

    out = []
    for r in iter_dpr_results(path):
        for c in r.ctxs[:depth]:
            if c.get("has_answer"):
                out.append((r.question, list(r.answers), str(c.get("title") or ""), c["text"]))
                break
        if len(out) >= limit:
            break
    return out


def span_scores(preds: list[str], gold) -> dict:
    """Exact match and F1 (DPR's / SQuAD's normalisation), in %, of one predicted answer per gold row."""
    from densepr.evaluate.qa import exact_match, f1_score

    n = max(1, len(gold))
    return {"em": round(100 * sum(exact_match(p, g[1]) for p, g in zip(preds, gold)) / n, 2),
            "f1": round(100 * sum(f1_score(p, g[1]) for p, g in zip(preds, gold)) / n, 2)}  # fmt: skip


def given_passage_scores(reader_dir: str | Path, gold, device: str) -> dict:
    """Exact match and F1 (%) of a reader's best span in each gold row's answer passage (:func:`gold_passages`)."""
    from densepr.models.reader import Reader

    reader = Reader.load(reader_dir, device)
    reader.eval()
    readings = reader.read([g[0] for g in gold], [[(g[2], g[3])] for g in gold])
    return span_scores([r[0].text for r in readings], gold)


def train_reader_once(cfg, run_dir: Path, device: str, name: str) -> dict:
    """Train reader config ``cfg`` unless ``run_dir/done.json`` records a finished run of the same
    configuration (so a killed benchmark continues; fields the record predates count at their default);
    returns that record ``{config, seconds, steps}``."""
    import json

    from densepr.fileio.atomic import read_json, write_json
    from densepr.fileio.dirs import remove_tree
    from densepr.train.checkpoint import check_run_dir
    from densepr.train.reader import train_reader

    done = run_dir / "done.json"
    # a record written before a config field existed trained with that field's default
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(cfg)
                if f.default is not MISSING or f.default_factory is not MISSING}  # fmt: skip
    if done.is_file() and json.loads(json.dumps({**defaults, **read_json(done).get("config", {})})) == json.loads(json.dumps(asdict(cfg))):
        record = read_json(done)
        print(f"{name}: trained before ({record['seconds']} s), read again")
        return record
    check_run_dir(Path(cfg.output_dir))  # a folder a run did not write is refused, not deleted
    remove_tree(Path(cfg.output_dir))
    t0 = time.perf_counter()
    out = train_reader(cfg, device=device, show_progress=False, log=print)
    record = {"config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1), "steps": out.get("step")}
    write_json(done, record)
    return record


__all__ = ["given_passage_scores", "gold_passages", "machine_info", "reader_recipe", "span_scores", "train_reader_once"]
