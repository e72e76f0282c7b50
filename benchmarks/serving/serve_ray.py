"""`densepr serve` (one process) against `densepr serve --ray` (Ray Serve: router, question encoder with
``@serve.batch``, searcher, as separate replicas) on this machine: the same index, the same bounded
loopback load (real NQ test questions to ``POST /search``, one request in flight per client), at 1 and
16 clients. Reports requests/s, p50/p95/p99 and errors side by side, the ratio, and writes
``benchmarks/serving/results/serve-ray.json``. The Ray server runs a local Ray (``--ray local``) started by
the server process; its start-up is not timed.

    python benchmarks/serving/serve_ray.py [--index runs/embedded] [--mode dense] [--clients 1,16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info
from serve_load import free_port, load, start_server, wait_ready

from densepr.data import EmbeddedData
from densepr.fileio.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def start_ray_server(index: Path, replicas: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "densepr", "serve", "--index", str(index), "--port", str(port), "--device", "cpu",
           "--ray", "local", "--ray-replicas", replicas]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}", 300)


def stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=Path("runs/embedded"))
    ap.add_argument("--mode", default="dense")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--replicas", default="router=1,encoder=1,searcher=1,cpus=0.5", help="densepr serve --ray-replicas")
    args = ap.parse_args()
    questions = EmbeddedData().load_qa("nq-test").questions
    rows = []
    for label, starter in (("densepr serve", lambda: start_server(args.index, 64, [])),
                           ("densepr serve --ray", lambda: start_ray_server(args.index, args.replicas))):  # fmt: skip
        proc, url = starter()
        try:
            asyncio.run(load(url, questions[-64:], 4, 3, args.mode, args.k))  # warm-up
            for c in [int(x) for x in args.clients.split(",")]:
                r = asyncio.run(load(url, questions, c, args.seconds, args.mode, args.k))
                rows.append({"server": label, **r})
                print(f"{label:>20} {c:>3} clients: {r['requests_per_s']:>7} req/s  p50 {r['p50_ms']} ms  p95 {r['p95_ms']} ms  "
                      f"p99 {r['p99_ms']} ms  errors {r['errors']}", flush=True)  # fmt: skip
        finally:
            proc.terminate() if label == "densepr serve" else stop(proc)
            if label == "densepr serve":
                proc.wait(10)
    ratio = {}
    for c in sorted({r["clients"] for r in rows}):
        one, ray = (next(r for r in rows if r["clients"] == c and r["server"] == s) for s in ("densepr serve", "densepr serve --ray"))
        ratio[str(c)] = round(ray["requests_per_s"] / one["requests_per_s"], 2) if one["requests_per_s"] else None
    print("\n| server | clients | req/s | p50 ms | p99 ms | errors |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    print("throughput Ray / one process, by clients:", ratio)
    out = RESULTS / "serve-ray.json"
    write_json(out, {"command": "python benchmarks/serving/serve_ray.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
                     "machine": machine_info(), "mode": args.mode, "k": args.k, "replicas": args.replicas, "rows": rows, "ratio": ratio})  # fmt: skip
    print(f"written to {out}")


if __name__ == "__main__":
    main()
