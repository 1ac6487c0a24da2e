"""Where batches run: alone on the model thread with every torch thread, under load on single-thread lanes at once."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service.batcher import Batcher, NotServing
from service.lanes import LANE_MIN_IMAGES, LANE_NICE, STEADY_BATCHES, Lanes, single_thread_lanes
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings
from tests.conftest import serve


def lone() -> tuple[int, int]:  # what take() is told is queued for the batch: (items, images)
    return 1, 1


def crowd() -> tuple[int, int]:
    return 20, 20


def test_lanes_take_work_only_when_every_lane_gets_a_batch_worth_running_on_one_thread() -> None:
    lanes = Lanes(ThreadPoolExecutor(1), single_thread_lanes(2))
    try:
        assert lanes.worth_lanes(items=2, images=2 * LANE_MIN_IMAGES)
        assert not lanes.worth_lanes(items=2 * LANE_MIN_IMAGES - 1, images=2 * LANE_MIN_IMAGES - 1)  # a few images
        assert not lanes.worth_lanes(items=1, images=64)  # one batch cannot be split between lanes
        assert not Lanes(ThreadPoolExecutor(1)).worth_lanes(items=64, images=64)  # no lanes
    finally:
        lanes.shutdown()


async def test_a_batch_alone_gets_the_model_thread_and_it_never_computes_beside_a_lane() -> None:
    model_thread = ThreadPoolExecutor(1)
    lanes = Lanes(model_thread, single_thread_lanes(2))
    try:
        assert await lanes.take(lone) is model_thread
        blocked = asyncio.ensure_future(lanes.take(crowd))
        await asyncio.sleep(0.01)
        assert not blocked.done()  # the model thread uses every core: no lane runs beside it
        lanes.give_back(model_thread)
        first = await asyncio.wait_for(blocked, 1)
        second = await lanes.take(lone)  # a lane computes: the model thread stays out of it
        assert {first, second} == set(lanes.singles)
        third = asyncio.ensure_future(lanes.take(lone))
        await asyncio.sleep(0.01)
        assert not third.done()  # every lane is busy: the next batch waits for one
        lanes.give_back(first)
        assert await asyncio.wait_for(third, 1) is first
    finally:
        lanes.shutdown()


async def test_without_lanes_every_batch_runs_on_the_model_thread_one_at_a_time() -> None:
    model_thread = ThreadPoolExecutor(1)
    lanes = Lanes(model_thread)
    try:
        assert await lanes.take(crowd) is model_thread
        second = asyncio.ensure_future(lanes.take(crowd))
        await asyncio.sleep(0.01)
        assert not second.done()
        lanes.give_back(model_thread)
        assert await asyncio.wait_for(second, 1) is model_thread
    finally:
        lanes.shutdown()


def test_a_lane_runs_torch_on_one_thread_and_the_model_thread_keeps_its_own() -> None:
    model_thread = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(2,))
    lanes = Lanes(model_thread, single_thread_lanes(2))
    try:
        assert [lane.submit(torch.get_num_threads).result() for lane in lanes.singles] == [1, 1]
        assert model_thread.submit(torch.get_num_threads).result() == 2  # a per-thread setting
    finally:
        lanes.shutdown()


def niceness() -> int:  # the calling thread's: Linux keeps one for each thread
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no nice values here")
def test_lanes_run_below_the_rest_of_the_process_so_that_the_event_loop_never_waits_behind_them() -> None:
    own = niceness()
    model_thread = ThreadPoolExecutor(1)
    lanes = Lanes(model_thread, single_thread_lanes(2))
    try:
        assert [lane.submit(niceness).result() for lane in lanes.singles] == [min(19, own + LANE_NICE)] * 2
        assert model_thread.submit(niceness).result() == own and niceness() == own
    finally:
        lanes.shutdown()


async def test_under_load_batches_compute_on_the_lanes_at_once() -> None:
    threads: list[str] = []
    overlap = threading.Barrier(2, timeout=5)  # passes only if two batches are inside predict together

    def predict(x: torch.Tensor) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        if threading.current_thread().name.startswith("lane"):
            overlap.wait()
        return x * 2

    lanes = Lanes(ThreadPoolExecutor(1, thread_name_prefix="model"), single_thread_lanes(2))
    size = LANE_MIN_IMAGES  # two requests of this many: a batch for each lane
    metrics = Metrics()
    b = Batcher("m", "decode", predict, lanes, metrics, max_batch_size=size, max_wait_s=0.001, queue_size=64)
    b.start()
    try:
        outs = await asyncio.gather(*(b.submit(torch.full((size, 1), float(i)), timeout_s=5) for i in range(2)))
        assert [o[:, 0].tolist() for (o,) in outs] == [[0.0] * size, [2.0] * size]
        assert sorted(threads) == ["lane0_0", "lane1_0"]  # one batch per lane, side by side
        (alone,) = await b.submit(torch.ones(1, 1), timeout_s=5)
        assert float(alone[0]) == 2.0 and threads[-1].startswith("model")
        ran = {t: metrics.registry.get_sample_value("vae_batches_total", {"model": "m", "op": "decode", "thread": t})
               for t in ("lane", "model")}
        assert ran == {"lane": 2.0, "model": 1.0}  # operators see where batches ran
    finally:
        await b.stop()
        lanes.shutdown()


async def test_a_batch_for_a_lane_starts_with_what_is_queued_and_one_on_the_model_thread_waits_for_company() -> None:
    hold = threading.Event()

    def predict(x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            hold.wait(5)
        return x * 2

    async def two_together(b: Batcher) -> None:  # queued together: each has company, then nothing more comes
        await asyncio.gather(*(b.submit(torch.ones(1, 1), timeout_s=5) for _ in range(2)))

    size = LANE_MIN_IMAGES
    lanes = Lanes(ThreadPoolExecutor(1, thread_name_prefix="model"), single_thread_lanes(2))
    b = Batcher("m", "decode", predict, lanes, Metrics(), max_batch_size=size, max_wait_s=10, queue_size=64)
    b.start()
    try:
        held = [asyncio.create_task(b.submit(torch.full((size, 1), v), timeout_s=5)) for v in (-1.0, 1.0)]
        await asyncio.sleep(0.05)  # both on the lanes; one lane held
        await asyncio.wait_for(two_together(b), 2)  # a free lane does not wait 10 s for a full batch
    finally:
        hold.set()
        await asyncio.gather(*held)
        await b.stop()
        lanes.shutdown()

    hold.clear()
    lanes = Lanes(ThreadPoolExecutor(1, thread_name_prefix="model"))
    b = Batcher("m", "decode", predict, lanes, Metrics(), max_batch_size=size, max_wait_s=0.3, queue_size=64)
    b.start()
    try:
        first = asyncio.create_task(b.submit(-torch.ones(1, 1), timeout_s=5))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(two_together(b))
        await asyncio.sleep(0.05)
        hold.set()
        released = time.monotonic()
        await asyncio.gather(first, waiting)
        assert time.monotonic() - released >= 0.25  # the model thread's batch waited for more
    finally:
        hold.set()
        await b.stop()
        lanes.shutdown()


@pytest.mark.parametrize(("cpu_per_image_s", "batches"), [(0.002, [16, 16]), (0.0, [32])], ids=["costly", "cheap"])
async def test_a_burst_that_would_take_one_lane_long_is_shared_among_the_free_lanes(
    cpu_per_image_s: float, batches: list[int]
) -> None:
    """Clients answered together come back together: their batch is split among the free lanes where one lane would
    compute it for LANE_SPLIT_S or more, as its earlier batches measured, rather than one lane taking it all while the
    others idle. A cheap model's burst stays one batch."""
    calls: list[tuple[str, int]] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        until = time.thread_time() + cpu_per_image_s * len(x)  # the lane's own CPU, as `Batcher` measures it
        while time.thread_time() < until:
            pass
        calls.append((threading.current_thread().name, len(x)))
        return x * 2

    lanes = Lanes(ThreadPoolExecutor(1, thread_name_prefix="model"), single_thread_lanes(2))
    b = Batcher("m", "decode", predict, lanes, Metrics(), max_batch_size=64, max_wait_s=0.001, queue_size=256)
    b.start()

    async def burst(requests: int) -> None:
        await asyncio.gather(*(b.submit(torch.ones(1, 1), timeout_s=5) for _ in range(requests)))

    try:
        await burst(2 * LANE_MIN_IMAGES)  # on a lane, which measures what an image costs it
        assert calls[-1][0].startswith("lane")
        calls.clear()
        await burst(32)
        assert sorted(size for _, size in calls) == batches
        assert len({thread for thread, _ in calls}) == len(batches)  # each on a lane of its own
    finally:
        await b.stop()
        lanes.shutdown()


@pytest.mark.parametrize(("cpu_per_image_s", "batches"), [(0.002, [8, 8]), (0.0, [16])], ids=["costly", "cheap"])
async def test_a_lone_request_of_more_than_a_lane_s_batch_is_one_batch_on_one_lane_for_a_cheap_model(
    cpu_per_image_s: float, batches: list[int]
) -> None:
    """A costly model's lone large request is decoded in parts on the lanes side by side; a cheap model's (one lane
    computes it in under LANE_SPLIT_S, as its earlier batches measured) in one batch on one lane, up to the lanes'
    batches together: its work is mostly Python's, which two lanes would only share the GIL for."""
    calls: list[tuple[str, int]] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        until = time.thread_time() + cpu_per_image_s * len(x)
        while time.thread_time() < until:
            pass
        calls.append((threading.current_thread().name, len(x)))
        return x * 2

    lanes = Lanes(ThreadPoolExecutor(1, thread_name_prefix="model"), single_thread_lanes(2))
    b = Batcher("m", "decode", predict, lanes, Metrics(), max_batch_size=LANE_MIN_IMAGES, max_wait_s=0.001, queue_size=256)
    b.start()
    try:
        (out,) = await b.submit(torch.arange(16.0)[:, None], timeout_s=5, alone=True)  # no lane has measured yet: parts
        assert sorted(size for _, size in calls) == [8, 8] and all(t.startswith("lane") for t, _ in calls)
        assert out[:, 0].tolist() == [2.0 * i for i in range(16)]
        calls.clear()
        (out,) = await b.submit(torch.arange(16.0)[:, None], timeout_s=5, alone=True)
        assert sorted(size for _, size in calls) == batches and all(t.startswith("lane") for t, _ in calls)
        assert out[:, 0].tolist() == [2.0 * i for i in range(16)]  # in order, whole or in parts
        calls.clear()
        await b.submit(torch.ones(24, 1), timeout_s=5, alone=True)  # more than the lanes' batches together: parts
        assert sorted(size for _, size in calls) == [8, 8, 8]
        calls.clear()
        await b.submit(torch.ones(16, 1), timeout_s=5)  # not the only request in progress: parts
        assert sorted(size for _, size in calls) == [8, 8]
    finally:
        await b.stop()
        lanes.shutdown()


class HeldLanes:
    """Two single-thread lanes whose model calls wait for `release`, and what each call saw: (model, thread, size)."""

    def __init__(self, cpus: list[int] | None = None) -> None:
        self.lanes = Lanes(ThreadPoolExecutor(1, thread_name_prefix="model"), single_thread_lanes(2), cpus=cpus)
        self.release = threading.Event()
        self.calls: list[tuple[str, str, int]] = []
        self.cpus_seen: list[tuple[str, set[int]]] = []  # (thread, the CPUs it may run on) at each call

    def batcher(self, name: str) -> Batcher:
        def predict(x: torch.Tensor) -> torch.Tensor:
            self.release.wait(5)
            time.sleep(0.01)  # a model call's time: much longer than the event loop takes to hand out a thread
            self.calls.append((name, threading.current_thread().name, len(x)))
            if hasattr(os, "sched_getaffinity"):
                self.cpus_seen.append((threading.current_thread().name, os.sched_getaffinity(0)))
            return x * 2

        b = Batcher(name, "decode", predict, self.lanes, Metrics(), max_batch_size=LANE_MIN_IMAGES, max_wait_s=0.001,
                    queue_size=256)
        b.start()
        return b

    def requests(self, b: Batcher, count: int) -> list[asyncio.Task[tuple[torch.Tensor, ...]]]:
        """`count` requests of a full batch each."""
        return [asyncio.create_task(b.submit(torch.ones(LANE_MIN_IMAGES, 1), timeout_s=5)) for _ in range(count)]


async def test_a_lane_goes_straight_on_with_what_was_queued_while_the_event_loop_is_busy() -> None:
    """Under load a lane takes its next batch itself: it does not wait for the event loop, which is busy with the
    answers of the batch just computed and with the next requests' HTTP."""
    held = HeldLanes()
    b = held.batcher("m")
    try:
        answers = held.requests(b, 6)
        await asyncio.sleep(0.05)  # two batches on the lanes, four queued behind them
        held.release.set()
        time.sleep(0.3)  # the event loop busy: the lanes go on by themselves
        assert len(held.calls) == 6 and {thread for _, thread, _ in held.calls} == {"lane0_0", "lane1_0"}
        assert all(len(out) == LANE_MIN_IMAGES for (out,) in await asyncio.gather(*answers))
        assert held.lanes.idle  # queue empty: both lanes handed back
    finally:
        await b.stop()
        held.lanes.shutdown()


needs_two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs CPU affinity and 2 CPUs"
)


@needs_two_cpus
async def test_a_lane_under_steady_load_is_held_to_a_cpu_of_its_own_until_it_hands_its_thread_back() -> None:
    two = sorted(os.sched_getaffinity(0))[:2]
    held = HeldLanes(cpus=two)
    b = held.batcher("m")
    try:
        answers = held.requests(b, 12)
        await asyncio.sleep(0.05)
        held.release.set()
        await asyncio.gather(*answers)
        per_lane = {lane: [cpus for thread, cpus in held.cpus_seen if thread == lane] for lane in ("lane0_0", "lane1_0")}
        for lane, cpu in zip(per_lane, two, strict=True):
            seen = per_lane[lane]
            steady = seen[STEADY_BATCHES:]  # the batches after it went on by itself STEADY_BATCHES times
            assert all(cpus != {cpu} for cpus in seen[:STEADY_BATCHES]) and all(cpus == {cpu} for cpus in steady)
        assert any(len(seen) > STEADY_BATCHES for seen in per_lane.values())  # 12 batches: one lane at least got there
        assert held.lanes.idle
        for lane in held.lanes.singles:  # handed back: free to run anywhere again
            assert lane.submit(os.sched_getaffinity, 0).result() == set(two)
    finally:
        await b.stop()
        held.lanes.shutdown()


def test_lanes_are_held_to_cpus_only_where_there_is_one_for_each() -> None:
    lanes = Lanes(ThreadPoolExecutor(1), single_thread_lanes(2), cpus={0, 1, 2})
    try:
        assert not lanes.hold_to_cpu(lanes.singles[0])  # a held lane could wait there while another CPU idles
    finally:
        lanes.shutdown()


async def test_a_lane_hands_its_thread_back_when_another_model_waits_for_one() -> None:
    """A model under steady load keeps its lanes only while no other model waits: the other's batch runs after at
    most one more batch on each lane, not after the whole queue."""
    held = HeldLanes()
    busy, other = held.batcher("busy"), held.batcher("other")
    try:
        answers = held.requests(busy, 12)
        await asyncio.sleep(0.05)
        answers += held.requests(other, 1)
        await asyncio.sleep(0.05)  # its collector waits for a thread
        held.release.set()
        await asyncio.gather(*answers)
        models = [model for model, _, _ in held.calls]
        assert models.index("other") <= 4  # two batches computing, at most one more on each lane, then its own
    finally:
        await busy.stop()
        await other.stop()
        held.lanes.shutdown()


async def test_a_stop_answers_the_batches_on_the_lanes_and_they_take_nothing_more() -> None:
    held = HeldLanes()
    b = held.batcher("m")
    try:
        answers = held.requests(b, 6)
        await asyncio.sleep(0.05)
        await b.stop()  # the lanes' batches may never finish: answered now
        outcomes = await asyncio.wait_for(asyncio.gather(*answers, return_exceptions=True), 1)
        assert all(isinstance(o, NotServing) for o in outcomes)
        held.release.set()
        await asyncio.sleep(0.1)
        assert len(held.calls) == 2 and held.lanes.idle  # the two that were computing; then both handed back
    finally:
        held.release.set()
        held.lanes.shutdown()


def test_lanes_share_the_batch_limit_so_batches_in_flight_hold_no_more_images_than_one(settings: Settings) -> None:
    for cpu_lanes, singles, batch in ((2, 2, settings.max_batch_size // 2), (1, 0, settings.max_batch_size)):
        rt = Runtime.load(settings.model_copy(update={"cpu_lanes": cpu_lanes, "device": "cpu"}), Metrics())
        try:
            assert (len(rt.lanes.singles), rt.max_batch_size) == (singles, batch)
        finally:
            rt.lanes.shutdown()
            rt.image_threads.shutdown()


async def test_answers_are_the_same_on_a_lane_as_on_the_model_thread(settings: Settings) -> None:
    """On a CPU a decode gives the same bytes with one torch thread as with several: which thread ran a batch does
    not show in its images."""
    body = {"model": "faces", "n": 4, "seed": 11}
    answers = []
    for cpu_lanes in (1, 2):
        async with serve(settings.model_copy(update={"cpu_lanes": cpu_lanes})) as client:
            crowd = [client.post("/sample", json={"model": "faces", "n": 3}) for _ in range(6)]
            *others, mine = await asyncio.gather(*crowd, client.post("/sample", json=body))
            assert all(r.status_code == 200 for r in others) and mine.status_code == 200
            answers.append(mine.content)
    assert answers[0] == answers[1]


@pytest.mark.parametrize("cpu_lanes", [1, 3])
async def test_a_burst_larger_than_every_lane_together_is_answered_in_full(settings: Settings, cpu_lanes: int) -> None:
    async with serve(settings.model_copy(update={"cpu_lanes": cpu_lanes, "max_batch_size": 6})) as client:
        answers = await asyncio.gather(*(client.post("/sample", json={"model": "mnist", "n": 5}) for _ in range(20)))
        assert [r.status_code for r in answers] == [200] * 20
        metrics = (await client.get("/metrics")).text
    assert 'vae_images_generated_total{model="mnist"} 100.0' in metrics
