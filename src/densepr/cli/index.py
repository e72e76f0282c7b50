"""``densepr index ...`` (BM25 and FAISS indexes, and their cost at scale), ``densepr encode`` (the
passage embeddings a dense index is built from) and ``densepr verify`` (every artefact checked)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from densepr.cli.common import CacheOpt, DeviceOpt, _check_output, _default, out
from densepr.errors import DenseprError
from densepr.index.types import INDEX_TYPES, IndexParams


def index_bm25(
    passages: Annotated[Path, typer.Argument(help="Passages (.tsv DPR layout, .jsonl or .parquet).")],
    output: Annotated[Path, typer.Argument(help="Index directory to write.")],
    k1: float = 0.9,
    b: float = 0.4,
    workers: Annotated[Optional[int], typer.Option(help="Processes analysing passages (default: every core).")] = None,
    chunk_passages: Annotated[int, typer.Option(help="Passages per chunk a worker analyses (memory per worker grows with it).")] = 50_000,
) -> None:
    """Build a Lucene-style BM25 index over title + text (k1=0.9, b=0.4 as Anserini)."""
    _check_output(output, "dir", "BM25 index")
    from densepr.data.store import open_passages
    from densepr.retrieve.bm25 import BM25Index

    BM25Index.check_output(output)  # another artefact, or files densepr did not write: refused before the work
    corpus = open_passages(passages, output)  # an index directory's store, else the file streamed: never held whole
    index = BM25Index.build(corpus, k1=k1, b=b, workers=workers or os.cpu_count() or 1, chunk_passages=chunk_passages,
                            workdir=output.parent if output.parent.is_dir() else None, progress=True)  # fmt: skip
    index.save(output)
    out.print(f"BM25 index over {index.num_docs} passages written to {output}")


def index_dense(
    embeddings: Annotated[Path, typer.Argument(help="Embeddings directory written by `densepr encode`.")],
    output: Annotated[Path, typer.Argument(help="Index directory to write.")],
    type: Annotated[str, typer.Option("--type", help="Index type: " + "; ".join(f"{t.name}: {t.description}" for t in INDEX_TYPES.values()) + ".")] = "flat",
    num_shards: Annotated[int, typer.Option(help="Split the index into this many files (searched together).")] = 1,
    hnsw_m: Annotated[int, typer.Option(help="hnsw: neighbours per node.")] = _default(IndexParams, "hnsw_m"),
    ef_construction: Annotated[int, typer.Option(help="hnsw: build-time search width.")] = _default(IndexParams, "ef_construction"),
    ef_search: Annotated[int, typer.Option(help="hnsw: query-time search width.")] = _default(IndexParams, "ef_search"),
    nlist: Annotated[Optional[int], typer.Option(help="ivf-*: k-means cells (default ~4 sqrt(N)).")] = _default(IndexParams, "nlist"),
    nprobe: Annotated[int, typer.Option(help="ivf-*: cells visited per query.")] = _default(IndexParams, "nprobe"),
    pq_m: Annotated[Optional[int], typer.Option(help="ivf-pq/opq-pq: bytes per vector (default dim/4).")] = _default(IndexParams, "pq_m"),
    rerank: Annotated[int, typer.Option(help="Compressed types: re-score the top k x RERANK exactly from the embeddings on disk (0 = off).")] = _default(IndexParams, "rerank"),
    train_size: Annotated[int, typer.Option(help="Vectors sampled to train quantisers.")] = _default(IndexParams, "train_size"),
    checkpoint_seconds: Annotated[float, typer.Option(help="Save build progress at most this often (a killed build resumes from it).")] = 300.0,
    question_encoder: Annotated[Optional[Path], typer.Option(help="Record this question encoder for retrieval instead of the one the embeddings name (e.g. the DPRQuestionEncoder matching DPRContextEncoder passages).")] = None,
    bundle_encoder: Annotated[bool, typer.Option("--bundle-encoder", help="Copy the question encoder into the index (question_encoder/), so the index works wherever it is copied.")] = False,
) -> None:
    """Build a FAISS index from passage embeddings (exact, compressed or approximate); resumes a killed build."""
    _check_output(output, "dir", "dense index", inputs=(embeddings, question_encoder))
    _check_output(output.with_name(output.name + ".building"), "dir", "build's work directory", inputs=(embeddings,))
    from densepr.fileio.dirs import remove_tree
    from densepr.index.dense import DenseIndex
    from densepr.index.types import IndexParams

    params = IndexParams(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist, nprobe=nprobe,
                         pq_m=pq_m, rerank=rerank, train_size=train_size)  # fmt: skip
    DenseIndex.check_output(output)  # another artefact, or files densepr did not write: refused before the work
    work = output.with_name(output.name + ".building")  # resumable: a killed build continues from here
    index = DenseIndex.build(embeddings, type, params, num_shards=num_shards, show_progress=True, work_dir=work,
                             checkpoint_seconds=checkpoint_seconds)  # fmt: skip
    from densepr.index.encoder_ref import save_bundled, set_question_encoder

    if question_encoder is not None:
        set_question_encoder(index, question_encoder)
    if bundle_encoder:
        save_bundled(index, output)
    else:
        index.save(output)
    remove_tree(work)  # checked as the build's own when the build opened it
    shards = f" in {num_shards} shards" if num_shards > 1 else ""
    out.print(f"{type} index of {len(index)} x {index.dim} vectors{shards} written to {output}")


def index_plan(
    num_passages: Annotated[int, typer.Option(help="Passages to index (DPR's Wikipedia: 21015324).")] = 21_015_324,
    dim: Annotated[int, typer.Option(help="Vector dimension (BERT-base: 768).")] = 768,
    hnsw_m: int = _default(IndexParams, "hnsw_m"),
    pq_m: Annotated[Optional[int], typer.Option(help="PQ bytes per vector (default dim/4).")] = None,
    nodes: Annotated[Optional[int], typer.Option(help="Also plan a cluster of this many machines: shards x replicas per index type.")] = None,
    node_ram: Annotated[float, typer.Option(help="With --nodes: RAM per machine, GiB.")] = 64.0,
    gpus: Annotated[int, typer.Option(help="With --nodes: GPUs encoding the passages.")] = 8,
    encode_rate: Annotated[Optional[float], typer.Option(help="With --nodes: passages/s per GPU (default: the paper's, 21M in 8.8 h on 8 GPUs).")] = None,
) -> None:
    """Memory and disk for each index type at a given scale, with the accuracy cost measured here;
    with --nodes, how to spread it over a cluster (`densepr serve --ray`) and how long encoding takes."""
    from rich.table import Table

    from densepr.index.dense_plan import PAPER_ENCODE_RATE, cluster_plan, plan

    rows = plan(num_passages, dim, hnsw_m=hnsw_m, pq_m=pq_m)
    table = Table(title=f"{num_passages:,} passages x {dim} dims")
    for col in ("type", "bytes/passage", "RAM", "disk", "recall@100 vs exact", "top-20 change (points)", "measured on"):
        table.add_column(col, justify="left" if col in ("type", "measured on") else "right")
    for r in rows:
        cost = r.get("measured") or {}
        table.add_row(r["type"], f"{r['bytes_per_passage']:,.0f}", _gib(r["ram_bytes"]), _gib(r["disk_bytes"]),
                      _fmt(cost.get("recall_at_100")), _fmt(cost.get("top20_change"), signed=True), cost.get("source", "not measured"))  # fmt: skip
    out.print(table)
    if nodes is not None:
        if nodes < 1 or node_ram <= 0 or gpus < 1:
            raise DenseprError("--nodes, --node-ram and --gpus must be positive")
        rate = encode_rate or PAPER_ENCODE_RATE
        rows = cluster_plan(rows, num_passages, nodes, node_ram, gpus, rate)
        t = Table(title=f"on {nodes} machines of {node_ram:g} GiB (70% for the index); encoding: {rows[0]['encode_hours']:.1f} h on {gpus} GPUs at {rate:.0f} passages/s each")
        for col in ("type", "shards", "replicas", "RAM per shard", "merged top-k"):
            t.add_column(col, justify="left" if col in ("type", "merged top-k") else "right")
        for r in rows:
            t.add_row(r["type"], str(r["shards"]), str(r["replicas"]) if r["fits"] else "does not fit", _gib(r["ram_per_shard"]),
                      "exact" if r["exact_merge"] else "approximate per shard")  # fmt: skip
        out.print(t)
    _print_corpus_plan(num_passages)


def _print_corpus_plan(num_passages: int) -> None:
    """The passages' and BM25's measured costs (benchmarks/scale/scale.py) at this size."""
    from rich.table import Table

    from densepr.index.corpus_plan import corpus_plan, measured_costs

    costs = measured_costs()
    rows = corpus_plan(num_passages, costs)
    if not rows:
        return
    sizes = ", ".join(f"{n:,}" for n in costs["sizes"])
    t = Table(title=f"passages and BM25 at {num_passages:,} passages (linear fit of runs at {sizes} passages; * beyond them)")
    t.add_column("what")
    t.add_column("cost", justify="right")
    for r in rows:
        v = _gib(r["value"]) if r["unit"] == "bytes" else f"{r['value']:,.1f} s"
        t.add_row(r["what"], v + (" *" if r["extrapolated"] else ""))
    out.print(t)
    if costs.get("queries"):
        q = Table(title="BM25 queries (top-100, NQ test questions), as measured")
        for col in ("passages", "q/s batched", "q/s one at a time", "p50 ms", "Lucene q/s (one thread)"):
            q.add_column(col, justify="right")
        for r in costs["queries"]:
            q.add_row(f"{r['passages']:,}", f"{r['batched_top100_qps']:,.0f}", f"{r['one_at_a_time_qps']:,.0f}", f"{r['top100_p50_ms']:.1f}",
                      "-" if r.get("lucene_one_thread_qps") is None else f"{r['lucene_one_thread_qps']:,.0f}")  # fmt: skip
        out.print(q)
    if costs.get("dense"):
        d = Table(title="a dense index beside them (synthetic 768-d float16 vectors, re-ranked from disk), as measured")
        for col in ("passages", "index dense", "build", "peak RSS", "vectors + index on disk", "top-100 p50", "recall@10",
                    "serve RSS (BM25 + dense)", "/search p50 dense, hybrid"):  # fmt: skip
            d.add_column(col, justify="left" if col == "index dense" else "right")
        for r in costs["dense"]:
            d.add_row(f"{r['passages']:,}", r["args"], f"{r['build_s'] / 60:,.1f} min", _gib(r["build_peak_bytes"]),
                      f"{_gib(r['vectors_bytes'])} + {_gib(r['index_bytes'])}", f"{r['top100_p50_ms']:.1f} ms", _fmt(r.get("recall_at_10")),
                      "-" if not r.get("serve_rss_bytes") else _gib(r["serve_rss_bytes"]),
                      " / ".join("-" if r.get(k) is None else f"{r[k]:,.0f}" for k in ("serve_dense_p50_ms", "serve_hybrid_p50_ms")) + " ms")  # fmt: skip
        out.print(d)
    out.print(f"[dim]{costs['source']}[/dim]")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _fmt(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else (f"{x:+.2f}" if signed else f"{x:.3f}")


def encode(
    passages: Annotated[Path, typer.Argument(help="Passages (.tsv DPR layout, .jsonl or .parquet).")],
    output: Annotated[Path, typer.Argument(help="Embeddings directory to write (resumes if present).")],
    encoder: Annotated[Optional[Path], typer.Option(help="Model directory, or a two-tower checkpoint: question_encoder/ + passage_encoder/ (densepr), query_encoder/ + passage_encoder/ (Haystack) or query_model/ + passage_model/ (Tevatron) (default: embedded all-MiniLM-L6-v2).")] = None,
    question_encoder: Annotated[Optional[Path], typer.Option(help="The question tower recorded for retrieval (replaces --encoder's; alone: used for both).")] = None,
    passage_encoder: Annotated[Optional[Path], typer.Option(help="The passage tower that encodes PASSAGES (replaces --encoder's; alone: used for both).")] = None,
    batch_size: int = 64,
    part_size: Annotated[int, typer.Option(help="Passages per .npy part file (the unit of resumption).")] = 100_000,
    dtype: Annotated[str, typer.Option(help="float32 or float16 storage.")] = "float32",
    shard_id: Annotated[Optional[int], typer.Option(help="Encode only this shard of the parts (0-based); under torchrun: the rank.")] = None,
    num_shards: Annotated[Optional[int], typer.Option(help="How many shards the parts are split into; under torchrun: the world size.")] = None,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Encode on a Ray cluster: `auto` (the one this machine belongs to), HOST:PORT or ray://HOST:10001, or `local` (a Ray started here). Needs densepr[ray]; every node reads PASSAGES at the same path.")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(help="With --ray: encoder actors (default: as many as the cluster's GPUs or CPUs allow).")] = None,
    ray_gpus: Annotated[float, typer.Option(help="With --ray: GPUs per encoder actor (0: CPU actors of --ray-cpus each).")] = 0.0,
    ray_cpus: Annotated[float, typer.Option(help="With --ray: CPUs per encoder actor.")] = 1.0,
) -> None:
    """Encode passages as `title [SEP] text` into .npy parts plus ids; several processes can share
    the work (`--shard-id I --num-shards N`, or `torchrun --nproc-per-node K -m densepr encode ...`),
    or a Ray cluster (`--ray auto`): the same directory format, resumable, a lost node's part re-run."""
    _check_output(output, "dir", "embeddings", inputs=(encoder, question_encoder, passage_encoder))
    if ray is not None:
        if shard_id is not None or num_shards is not None:
            raise DenseprError("--ray splits the work itself: drop --shard-id/--num-shards")
        if question_encoder is not None or passage_encoder is not None:
            raise DenseprError("--ray takes --encoder (a model, or a two-tower checkpoint), not --question-encoder/--passage-encoder")
        from densepr.data import EmbeddedData
        from densepr.index.ray_encode import encode_corpus_ray

        m = encode_corpus_ray(encoder or EmbeddedData(cache_dir).model_dir, passages, output, address=ray, part_size=part_size,
                              batch_size=batch_size, dtype=dtype, actors=ray_actors, cpus_per_actor=ray_cpus,
                              gpus_per_actor=ray_gpus, device=device, show_progress=True)  # fmt: skip
        out.print(f"{m['count']} passage vectors ({m['dim']}-d, {dtype}) in {len(m['parts'])} part(s) written to {output} (Ray)")
        return
    from densepr.data import EmbeddedData
    from densepr.data.store import open_passages
    from densepr.index.embeddings import encode_corpus, process_share
    from densepr.models.encoder import load_biencoder

    shard_id, num_shards, device, show_progress = process_share(shard_id, num_shards, device)  # under torchrun: its rank's
    base = encoder or (None if question_encoder or passage_encoder else EmbeddedData(cache_dir).model_dir)
    q_enc, p_enc = load_biencoder(base, device=device, question=question_encoder, passage=passage_encoder)
    corpus = open_passages(passages, output)  # an index directory's store, else the file streamed: read part by part
    m = encode_corpus(p_enc, corpus, output, question_encoder=q_enc, part_size=part_size, batch_size=batch_size,
                      dtype=dtype, shard_id=shard_id, num_shards=num_shards, show_progress=show_progress)  # fmt: skip
    if m is None:
        out.print(f"shard {shard_id + 1}/{num_shards} encoded into {output}; other shards still to finish")
    else:
        out.print(f"{m['count']} passage vectors ({m['dim']}-d, {dtype}) in {len(m['parts'])} part(s) written to {output}")



def verify_cmd(
    directory: Annotated[Path, typer.Argument(help="A directory: every manifest.json under it is checked.")],
    quick: Annotated[bool, typer.Option("--quick", help="The checks done on load (sizes, sampled sha256 of large files), not every byte.")] = False,
) -> None:
    """Check every artefact under a directory: files against their manifest (sizes and sha256), BM25
    arrays' ranges, dense index shards, and each index's corpus against the passages.tsv beside it."""
    from densepr.retrieve.index_dir import verify_artefacts

    results = verify_artefacts(directory, quick)
    if not results:
        raise DenseprError(f"{directory}: no manifest.json found; nothing densepr wrote is here")
    bad = 0
    for d, kind, problem in results:
        if problem is None:
            out.print(f"[green]ok[/green]      {kind:<14} {d}", highlight=False)
        else:
            bad += 1
            out.print(f"[red]FAILED[/red]  {kind:<14} {problem}", highlight=False)
    what = "sizes and sampled sha256" if quick else "sizes and sha256"
    out.print(f"{len(results) - bad} of {len(results)} artefacts verified ({what}; index structure and corpus)")
    if bad:
        raise typer.Exit(1)


def export_index(
    index: Annotated[Path, typer.Argument(help="Index directory (with dense/ and passages.tsv) or a dense index directory.")],
    format: Annotated[str, typer.Option("--format", help="pyserini: a directory with `index` + `docid` for Pyserini's FaissSearcher; "
                                                         "parquet: id, title, text, vector per passage, for vector stores.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory (pyserini) or .parquet file to write.")],
    passages: Annotated[Optional[Path], typer.Option(help="parquet: the passages file, when INDEX is a dense index directory alone.")] = None,
    vectors: Annotated[Optional[Path], typer.Option(help="parquet: the embeddings directory the index was built from (default: the one it records).")] = None,
    row_group_size: Annotated[int, typer.Option(help="parquet: passages per row group (held in memory at a time).")] = 10_000,
) -> None:
    """Export a dense index for other tools: Pyserini's FAISS layout (hnsw scored by inner product, shards
    merged), or parquet (ids, titles, texts, vectors) for Qdrant, LanceDB, Milvus and the like."""
    from densepr.index import export

    if format == "pyserini":
        _check_output(output, "dir", "Pyserini index", inputs=(index,))
        export.check_pyserini_output(output)
        m = export.export_pyserini(index, output)
        notes = "".join(f"; note: {x}" for x in m["notes"])
        out.print(f"{m['type']} index of {m['count']} x {m['dim']} vectors ({m['how']}) written to {output} as index + docid{notes}")
    elif format == "parquet":
        _check_output(output, "file", "parquet file", inputs=(index,))
        m = export.export_parquet(index, output, passages=passages, vectors=vectors, row_group=row_group_size, show_progress=True)
        out.print(f"{m['count']} passages with {m['dim']}-d vectors (from {m['vectors']}) in {m['row_groups']} row group(s) written to {output}")
    else:
        raise DenseprError(f"--format {format!r}: expected pyserini or parquet")


def export_run(
    results: Annotated[Path, typer.Argument(help="DPR result JSON, as `densepr retrieve --output` writes it.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Retrieval JSON to write.")],
    format: Annotated[str, typer.Option("--format", help="pyserini: the JSON `python -m pyserini.eval.evaluate_dpr_retrieval --retrieval` reads.")] = "pyserini",
    regex: Annotated[Optional[bool], typer.Option("--regex/--no-regex", help="Where a passage has no has_answer: answers are regexes (default: yes for CuratedTREC files).")] = None,
) -> None:
    """Convert retrieval results for another tool's evaluation (Pyserini's DPR top-k accuracy)."""
    _check_output(output, "file", "retrieval JSON", inputs=(results,))
    if format != "pyserini":
        raise DenseprError(f"--format {format!r}: expected pyserini")
    from densepr.evaluate.pyserini_run import dpr_results_to_pyserini

    n = dpr_results_to_pyserini(results, output, None if regex is None else ("regex" if regex else "string"))
    out.print(f"{n} questions written to {output} (Pyserini's DPR retrieval JSON)")
