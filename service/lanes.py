"""Where batches run: the model thread with every torch thread, or, under load on a CPU, several single-thread lanes.

A batch alone (nothing else computing, and too little queued to give every lane a batch: `worth_lanes`) runs on
the model thread, whose OpenMP team spreads each op over every torch thread: the shortest latency. Under load,
batches run at once on lanes of one torch thread each. On the 2-core machine of bench/README.md two lanes
decoding batches of 32 gave about 20% more images/s in-process than the model thread with two threads on batches
of 64 (943-1031 against 781-856, faces, decode+PNG): a team of two waits at the end of every op for its slower
thread, and under load the scheduler keeps lending one of them to the event loop or a PNG thread. A lane's ops
never go parallel, so the lanes start no OpenMP teams of their own (see runtime.py for why a second team is
costly), and no thread ever changes its thread count. The model thread and the lanes never compute at the same
time: they would split the same cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

LANE_MIN_IMAGES = 8  # per lane: below this many queued images a batch alone runs on the model thread (see worth_lanes)


def single_thread_lanes(count: int) -> list[ThreadPoolExecutor]:
    """`count` threads that run torch ops with one intra-op thread each. OpenMP keeps the count per thread; torch also
    makes it the default for threads that have not run torch yet, which by then the model thread has."""
    return [
        ThreadPoolExecutor(1, thread_name_prefix=f"lane{i}", initializer=torch.set_num_threads, initargs=(1,))
        for i in range(count)
    ]


class Lanes:
    """Hands out a thread to compute one batch on, and holds a batch back until its thread is free."""

    def __init__(self, model_thread: ThreadPoolExecutor, singles: Sequence[ThreadPoolExecutor] = ()) -> None:
        self.model_thread = model_thread
        self.singles = tuple(singles)
        self._free = list(self.singles)
        self._solo_busy = False
        self._waiting: list[asyncio.Future[None]] = []

    @property
    def idle(self) -> bool:
        return not self._solo_busy and len(self._free) == len(self.singles)

    def worth_lanes(self, items: int, images: int) -> bool:
        """Whether queued work is enough to give every lane a batch worth running on one thread. A lone batch, or a few
        images, run faster on the model thread: one thread decodes a batch of 8 faces at 88% of the images/s of a
        batch of 32, a batch of 1 at 30%, and on 2 cores 8 connections were served 20% slower on the lanes."""
        return bool(self.singles) and items > 1 and images >= LANE_MIN_IMAGES * len(self.singles)

    async def take(self, queued: Callable[[], tuple[int, int]]) -> ThreadPoolExecutor:
        """Wait for a thread to compute the next batch on. `queued()` gives the items and images queued for it, this
        batch's own included. The model thread when nothing else computes and the work is not `worth_lanes`, else a
        free lane (with no lanes: the model thread once it is free)."""
        while True:
            if self.idle and not self.worth_lanes(*queued()):
                self._solo_busy = True
                return self.model_thread
            if not self._solo_busy and self._free:
                return self._free.pop()
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    def take_now(self) -> ThreadPoolExecutor | None:
        """The model thread, if nothing computes and no batch waits for a thread; else None. A lone request takes it
        at once, past its batcher's collector (`Batcher.parts`)."""
        if self.idle and not self._waiting:
            self._solo_busy = True
            return self.model_thread
        return None

    def kind(self, thread: ThreadPoolExecutor) -> str:
        """What the metrics call `thread`: "model" or "lane"."""
        return "model" if thread is self.model_thread else "lane"

    def give_back(self, thread: ThreadPoolExecutor) -> None:
        if thread is self.model_thread:
            self._solo_busy = False
        else:
            self._free.append(thread)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:  # each checks again whether there is room for it
            if not waiter.done():
                waiter.set_result(None)

    def shutdown(self) -> None:
        for thread in (self.model_thread, *self.singles):
            thread.shutdown(wait=False, cancel_futures=True)
