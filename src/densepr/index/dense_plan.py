"""Planning a dense index: bytes per passage, RAM and disk per index type, and how to spread it over a cluster."""

from __future__ import annotations

from densepr.index.types import INDEX_TYPES, IndexParams, get

COSTS_RESOURCE = "index-costs.json"


def bytes_per_vector(index_type: str, dim: int, hnsw_m: int = 32, pq_m: int | None = None) -> float:
    """Bytes each passage costs in an index of ``index_type`` (vectors, codes, graph links, ids)."""
    return get(index_type).bytes_per_vector(dim, IndexParams(hnsw_m=hnsw_m, pq_m=pq_m or max(1, dim // 4)))


def plan(num_passages: int, dim: int, hnsw_m: int = 32, pq_m: int | None = None) -> list[dict]:
    """Per index type: bytes per passage, total RAM and disk, and the accuracy cost measured by
    ``benchmarks/retrieval/index_bench.py`` (packaged as ``resources/index-costs.json``)."""
    import json
    from importlib import resources

    try:
        costs = json.loads(resources.files("densepr").joinpath("resources", COSTS_RESOURCE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        costs = {}
    p = IndexParams(hnsw_m=hnsw_m, pq_m=pq_m).resolved(num_passages, dim)
    rows = []
    for t, spec in INDEX_TYPES.items():
        per = spec.bytes_per_vector(dim, p)
        total = per * num_passages + spec.fixed_bytes(dim, p)
        rows.append({"type": t, "bytes_per_passage": per, "ram_bytes": total, "disk_bytes": total, "measured": costs.get(t)})
        if spec.pq:  # codes in RAM; float32 vectors on disk, read k x R rows per query
            rows.append({"type": f"{t}+rerank", "bytes_per_passage": per, "ram_bytes": total,
                         "disk_bytes": total + 4 * dim * num_passages, "measured": costs.get(f"{t}+rerank")})  # fmt: skip
    return rows


# DPR's own figure (Section 4.2 / Appendix): 21M passages encoded in 8.8 hours on 8 GPUs, BERT-base.
PAPER_ENCODE_RATE = 21_015_324 / (8.8 * 3600 * 8)  # passages per second per GPU (~83)


def cluster_plan(rows: list[dict], num_passages: int, nodes: int, node_ram_gib: float, gpus: int,
                 rate: float = PAPER_ENCODE_RATE, headroom: float = 0.7) -> list[dict]:  # fmt: skip
    """Spread each index type of :func:`plan` over ``nodes`` machines of ``node_ram_gib``: the shards it
    needs (each within ``headroom`` of a node's RAM; the rest is for the process, the corpus text, the
    OS), the replicas of the whole index the nodes then hold, RAM per shard, and the encoding hours at
    ``rate`` passages/s per GPU on ``gpus`` GPUs. Merged top-k over shards is exact for flat shards
    only: per-shard HNSW/IVF/PQ results differ from one big index's (approximate either way)."""
    budget = node_ram_gib * 2**30 * headroom
    out = []
    for r in rows:
        shards = max(1, -(-int(r["ram_bytes"]) // int(budget)))
        fits = shards <= nodes
        out.append({**r, "shards": shards, "replicas": nodes // shards if fits else 0, "ram_per_shard": r["ram_bytes"] / shards,
                    "fits": fits, "exact_merge": shards == 1 or get(r["type"].partition("+")[0]).exact, "encode_hours": num_passages / (rate * max(gpus, 1)) / 3600})  # fmt: skip
    return out
