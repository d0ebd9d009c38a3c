"""Concurrency of ``unicom serve``: queries batched through one worker thread, byte budgets
for decoding and for the request bodies being held."""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable

from fastapi import HTTPException


class QueryBatcher:
    """Runs ``fn(items) -> results`` (one result per item) over batches of concurrent submissions.

    The first waiting item opens a batch; items that arrive within ``max_wait`` seconds
    join it, up to ``max_batch``, while items come together: when the last batch held one
    item, or ended ``max_wait`` ago or more, an item waits for no one (it takes the items
    already waiting), so that one client's queries are answered at once. Batches run
    one at a time in a worker thread, so the event loop keeps accepting requests (which
    form the next batch) while the model works. A result that is an exception is raised to
    that item's caller only.
    """

    def __init__(self, fn: Callable[[list], list], max_batch: int = 32, max_wait: float = 0.01, max_pending: int = 1024):
        self.fn = fn
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self.max_pending = max_pending
        self.queries = 0
        self.batches = 0
        self.largest_batch = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unicom-search")
        self._queue: asyncio.Queue | None = None
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._idle_since = float("-inf")  # when the last batch ended (the loop's clock)
        self._last_size = 0  # how many items it held

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, item: Any) -> Any:
        self._start()
        if self._queue.qsize() >= self.max_pending:
            raise HTTPException(503, f"{self._queue.qsize()} queries are waiting; try again shortly")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        self._arrived.set()
        return await future

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        now = loop.time()
        together = self._last_size > 1 and now - self._idle_since < self.max_wait
        deadline = now + self.max_wait if together else now
        while len(batch) < self.max_batch:
            while not self._queue.empty() and len(batch) < self.max_batch:
                batch.append(self._queue.get_nowait())
            remaining = deadline - loop.time()
            if len(batch) >= self.max_batch or remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, future) for item, future in await self._collect() if not future.cancelled()]
            if not batch:
                continue
            self.batches += 1
            self.queries += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [item for item, _ in batch])
            except Exception as error:  # the callers answer with it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                self._idle_since, self._last_size = loop.time(), len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)


class ByteBudget:
    """At most ``limit`` bytes held at once by the holders (asyncio); a larger request waits
    until it is alone, so one image over the budget is still decoded.

    First come, first served: a request that has to wait is granted before any that comes
    after it, so a steady stream of small requests cannot hold back a large one for ever (a
    later request that would fit waits behind it)."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.used = 0
        self.peak = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, size: int) -> int:
        """Hold ``size`` bytes (at most ``limit``); returns what is held, to :meth:`release`."""
        size = min(max(0, int(size)), self.limit)
        if not self._waiting and self.used + size <= self.limit:
            self._hold(size)
            return size
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():  # granted as its caller was cancelled: given back
                self.used -= size
            elif entry in self._waiting:
                self._waiting.remove(entry)
            self._grant()  # those behind it may fit now
            raise
        return size

    async def release(self, size: int) -> None:
        self._give_back(size)

    def _give_back(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _hold(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        """Grant the waiting requests in order of arrival, as long as the first fits."""
        while self._waiting:
            size, granted = self._waiting[0]
            if granted.done():  # its caller was cancelled
                self._waiting.popleft()
                continue
            if self.used + size > self.limit:
                return
            self._waiting.popleft()
            self._hold(size)
            granted.set_result(None)

    async def run(self, size: int, fn: Callable, *args, kept: bool = False, executor: Executor | None = None) -> Any:
        """``fn(*args)`` in a worker thread (of ``executor``, else the loop's default) while
        holding ``size`` bytes; they are given back when it ends, even if the caller is
        cancelled before. ``kept``: ``(result, held)``, and the bytes stay held for the caller
        to :meth:`release` (given back here only when ``fn`` fails or the caller is cancelled)."""
        held = await self.acquire(size)
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(executor, fn, *args)
        try:
            # shielded: a cancelled caller would cancel the job's future, which gives the bytes
            # back at once while the thread still holds them
            result = await asyncio.shield(job)
        except BaseException:  # failed, or the caller was cancelled: given back once the thread ends
            if job.done():
                self._give_back(held)
            else:
                job.add_done_callback(lambda _: self._give_back(held))
            raise
        if kept:
            return result, held
        await self.release(held)
        return result


# A request body is held at most twice over while its request is answered: its chunks as
# received beside the body joined from them, then the body beside what is parsed from it (a
# multipart form's file, a JSON body's text, then that text beside its value), then that alone
# (unicom.search.service; measured with 24 uploads of 6 MB waiting at once: 1.8 to 1.9 times a
# multipart body each, 1.8 to 1.9 times a JSON body, decoding included; 3 and 2.3 times when a
# form was parsed by Starlette and a JSON body whole).
BODY_COPIES = 2
BODY_SECONDS = 60.0  # the most a request body may take to arrive once its turn has come


class HeldBodies:
    """ASGI middleware: a POST request takes :data:`BODY_COPIES` times its body's length
    (its ``Content-Length``, or ``limit``, the largest body any route accepts, when it
    gives none) from ``budget``, then its body is read and the request answered; the bytes
    are given back as the reply starts (the request has been read and parsed by then, so a
    client that reads its reply slowly holds no share). Requests over the budget wait with
    their bodies unread, first come first served, so that uploads hold at most the budget
    however many clients send them at once. A body that has not arrived ``seconds`` after
    its turn came is answered 408 (a client sending slowly would hold its share for ever),
    one longer than ``limit`` 413 (``why``: where the limit comes from, said in the answer);
    a ``Content-Length`` over ``limit`` is left to the route, which refuses it from the
    header."""

    def __init__(self, app, budget: ByteBudget, limit: int, why: str = "", seconds: float = BODY_SECONDS):
        self.app, self.budget, self.limit, self.why, self.seconds = app, budget, limit, why, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        length = int(declared) if declared.isdigit() else self.limit
        if length > self.limit:
            await self.app(scope, receive, send)
            return
        held = await self.budget.acquire(BODY_COPIES * length)

        async def give_back() -> None:
            nonlocal held
            held, given = 0, held
            await self.budget.release(given)

        async def answering(message) -> None:
            if message["type"] == "http.response.start":  # the body has been read and parsed: the reply
                await give_back()  # (which may take a slow client long to read) holds none of it
            await send(message)

        try:
            try:
                body = await asyncio.wait_for(self._body(receive), self.seconds)
            except asyncio.TimeoutError:
                await _answer(send, 408, f"the request body did not arrive within {self.seconds:g} s; send it again")
                return
            if body is None:  # the client left
                return
            if len(body) > self.limit:
                await _answer(send, 413, f"request body is larger than the limit of {self.limit} bytes{self.why}")
                return
            replay, body = _replayed(body, receive), None
            await self.app(scope, replay, answering)
        finally:
            await give_back()

    async def _body(self, receive) -> bytes | None:
        """The whole body (reading stops past ``limit``), or None when the client disconnects."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False) or size > self.limit:
                return b"".join(chunks)


def _replayed(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` whole (keeping no reference to it after), then
    what ``receive`` gives (a disconnect)."""
    pending = [body]

    async def replay():
        if not pending:
            return await receive()
        return {"type": "http.request", "body": pending.pop(), "more_body": False}

    return replay


async def _answer(send, status: int, detail: str) -> None:
    import json

    content = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})
