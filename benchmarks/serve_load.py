"""Load test of `densepr serve`: concurrent clients on loopback, with and without micro-batching.

For each setting (micro-batching on: ``--max-batch 64``; off: ``--max-batch 1``) a server is
started as a separate process on a free loopback port, warmed up, then ``--clients``
concurrent clients send real NQ test questions to ``POST /search`` for ``--seconds``
seconds each (one request in flight per client). Reports requests/s, p50/p95/p99 latency and
errors per setting and concurrency, the throughput ratio, and writes
``benchmarks/results/serve-load.json``.

    python benchmarks/serve_load.py [--index runs/embedded] [--mode dense] [--clients 1,16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from common import machine_info

from densepr.data import EmbeddedData
from densepr.fileio import write_json

RESULTS = Path(__file__).parent / "results" / "serve-load.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "densepr", "serve", "--index", str(index), "--port", str(port), "--max-batch", str(max_batch), "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


async def load(url: str, questions: list[str], clients: int, seconds: float, mode: str, k: int) -> dict:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = c
        while time.perf_counter() < stop:
            q = questions[i % len(questions)]
            i += clients
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/search", json={"question": q, "k": k, "mode": mode})
                ok = r.status_code == 200 and len(r.json()["results"][0]["passages"]) > 0
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, http) for c in range(clients)])
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2),
            **{f"p{p}_ms": round(float(np.percentile(lat, p)), 1) if len(lat) else None for p in (50, 95, 99)}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("runs/embedded"))
    ap.add_argument("--mode", default="dense")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    questions = EmbeddedData().load_qa("nq-test").questions
    rows = []
    for label, max_batch in (("micro-batching", 64), ("one at a time", 1)):
        proc, url = start_server(args.index, max_batch, [])
        try:
            asyncio.run(load(url, questions[-64:], 4, 3, args.mode, args.k))  # warm-up
            for c in [int(x) for x in args.clients.split(",")]:
                r = asyncio.run(load(url, questions, c, args.seconds, args.mode, args.k))
                health = httpx.get(url + "/health").json()["micro_batches"]["search"]
                rows.append({"setting": label, "max_batch": max_batch, **r, "server_batches_so_far": health})
                print(f"{label:>15} {c:>3} clients: {r['requests_per_s']:>7} req/s  p50 {r['p50_ms']} ms  p95 {r['p95_ms']} ms  "
                      f"p99 {r['p99_ms']} ms  errors {r['errors']}", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(10)
    ratio = {}
    for c in {r["clients"] for r in rows}:
        on = next(r for r in rows if r["clients"] == c and r["max_batch"] > 1)
        off = next(r for r in rows if r["clients"] == c and r["max_batch"] == 1)
        ratio[str(c)] = round(on["requests_per_s"] / off["requests_per_s"], 2) if off["requests_per_s"] else None
    print("throughput micro-batching / one at a time, by clients:", ratio)
    write_json(RESULTS, {"command": "python benchmarks/serve_load.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
                         "machine": machine_info(), "threads": os.cpu_count(), "mode": args.mode, "k": args.k,
                         "rows": rows, "throughput_ratio": ratio})  # fmt: skip
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
