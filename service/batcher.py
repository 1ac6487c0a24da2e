"""Per-model batching: collect -> predict -> split.

One asyncio task per (model, operation) collects queued items into a batch once a thread is free for it
(`lanes.Lanes`: the model thread, or under load on a CPU one of several single-thread lanes), runs it there as one
call, splits the result there into each request's rows (put through the request's own `then`, if it has one: a JSON
answer's PNGs, say) and answers the waiting requests. A lane then goes straight on with what was queued meanwhile,
from its own thread, while the event loop answers the batch it finished; a lane taken while others are free takes only
its share of a costly queue (`_share`). The only request in progress runs at once, from its own task (no collector, no
queue), unless another client could send one to share its batch. A batch on the model thread waits (up to max_wait)
for company while another client could still send a request to join it (`_company_could_come`), or, where the server
does not count its connections, when other requests were queued with its first. Every admitted item gets an answer: a
result, or an exception if its batch failed or it expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

import numpy as np
import torch
from torch import Tensor

from service.artifact import quiet_torchscript
from service.lanes import LANE_MIN_IMAGES, STEADY_BATCHES, Lanes
from service.metrics import Metrics

log = logging.getLogger("vae_serve.batcher")
SHUTTING_DOWN = "the service is shutting down"
# A batch that would take one lane this long or longer is shared among the lanes that are free (`Batcher._share`).
LANE_SPLIT_S = 0.010


class Deferred(Protocol):
    """Inputs made on the batch's thread, right before the model call, rather than on the event loop: len() rows,
    called for the tensor (`latents.Prior`: a request's latents, drawn from its seed; `uploads.Upload`: an image
    decoded). A batch's parts of one class are made `together`, in one call (see `compute` on why fewer calls). A part
    that could not be made (an upload that does not decode: its rows are then zeros) says why in `failure`, and its
    request gets that error, the batch's others their rows."""

    def __len__(self) -> int: ...

    def __call__(self) -> Tensor: ...

    @classmethod
    def together(cls, parts: Sequence[Any]) -> Tensor: ...

    def failure(self) -> Exception | None: ...


Inputs = Tensor | Deferred
# A model call: a batch of inputs (B, ...) -> one tensor or a tuple of tensors, each with B rows.
Predict = Callable[[Tensor], Tensor | tuple[Tensor, ...]]
# What each checked output becomes before it leaves the device, once per batch (decoders: uint8 pixels).
Finish = Callable[[Tensor], Tensor]
# What a request makes of its own rows, on the batch's thread right after the model call (JSON answers: base64 PNGs).
Then = Callable[[tuple[Tensor, ...]], Any]
_R = TypeVar("_R")


def as_float32(output: Tensor) -> Tensor:
    return output if output.dtype == torch.float32 else output.float()


# What `compute` does to a batch's outputs is made of as few torch calls as it takes. Each call lets go of the GIL, and
# a lane that lets go of it under load takes it back only once the thread that took it lets go in turn (the event loop,
# at the end of its pass): 18 calls more per faces batch (one per PNG) made 64 connections 4-5% slower (bench/README.md,
# *Fewer GIL hand-overs per batch*). So the checks below are one TorchScript call, not six, and conversions that would
# change nothing (float32 to float32, the host's tensor to the host) are not made.
def _all_finite(outputs: list[Tensor]) -> bool:
    for o in outputs:  # noqa: SIM110 (TorchScript has no generator expressions)
        if not bool(torch.isfinite(o.sum(dtype=torch.float32))):
            return False
    return True


with quiet_torchscript():
    all_finite: Callable[[list[Tensor]], bool] = torch.jit.script(_all_finite)


class QueueFull(Exception):
    """The model's queue cannot take the request now: answer 429."""


class DeadlineExceeded(Exception):
    """The request waited past its deadline: answer 504."""


class BatchFailed(Exception):
    """The model call for this request's batch raised: answer 500 with this message."""


class NotServing(Exception):
    """The batcher is stopped or stopping: answer 503."""


class InvalidOutput(RuntimeError):
    """The model's output is not one finite row per input: its batch fails rather than answer wrong values."""


def compute(name: str, predict: Predict, finish: Finish, inputs: Tensor) -> tuple[Tensor, ...]:
    """One model call as the service makes it (bench/ceiling.py times this too): predict, check that the output is
    one finite row per input, finish, copy to the host."""
    with torch.inference_mode():
        out = predict(inputs)
        outputs = out if isinstance(out, tuple) else (out,)
        if any(o.shape[:1] != inputs.shape[:1] for o in outputs):  # splitting would hand out wrong rows
            shapes = ", ".join(str(tuple(o.shape)) for o in outputs)
            raise InvalidOutput(f"model {name!r} answered a batch of {len(inputs)} with {shapes}")
        # NaN would be null in JSON and black in a PNG. A NaN or inf anywhere makes the sum non-finite, and a sum is
        # 30x cheaper than isfinite(o).all() on a batch of images (in float32: a half-precision sum of a batch of
        # images overflows).
        if not all_finite(list(outputs)):
            raise InvalidOutput(f"model {name!r} answered a batch of {len(inputs)} with non-finite values")
        return tuple(o if o.device.type == "cpu" else o.cpu() for o in map(finish, outputs))


@dataclass
class _Raised:
    """What a request's `then` raised: that request's own failure, not its batch's."""

    error: Exception


@dataclass
class _Item:
    inputs: Inputs  # (k, ...) with k <= max_batch_size
    future: asyncio.Future[Any]  # its rows of the outputs, or what `then` made of them
    deadline: float  # loop.time()
    request: int  # which submission it is part of: parts of one request never share a batch
    then: Then | None = None
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Batches calls of one operation (encode or decode) of one model."""

    def __init__(
        self,
        name: str,
        op: str,
        predict: Predict,
        lanes: Lanes,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        finish: Finish = as_float32,
        active_connections: Callable[[], int] | None = None,
    ) -> None:
        """`active_connections`: how many client connections are open and not idle, where the HTTP server says
        (`server.DrainingServer`); a batch waits for company only while they outnumber the requests already waiting for
        this model (`_company_could_come`)."""
        self.name, self.op, self._predict, self._finish = name, op, predict, finish
        self._active_connections = active_connections
        self._lanes = lanes
        # Each metric's child for this model and operation, bound once: `labels(...)` looks it up under a lock, and a
        # request under load makes several such calls on the event loop.
        self._queue_seconds = metrics.queue_seconds.labels(name)
        self._compute_seconds = metrics.compute_seconds.labels(name, op)
        self._batch_size = metrics.batch_size.labels(name, op)
        self._queue_depth = metrics.queue_depth.labels(name, op)
        self._batches = {kind: metrics.batches.labels(name, op, kind) for kind in ("model", "lane")}
        self.max_batch_size, self.max_wait_s, self.queue_size = max_batch_size, max_wait_s, queue_size
        self._queue: deque[_Item] = deque()
        # Lanes take their next batch from the queue themselves: the queue's and depth's changes are made under it.
        self._lock = threading.Lock()
        self._arrived = asyncio.Event()
        self._depth = 0  # images queued, not yet taken into a batch
        self._reserved = 0  # images promised room by `reserve`, not yet submitted
        self._computing: dict[ThreadPoolExecutor, list[_Item]] = {}  # each thread's batch, till the thread is free
        self._computing_now: set[asyncio.Future[Any]] = set()  # answers to lone requests being computed
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._submissions = 0
        self._lane_seconds_per_image: float | None = None  # a lane's recent batches, per image (`_share`)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}-{self.op}")
        self._task.add_done_callback(self._on_exit)

    def _on_exit(self, task: asyncio.Task[None]) -> None:
        """If the collector ever dies, nothing queued may wait forever: fail it all at once."""
        if not task.cancelled() and task.exception() is not None:
            log.error("batcher %s/%s stopped", self.name, self.op, exc_info=task.exception())
        self._closing = True
        self._fail_queued(SHUTTING_DOWN if task.cancelled() else "the model's batcher stopped")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    def _admit(self, n: int) -> None:
        if not self.alive:
            raise NotServing(f"model {self.name!r} is not accepting requests")
        if self._depth + self._reserved + n > self.queue_size:
            raise QueueFull(f"model {self.name!r} has {self._depth + self._reserved} images queued (limit {self.queue_size})")

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        """Hold room for `n` images while their inputs are prepared (decoding uploads, say), so that a full queue
        refuses a request before that work rather than after it. Raises what `submit` would. Submit after leaving
        the block, with no await in between: the room is then still free."""
        self._admit(n)
        self._reserved += n
        try:
            yield
        finally:
            self._reserved -= n

    async def submit(self, inputs: Inputs, timeout_s: float, *, alone: bool = False) -> tuple[Tensor, ...]:
        """Queue `inputs` (split into batch-sized items) and wait for all their outputs. `alone`: see `parts`."""
        if len(inputs) <= self.max_batch_size:
            return await self.one(inputs, timeout_s, alone=alone)
        parts = [part async for part in self.parts(inputs, timeout_s, self.max_batch_size, alone=alone)]
        # numpy, not torch.cat: a large torch op here would start a second OpenMP team (see runtime.py)
        return tuple(torch.from_numpy(np.concatenate([c.numpy() for c in columns])) for columns in zip(*parts, strict=True))

    @overload
    def parts(
        self, inputs: Inputs, timeout_s: float, part_size: int, *, alone: bool = False, then: None = None
    ) -> AsyncGenerator[tuple[Tensor, ...], None]: ...

    @overload
    def parts(
        self, inputs: Inputs, timeout_s: float, part_size: int, *, alone: bool = False, then: Callable[[tuple[Tensor, ...]], _R]
    ) -> AsyncGenerator[_R, None]: ...

    async def parts(
        self, inputs: Inputs, timeout_s: float, part_size: int, *, alone: bool = False, then: Then | None = None
    ) -> AsyncGenerator[Any, None]:
        """Queue `inputs` in parts of up to `part_size` rows, each computed in a batch of its own (other requests may
        join it), and yield their outputs in order as they come: the caller can work on one part while the next is
        computed. Close it early with `contextlib.aclosing`: parts not yet computed are then dropped. `alone`: the
        caller's is the only request in progress; if it fits one part, no thread computes and no other client could send
        one to share its batch (`_others_could_join`), it runs at once, past the queue (requests that come meanwhile
        queue behind it, as they would behind any batch). `then`: each part's outputs go through it on the batch's
        thread, right after the model call, and the part yields what it returns; what it raises, the part raises, and
        the other requests of its batch get their answers all the same."""
        part_size = min(part_size, self.max_batch_size)
        if len(inputs) <= part_size:
            yield await self.one(inputs, timeout_s, alone=alone, then=then)
            return
        self._admit(len(inputs))
        deadline = asyncio.get_running_loop().time() + timeout_s
        if (
            alone and self._whole_on_one_lane(len(inputs)) and not self._queue and not self._others_could_join()
            and (thread := self._lanes.take_lane_now()) is not None
        ):
            yield await self._compute_now(thread, inputs, then, deadline, timeout_s)
            return
        if not isinstance(inputs, Tensor):  # `Deferred` inputs are made here, to be split
            made = inputs()
            if (failure := inputs.failure()) is not None:
                raise failure
            inputs = made
        items = self._enqueue(inputs.split(part_size), deadline, then)  # split: no torch call, see routes
        try:
            for item in items:
                yield await self._wait(item.future, deadline, timeout_s)
        finally:
            for item in items:
                if not item.future.done():
                    item.future.cancel()  # the collector skips it

    async def one(self, inputs: Inputs, timeout_s: float, *, alone: bool = False, then: Then | None = None) -> Any:
        """`parts` for inputs of one part (at most `max_batch_size` rows), as a plain coroutine. The async generator,
        its `aclosing` and `asyncio.timeout_at` around the wait took a fifth of the event loop's GIL samples at 64
        connections (py-spy --gil); without them the loop holds the GIL 29% less per request: mnist at 64 connections
        3,392 -> 3,741 requests/s, faces 1,271 -> 1,284 images/s with p99 142 -> 112 ms (alternating servers, 4
        rounds each; bench/README.md)."""
        self._admit(len(inputs))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if alone and not self._queue and not self._others_could_join() and (thread := self._lanes.take_now()) is not None:
            return await self._compute_now(thread, inputs, then, deadline, timeout_s)
        (item,) = self._enqueue((inputs,), deadline, then)
        try:
            return await self._wait(item.future, deadline, timeout_s)
        finally:
            if not item.future.done():
                item.future.cancel()  # the collector skips it

    def _enqueue(self, chunks: Sequence[Inputs], deadline: float, then: Then | None) -> list[_Item]:
        """Queue one request's parts, each an item of its own (`_take_into` keeps them out of each other's batch)."""
        loop = asyncio.get_running_loop()
        self._submissions += 1
        items = [_Item(chunk, loop.create_future(), deadline, self._submissions, then) for chunk in chunks]
        with self._lock:
            self._queue.extend(items)
            self._set_depth(self._depth + sum(len(chunk) for chunk in chunks))
        self._arrived.set()
        return items

    async def _wait(self, answer: asyncio.Future[Any], deadline: float, timeout_s: float) -> Any:
        """`answer`'s result, or DeadlineExceeded once `deadline` passes: a timer fails the future itself, cheaper
        than `asyncio.timeout_at`, which cancels the task and counts its cancellations."""
        timer = asyncio.get_running_loop().call_at(deadline, self._expire, answer, timeout_s)
        try:
            return await answer
        finally:
            timer.cancel()

    def _expire(self, answer: asyncio.Future[Any], timeout_s: float) -> None:
        if not answer.done():
            answer.set_exception(DeadlineExceeded(f"no answer from model {self.name!r} within {timeout_s:g}s"))

    async def _compute_now(
        self, thread: ThreadPoolExecutor, inputs: Inputs, then: Then | None, deadline: float, timeout_s: float
    ) -> Any:
        """A lone request's batch, computed from the request's own task: past the collector and its queue, a loop
        iteration less each way. A lone `mnist` request on 2 cores: 0.86 -> 0.81 ms p50 (wrk, alternating servers;
        bench/README.md)."""
        self._queue_seconds.observe(0.0)
        loop = asyncio.get_running_loop()
        try:
            work = thread.submit(self._recorded_call, thread, [inputs], [then])
        except RuntimeError:  # the thread was shut down: the service is stopping
            self._lanes.give_back(thread)
            raise _shutting_down() from None
        answer: asyncio.Future[Any] = loop.create_future()  # a request that gives up cancels this alone
        self._computing_now.add(answer)
        # Straight back to the event loop from the thread: one loop pass less than an asyncio future around `work`.
        work.add_done_callback(lambda done: _to_loop(loop, self._computed_now, thread, len(inputs), answer, done))
        return await self._wait(answer, deadline, timeout_s)

    def _computed_now(
        self, thread: ThreadPoolExecutor, size: int, answer: asyncio.Future[Any], work: Future[list[Any]]
    ) -> None:
        """The thread is done with a lone request's batch: answer the request, if it still waits (`stop` may have)."""
        self._lanes.give_back(thread)
        self._computing_now.discard(answer)
        error: BaseException | None = None
        if work.cancelled():  # the thread was shut down before it started
            error = _shutting_down()
        elif (exc := work.exception()) is not None:
            error = BatchFailed(self._failure(exc, size)) if isinstance(exc, Exception) else exc
        if answer.done():  # the request gave up, or `stop` answered it
            return
        if error is None:
            _answer(answer, work.result()[0])
        else:
            answer.set_exception(error)

    def _failure(self, exc: Exception, size: int) -> str:
        """Log a failed batch once, with its traceback; the message each of its requests gets (as BatchFailed)."""
        log.error("model %s %s: a batch of %d images failed", self.name, self.op, size, exc_info=exc)
        return f"model {self.name!r} failed on this batch: {type(exc).__name__}"

    def _recorded_call(self, thread: ThreadPoolExecutor, parts: list[Inputs], thens: list[Then | None]) -> list[Any]:
        """On `thread`: `_call_batch`, then count the batch in the metrics (its time there, its size, the thread)."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        answers = self._call_batch(parts, thens)
        size, kind = sum(len(part) for part in parts), self._lanes.kind(thread)
        self._compute_seconds.observe(time.perf_counter() - started)
        self._batch_size.observe(size)
        self._batches[kind].inc()
        if kind == "lane":  # its CPU time: the wall time grows with what else wants the cores. Read by `_share`.
            per_image, before = (time.thread_time() - cpu_started) / size, self._lane_seconds_per_image
            self._lane_seconds_per_image = per_image if before is None else 0.8 * before + 0.2 * per_image
        return answers

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._queue_depth.set(depth)

    async def _wait_for_items(self, timeout_s: float | None) -> bool:
        """Wait until something is queued; False if `timeout_s` passed first."""
        while not self._queue:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._arrived.wait()
            except TimeoutError:
                return False
        return True

    async def _collect(self, batch: list[_Item], max_wait_s: float, limit: int) -> None:
        """Move what is queued into `batch`, up to `limit` images, waiting up to `max_wait_s` for more while company
        could come. Nothing if a lane that feeds itself took everything first.

        Where the server counts its connections, a request queued on its own waits too: it queued behind another
        client's batch, whose client sends its next request as soon as it is answered. Two clients then share batches
        instead of taking turns, each batch alone. On 2 cores, two servers up at once, wrk alternating between them
        (bench/README.md): faces at 2 connections 396 -> 442 and 430 -> 504 requests/s, at 4 532 -> 599, mnist at 2
        1,680 -> 2,133; 8 and 64 connections the same. Without the count it waits only if others were queued with
        it: the only sign there that more may come."""
        company = self._active_connections is not None or len(self._queue) > 1
        give_up = asyncio.get_running_loop().time() + max_wait_s
        while not self._take_into(batch, limit) and batch and company:  # not full yet
            remaining = give_up - asyncio.get_running_loop().time()
            # a lane's batch (no wait) stops here before counting anything
            if remaining <= 0 or not self._company_could_come() or not await self._wait_for_items(remaining):
                break

    def _others_could_join(self) -> bool:
        """For the only request in progress: whether another client could send one to share its batch, which is then
        worth the collector's short wait. Only where the server counts its active connections: one client alone, or
        beside idle connections, never waits. Two clients at once shared every other batch before (the request answered
        first came back alone and ran at once, the other's queued behind it); now every batch. On 2 cores, two servers
        up at once, wrk alternating between them: faces at 2 connections 502 -> 558 requests/s, at 4 538 -> 649, at 8
        735 -> 892, at 32 1,136 -> 1,182, mnist at 2 2,090 -> 2,354 and at 8 3,354 -> 4,120; 1 and 64 connections
        the same (bench/README.md, *Two clients share batches*)."""
        return self._active_connections is not None and self._company_could_come(arriving=1)

    def _company_could_come(self, arriving: int = 0) -> bool:
        """Whether a request not yet here could still join the batch being collected: more client connections are
        active (open and not idle: `server.DrainingServer.active_connections`) than requests wait for this model
        (queued, in this batch or computing, and `arriving`: the caller's own, not queued yet). Over HTTP/1.1 a client
        sends its next request on a connection only once answered, so once every client's request is here, a wait for
        company only delays them all: at 8 connections the batch waited out VAE_MAX_WAIT_MS after the eighth request
        came. Requests being answered, and connections answered a moment ago, count as able to come (their clients
        send again at once); connections idle for longer (a proxy's pool) do not. A new connection may still come
        meanwhile; it waits one batch. On 2 cores, faces (bench/README.md)."""
        if self._active_connections is None:
            return True
        waiting = len(self._queue) + len(self._computing_now) + sum(len(items) for items in self._computing.values())
        return self._active_connections() > waiting + arriving

    def _take_into(self, batch: list[_Item], limit: int | None = None) -> bool:
        """Move queued items into `batch` while they fit in `limit` images (default: the batch size); True once it is
        full. From the event loop or a lane."""
        limit = self.max_batch_size if limit is None else limit
        with self._lock:
            size = taken = sum(len(item.inputs) for item in batch)
            while self._queue and size < limit:
                head = self._queue[0]
                if batch and (size + len(head.inputs) > limit or head.request == batch[-1].request):
                    break  # the next item would not fit, or is the next part of a request in this batch: it heads the next
                batch.append(self._queue.popleft())
                size += len(head.inputs)
            self._set_depth(self._depth - (size - taken))
            return bool(self._queue) or size >= limit

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_items(None)
            thread = await self._lanes.take(queued=lambda: (len(self._queue), self._depth), owner=self)
            # The batch is the thread's from its first item: a drain waits for it, and a stop answers it even while
            # it waits for company (else a stop then dropped its requests, which waited out their deadline).
            batch = self._computing[thread] = []
            try:
                await self._collect(batch, self._wait_for_company(thread), self._share())
            except BaseException:
                self._thread_free(thread, batch, _shutting_down())
                raise
            now = loop.time()
            live = []
            for item in batch:
                if item.future.done():  # cancelled: the client gave up or timed out
                    continue
                if now > item.deadline:
                    item.future.set_exception(DeadlineExceeded(f"waited past the deadline for model {self.name!r}"))
                    continue
                live.append(item)
            self._computing[thread] = live
            if not live:
                self._thread_free(thread, live, [])  # nothing to answer
                continue
            try:
                thread.submit(self._compute, loop, thread, live)
            except RuntimeError:  # the thread was shut down: the service is stopping
                self._thread_free(thread, live, _shutting_down())

    def _whole_on_one_lane(self, images: int) -> bool:
        """Whether the only request in progress, of more images than a lane's batch, is computed as one batch on one
        lane rather than in parts on the lanes side by side: where the model is cheap (its lanes' recent batches say
        `images` would take one lane less than LANE_SPLIT_S) and the batch holds no more images than the lanes'
        batches together (a request that comes meanwhile may take another lane: at most 1.5 times a full batch in
        flight on 2 lanes, for a model this cheap). Such a request's work is mostly Python's (`mnist`: a digit's PNG,
        28x28), and two lanes held up each other's GIL. `mnist` n=64 at one connection on 2 cores, alternating
        servers: as JSON 2.58 -> 2.32 and 2.65 -> 2.50 ms p50 in two series, as a grid 1.62 -> 1.31
        (bench/README.md, *A cheap model's large request in one batch*). On the model thread, with both torch
        threads, it was faster still at the median but a grid's p99 went from 2.7 to 9.5-11.8 ms: its OpenMP worker
        still spun while the event loop encoded the grid and the client read it. `faces` stays split: its decode is
        the work, two lanes side by side."""
        lanes, per_image = len(self._lanes.singles), self._lane_seconds_per_image
        return (
            lanes > 1 and images <= self.max_batch_size * lanes and per_image is not None
            and images * per_image < LANE_SPLIT_S
        )

    def _wait_for_company(self, thread: ThreadPoolExecutor) -> float:
        """How long a batch for `thread` waits for more items: max_wait on the model thread, none on a lane. A lane runs
        one torch thread, whose images/s barely grow past a batch of 8, while a wait leaves its core idle: faces at 32
        connections on 2 cores, 597 -> 651 images/s without it (bench/README.md). On the model thread (and on a GPU)
        a bigger batch is worth the wait."""
        return self.max_wait_s if thread is self._lanes.model_thread else 0.0

    def _share(self) -> int:
        """The most images the batch just given a thread takes: on a lane taken while other lanes are free too, its
        share of what is queued, so that the others take the rest at once rather than idle beside one lane's batch. Else
        a clientele that is answered together comes back together, every batch is one lane's, and the process runs on
        one core: faces at 32 connections on 2 cores fell into that in 4 of 6 rounds, 623-695 images/s on 1.0-1.2
        cores, and never with shares, 997-1,192 on 1.8 (two servers up at once, wrk alternating; bench/README.md).
        Only where what is queued would take a lane LANE_SPLIT_S or more of CPU, as its recent batches took: a cheap
        model's big batch costs the event loop less than two halves (mnist at 32 connections with every batch split,
        2,910-3,280 requests/s against 3,600-4,060)."""
        free = self._lanes.free_lanes()  # none while the model thread computes: a batch for it takes the full size
        per_image = self._lane_seconds_per_image
        if not free or per_image is None or self._depth * per_image < LANE_SPLIT_S:
            return self.max_batch_size
        return min(self.max_batch_size, max(LANE_MIN_IMAGES, math.ceil(self._depth / (free + 1))))

    def _compute(self, loop: asyncio.AbstractEventLoop, thread: ThreadPoolExecutor, live: list[_Item]) -> None:
        """On `thread`: compute `live`, hand its answers to the event loop and, on a lane, go straight on with what was
        queued meanwhile. A lane that waited for the event loop to answer one batch and hand it the next sat idle 12%
        of the time at 64 connections on 2 cores (3.3 ms between batches of 18; 0.2 ms now): faces at 64 connections
        1,194 -> 1,281 images/s, alternating servers, faster in 4 of 4 rounds (bench/README.md). It hands its thread
        back once the queue is empty, the batcher stops, or another model waits for a thread (so no model's lanes
        starve another's). The model thread computes one batch: its next waits for company on the event loop. Under
        steady load a lane is held to a CPU of its own until it hands its thread back (`Lanes.hold_to_cpu`)."""
        outcome: list[Any] | Exception = _shutting_down()  # if this stops short of answers
        went_on, held = 0, False
        try:
            while True:
                started = time.perf_counter()
                for item in live:
                    self._queue_seconds.observe(started - item.enqueued)
                try:
                    outcome = self._recorded_call(thread, [item.inputs for item in live], [item.then for item in live])
                except Exception as exc:  # one failing batch fails only its own requests
                    outcome = BatchFailed(self._failure(exc, sum(len(item.inputs) for item in live)))
                following = self._next_on_lane(thread)
                if not following:
                    return
                went_on += 1
                if went_on == STEADY_BATCHES:
                    held = self._lanes.hold_to_cpu(thread)
                self._computing[thread] = following
                _to_loop(loop, self._answer_batch, live, outcome)
                live, outcome = following, _shutting_down()
        finally:
            if held:
                self._lanes.let_go()
            _to_loop(loop, self._thread_free, thread, live, outcome)

    def _next_on_lane(self, thread: ThreadPoolExecutor) -> list[_Item]:
        """On a lane that finished a batch: the next, as `_collect` takes it for a lane (no wait for company), or
        nothing if the lane should go back to the event loop."""
        if thread is self._lanes.model_thread or self._closing or self._lanes.others_waiting(self):
            return []
        batch: list[_Item] = []
        self._take_into(batch)
        return [item for item in batch if not item.future.done()]  # skips requests that gave up meanwhile

    def _answer_batch(self, live: list[_Item], answers: list[Any] | Exception) -> None:
        for i, item in enumerate(live):
            if not item.future.done():  # the request gave up, or `stop` answered it
                if isinstance(answers, Exception):
                    item.future.set_exception(answers)
                else:
                    _answer(item.future, answers[i])

    def _thread_free(self, thread: ThreadPoolExecutor, live: list[_Item], outcome: list[Any] | Exception) -> None:
        """The thread is done with this batcher: give it back, then answer its last batch (a request sent on its answer
        finds the thread free)."""
        self._lanes.give_back(thread, owner=self)
        self._computing.pop(thread, None)
        self._answer_batch(live, outcome)

    def _call_batch(self, parts: list[Inputs], thens: list[Then | None]) -> list[Any]:
        """On the batch's thread: make the parts' `Deferred` inputs, `_call` the parts as one batch, then split the
        outputs into each part's rows, put through its `then` if it has one (a part that could not be made: its
        `failure`)."""
        outputs = self._call(_made(parts))
        answers: list[Any] = []
        offset = 0
        for part, then in zip(parts, thens, strict=True):
            rows = tuple(out[offset : offset + len(part)] for out in outputs) if len(parts) > 1 else outputs
            offset += len(part)
            if not isinstance(part, Tensor) and (failure := part.failure()) is not None:
                answers.append(_Raised(failure))
                continue
            try:
                answers.append(rows if then is None else then(rows))
            except Exception as exc:
                answers.append(_Raised(exc))
        return answers

    def _call(self, inputs: Tensor) -> tuple[Tensor, ...]:
        """Runs on the batch's thread: `compute` the batch. On CUDA out-of-memory, halve the batch and retry."""
        try:
            return compute(self.name, self._predict, self._finish, inputs)
        except torch.OutOfMemoryError:
            if len(inputs) == 1:
                raise
            log.warning("model %s ran out of memory on a batch of %d: splitting it", self.name, len(inputs))
            torch.cuda.empty_cache()
            half = len(inputs) // 2
            first, second = self._call(inputs[:half]), self._call(inputs[half:])
            return tuple(torch.cat(pair) for pair in zip(first, second, strict=True))

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting, let what was admitted finish (up to timeout_s), then stop the collector."""
        self._closing = True
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while (self._queue or self._computing or self._computing_now) and loop.time() < give_up:
            await asyncio.sleep(0.01)
        await self.stop()

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Their threads may never finish (a drain past its timeout): answer now, and a lane takes nothing more.
        for live in list(self._computing.values()):
            self._answer_batch(live, _shutting_down())
        for answer in self._computing_now:  # their threads may never finish (a drain past its timeout): answer now
            if not answer.done():
                answer.set_exception(_shutting_down())
        self._fail_queued(SHUTTING_DOWN)

    def _fail_queued(self, reason: str) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), deque()
            self._set_depth(0)
        for item in queued:  # nobody will serve these now: answer them
            if not item.future.done():
                item.future.set_exception(NotServing(reason))


def _made(parts: list[Inputs]) -> Tensor:
    """A batch's inputs from its parts, on its thread: `Deferred` parts all of one class made together."""
    first = parts[0]
    if not isinstance(first, Tensor) and all(type(part) is type(first) for part in parts):
        return first.together(parts)
    made = [part if isinstance(part, Tensor) else part() for part in parts]
    return torch.cat(made) if len(made) > 1 else made[0]  # torch.cat here: see runtime.py


def _shutting_down() -> NotServing:
    """What a request gets when the service stops before its batch is answered: a fresh exception each time."""
    return NotServing(SHUTTING_DOWN)


def _to_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    """From a thread: run `callback(*args)` on the event loop, unless the loop has closed (nobody waits then)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _answer(future: asyncio.Future[Any], answer: Any) -> None:
    if isinstance(answer, _Raised):
        future.set_exception(answer.error)
    else:
        future.set_result(answer)
