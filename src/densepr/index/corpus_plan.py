"""What the passages and their BM25 index cost at a given corpus size, from measurements.

``benchmarks/scale/scale.py`` measures the passage store and BM25 (build wall and peak memory, disk,
``Retriever.load`` time and memory, queries/s) at several corpus sizes and packages a linear
fit ``cost = fixed + per_passage * N`` of each in ``resources/corpus-costs.json``, with the sizes
and machine it came from. ``densepr index plan`` shows them beside the dense index types' costs
(:func:`densepr.index.dense_plan.plan`). Sizes beyond the largest measured are extrapolations, and are
marked so.
"""

from __future__ import annotations

import json
from importlib import resources

COSTS_RESOURCE = "corpus-costs.json"

# (key in the resource, what it is, unit): the rows `densepr index plan` prints
ROWS = (
    ("store_bytes", "passage store on disk (passages.tsv may go once it is built)", "bytes"),
    ("bm25_index_bytes", "BM25 index on disk", "bytes"),
    ("bm25_build_peak_bytes", "BM25 build: peak RSS, all processes", "bytes"),
    ("bm25_build_anon_bytes", "BM25 build: peak anonymous memory (not page cache)", "bytes"),
    ("bm25_build_s", "BM25 build: wall time", "seconds"),
    ("load_rss_bytes", "Retriever.load (store + BM25): RSS after", "bytes"),
    ("load_s", "Retriever.load: wall time", "seconds"),
)


def measured_costs() -> dict | None:
    """The packaged fit (None when this build carries none)."""
    try:
        return json.loads(resources.files("densepr").joinpath("resources", COSTS_RESOURCE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def fit(sizes: list[int], values: list[float]) -> dict:
    """Least-squares ``fixed + per_passage * N`` over the measured sizes; through zero for one size, or
    where the line would cross zero above N = 0 (a negative fixed cost: small corpora would cost nothing)."""
    n = len(sizes)
    if n > 1:
        mx, my = sum(sizes) / n, sum(values) / n
        slope = sum((x - mx) * (y - my) for x, y in zip(sizes, values)) / sum((x - mx) ** 2 for x in sizes)
        if my - slope * mx >= 0:
            return {"fixed": my - slope * mx, "per_passage": slope}
    return {"fixed": 0.0, "per_passage": sum(x * y for x, y in zip(sizes, values)) / sum(x * x for x in sizes)}


def corpus_plan(num_passages: int, costs: dict | None = None) -> list[dict]:
    """Each row of :data:`ROWS` at ``num_passages``: the fitted value, and whether it is within the
    measured sizes (``measured``), or an extrapolation beyond them."""
    costs = costs if costs is not None else measured_costs()
    if not costs:
        return []
    largest = max(costs["sizes"])
    out = []
    for key, what, unit in ROWS:
        f = costs["fits"].get(key)
        if f is None:
            continue
        value = max(0.0, f["fixed"] + f["per_passage"] * num_passages)
        out.append({"key": key, "what": what, "unit": unit, "value": value, "extrapolated": num_passages > largest * 1.01})
    return out
