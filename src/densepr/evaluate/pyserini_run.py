"""DPR result JSON (what ``densepr retrieve -o`` writes) as Pyserini's DPR retrieval JSON (``densepr export-run``).

Pyserini's ``pyserini.eval.evaluate_dpr_retrieval --retrieval FILE --topk 20 100`` reads::

    {"0": {"question": "...", "answers": ["..."],
           "contexts": [{"docid": "...", "score": 81.2, "text": "title\\ntext", "has_answer": true}, ...]}, ...}

It counts a question as a hit at k when a context before rank k has ``has_answer`` true; a context
without ``has_answer`` is judged on ``text.split('\\n')[1]`` (the passage text after the title) by its
copy of DPR's rule. So: the keys are the questions' 0-based positions (the qids of densepr's TREC runs
and of Pyserini's ``topics.dpr.*``); ``has_answer`` is kept as densepr judged it, or computed by DPR's
rule (:func:`densepr.evaluate.answers.has_answer`) where the input lacks it and has answers; line
breaks inside a title or text become spaces, so the text is exactly the second line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from densepr.data.qa import default_match
from densepr.data.runs import iter_dpr_results
from densepr.errors import InputError
from densepr.evaluate.answers import has_answer
from densepr.fileio import atomic_write


def _one_line(s: object) -> str:
    return " ".join(str(s or "").splitlines())


def dpr_results_to_pyserini(results: str | os.PathLike[str], out: str | os.PathLike[str], match: str | None = None) -> int:
    """Convert a DPR result JSON file into Pyserini's retrieval JSON, streaming and atomically.

    Args:
        results: DPR result JSON (``[{"question", "answers", "ctxs": [{"id", "title", "text", "score", "has_answer"}]}]``).
        out: the Pyserini retrieval JSON to write.
        match: how answers are matched where ``has_answer`` is missing (default: regex for CuratedTREC files, by name).

    Returns:
        The number of questions written.
    """
    match = match or default_match(Path(results).name)
    n = 0
    with atomic_write(out) as fh:
        fh.write("{")
        for n, r in enumerate(iter_dpr_results(results), 1):
            contexts = []
            for j, c in enumerate(r.ctxs):
                try:
                    score = float(c.get("score", 0.0))
                except (TypeError, ValueError):
                    raise InputError(results, f"ctxs[{j}].score {c.get('score')!r} is not a number", line=n, unit="record", field="score") from None
                ctx = {"docid": str(c.get("id", "")), "score": score,
                       "text": f"{_one_line(c.get('title'))}\n{_one_line(c['text'])}"}  # fmt: skip
                if "has_answer" in c:
                    ctx["has_answer"] = bool(c["has_answer"])
                elif r.answers:
                    ctx["has_answer"] = has_answer(r.answers, c["text"], match)
                contexts.append(ctx)
            fh.write(",\n" if n > 1 else "\n")
            fh.write(f"{json.dumps(str(n - 1))}: " + json.dumps({"question": r.question, "answers": r.answers, "contexts": contexts},
                                                                 ensure_ascii=False))  # fmt: skip
        fh.write("\n}\n")
    return n
