"""How densepr's cost grows with the corpus: 1M, 5M and DPR's 21,015,324 passages on one machine.

For each size N, in ``<work>/n<N>/`` (an index directory: ``passages.tsv``, ``store/``, ``bm25/``),
each step in a fresh process, measured from outside (``/proc`` polled every 0.2 s over the process
and its children: peak RSS of all of them together, its anonymous part, i.e. what page cache
cannot take back, and the largest single process):

* ``corpus``: N synthetic passages (``benchmarks/scale/synthetic_corpus.py``; a prefix of a larger
  corpus already written, same seed, is copied instead of generated);
* ``store``: the passage store built from ``passages.tsv`` (what the first open does);
* ``bm25``: ``densepr index bm25 <d>/passages.tsv <d>/bm25 --workers W`` (analysis in W worker
  processes reading the store): wall, peak RSS, index size on disk;
* ``load``: ``Retriever.load(<d>)`` (store + BM25): seconds, and RSS right after;
* ``queries``: the first Q NQ-test questions (the embedded set, so real question words),
  batched and one at a time, top-100 (and top-10 batched); the top-100 rows are kept for
  ``lucene``'s agreement;
* ``serve``: ``densepr serve --index <d>`` (BM25), 100 sequential ``/search`` requests (k=100):
  p50/p95 latency and the server's RSS after them;
* ``lucene`` (N <= ``--lucene-max``): Anserini 0.12's ``IndexCollection`` (from the pyserini
  0.12 jar, as ``benchmarks/retrieval/bm25_lucene.py``) over the same passages on the same W threads,
  and its one-thread search of the same questions (``IndexSearcher.search``: block-max WAND),
  with top-k agreement with densepr's lists;
* ``dense`` (N <= ``--dense-max``): N x 768 synthetic float16 vectors (``benchmarks/retrieval/index_bench.py``'s
  generator, 1,000 clusters) with the corpus's ids, built as ``<d>/dense`` by ``densepr index dense
  --type ivf-pq --pq-m 96 --rerank 10`` (``--dense-args``): build wall and peak RSS, disk;
* ``dense-search``: in a fresh process, the dense index alone: load, top-100 latency one query at a
  time and batched, recall@10/@100 against exact search (the vectors streamed), with and without
  re-ranking;
* ``dense-serve`` (N <= ``--dense-max``): ``densepr serve --index <d>`` over the store, BM25 and the
  dense index (MPNet as the question encoder when fetched): /search p50/p95 and server RSS in the
  dense, hybrid and bm25 modes.

Resumable: each step's result is ``<d>/scale-<step>.json``, skipped when present (``--redo
STEP`` reruns it). The table and ``benchmarks/scale/results/scale.json`` gather every size measured.

    python benchmarks/scale/scale.py --sizes 1000000 5000000 21015324 --work-dir /data/scale [--workers 2]
        [--steps corpus store bm25 load queries serve lucene dense dense-search dense-serve] [--lucene-max 1000000] [--dense-max 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/scale/
BENCH = HERE.parent  # benchmarks/: common.py; retrieval/ holds bm25_lucene.py and index_bench.py
RESULTS = HERE / "results" / "scale.json"
STEPS = ("corpus", "store", "bm25", "load", "queries", "serve", "lucene", "dense", "dense-search", "dense-serve")
QUESTIONS = 1000  # NQ test questions searched (batched); one at a time: the first ONE_AT_A_TIME
ONE_AT_A_TIME = 200
HITS = 100


# --- measuring a process tree from outside ---------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return pids


def measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds, peak RSS of its process tree (all, anonymous, largest process),
    the load average before and after, and its JSON result (its last stdout line, when it prints one)."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        peak = {"rss": 0, "anon": 0, "largest": 0}
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        while proc.poll() is None:
            st = [_status(p) for p in _tree(proc.pid)]
            peak["rss"] = max(peak["rss"], sum(s.get("VmRSS", 0) for s in st))
            peak["anon"] = max(peak["anon"], sum(s.get("RssAnon", 0) + s.get("RssShmem", 0) for s in st))
            peak["largest"] = max(peak["largest"], max((s.get("VmRSS", 0) for s in st), default=0))
            time.sleep(0.2)
        reader.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n    ".join(log.read_text(errors="replace").strip().splitlines()[-10:])
        raise SystemExit(f"step failed (exit {proc.returncode}): {' '.join(cmd)}\n    {tail}")
    result = {}
    for line in reversed(lines):
        if line.startswith("{"):
            result = json.loads(line)
            break
    return {"wall_s": round(wall, 2), "peak_rss_bytes": peak["rss"], "peak_anon_bytes": peak["anon"],
            "largest_process_bytes": peak["largest"], "loadavg_before": round(load0, 2),
            "loadavg_after": round(os.getloadavg()[0], 2), "command": " ".join(cmd), **result}  # fmt: skip


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def me() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve())]


# --- the steps (run in a child process: `scale.py child STEP DIR ...`) ------------------------------


def rss_now() -> dict:
    s = _status(os.getpid())
    return {"rss_bytes": s.get("VmRSS", 0), "anon_bytes": s.get("RssAnon", 0), "file_bytes": s.get("RssFile", 0)}


def questions(n: int) -> list[str]:
    from densepr.data import EmbeddedData

    return [qa.question for qa in EmbeddedData().load_qa("nq-test", limit=n).items]


def child(step: str, d: Path, args: list[str]) -> dict:
    if step == "store":
        from densepr.data.store import STORE_DIR, ensure_store

        return {"passages": len(ensure_store(d / "passages.tsv", d / STORE_DIR))}
    if step == "bm25":
        from densepr.retrieve.bm25 import BM25Index
        from densepr.retrieve.retriever import open_corpus

        corpus = open_corpus(d)  # what `densepr index bm25 <d>/passages.tsv` opens: the store beside it
        BM25Index.build(corpus, workers=int(args[0]), chunk_passages=int(args[1]), workdir=d, progress=True).save(d / "bm25")
        return {"passages": len(corpus)}
    if step == "load":
        base = rss_now()
        t0 = time.perf_counter()
        from densepr.retrieve.retriever import Retriever

        r = Retriever.load(d)
        return {"load_s": round(time.perf_counter() - t0, 3), "interpreter": base, "after_load": rss_now(), "modes": r.modes}
    if step == "queries":
        import numpy as np

        from densepr.retrieve.retriever import Retriever

        r = Retriever.load(d)
        qs = questions(QUESTIONS)
        for k in (10, HITS):
            r.bm25.search(qs[:50], k)  # compiled code and the first pages warm
        out = {"questions": len(qs), "after_load": rss_now()}
        for k in (10, HITS):
            t0 = time.perf_counter()
            res = r.bm25.search(qs, k)
            out[f"batched_top{k}_qps"] = round(len(qs) / (time.perf_counter() - t0), 2)
        np.save(d / "densepr-top100.npy", res.rows)
        lat = []
        for q in qs[:ONE_AT_A_TIME]:
            t0 = time.perf_counter()
            r.bm25.search([q], HITS)
            lat.append(time.perf_counter() - t0)
        lat = np.asarray(lat)
        out.update(one_at_a_time_qps=round(len(lat) / lat.sum(), 2), top100_p50_ms=round(1000 * float(np.median(lat)), 2),
                   top100_p95_ms=round(1000 * float(np.percentile(lat, 95)), 2), after_queries=rss_now())  # fmt: skip
        return out
    if step == "dense-search":
        return dense_search(d)
    raise SystemExit(f"unknown child step {step}")


def step_serve(d: Path, mode: str | None = None, requests: int = 100) -> dict:
    """``densepr serve --index <d>``: seconds until /health answers, then ``requests`` sequential /search
    (k=100, ``mode``: the server's default when None): p50/p95 latency and the server's RSS after them."""
    import numpy as np

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(d / f"scale-serve{'-' + mode if mode else ''}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "densepr", "serve", "--index", str(d), "--port", str(port)], stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"densepr serve exited {proc.returncode}; see {d / 'scale-serve.log'}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        ready = time.perf_counter() - t0
        lat = []
        for q in questions(requests):
            body = json.dumps({"question": q, "k": HITS, **({"mode": mode} if mode else {})}).encode()
            req = urllib.request.Request(url + "/search", body, {"Content-Type": "application/json"})
            t1 = time.perf_counter()
            json.loads(urllib.request.urlopen(req, timeout=60).read())
            lat.append(time.perf_counter() - t1)
        st = _status(proc.pid)
        return {"ready_s": round(ready, 2), "requests": len(lat), "search_p50_ms": round(1000 * float(np.median(lat)), 2),
                "search_p95_ms": round(1000 * float(np.percentile(lat, 95)), 2), "server_rss_bytes": st.get("VmRSS", 0),
                "server_anon_bytes": st.get("RssAnon", 0), "command": f"densepr serve --index {d}" + (f" (/search mode {mode})" if mode else "")}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def step_lucene(d: Path, workers: int) -> dict:
    sys.path.insert(0, str(BENCH / "retrieval"))
    import numpy as np
    from bm25_lucene import HITS as LHITS
    from bm25_lucene import build_lucene, ensure_jar, java_version, search_lucene, time_lucene_one_thread

    from densepr.data import default_cache_dir
    from densepr.data.passages import iter_passages
    from densepr.retrieve.retriever import open_corpus

    java_version()
    jar = ensure_jar(default_cache_dir())
    work = d / "lucene"
    coll, index = work / "collection", work / "index"
    if not (work / "collection.done").is_file():
        shutil.rmtree(work, ignore_errors=True)
        coll.mkdir(parents=True)
        files = [open(coll / f"docs{f:02d}.jsonl", "w", encoding="utf-8") for f in range(workers)]
        for i, p in enumerate(iter_passages(d / "passages.tsv")):  # round robin: each indexing thread one file
            files[i % workers].write(json.dumps({"id": p.id, "contents": f"{p.title}\n{p.text}"}) + "\n")
        for f in files:
            f.close()
        (work / "collection.done").touch()
    shutil.rmtree(index, ignore_errors=True)
    corpus = open_corpus(d)
    build_s = build_lucene(jar, coll, index, [], workers)
    qs = questions(QUESTIONS)
    one_s, _ = time_lucene_one_thread(jar, index, qs, work)
    run = search_lucene(jar, index, qs, corpus, work, "-bm25", 1)
    ours = np.load(d / "densepr-top100.npy", allow_pickle=False)
    k = min(LHITS, HITS)
    top = {}
    for cut in (1, 10, 100):
        agree = [
            len(set(a[:cut][a[:cut] >= 0]) & set(b[:cut][b[:cut] >= 0])) / max(1, min(cut, (a[:cut] >= 0).sum()))
            for a, b in zip(run.rows[:, :k], ours)
        ]
        top[f"top{cut}_overlap"] = round(float(np.mean(agree)), 4)
    return {"index_s": round(build_s, 2), "passages_per_s": round(len(corpus) / build_s, 1), "index_bytes": du(index),
            "threads": workers, "one_thread_qps": round(len(qs) / one_s, 2), "agreement_with_densepr": top,
            "command": f"IndexCollection -threads {workers} -storeRaw; TimeSearch (1 thread, {len(qs)} questions)"}  # fmt: skip


DENSE_ARGS = "--type ivf-pq --pq-m 96 --rerank 10"  # 96 bytes a vector (8 dims a code): 1.9 GiB of codes at 21M
DENSE_QUERIES = 200


def dense_binding(d: Path) -> dict:
    """What makes synthetic vectors stand in for ``<d>``'s: the store's corpus fingerprint (the vectors'
    ids are the synthetic corpus's, 1..N in order) and a real 768-d question encoder (MPNet, when
    fetched: ``densepr data fetch --model mpnet``), so ``densepr serve --index <d>`` answers dense
    and hybrid /search end to end. The vectors are random, so the hits mean nothing; the costs are real."""
    from densepr.fileio.manifest import read_manifest

    out = {"corpus": read_manifest(d / "store", "passage-store", "none")["corpus"]}
    try:
        from densepr.data.pretrained import pretrained_dir
        from densepr.index.embeddings import encoder_info
        from densepr.models.encoder import Encoder

        path = pretrained_dir("mpnet")
    except Exception as e:  # noqa: BLE001 - serving dense needs it; building does not
        print(f"  no question encoder recorded ({e}); dense-serve will be skipped", flush=True)
        return out
    return {**out, "encoder": encoder_info(Encoder.load(path)), "question_encoder": str(path)}


def step_dense(d: Path, n: int, dense_args: str) -> dict:
    """N x 768 float16 synthetic vectors bound to ``<d>``'s corpus, built as ``<d>/dense``: build wall
    and peak RSS, disk."""
    sys.path.insert(0, str(BENCH / "retrieval"))
    import numpy as np
    from index_bench import write_synthetic

    emb, idx = d / "emb768", d / "dense"
    gen_s = None
    if not (emb / "manifest.json").is_file():
        shutil.rmtree(emb, ignore_errors=True)
        t0 = time.perf_counter()
        q = write_synthetic(emb, n, 768, DENSE_QUERIES, clusters=1000, dtype="float16", first_id=1, manifest=dense_binding(d))
        np.save(d / "dense-queries.npy", q)
        gen_s = round(time.perf_counter() - t0, 1)
        print(f"  vectors written in {gen_s} s", flush=True)
    shutil.rmtree(idx, ignore_errors=True)
    cmd = ["index", "dense", str(emb), str(idx), *dense_args.split()]
    # one save of the trained quantiser, no mid-add checkpoints: each would write another copy of the codes
    build = measured([sys.executable, "-m", "densepr", *cmd, "--checkpoint-seconds", "1e9"], d / "scale-dense-build.log")
    return {"vectors": n, "dim": 768, "dtype": "float16", "command": "densepr " + " ".join(cmd).replace(str(d), "DIR"),
            "generate_s": gen_s, "embeddings_bytes": du(emb), "index_bytes": du(idx), "build": build}  # fmt: skip


def dense_search(d: Path) -> dict:
    """Load ``<d>/dense`` alone; latency one query at a time and batched (top-100); recall@10 and
    @100 against exact search over the float16 vectors (streamed part by part), with and
    without re-ranking. Latency is measured first, with whatever of the vectors the page cache holds."""
    import numpy as np
    import torch

    from densepr.index.dense import DenseIndex
    from densepr.index.dense_search import torch_topk
    from densepr.index.embeddings import Embeddings

    base, t0 = rss_now(), time.perf_counter()
    ix = DenseIndex.load(d / "dense")
    load_s, after = time.perf_counter() - t0, rss_now()
    q = np.load(d / "dense-queries.npy", allow_pickle=False)
    ix.search(q[:5], HITS)
    lat = []
    for v in q:
        t0 = time.perf_counter()
        ix.search(v[None], HITS)
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    approx = ix.search(q, HITS)
    batch_qps = len(q) / (time.perf_counter() - t0)
    params = {k: getattr(ix.params, k) for k in ("nlist", "nprobe", "pq_m", "rerank")}
    ix.set_search(rerank=0)
    plain = ix.search(q, HITS)
    out = {"load_s": round(load_s, 3), "interpreter": base, "after_load": after, "after_queries": rss_now(),
           "params": params, "queries": len(q),
           "top100_p50_ms": round(1000 * float(np.median(lat)), 2), "top100_p95_ms": round(1000 * float(np.percentile(lat, 95)), 2),
           "batched_top100_qps": round(batch_qps, 2)}  # fmt: skip
    t0 = time.perf_counter()
    parts = (torch.from_numpy(np.asarray(vecs, dtype=np.float32)) for _, vecs in Embeddings.open(d / "emb768").parts())
    best_i = torch_topk(q, HITS, parts)[1]  # one part in memory at a time
    out["exact_s"] = round(time.perf_counter() - t0, 1)

    def recall(res, k: int) -> float:
        rows = np.asarray(res.rows)
        return round(float(np.mean([len(set(rows[i, :k].tolist()) & set(best_i[i, :k].tolist())) / k for i in range(len(q))])), 4)

    out["recall"] = {f"rerank{params['rerank']}": {"at10": recall(approx, 10), "at100": recall(approx, 100)},
                     "rerank0": {"at10": recall(plain, 10), "at100": recall(plain, 100)}}  # fmt: skip
    return out


def step_dense_serve(d: Path) -> dict | None:
    """``densepr serve --index <d>`` with BM25 and the dense index: /search in each mode."""
    if "question_encoder" not in json.loads((d / "emb768" / "manifest.json").read_text()):
        return {"skipped": "no question encoder recorded (densepr data fetch --model mpnet)"}
    return {m: step_serve(d, m, 50) for m in ("dense", "hybrid", "bm25")}


def step_corpus(d: Path, n: int, work: Path) -> dict:
    tsv = d / "passages.tsv"
    size = lambda p: int(p.parent.name[1:]) if p.parent.name[1:].isdigit() else 0  # noqa: E731
    # a corpus is a prefix of any larger one with the same seed (even one still being written): header + n lines
    bigger = sorted((p for p in [*work.glob("n*/passages.tsv"), *work.glob("n*/passages.tsv.partial")] if size(p) > n), key=size)
    t0 = time.perf_counter()
    tmp = tsv.with_suffix(".tsv.partial")
    if tsv.is_file():  # written before (e.g. by synthetic_corpus.py directly): kept when it holds n passages
        with open(tsv, "rb") as fh:
            lines = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 24), b""))
        if lines == n + 1:
            return {"passages": n, "how": "existing", "tsv_bytes": tsv.stat().st_size}
    for src_path in bigger:
        lines = 0
        with open(src_path, "rb") as src, open(tmp, "wb") as dst:
            for line in src:
                if lines > n:
                    break
                dst.write(line)
                lines += 1
        if lines == n + 1:
            os.replace(tmp, tsv)
            how = f"prefix of {src_path}"
            break
    else:
        tmp.unlink(missing_ok=True)
        subprocess.run([sys.executable, str(HERE / "synthetic_corpus.py"), "--passages", str(n), "--output", str(tsv)], check=True)
        how = "generated"
    return {"passages": n, "how": how, "wall_s": round(time.perf_counter() - t0, 1), "tsv_bytes": tsv.stat().st_size}


def run_step(step: str, n: int, d: Path, args: argparse.Namespace) -> dict:
    if step == "corpus":
        return step_corpus(d, n, args.work_dir)
    if step == "store":
        r = measured([*me(), "child", "store", str(d)], d / "scale-store.log")
        return {**r, "store_bytes": du(d / "store")}
    if step == "bm25":
        shutil.rmtree(d / "bm25", ignore_errors=True)
        r = measured([*me(), "child", "bm25", str(d), str(args.workers), str(args.chunk_passages)], d / "scale-bm25.log")
        return {**r, "workers": args.workers, "index_bytes": du(d / "bm25"),
                "command": f"densepr index bm25 {d}/passages.tsv {d}/bm25 --workers {args.workers} --chunk-passages {args.chunk_passages} (as a library call: the store beside it)"}  # fmt: skip
    if step in ("load", "queries"):
        return measured([*me(), "child", step, str(d)], d / f"scale-{step}.log")
    if step == "serve":
        return step_serve(d)
    if step == "lucene":
        return step_lucene(d, args.workers)
    if step == "dense":
        return step_dense(d, n, args.dense_args)
    if step == "dense-search":
        return measured([*me(), "child", "dense-search", str(d)], d / "scale-dense-search.log")
    if step == "dense-serve":
        return step_dense_serve(d)
    raise SystemExit(step)


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def table(results: dict) -> None:
    print(f"\n{'N':>11} {'build s':>8} {'peak GiB':>8} {'anon GiB':>8} {'disk GiB':>8} {'load s':>6} {'load RSS GiB':>12} "
          f"{'q/s batch':>9} {'q/s 1-by-1':>10} {'p50 ms':>7} {'serve GiB':>9} {'serve p50':>9} | {'Lucene idx s':>12} {'Lucene q/s':>10}")  # fmt: skip
    for n, r in sorted(results.items(), key=lambda x: int(x[0])):
        b, ld, q, s, lu = (r.get(k, {}) for k in ("bm25", "load", "queries", "serve", "lucene"))
        print(f"{int(n):>11,} {b.get('wall_s', '-'):>8} {gib(b.get('peak_rss_bytes')):>8} {gib(b.get('peak_anon_bytes')):>8} "
              f"{gib(b.get('index_bytes')):>8} {ld.get('load_s', '-'):>6} {gib(ld.get('after_load', {}).get('rss_bytes')):>12} "
              f"{q.get('batched_top100_qps', '-'):>9} {q.get('one_at_a_time_qps', '-'):>10} {q.get('top100_p50_ms', '-'):>7} "
              f"{gib(s.get('server_rss_bytes')):>9} {s.get('search_p50_ms', '-'):>9} | {lu.get('index_s', '-'):>12} {lu.get('one_thread_qps', '-'):>10}")  # fmt: skip


def dense_summary(n: str, r: dict) -> dict:
    """One size's dense figures (its ``dense``, ``dense-search`` and ``dense-serve`` steps), as the table
    prints them and ``corpus-costs.json`` (``densepr index plan``) keeps them."""
    d, se, sv = r["dense"], r.get("dense-search", {}), r.get("dense-serve", {})
    rec = se.get("recall", {})
    return {"passages": int(n), "args": d["command"].split(" DIR/dense ", 1)[-1], "build_s": d["build"]["wall_s"],
            "build_peak_bytes": d["build"]["peak_rss_bytes"], "vectors_bytes": d["embeddings_bytes"], "index_bytes": d["index_bytes"],
            "load_s": se.get("load_s"), "load_rss_bytes": se.get("after_load", {}).get("rss_bytes"),
            "top100_p50_ms": se.get("top100_p50_ms"), "batched_top100_qps": se.get("batched_top100_qps"),
            "recall_at_10": next((v["at10"] for k, v in rec.items() if k != "rerank0"), None),
            "codes_recall_at_10": rec.get("rerank0", {}).get("at10"),
            "serve_rss_bytes": max((v.get("server_rss_bytes", 0) for v in sv.values() if isinstance(v, dict)), default=None),
            "serve_dense_p50_ms": sv.get("dense", {}).get("search_p50_ms"), "serve_hybrid_p50_ms": sv.get("hybrid", {}).get("search_p50_ms")}  # fmt: skip


def dense_table(results: dict) -> None:
    rows = [dense_summary(n, r) for n, r in sorted(results.items(), key=lambda x: int(x[0])) if "dense" in r]
    if not rows:
        return
    print(f"\n{'N':>11} {'dense build s':>13} {'peak GiB':>8} {'vectors GiB':>11} {'index GiB':>9} {'load s':>6} {'RSS GiB':>7} "
          f"{'p50 ms':>6} {'q/s batch':>9} {'R@10 rerank':>11} {'R@10 codes':>10} | {'serve GiB':>9} {'dense p50':>9} {'hybrid p50':>10}")  # fmt: skip
    for x in rows:
        v = {k: "-" if val is None else val for k, val in x.items()}
        print(f"{x['passages']:>11,} {v['build_s']:>13} {gib(x['build_peak_bytes']):>8} {gib(x['vectors_bytes']):>11} "
              f"{gib(x['index_bytes']):>9} {v['load_s']:>6} {gib(x['load_rss_bytes']):>7} {v['top100_p50_ms']:>6} "
              f"{v['batched_top100_qps']:>9} {v['recall_at_10']:>11} {v['codes_recall_at_10']:>10} | "
              f"{gib(x['serve_rss_bytes'] or None):>9} {v['serve_dense_p50_ms']:>9} {v['serve_hybrid_p50_ms']:>10}")  # fmt: skip


COSTS = BENCH.parent / "src" / "densepr" / "resources" / "corpus-costs.json"


def write_costs(results: dict) -> None:
    """The linear fits ``densepr index plan`` shows (densepr.index.corpus_plan), over every size measured."""
    from densepr.index.corpus_plan import ROWS, fit

    pick = {
        "store_bytes": ("store", "store_bytes"),
        "bm25_index_bytes": ("bm25", "index_bytes"),
        "bm25_build_peak_bytes": ("bm25", "peak_rss_bytes"),
        "bm25_build_anon_bytes": ("bm25", "peak_anon_bytes"),
        "bm25_build_s": ("bm25", "wall_s"),
        "load_rss_bytes": ("load", "after_load", "rss_bytes"),
        "load_s": ("load", "load_s"),
    }
    fits, sizes = {}, set()
    for key, _, _ in ROWS:
        pts = []
        for n, r in results["sizes"].items():
            v = r
            for part in pick[key]:
                v = v.get(part) if isinstance(v, dict) else None
            if v is not None:
                pts.append((int(n), float(v)))
        if pts:
            fits[key] = {**fit([x for x, _ in pts], [y for _, y in pts]), "sizes": sorted(x for x, _ in pts)}
            sizes.update(x for x, _ in pts)
    if not fits:
        return
    queries = [
        {"passages": int(n), **{k: r["queries"][k] for k in ("batched_top100_qps", "one_at_a_time_qps", "top100_p50_ms")},
         "lucene_one_thread_qps": r.get("lucene", {}).get("one_thread_qps")}
        for n, r in sorted(results["sizes"].items(), key=lambda x: int(x[0])) if "queries" in r
    ]  # fmt: skip
    keep = ("passages", "args", "build_s", "build_peak_bytes", "vectors_bytes", "index_bytes", "top100_p50_ms", "recall_at_10",
            "serve_rss_bytes", "serve_dense_p50_ms", "serve_hybrid_p50_ms")  # what `index plan` shows
    dense = [{k: x[k] for k in keep} for x in (dense_summary(n, r) for n, r in sorted(results["sizes"].items(), key=lambda x: int(x[0]))
                                              if "dense" in r and "dense-search" in r)]  # fmt: skip
    m = results.get("machine", {})
    COSTS.write_text(json.dumps({"sizes": sorted(sizes), "fits": fits, "queries": queries, "dense": dense,
                                 "source": f"benchmarks/scale/scale.py, synthetic 100-word passages, {m.get('cores', '?')} cores, "
                                           f"{time.strftime('%Y-%m-%d')} (benchmarks/scale/results/scale.json)"}, indent=1) + "\n")  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000, 21_015_324])
    ap.add_argument("--work-dir", type=Path, required=True, help="corpora and indexes (tens of GB at 21M)")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--redo", nargs="*", default=[], choices=STEPS, help="rerun these steps even if measured")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk-passages", type=int, default=50_000)
    ap.add_argument("--lucene-max", type=int, default=1_000_000)
    ap.add_argument("--dense-max", type=int, default=1_000_000)
    ap.add_argument("--dense-args", default=DENSE_ARGS, help="densepr index dense options for the dense step")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    all_results = json.loads(args.results.read_text()) if args.results.is_file() else {"sizes": {}}
    for n in sorted(args.sizes):
        d = args.work_dir / f"n{n}"
        d.mkdir(parents=True, exist_ok=True)
        for step in args.steps:
            if (step == "lucene" and n > args.lucene_max) or (step.startswith("dense") and n > args.dense_max):
                continue
            f = d / f"scale-{step}.json"
            if f.is_file() and step not in args.redo:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {n:,} passages: {step} ...", flush=True)
            r = run_step(step, n, d, args)
            r["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            f.write_text(json.dumps(r, indent=1))
            print(f"  {json.dumps(r)[:400]}", flush=True)
        all_results["sizes"][str(n)] = {f.stem[6:]: json.loads(f.read_text()) for f in sorted(d.glob("scale-*.json"))}
    sys.path.insert(0, str(BENCH))
    from common import machine_info

    all_results["machine"] = machine_info()
    if args.results.resolve() == RESULTS.resolve():  # a trial run elsewhere (--results) leaves the shipped fits alone
        write_costs(all_results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(all_results, indent=1))
    table(all_results["sizes"])
    dense_table(all_results["sizes"])
    print(f"\nwritten to {args.results}")


if __name__ == "__main__":
    main()
