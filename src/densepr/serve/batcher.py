"""The micro-batcher: concurrent requests' model calls batched in one worker thread, each request's
errors isolated, the queue bounded and fair across clients, abandoned requests dropped."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from densepr.serve.limits import LimitError

log = logging.getLogger("densepr.serve")


class _Entry:
    __slots__ = ("key", "item", "size", "cost", "client", "seq", "fut", "waiting")

    def __init__(self, key: Any, item: Any, size: int, cost: int, client: Any, seq: int, fut: asyncio.Future) -> None:
        self.key, self.item, self.size, self.cost, self.client, self.seq, self.fut = key, item, size, cost, client, seq, fut
        self.waiting = True


class MicroBatcher:
    """Runs ``fn(key, items)`` on batches of items submitted concurrently under the same key.

    One worker thread runs the model (torch and FAISS already use every core); while it is
    busy, new requests queue, and the next call takes up to ``max_batch`` questions at once.

    * Each request has a ``size`` (questions: what ``max_batch`` counts) and a ``cost`` (what the
      queue counts, in ``unit``: questions for retrieval, passages for the reader, whose work
      grows with k). At most ``max_queue`` units wait (a request costing more is still taken
      when nothing waits). When a request does not fit, waiting requests are shed to make room:
      first those costing more than it, largest first (so many-question or large-k requests
      cannot starve small ones), then the newest of any client holding more of the queue than
      the newcomer's client would (so one client's flood cannot lock others out); if it still
      does not fit, it is refused. Shed and refused requests get a 503 :class:`LimitError`
      (``limit``) whose ``Retry-After`` is the estimated time to drain the queue.
    * **Fair batches.** Requests carry a ``client`` (the peer's address): a batch is filled
      round-robin across the clients that have requests waiting, the least recently served
      first, so a client sending one request while another floods is served in the next batch,
      not after the flood's backlog. Within a client, requests keep their order.
    * A request whose future is already done when its batch forms (cancelled because its
      client disconnected, or timed out) is dropped: the model never sees it. While a batch
      runs, :meth:`abandoned` (callable from ``fn``, in the worker thread) says whether every
      request of it is gone, so a long model call can stop between chunks (the reader does).
    * When a batch call raises, each request of the batch is re-run alone, so an exception
      belongs to the one request whose input raised it (``isolated`` counts such batches).
    """

    def __init__(self, fn: Callable[[Any, list], list], max_batch: int = 64, max_wait_ms: float = 2.0,
                 max_queue: int | None = None, name: str = "model", unit: str = "question", limit: str = "max_queue") -> None:  # fmt: skip
        self.fn, self.max_batch, self.max_wait = fn, max(1, max_batch), max_wait_ms / 1000
        self.max_queue, self.name, self.unit, self.limit = max_queue, name, unit, limit
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"densepr-{name}")
        self.queue: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0  # model calls
        self.items = 0  # requests served by them
        self.queued = 0  # units waiting (submitted, not started, not abandoned)
        self.waiting: set[_Entry] = set()  # the requests they belong to
        self.rejected = 0  # requests refused because the queue was full
        self.shed = 0  # waiting requests answered 503 to make room for a smaller one, or another client's
        self.dropped = 0  # requests abandoned (disconnected or timed out) before their batch ran
        self.stopped = 0  # batches given up while running because every request of theirs was gone
        self.isolated = 0  # batches that raised and were re-run one request at a time
        self.s_per_unit = 0.0  # moving average of model time per unit
        self.seq = 0  # submissions so far (orders a client's requests)
        self.served: dict[Any, int] = {}  # client -> the batch that last served it (clients waiting or in the last batch)
        self._gone: threading.Event | None = None  # set when every request of the running call is gone

    def retry_after(self) -> int:
        """Seconds until the units now waiting are likely served (1 to 60)."""
        return int(min(60, max(1, math.ceil(self.queued * self.s_per_unit))))

    def abandoned(self) -> bool:
        """True when every request of the model call now running has gone (client disconnected or
        timed out): its results would be thrown away. Safe to call from the worker thread."""
        gone = self._gone
        return gone is not None and gone.is_set()

    def _leave(self, e: _Entry) -> None:
        if e.waiting:
            e.waiting = False
            self.queued -= e.cost
            self.waiting.discard(e)

    def _busy(self) -> LimitError:
        return LimitError(503, self.limit, f"server busy: {self.queued} {self.unit}s are waiting for the {self.name} "
                                           f"(limit {self.max_queue}); retry later",
                          headers={"Retry-After": str(self.retry_after())})  # fmt: skip

    def _admit(self, cost: int, client: Any) -> bool:
        """Make room for ``cost`` units from ``client`` by shedding waiting requests: those costing more,
        largest first, then the newest of the client holding the most, while it holds more than ``client``
        would. Nothing is shed unless that makes room."""
        if self.max_queue is None or self.queued == 0 or self.queued + cost <= self.max_queue:
            return True
        live = [e for e in self.waiting if not e.fut.done()]
        held: dict[Any, int] = {}
        for e in live:
            held[e.client] = held.get(e.client, 0) + e.cost
        plan: list[_Entry] = []
        over = self.queued + cost - self.max_queue  # units to free
        for e in sorted((e for e in live if e.cost > cost), key=lambda e: e.cost, reverse=True):
            if over <= 0:
                break
            plan.append(e)
            over -= e.cost
            held[e.client] -= e.cost
        newest = sorted((e for e in live if e not in plan and e.client != client), key=lambda e: e.seq, reverse=True)
        while over > 0:
            top = max((c for c in held if c != client), key=lambda c: held[c], default=None)
            if top is None or held[top] <= held.get(client, 0) + cost:
                return False  # shedding more would take from clients holding no more than the newcomer's: refuse it instead
            e = next(e for e in newest if e.client == top and e not in plan)
            plan.append(e)
            over -= e.cost
            held[top] -= e.cost
        for e in plan:
            self._leave(e)
            self.shed += 1
            e.fut.set_exception(self._busy())
        return True

    async def submit(self, key: Any, item: Any, size: int = 1, cost: int | None = None, client: Any = None) -> Any:
        """``fn``'s result for ``item``, computed in a batch of items under ``key``. ``size``: questions
        (what ``max_batch`` counts); ``cost``: units the queue counts (default ``size``); ``client``: who
        sent it (fair batches and shedding)."""
        loop = asyncio.get_running_loop()
        if self.queue is None or self.loop is not loop:  # first call, or a new event loop (test clients)
            self.loop, self.queue, self.queued, self.waiting, self.served = loop, asyncio.Queue(), 0, set(), {}
            self.worker = loop.create_task(self._run())
        cost = size if cost is None else cost
        if not self._admit(cost, client):
            self.rejected += 1
            raise self._busy()
        self.seq += 1
        e = _Entry(key, item, size, cost, client, self.seq, loop.create_future())
        self.queued += cost
        self.waiting.add(e)
        e.fut.add_done_callback(lambda _, e=e: self._leave(e))
        self.queue.put_nowait(e)
        return await e.fut  # cancelling the awaiting task cancels e.fut: the entry is dropped

    def _guarded(self, key: Any, items: list) -> list:
        """``fn`` in the worker thread; a BaseException that is not an Exception (a Rust
        extension's panic) becomes a RuntimeError, so it fails one request, not the worker."""
        try:
            return self.fn(key, items)
        except (Exception, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise RuntimeError(f"{type(e).__name__}: {e}") from e

    async def _call(self, key: Any, entries: list[_Entry]) -> list:
        assert self.loop is not None
        gone, left = threading.Event(), [len(entries)]

        def one_gone(_: asyncio.Future) -> None:
            left[0] -= 1
            if left[0] == 0:
                gone.set()

        for e in entries:
            e.fut.add_done_callback(one_gone)
        self._gone = gone  # read by abandoned() in the worker thread, which runs one call at a time
        try:
            results = await self.loop.run_in_executor(self.pool, self._guarded, key, [e.item for e in entries])
        finally:
            self._gone = None
            for e in entries:
                e.fut.remove_done_callback(one_gone)
        if len(results) != len(entries):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(entries)} items")
        return results

    async def _run_batch(self, key: Any, batch: list[_Entry]) -> None:
        t0 = time.perf_counter()
        try:
            results = await self._call(key, batch)
        except Exception as exc:
            if all(e.fut.done() for e in batch):  # everyone left (the model stopped early, or failed): nobody to tell
                self.stopped += 1
                return
            if len(batch) == 1:
                batch[0].fut.set_exception(exc)
                return
            self.isolated += 1
            for e in batch:  # one at a time: the exception belongs to the request that raised it
                if e.fut.done():
                    continue
                try:
                    r = (await self._call(key, [e]))[0]
                except Exception as one:
                    if not e.fut.done():
                        e.fut.set_exception(one)
                else:
                    if not e.fut.done():
                        e.fut.set_result(r)
            return
        per = (time.perf_counter() - t0) / max(1, sum(e.cost for e in batch))
        self.s_per_unit = per if self.s_per_unit == 0 else 0.8 * self.s_per_unit + 0.2 * per
        for e, r in zip(batch, results):
            if not e.fut.done():
                e.fut.set_result(r)

    def _fair(self, live: list[_Entry]) -> list[_Entry]:
        """``live`` (in arrival order) round-robin across clients, the least recently served first."""
        by_client: dict[Any, list[_Entry]] = {}
        for e in live:
            by_client.setdefault(e.client, []).append(e)
        turns = sorted(by_client.values(), key=lambda es: (self.served.get(es[0].client, -1), es[0].seq))
        return [es[i] for i in range(max(map(len, turns))) for es in turns if i < len(es)]

    async def _run(self) -> None:
        assert self.queue is not None
        pending: list[_Entry] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
                if self.max_batch > 1 and self.max_wait > 0:
                    await asyncio.sleep(self.max_wait)
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            live = [e for e in pending if not e.fut.done()]
            self.dropped += sum(e.fut.cancelled() for e in pending)  # client gone or timed out: never computed
            if not live:
                pending = []
                continue
            turns = self._fair(live)
            key = turns[0].key
            batch, n = [], 0
            for e in turns:  # same key, up to max_batch questions (always at least one request)
                if e.key == key and (not batch or n + e.size <= self.max_batch):
                    batch.append(e)
                    n += e.size
            chosen = set(batch)
            pending = [e for e in live if e not in chosen]
            for e in batch:
                self._leave(e)
                self.served[e.client] = self.batches
            keep = {e.client for e in pending} | {e.client for e in batch}  # bounded by the queue and one batch
            self.served = {c: b for c, b in self.served.items() if c in keep}
            self.batches += 1
            self.items += len(batch)
            try:
                await self._run_batch(key, batch)
            except Exception as exc:  # a bug here must not stop the worker: fail this batch only
                log.error("micro-batch worker error", exc_info=exc)
                for e in batch:
                    if not e.fut.done():
                        e.fut.set_exception(exc)

    def stats(self) -> dict:
        return {"batches": self.batches, "requests": self.items, f"queued_{self.unit}s": self.queued,
                "rejected_queue_full": self.rejected, "shed_for_smaller": self.shed, "dropped_abandoned": self.dropped,
                "stopped_abandoned": self.stopped, "isolated_batches": self.isolated}  # fmt: skip
