"""Cost and accuracy of every dense index type, side by side in one run.

For each type (flat, flat-fp16, flat-sq8, hnsw, ivf-flat, ivf-pq, opq-pq), in a fresh process
(so its peak memory is its own): build time, peak RSS, index size on disk, queries/s at
batch 1 and batch 256 (top-100), and recall@100 against exact search. Exact search is also
reported as a fraction of this machine's float32 matrix-multiply rate, measured in the same run,
for FAISS's ``IndexFlatIP`` and for the torch matmul + top-k path.

Two data sets:

* ``synthetic``: N vectors of D dims with low intrinsic dimension (a 64-d Gaussian latent
  mixed into D dims by a fixed random matrix, plus small isotropic noise), queries from the
  same distribution. Pure isotropic Gaussians would have no neighbours worth finding.
* ``embedded``: the real passage vectors of the embedded benchmark (``densepr reproduce``'s
  ``runs/embedded``), with NQ-test questions; also top-20 accuracy (DPR's ``has_answer``) on
  all five test sets for each type, against exact search.

    python benchmarks/retrieval/index_bench.py synthetic [--n 1000000] [--dim 768]
    python benchmarks/retrieval/index_bench.py embedded [--index-dir runs/embedded]

Writes ``benchmarks/retrieval/results/index-<dataset>.json`` (and, for ``embedded``, the measured costs the
memory planner ``densepr index plan`` shows: ``src/densepr/resources/index-costs.json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from densepr.index.types import INDEX_TYPES

RESULTS = Path(__file__).parent / "results"
TYPES = tuple(INDEX_TYPES)


def matmul_gflops(n: int = 4096, reps: int = 3) -> float:
    """This machine's float32 matrix-multiply rate: the better of torch's and numpy's BLAS (FAISS
    links its own), square n x n, after a warm-up."""
    import torch

    best = 0.0
    for a, b in ((torch.randn(n, n), torch.randn(n, n)), (np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32))):
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def write_synthetic(directory: Path, n: int, dim: int, n_queries: int, seed: int = 0, part: int = 100_000, clusters: int = 0,
                    dtype: str = "float32", first_id: int = 0, manifest: dict | None = None) -> np.ndarray:
    """An embeddings directory of ``n`` synthetic vectors; returns ``n_queries`` query vectors.

    ``dtype``: how the parts are stored (``float16`` halves the disk: 21M x 768 is 30 GiB);
    ids are ``first_id``, ``first_id + 1``, ...; ``manifest``: keys that replace the synthetic
    ``encoder``/``question_encoder`` (e.g. ``corpus`` and a real question encoder, so that the
    vectors stand in for an index directory's, as ``benchmarks/scale/scale.py`` does).

    Vectors live near a 64-d subspace (a Gaussian latent mixed into ``dim`` dims, plus small
    isotropic noise). With ``clusters`` > 0 the latent is a mixture of that many Gaussians (centres
    N(0, I), spread 0.5), the topical structure real passage embeddings have; with 0 it is one
    Gaussian, a worst case for approximate search (no neighbourhood stands out).
    """
    from densepr.fileio.atomic import save_npy, write_json
    from densepr.fileio.ids import write_ids
    from densepr.fileio.manifest import write_manifest

    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((64, dim)).astype(np.float32) / 8
    centres = rng.standard_normal((clusters, 64)).astype(np.float32) if clusters else None

    def draw(m: int) -> np.ndarray:
        z = rng.standard_normal((m, 64)).astype(np.float32)
        if centres is not None:
            z = centres[rng.integers(0, clusters, m)] + 0.5 * z
        return (z @ mix + 0.05 * rng.standard_normal((m, dim)).astype(np.float32)).astype(np.float32)

    directory.mkdir(parents=True, exist_ok=True)
    parts, files = [], []
    for i, start in enumerate(range(0, n, part)):
        m = min(part, n - start)
        save_npy(directory / f"part-{i:05d}.npy", draw(m).astype(dtype))
        write_ids(directory / f"part-{i:05d}.ids", [str(j) for j in range(first_id + start, first_id + start + m)])
        parts.append({"vectors": f"part-{i:05d}.npy", "ids": f"part-{i:05d}.ids", "count": m})
        files += [parts[-1]["vectors"], parts[-1]["ids"]]
    write_json(directory / "encoding.json", {"synthetic": True, "seed": seed, "clusters": clusters})
    meta = {"encoder": {"path": "synthetic", "weights_id": f"synthetic-{seed}"}, "question_encoder": "synthetic", **(manifest or {})}
    write_manifest(directory, "embeddings", files, dim=dim, count=n, dtype=dtype, parts=parts, **meta)
    return draw(n_queries)


def time_search(index, queries: np.ndarray, batch: int, n: int, k: int = 100) -> tuple[float, object]:
    q = queries[:n]
    index.search(q[: min(batch, len(q))], k, batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    res = index.search(q, k, batch_size=batch)
    return n / (time.perf_counter() - t0), res


# Search settings swept after one build (search is cheap next to building): the recall/speed curve.
SWEEPS: dict[str, list[dict]] = {
    "hnsw": [{"ef_search": e} for e in (128, 256, 512, 1024, 2048)],
    "ivf-flat": [{"nprobe": p} for p in (16, 64, 256)],
    "ivf-pq": [{"nprobe": 64, "rerank": 0}, {"nprobe": 64, "rerank": 4}, {"nprobe": 256, "rerank": 10}],
    "opq-pq": [{"nprobe": 64, "rerank": 0}, {"nprobe": 64, "rerank": 4}, {"nprobe": 256, "rerank": 10}],
}


def label(t: str, setting: dict) -> str:
    return t + "".join(f" {k}={v}" for k, v in setting.items())


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_type(args: argparse.Namespace) -> list[dict]:
    """Build, save, reload and time one index type at each search setting (in its own process)."""
    import faiss

    from densepr.index.dense import DenseIndex
    from densepr.index.types import IndexParams

    work = Path(args.work)
    queries = np.load(work / "queries.npy", allow_pickle=False)
    base = rss_gib()  # interpreter, libraries and queries
    params = IndexParams(**json.loads(args.params))
    t0 = time.perf_counter()
    index = DenseIndex.build(work / "emb", args.one, params)
    build_s = time.perf_counter() - t0
    build_peak = rss_gib()
    out = work / f"idx-{args.one}"
    index.save(out)
    disk = sum(f.stat().st_size for f in out.glob("*.faiss"))
    del index
    index = DenseIndex.load(out)
    path = index.to_device(args.device) if args.device != "cpu" else "cpu"  # GPU: FAISS GPU or torch fp16 (exact types)
    rows = []
    for setting in SWEEPS.get(args.one, [{}]):
        index.set_search(**setting)
        qps1, _ = time_search(index, queries, 1, min(args.batch1_queries, len(queries)))
        qps256, res = time_search(index, queries, 256, len(queries))
        name = label(args.one, setting)
        rows.append({"type": args.one, "setting": setting, "label": name, "build_s": round(build_s, 1), "disk_bytes": disk,
                     "bytes_per_vector": round(disk / len(index), 1), "queries_per_s_batch1": round(qps1, 1),
                     "queries_per_s_batch256": round(qps256, 1), "rss_before_build_gib": round(base, 2),
                     "peak_rss_build_gib": round(build_peak, 2), "search_path": path, "params": index.manifest["params"]})  # fmt: skip
        np.save(work / f"rows-{name}.npy", res.rows)
    if args.one == "flat" and path == "cpu":  # FAISS's own flat search, the copy-to-torch path, and the GEMM ceiling
        row = rows[0]
        gflops = matmul_gflops()
        flops = 2 * len(index) * index.dim
        row["machine_gemm_gflops"] = round(gflops, 1)
        row["fraction_of_gemm_batch256"] = round(row["queries_per_s_batch256"] * flops / 1e9 / gflops, 3)
        raw = index.shards[0].index
        q = queries[:256]
        raw.search(q, 100)
        t0 = time.perf_counter()
        for a in range(0, len(queries), 256):
            raw.search(queries[a : a + 256], 100)
        fq = len(queries) / (time.perf_counter() - t0)
        row["faiss_indexflatip_queries_per_s_batch256"] = round(fq, 1)
        row["faiss_indexflatip_fraction_of_gemm_batch256"] = round(fq * flops / 1e9 / gflops, 3)
        row["faiss_threads"] = faiss.omp_get_max_threads()
    shutil.rmtree(out)
    return rows


def recall(rows: np.ndarray, exact: np.ndarray, k: int = 100) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows, exact)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=("synthetic", "embedded"), nargs="?")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--clusters", type=int, default=1000, help="synthetic: latent mixture components (0 = one Gaussian)")
    ap.add_argument("--batch1-queries", type=int, default=200)
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--index-dir", type=Path, default=Path("runs/embedded"))
    ap.add_argument("--params", default="{}", help="IndexParams as JSON (e.g. '{\"nprobe\": 128}')")
    ap.add_argument("--device", default="cpu", help="search device, e.g. cuda (exact types on the GPU)")
    ap.add_argument("--tag", default="", help="suffix of the result file name (e.g. for other --params)")
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_type(args)))
        return
    if args.dataset is None:
        ap.error("choose a dataset: synthetic or embedded")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
    from common import machine_info

    work = Path(tempfile.mkdtemp(prefix="densepr-index-bench-"))
    try:
        if args.dataset == "synthetic":
            queries = write_synthetic(work / "emb", args.n, args.dim, args.queries, clusters=args.clusters)
            label = f"synthetic {args.n:,} x {args.dim} ({f'{args.clusters} clusters' if args.clusters else 'one Gaussian'})"
        else:
            queries, label = embedded_queries(args.index_dir, work, args.queries)
        np.save(work / "queries.npy", queries)
        rows = []
        for t in ["flat"] + [t for t in args.types if t != "flat"]:
            cmd = [sys.executable, __file__, "--work", str(work), "--one", t, "--params", args.params, "--batch1-queries", str(args.batch1_queries), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                got = [{"type": t, "label": t, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"}]
            else:
                got = json.loads(proc.stdout.strip().splitlines()[-1])
            for r in got:
                print(json.dumps(r), flush=True)
            rows += got
        exact = np.load(work / "rows-flat.npy", allow_pickle=False)
        flat = rows[0]
        for r in rows:
            if "error" in r:
                continue
            r["recall_at_100"] = round(recall(np.load(work / f"rows-{r['label']}.npy", allow_pickle=False), exact), 4)
            r["memory_vs_flat"] = round(r["disk_bytes"] / flat["disk_bytes"], 4)
            r["batch1_speedup_vs_flat"] = round(r["queries_per_s_batch1"] / flat["queries_per_s_batch1"], 2)
        result = {"command": "python benchmarks/retrieval/index_bench.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                  "machine": machine_info(), "data": label, "queries": len(queries), "k": 100, "rows": rows}  # fmt: skip
        if args.dataset == "embedded":
            result["top20"] = embedded_accuracy(args.index_dir, work, [r for r in rows if "error" not in r], json.loads(args.params))
        print_table(result)
        from densepr.fileio.atomic import write_json

        name = f"index-{args.dataset}" + (f"-{args.n // 1000}k-{args.dim}-c{args.clusters}" if args.dataset == "synthetic" else "") + (f"-{args.tag}" if args.tag else "") + ".json"
        write_json(RESULTS / name, result)
        print(f"wrote {RESULTS / name}")
        if args.dataset == "embedded":
            write_costs(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def embedded_queries(index_dir: Path, work: Path, n: int) -> tuple[np.ndarray, str]:
    from densepr.data import EmbeddedData
    from densepr.index.dense import DenseIndex
    from densepr.models.encoder import Encoder

    emb_dir = index_dir / "embeddings"
    if not (emb_dir / "manifest.json").is_file():
        raise SystemExit(f"{emb_dir}: no embeddings; run `densepr reproduce` first")
    shutil.copytree(emb_dir, work / "emb")
    manifest = DenseIndex.load(index_dir / "dense").manifest
    enc = Encoder.load(manifest["question_encoder"], device="cpu")
    qs = EmbeddedData().load_qa("nq-test").questions[:n]
    return enc.encode_questions(qs), f"embedded benchmark passages ({manifest['count']:,} x {manifest['dim']}), NQ-test questions"


def embedded_accuracy(index_dir: Path, work: Path, rows: list[dict], params: dict) -> dict:
    """Top-20 accuracy (all questions) on every test set for each index type and search setting."""
    from densepr.data import EmbeddedData, load_corpus
    from densepr.evaluate.answers import AnswerMatcher
    from densepr.evaluate.topk import topk_curve
    from densepr.index.dense import DenseIndex
    from densepr.index.types import IndexParams
    from densepr.models.encoder import Encoder

    data = EmbeddedData()
    corpus = load_corpus(index_dir / "passages.tsv")
    matcher = AnswerMatcher(corpus.texts)
    enc = Encoder.load(DenseIndex.load(index_dir / "dense").manifest["question_encoder"], device="cpu")
    sets = {name: data.load_qa(name) for name in data.TEST_SETS}
    qvecs = {name: enc.encode_questions(qas.questions) for name, qas in sets.items()}
    out: dict[str, dict] = {}
    built: dict[str, DenseIndex] = {}
    for r in rows:
        if r["type"] not in built:
            built[r["type"]] = DenseIndex.build(work / "emb", r["type"], IndexParams(**params))
            built[r["type"]].bind(corpus)
        index = built[r["type"]]
        index.set_search(**r["setting"])
        out[r["label"]] = {name: round(100 * float(topk_curve(matcher.hits(index.search(qvecs[name], 20).rows, qas), 20)[-1]), 2)
                           for name, qas in sets.items()}  # fmt: skip
    for name_ in out:
        out[name_]["change_vs_exact"] = {name: round(out[name_][name] - out["flat"][name], 2) for name in sets}
    return out


def chosen(rows: list[dict], goal: float) -> dict[str, dict]:
    """Per type, the fastest (batch 1) setting reaching ``goal`` recall, else the most accurate."""
    best: dict[str, dict] = {}
    for r in rows:
        if "error" in r:
            continue
        cur = best.get(r["type"])
        ok, cur_ok = r["recall_at_100"] >= goal, cur is not None and cur["recall_at_100"] >= goal
        if cur is None or (ok and not cur_ok) or (ok and r["queries_per_s_batch1"] > cur["queries_per_s_batch1"]) or \
                (not ok and not cur_ok and r["recall_at_100"] > cur["recall_at_100"]):  # fmt: skip
            best[r["type"]] = r
    return best


def write_costs(result: dict) -> None:
    """The measured accuracy costs the memory planner shows: per type, its fastest setting reaching
    recall 0.99 (else its most accurate); compressed types twice, without and with re-ranking."""
    from densepr.fileio.atomic import write_json

    rows = [r for r in result["rows"] if "error" not in r]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["type"] + ("+rerank" if r["setting"].get("rerank", 0) > 1 else "")
        groups.setdefault(key, []).append(r)
    costs = {}
    for key, group in groups.items():
        r = chosen(group, 0.9 if key.endswith("+rerank") else 0.99)[group[0]["type"]]
        change = result["top20"][r["label"]]["change_vs_exact"]
        costs[key] = {"recall_at_100": r["recall_at_100"], "top20_change": min(change.values()), "setting": r["setting"],
                      "source": f"{result['data']}, {result['date']} (top-20: worst of 5 test sets)"}  # fmt: skip
    path = Path(__file__).resolve().parents[2] / "src" / "densepr" / "resources" / "index-costs.json"
    write_json(path, costs)
    print(f"wrote {path}")


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['data']}: {result['queries']} queries, top-100 ({result['machine']['cpu']}, {result['machine']['cores']} cores)")
    cols = ["index, search setting", "build s", "bytes/vec", "mem vs flat", "build peak RSS GiB", "q/s b=1", "q/s b=256", "b=1 vs flat", "recall@100"]
    if "top20" in result:
        cols.append("worst top-20 change")
    for col in cols:
        table.add_column(col, justify="left" if col.startswith("index") else "right")
    for r in result["rows"]:
        if "error" in r:
            table.add_row(r["label"], r["error"])
            continue
        cells = [r["label"], f"{r['build_s']:.1f}", f"{r['bytes_per_vector']:.0f}", f"{r['memory_vs_flat']:.3f}", f"{r['peak_rss_build_gib']:.2f}",
                 f"{r['queries_per_s_batch1']:.0f}", f"{r['queries_per_s_batch256']:.0f}", f"{r['batch1_speedup_vs_flat']:.1f}x",
                 f"{r['recall_at_100']:.4f}"]  # fmt: skip
        if "top20" in result:
            cells.append(f"{min(result['top20'][r['label']]['change_vs_exact'].values()):+.2f}")
        table.add_row(*cells)
    Console(width=170).print(table)
    f = result["rows"][0]
    if "machine_gemm_gflops" in f:
        print(f"exact search at batch 256: densepr {f['fraction_of_gemm_batch256']:.2f} of the machine's GEMM ({f['machine_gemm_gflops']:.0f} GFLOP/s), "
              f"FAISS IndexFlatIP alone {f['faiss_indexflatip_fraction_of_gemm_batch256']:.2f}")


if __name__ == "__main__":
    main()
