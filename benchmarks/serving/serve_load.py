"""Load tests of `densepr serve` on loopback: throughput with and without micro-batching, and overload.

``--scenario throughput`` (default): for each setting (micro-batching on: ``--max-batch 64``;
off: ``--max-batch 1``) a server is started as a separate process on a free loopback port,
warmed up, then ``--clients`` concurrent clients send real NQ test questions to
``POST /search`` for ``--seconds`` seconds each (one request in flight per client). Reports
requests/s, p50/p95/p99 latency and errors per setting and concurrency, the throughput ratio,
and writes ``benchmarks/serving/results/serve-load.json``.

``--scenario overload``: one server with its default limits, attacked for ``--seconds`` by
``--flood-clients`` clients that each send ``--flood-questions`` NQ questions per request as
fast as they can, ignoring Retry-After, while ``--slowloris`` connections keep sending partial
headers (reconnecting when cut off); meanwhile an innocent client sends one question every
250 ms and /health is polled every 100 ms. Then ``--abandoned`` requests are sent and hung up
on at once, and one search measures what they cost. Reports status counts, latency
percentiles (all from the client side, over separate processes), /health latency, the
server's RSS (``/proc``) before, at peak and after, its queue counters, and writes
``benchmarks/serving/results/serve-overload.json``.

    python benchmarks/serving/serve_load.py [--index runs/embedded] [--mode dense] [--clients 1,16] [--seconds 20]
    python benchmarks/serving/serve_load.py --scenario overload --index runs/embedded --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.data import EmbeddedData
from densepr.fileio.atomic import write_json

RESULTS = Path(__file__).parent / "results" / "serve-load.json"
OVERLOAD_RESULTS = Path(__file__).parent / "results" / "serve-overload.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "densepr", "serve", "--index", str(index), "--port", str(port), "--max-batch", str(max_batch), "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}", 120)


def wait_ready(proc: subprocess.Popen, url: str, seconds: float) -> str:
    """``url`` once its /health answers 200; exits if the server process dies or takes longer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start in {seconds:.0f} s")


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


def rss_mb(pid: int) -> dict:
    """Resident memory of a process now and at its peak (``VmRSS``, ``VmHWM``), in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def percentiles(xs: list[float]) -> dict:
    a = np.array(xs) * 1000
    return {"n": len(xs), **{f"p{p}_ms": round(float(np.percentile(a, p)), 1) if len(a) else None for p in (50, 90, 99)},
            "max_ms": round(float(a.max()), 1) if len(a) else None}  # fmt: skip


def count(d: dict, key) -> None:
    d[key] = d.get(key, 0) + 1


async def overload(url: str, pid: int, questions: list[str], args) -> dict:
    host, port = url.removeprefix("http://").split(":")
    stop = time.perf_counter() + args.seconds
    flood: dict = {"status": {}, "ok": [], "server": [], "refused": [], "all": []}
    innocent: dict = {"status": {}, "ok": [], "server": [], "refused": [], "all": []}
    health: dict = {"status": {}, "all": []}
    peak = {"VmRSS": 0.0}
    slow = {"opened": 0, "cut_off_408": 0, "cut_off_silent": 0}

    async def one(http, rec: dict, body: dict) -> None:
        t0 = time.perf_counter()
        try:
            r = await http.post(url + "/search", json=body)
            code = r.status_code
        except httpx.HTTPError as e:
            code = type(e).__name__
        dt = time.perf_counter() - t0
        count(rec["status"], code)
        rec["all"].append(dt)
        if code == 200:
            rec["ok"].append(dt)
            rec["server"].append(r.json()["took_ms"] / 1000)  # queue + model + response, inside the server
        elif code == 503:
            rec["refused"].append(dt)

    async def flooder(c: int, http) -> None:
        i = c * args.flood_questions
        while time.perf_counter() < stop:
            qs = [questions[(i + j) % len(questions)] for j in range(args.flood_questions)]
            i += args.flood_clients * args.flood_questions
            await one(http, flood, {"question": qs, "k": args.k, "mode": args.mode})

    async def innocent_client(http) -> None:
        i = 0
        while time.perf_counter() < stop:
            await one(http, innocent, {"question": questions[-1 - i % 500], "k": args.k, "mode": args.mode})
            i += 1
            await asyncio.sleep(0.25)

    async def health_poller(http) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                code = (await http.get(url + "/health")).status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            count(health["status"], code)
            health["all"].append(time.perf_counter() - t0)
            await asyncio.sleep(0.1)

    async def memory() -> None:
        while time.perf_counter() < stop:
            peak["VmRSS"] = max(peak["VmRSS"], rss_mb(pid).get("VmRSS", 0.0))
            await asyncio.sleep(0.5)

    async def slowloris() -> None:  # partial headers, a byte every second, reconnecting when cut off
        while time.perf_counter() < stop:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                await asyncio.sleep(0.5)
                continue
            slow["opened"] += 1
            writer.write(b"POST /search HTTP/1.1\r\nHost: localhost\r\n")
            data = b""
            try:
                while time.perf_counter() < stop and not reader.at_eof():
                    writer.write(b"X")
                    await writer.drain()
                    try:
                        data += await asyncio.wait_for(reader.read(4096), 1.0)
                    except asyncio.TimeoutError:
                        continue
            except OSError:
                pass
            if reader.at_eof():
                count(slow, "cut_off_408" if b" 408 " in data[:20] else "cut_off_silent")
            writer.close()

    limits = httpx.Limits(max_connections=args.flood_clients, max_keepalive_connections=args.flood_clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as fl, httpx.AsyncClient(timeout=60) as inn, httpx.AsyncClient(timeout=60) as hl:
        await asyncio.gather(*[flooder(c, fl) for c in range(args.flood_clients)], innocent_client(inn), health_poller(hl),
                             memory(), *[slowloris() for _ in range(args.slowloris)])  # fmt: skip
        after_flood = rss_mb(pid)
        # Abandoned requests (one question each, so the queue takes them all): sent in full, then hung up on at once.
        body = json.dumps({"question": questions[1], "k": args.k, "mode": args.mode}).encode()
        raw = (f"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        before = (await hl.get(url + "/health")).json()["queues"]["search"]
        for _ in range(args.abandoned):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(raw)
            await writer.drain()
            writer.close()
        t0 = time.perf_counter()
        probe = await inn.post(url + "/search", json={"question": questions[0], "k": args.k, "mode": args.mode})
        probe_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        after = (await hl.get(url + "/health")).json()["queues"]["search"]
    stats = lambda rec: {"status": {str(k): v for k, v in sorted(rec["status"].items(), key=str)},  # noqa: E731
                         "ok_latency": percentiles(rec["ok"]), "ok_server_took": percentiles(rec["server"]),
                         "refused_503_latency": percentiles(rec["refused"]),
                         "all_latency": percentiles(rec["all"])}  # fmt: skip
    return {"flood": stats(flood), "innocent": stats(innocent),
            "health": {"status": {str(k): v for k, v in health["status"].items()}, "latency": percentiles(health["all"])},
            "slowloris": slow, "rss_peak_mb": peak["VmRSS"], "rss_after_flood_mb": after_flood,
            "abandoned": {"sent": args.abandoned, "probe_status": probe.status_code, "probe_ms": round(1000 * probe_s, 1),
                          "computed": after["requests"] - before["requests"] - 1, "dropped": after["dropped_abandoned"] - before["dropped_abandoned"],
                          "refused_queue_full": after["rejected_queue_full"] - before["rejected_queue_full"]},
            "server_queue": after}  # fmt: skip


def run_overload(args, questions: list[str]) -> None:
    # every simulated client connects from 127.0.0.1: the per-client cap would be the total cap
    proc, url = start_server(args.index, 64, ["--max-connections-per-client", "256"])
    try:
        asyncio.run(load(url, questions[-64:], 4, 3, args.mode, args.k))  # warm-up
        rss_before = rss_mb(proc.pid)
        r = asyncio.run(overload(url, proc.pid, questions, args))
        r["rss_before_mb"] = rss_before
        r["rss_end_mb"] = rss_mb(proc.pid)
        r["limits"] = httpx.get(url + "/health").json()["limits"]
    finally:
        proc.terminate()
        proc.wait(10)
    f, i, h = r["flood"], r["innocent"], r["health"]["latency"]
    print(f"overload: {args.flood_clients} clients x {args.flood_questions} questions for {args.seconds} s, "
          f"{args.slowloris} slowloris connections, then {args.abandoned} abandoned requests")  # fmt: skip
    print(f"{'(ms)':>10} {'statuses':<30} {'200 p50':>8} {'200 p99':>8} {'200 max':>8} {'server max':>10} {'503 p50':>8} {'503 p99':>8}")
    for name, rec in (("flood", f), ("innocent", i)):
        ok, sv, no = rec["ok_latency"], rec["ok_server_took"], rec["refused_503_latency"]
        print(f"{name:>10} {json.dumps(rec['status']):<30} {ok['p50_ms']!s:>8} {ok['p99_ms']!s:>8} {ok['max_ms']!s:>8} {sv['max_ms']!s:>10} "
              f"{no['p50_ms']!s:>8} {no['p99_ms']!s:>8}")  # fmt: skip
    print(f"{'/health':>10} {json.dumps(r['health']['status']):<30} {h['p50_ms']!s:>8} {h['p99_ms']!s:>8} {h['max_ms']!s:>8}")
    print(f"slowloris: {r['slowloris']}")
    print(f"RSS MiB: before {r['rss_before_mb'].get('VmRSS')}, peak sampled {r['rss_peak_mb']}, after flood {r['rss_after_flood_mb'].get('VmRSS')}, "
          f"end {r['rss_end_mb'].get('VmRSS')} (VmHWM {r['rss_end_mb'].get('VmHWM')})")  # fmt: skip
    print(f"abandoned: {r['abandoned']}")
    cmd = "python benchmarks/serving/serve_load.py --scenario overload " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("scenario", "clients"))
    write_json(OVERLOAD_RESULTS, {"command": cmd, "machine": machine_info(), "threads": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                                  "mode": args.mode, "k": args.k, **r})  # fmt: skip
    print(f"written to {OVERLOAD_RESULTS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["throughput", "overload"], default="throughput")
    ap.add_argument("--index", type=Path, default=Path("runs/embedded"))
    ap.add_argument("--mode", default="dense")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--flood-clients", type=int, default=64, help="overload: concurrent flooding clients")
    ap.add_argument("--flood-questions", type=int, default=64, help="overload: questions per flooding request")
    ap.add_argument("--slowloris", type=int, default=16, help="overload: connections sending partial headers")
    ap.add_argument("--abandoned", type=int, default=120, help="overload: requests sent and hung up on after the flood")
    args = ap.parse_args()
    questions = EmbeddedData().load_qa("nq-test").questions
    if args.scenario == "overload":
        return run_overload(args, questions)
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
    write_json(RESULTS, {"command": "python benchmarks/serving/serve_load.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
                         "machine": machine_info(), "threads": os.cpu_count(), "mode": args.mode, "k": args.k,
                         "rows": rows, "throughput_ratio": ratio})  # fmt: skip
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
