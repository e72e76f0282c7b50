"""What every benchmark shares: where results go and what they ran on, and the reader benchmarks'
held-out answer passages and recipe. Scripts run from the repository root (``python benchmarks/<name>.py``);
this folder is then on ``sys.path``, so ``import common`` works."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from densepr.machine import machine_info

RESULTS = Path(__file__).parent / "results"

# Reader settings a benchmark decides itself (how long, what is validated), not taken from the run's recipe.
_NOT_RECIPE = ("epochs", "max_steps", "save_every", "dev_limit", "eval_every", "max_questions", "init")


def reader_recipe(run: Path) -> dict:
    """The reader training settings (ReaderTrainConfig fields) that ``densepr reproduce --profile dpr``
    used in ``run`` (its train-reader stage record), or today's :class:`densepr.reproduce.ReaderPlan`
    where the run has none; without the settings a benchmark sets itself (steps, epochs, validation)."""
    from densepr.fileio import read_json
    from densepr.reproduce import ReaderPlan
    from densepr.train.config import ReaderTrainConfig

    record = run / "stages" / "train-reader.json"
    fields = set(ReaderTrainConfig.__dataclass_fields__)
    settings = read_json(record).get("settings", {}) if record.is_file() else asdict(ReaderPlan())
    return {k: v for k, v in settings.items() if k in fields and k not in _NOT_RECIPE}


def gold_passages(path: Path, limit: int) -> list[tuple[str, list[str], str, str]]:
    """(question, answers, title, text) of the best-ranked answer-bearing passage, for the first ``limit``
    questions of a DPR result file that have one."""
    from densepr.data.runs import iter_dpr_results

    out = []
    for r in iter_dpr_results(path):
        for c in r.ctxs:
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


__all__ = ["RESULTS", "gold_passages", "machine_info", "reader_recipe", "span_scores"]
