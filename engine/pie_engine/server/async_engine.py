"""Drive an LLMEngine from ONE background thread and stream its outputs to asyncio request handlers.

The engine is not thread-safe, so the event loop never touches it: adds and aborts go through a command queue that
the engine thread drains before every step, and outputs come back through per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from pie_engine.core.engine import EngineStats, LLMEngine
from pie_engine.core.output_processor import RequestOutput
from pie_engine.core.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the server answers 429."""


class EngineUnavailableError(RuntimeError):
    """The engine is shutting down or has died; the server answers 503."""


T = TypeVar("T")
StepHook = Callable[[list[RequestOutput], EngineStats], None]


class AsyncEngine:
    """Async facade over the engine thread: ``add_requests`` returns a RequestGroup to iterate."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._cmds: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending_adds = 0  # added through the queue, not yet in the scheduler
        self._accepting = True
        self.dead: BaseException | None = None
        self.stats: EngineStats = engine.stats()  # refreshed by the engine thread; read by /metrics
        self.step_hooks: list[StepHook] = []  # called in the engine thread after each step (metrics)
        self.abort_hooks: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pie-engine", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``drain_timeout_s``), abort the rest, stop."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._streams and time.monotonic() < deadline and self.dead is None:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.abort(rid)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        for loop, q in list(self._streams.values()):
            loop.call_soon_threadsafe(q.put_nowait, EngineUnavailableError("the server is shutting down"))

    # -------------------------------------------------------------------------------------------- requests
    @property
    def num_waiting(self) -> int:
        return self._pending_adds + self.stats.num_waiting

    def add_requests(self, requests: list[tuple[str, list[int], SamplingParams]],
                     arrival_time: float | None = None) -> RequestGroup:
        """Validate and queue requests (all or none) whose outputs arrive, interleaved, through one RequestGroup.

        Raises ValueError (invalid request), QueueFullError (429) or EngineUnavailableError (503) right away.
        """
        if not self._accepting or self.dead is not None:
            raise EngineUnavailableError("the server is shutting down" if self.dead is None else
                                         f"the engine failed: {self.dead}")
        for _, ids, params in requests:
            self.engine.validate(ids, params)  # reads only configuration: safe off the engine thread
        with self._lock:
            if self.num_waiting + len(requests) > self.max_waiting_requests:
                raise QueueFullError(f"too many waiting requests (limit {self.max_waiting_requests}); retry later")
            self._pending_adds += len(requests)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        arrival = arrival_time or time.monotonic()
        for rid, ids, params in requests:
            self._streams[rid] = (loop, q)
            self._cmds.put(("add", rid, ids, params, arrival))
        self._wake.set()
        return RequestGroup(self, [r[0] for r in requests], q)

    async def run_in_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between two steps (e.g. a runtime KV capacity change through
        ``engine.scheduler.set_num_blocks``) and return its result or raise its exception."""
        if self.dead is not None:
            raise EngineUnavailableError(f"the engine failed: {self.dead}")
        fut = asyncio.get_running_loop().create_future()
        self._cmds.put(("call", fn, fut))
        self._wake.set()
        return await fut

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._cmds.put(("abort", request_id))
        self._wake.set()

    # --------------------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self.stats = self.engine.stats()
                for hook in self.step_hooks:
                    hook(outputs, self.stats)
                self._publish(outputs)
        except BaseException as e:  # noqa: BLE001 - any engine failure must reach the waiting clients
            log.exception("engine thread failed")
            self.dead = e
            for loop, q in list(self._streams.values()):
                loop.call_soon_threadsafe(q.put_nowait, EngineUnavailableError(f"the engine failed: {e}"))

    def _drain_commands(self) -> None:
        changed = False
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            changed = True
            if cmd[0] == "add":
                _, rid, ids, params, arrival = cmd
                try:
                    self.engine.add_request(rid, ids, params, arrival_time=arrival)
                except ValueError as e:
                    self._send(rid, e)
                finally:
                    self.stats = self.engine.stats()
                    with self._lock:
                        self._pending_adds -= 1
            elif cmd[0] == "call":
                _, fn, fut = cmd
                try:
                    value, error = fn(self.engine), None
                except Exception as e:  # noqa: BLE001 - handed to the awaiting caller
                    value, error = None, e
                fut.get_loop().call_soon_threadsafe(_resolve, fut, value, error)
            elif self.engine.abort_request(cmd[1]):
                for hook in self.abort_hooks:
                    hook(cmd[1])
        if changed:
            self.stats = self.engine.stats()

    def _send(self, request_id: str, item: object) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            entry[0].call_soon_threadsafe(entry[1].put_nowait, item)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            # One wake-up of the event loop per step, not one per request.
            loop.call_soon_threadsafe(_deliver, items)


def _resolve(fut: asyncio.Future, value: object, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


class RequestGroup:
    """Outputs of the requests queued together, in arrival order; ``close()`` aborts the unfinished ones.

    NOTE: handlers must call ``close()`` in a ``finally``: that is how a client disconnect frees KV blocks.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str], q: asyncio.Queue) -> None:
        self._engine = engine
        self.request_ids = request_ids
        self._unfinished = set(request_ids)
        self._q = q

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._q.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
            self._engine._streams.pop(item.request_id, None)
        return item

    def close(self) -> None:
        for rid in self._unfinished:
            self._engine.abort(rid)
        self._unfinished.clear()
