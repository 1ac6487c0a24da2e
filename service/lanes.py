"""Where batches run: the model thread with every torch thread, or, under load on a CPU, several single-thread lanes.

A batch alone (nothing else computing, and too little queued to give every lane a batch: `worth_lanes`) runs on
the model thread, whose OpenMP team spreads each op over every torch thread: the shortest latency. Under load,
batches run at once on lanes of one torch thread each. On the 2-core machine of bench/README.md two lanes
decoding batches of 32 gave about 20% more images/s in-process than the model thread with two threads on batches
of 64 (943-1031 against 781-856, faces, decode+PNG): a team of two waits at the end of every op for its slower
thread, and under load the scheduler keeps lending one of them to the event loop or a PNG thread. A lane's ops
never go parallel, so the lanes start no OpenMP teams of their own (see runtime.py for why a second team is
costly), and no thread ever changes its thread count. The model thread and the lanes never compute at the same
time: they would split the same cores. A lane, once taken, goes on with its batcher's queue by itself
(`Batcher._compute`) until the queue is empty or another batcher waits for a thread; under steady load it is held to
a CPU of its own meanwhile (`hold_to_cpu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from service.cpus import affinity_mask

LANE_MIN_IMAGES = 8  # per lane: below this many queued images a batch alone runs on the model thread (see worth_lanes)
STEADY_BATCHES = 3  # batches in a row a lane goes on with by itself before it is held to a CPU (see hold_to_cpu)
LANE_NICE = 10  # how much lower a lane's scheduling priority is than the rest of the process (see _lane_thread)


def single_thread_lanes(count: int) -> list[ThreadPoolExecutor]:
    """`count` threads that run torch ops with one intra-op thread each, at a lower priority (`_lane_thread`)."""
    return [ThreadPoolExecutor(1, thread_name_prefix=f"lane{i}", initializer=_lane_thread) for i in range(count)]


def _lane_thread() -> None:
    """A lane's thread, as it starts. One torch thread: OpenMP keeps the count per thread; torch also makes it the
    default for threads that have not run torch yet, which by then the model thread has.

    A nice value LANE_NICE above the process's: the lanes keep the cores busy, and every request waits for the event
    loop (its HTTP, its admission into the next batch), which otherwise queued for a core behind them (0.16 s a
    second at 64 connections, as long as it ran). So the loop, the image threads and the log writer run as soon as
    they wake, and the lanes take every moment they leave. On 2 cores, alternating servers, 4 rounds: faces at 32
    connections 1,104 -> 1,255 and 1,097 -> 1,304 images/s (p50 32 -> 25 and 38 -> 23 ms), /encode at 32 771 -> 806,
    mnist at 64 5,674 -> 5,875 requests/s, 8 and 64 connections the same; n=64 as JSON, whose two halves are the
    lanes' with nothing else to wait for, 1,710 -> 1,688 and 1,726 -> 1,691. In a full bench run, where 32
    connections follows 8, 32 showed less of it (bench/README.md). Per thread: Linux keeps a nice value for each
    thread, and a lower priority needs no privilege. It cannot be raised back without one (CAP_SYS_NICE, which
    containers lack), so a lane keeps it for good."""
    torch.set_num_threads(1)
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            me = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + LANE_NICE))


class Lanes:
    """Hands out a thread to compute batches on, and holds a batch back until a thread is free for it."""

    def __init__(
        self, model_thread: ThreadPoolExecutor, singles: Sequence[ThreadPoolExecutor] = (),
        cpus: Collection[int] | None = None,
    ) -> None:
        """`cpus`: the CPUs the process may use (default: its affinity mask), one for each lane to be held to."""
        self.model_thread = model_thread
        self.singles = tuple(singles)
        self._free = list(self.singles)
        self._cpus = set(cpus if cpus is not None else affinity_mask() or ())
        # only where there are exactly as many CPUs as lanes (the 2-core default): elsewhere a lane held to one could
        # sit behind another thread there while other CPUs idle
        self._cpu_of = dict(zip(self.singles, sorted(self._cpus), strict=True)) if len(self._cpus) == len(self.singles) else {}
        self._solo_busy = False
        # (who waits, what wakes it): None to look again for a free thread, or a lane handed straight to it
        self._waiting: list[tuple[object, asyncio.Future[ThreadPoolExecutor | None]]] = []

    @property
    def idle(self) -> bool:
        return not self._solo_busy and len(self._free) == len(self.singles)

    def free_lanes(self) -> int:
        """How many lanes are free now (none while the model thread computes: they would split its cores)."""
        return 0 if self._solo_busy else len(self._free)

    def worth_lanes(self, items: int, images: int) -> bool:
        """Whether queued work is enough to give every lane a batch worth running on one thread. A lone batch, or a few
        images, run faster on the model thread: one thread decodes a batch of 8 faces at 88% of the images/s of a
        batch of 32, a batch of 1 at 30%, and on 2 cores 8 connections were served 20% slower on the lanes."""
        return bool(self.singles) and items > 1 and images >= LANE_MIN_IMAGES * len(self.singles)

    async def take(self, queued: Callable[[], tuple[int, int]], owner: object = None) -> ThreadPoolExecutor:
        """Wait for a thread to compute the next batch on. `queued()` gives the items and images queued for it, this
        batch's own included. The model thread when nothing else computes and the work is not `worth_lanes`, else a
        free lane (with no lanes: the model thread once it is free). `owner`: who waits (see `give_back`)."""
        while True:
            if self.idle and not self.worth_lanes(*queued()):
                self._solo_busy = True
                return self.model_thread
            if not self._solo_busy and self._free:
                return self._free.pop()
            waiter: asyncio.Future[ThreadPoolExecutor | None] = asyncio.get_running_loop().create_future()
            self._waiting.append((owner, waiter))
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and (lane := waiter.result()) is not None:
                    self.give_back(lane)  # handed over just as this waiter gave up
                raise
            finally:
                if (owner, waiter) in self._waiting:
                    self._waiting.remove((owner, waiter))
            if handed is not None:
                return handed

    def take_now(self) -> ThreadPoolExecutor | None:
        """The model thread, if nothing computes and no batch waits for a thread; else None. A lone request takes it
        at once, past its batcher's collector (`Batcher.parts`)."""
        if self.idle and not self._waiting:
            self._solo_busy = True
            return self.model_thread
        return None

    def take_lane_now(self) -> ThreadPoolExecutor | None:
        """A free lane, if the model thread does not compute and no batch waits for a thread; else None. A cheap
        model's lone request of more than a lane's batch takes it at once (`Batcher.parts`)."""
        if not self._solo_busy and self._free and not self._waiting:
            return self._free.pop()
        return None

    def _first_waiting_besides(self, owner: object) -> tuple[object, asyncio.Future[ThreadPoolExecutor | None]] | None:
        # over a copy: `others_waiting` asks from a lane's thread while the event loop changes the list
        return next((w for w in list(self._waiting) if w[0] is not owner and not w[1].done()), None)

    def others_waiting(self, owner: object) -> bool:
        """Whether anyone but `owner` waits for a thread. Safe from any thread: a lane that goes on with its own
        batcher's queue asks it after each batch, and a waiter it misses by a moment waits that lane's next batch."""
        return self._first_waiting_besides(owner) is not None

    def hold_to_cpu(self, lane: ThreadPoolExecutor) -> bool:
        """On `lane`'s own thread, once it has gone on by itself STEADY_BATCHES batches in a row: hold it to a CPU of
        its own until `let_go`; True if held. Then the two lanes never queue for the same CPU, each keeps its caches,
        and the event loop and every other thread take whichever CPU is free. On 2 cores, alternating servers against
        9cc1f4c: faces at 64 connections 1,372 -> 1,410 and 1,357 -> 1,378 images/s (faster or even in 6 of 6 rounds),
        mnist 5,020 -> 5,309 requests/s; faces at 32 connections 1,025 -> 1,048 and 1,031 -> 1,022, /encode at 32
        659 -> 636 and 759 -> 743 (bench/README.md). Held from its first batch on (no STEADY_BATCHES), a lane that
        went back and forth under moderate load paid for it: 32 connections 6% slower."""
        cpu = self._cpu_of.get(lane)
        if cpu is None:
            return False
        try:
            os.sched_setaffinity(0, {cpu})  # 0: the calling thread
        except OSError:  # a CPU taken away since (a changed cpuset): go on unheld
            return False
        return True

    def let_go(self) -> None:
        """On a held lane's thread, as it hands the lane back: every CPU again."""
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, self._cpus)

    def kind(self, thread: ThreadPoolExecutor) -> str:
        """What the metrics call `thread`: "model" or "lane"."""
        return "model" if thread is self.model_thread else "lane"

    def give_back(self, thread: ThreadPoolExecutor, owner: object = None) -> None:
        """`owner` hands `thread` back. A lane goes straight to the first who waits for one on behalf of someone else:
        a batcher that kept its lanes under steady load (`Batcher._compute`) gives them up, when another waits, to that
        one, not back to its own collector."""
        if thread is self.model_thread:
            self._solo_busy = False
        elif owner is not None and (other := self._first_waiting_besides(owner)) is not None:
            self._waiting.remove(other)
            other[1].set_result(thread)
            return
        else:
            self._free.append(thread)
        waiting, self._waiting = self._waiting, []
        for _, waiter in waiting:  # each checks again whether there is room for it
            if not waiter.done():
                waiter.set_result(None)

    def shutdown(self) -> None:
        for thread in (self.model_thread, *self.singles):
            thread.shutdown(wait=False, cancel_futures=True)
