"""The batcher: collect -> predict -> split, with limits, deadlines and failures."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service import batcher
from service.batcher import Batcher, BatchFailed, DeadlineExceeded, NotServing, QueueFull
from service.lanes import Lanes
from service.metrics import Metrics


class Recorder:
    """A predict function that doubles its input and records the batch sizes it saw."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.release.wait(5)
        time.sleep(self.delay_s)
        self.sizes.append(len(x))
        return x * 2


def make(predict, metrics: Metrics | None = None, lanes: Lanes | None = None, **overrides) -> Batcher:  # type: ignore[no-untyped-def]
    options = {"max_batch_size": 8, "max_wait_s": 0.005, "queue_size": 64} | overrides
    b = Batcher("m", "decode", predict, lanes or Lanes(ThreadPoolExecutor(1)), metrics or Metrics(), **options)
    b.start()
    return b


def held(**overrides) -> tuple[Recorder, Batcher]:  # type: ignore[no-untyped-def]
    """A batcher whose model calls wait until `rec.release` is set: requests pile up behind the first."""
    rec = Recorder()
    rec.release.clear()
    return rec, make(rec, **overrides)


async def test_a_lone_request_runs_at_once_and_gets_its_own_rows() -> None:
    rec = Recorder()
    b = make(rec)
    (out,) = await b.submit(torch.arange(3.0)[:, None], timeout_s=5)
    assert out.squeeze(1).tolist() == [0.0, 2.0, 4.0]
    assert rec.sizes == [3]
    await b.stop()


async def test_the_only_request_in_progress_runs_past_the_queue_and_is_counted_like_any_batch() -> None:
    rec, metrics = Recorder(), Metrics()
    b = make(rec, metrics)
    (out,) = await b.submit(torch.arange(3.0)[:, None], timeout_s=5, alone=True)
    assert out.squeeze(1).tolist() == [0.0, 2.0, 4.0] and rec.sizes == [3]
    value = metrics.registry.get_sample_value
    assert value("vae_batches_total", {"model": "m", "op": "decode", "thread": "model"}) == 1.0
    assert value("vae_batch_size_images_sum", {"model": "m", "op": "decode"}) == 3.0
    assert value("vae_queue_wait_seconds_sum", {"model": "m"}) == 0.0
    await b.stop()


async def test_requests_that_come_while_a_lone_request_computes_queue_behind_it_and_share_a_batch() -> None:
    rec, b = held()
    first = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=5, alone=True))
    await asyncio.sleep(0.01)
    # alone as far as their callers know, but a batch is computing: they queue
    rest = [asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=5, alone=True)) for _ in range(3)]
    await asyncio.sleep(0.01)
    rec.release.set()
    await asyncio.gather(first, *rest)
    assert rec.sizes == [1, 3]
    await b.stop()


async def test_a_lone_request_past_its_deadline_gets_an_error_and_the_next_batch_waits_for_its_thread() -> None:
    rec, b = held()
    with pytest.raises(DeadlineExceeded):
        await b.submit(torch.ones(1, 1), timeout_s=0.05, alone=True)
    late = asyncio.create_task(b.submit(torch.full((1, 1), 3.0), timeout_s=5, alone=True))
    await asyncio.sleep(0.05)
    assert not late.done()  # the model thread still computes the first batch: one batch at a time
    rec.release.set()
    (out,) = await late
    assert float(out[0]) == 6.0 and rec.sizes == [1, 1]
    await b.stop()


async def test_a_drain_waits_for_a_lone_request_and_a_stop_answers_one_still_computing() -> None:
    rec, b = held()
    running = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=5, alone=True))
    await asyncio.sleep(0.01)
    asyncio.get_running_loop().call_later(0.05, rec.release.set)
    await b.drain(timeout_s=5)
    assert float((await running)[0][0]) == 2.0

    rec.release.clear()
    b = make(rec)
    stuck = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=5, alone=True))
    await asyncio.sleep(0.01)
    await b.drain(timeout_s=0.05)  # past its timeout: the batch may never finish, the request is answered now
    with pytest.raises(NotServing):
        await asyncio.wait_for(stuck, 1)
    rec.release.set()


class Clients:
    """What the server says of its active connections (`Batcher(active_connections=...)`): set `count` as clients come."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self) -> int:
        return self.count


async def two_in_a_batch_for_company(
    rec: Recorder, b: Batcher, clients: Clients | None = None, then: int = 3
) -> list[asyncio.Task[tuple[torch.Tensor, ...]]]:
    """Two requests queued behind a lone one that holds the model thread (its client the only one, then `then` in
    all); once it is done they make the next batch."""
    first = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=30, alone=True))
    await asyncio.sleep(0.01)
    if clients is not None:
        clients.count = then
    two = [asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=30)) for _ in range(2)]
    await asyncio.sleep(0.01)
    rec.release.set()
    await first
    await asyncio.sleep(0.05)
    return two


async def test_a_drain_waits_for_a_batch_still_gathering_company_and_a_stop_answers_it() -> None:
    rec, b = held(max_wait_s=10)
    gathering = await two_in_a_batch_for_company(rec, b)  # out of the queue, in a batch that waits up to 10 s for more
    assert not any(request.done() for request in gathering)
    await b.drain(timeout_s=0.1)
    outcomes = await asyncio.wait_for(asyncio.gather(*gathering, return_exceptions=True), 1)
    assert all(isinstance(outcome, NotServing) for outcome in outcomes)  # not left to wait out their deadline


@pytest.mark.parametrize(("connections", "waits"), [(2, False), (3, True)])
async def test_a_batch_waits_for_company_only_while_more_clients_are_connected_than_requests_wait_for_the_model(
    connections: int, waits: bool
) -> None:
    clients = Clients(1)
    rec, b = held(max_wait_s=10, active_connections=clients)
    queued = await two_in_a_batch_for_company(rec, b, clients, then=connections)
    assert all(request.done() for request in queued) is not waits  # with 2 connections both clients' requests are in
    if not waits:
        assert rec.sizes == [1, 2]
    await b.drain(timeout_s=0.1)


async def test_a_request_queued_on_its_own_waits_for_the_next_request_of_another_connected_client() -> None:
    clients = Clients(1)
    rec, b = held(max_wait_s=10, active_connections=clients)
    first = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=30, alone=True))  # client 1's, computing
    await asyncio.sleep(0.01)
    clients.count = 2
    second = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=30))  # client 2's, queued behind it
    await asyncio.sleep(0.01)
    rec.release.set()
    await first  # client 1 is answered, and sends its next request
    await asyncio.sleep(0.05)
    assert not second.done()  # its batch waits for client 1's next request
    third = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=30))
    await asyncio.wait_for(asyncio.gather(second, third), 1)  # then both clients' requests are in: no more waiting
    assert rec.sizes == [1, 2]
    await b.stop()


# where no other client could send a request: the server gives no count (another ASGI server), or one client is active
no_other_client = pytest.mark.parametrize(
    "active_connections", [None, Clients(1)], ids=["no count from the server", "one active client"]
)


@no_other_client
async def test_a_request_queued_on_its_own_waits_for_no_company_that_cannot_come(
    active_connections: Clients | None,
) -> None:
    rec, b = held(max_wait_s=10, active_connections=active_connections)
    first = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=30, alone=True))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=30))
    await asyncio.sleep(0.01)
    rec.release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert rec.sizes == [1, 1]
    await b.stop()


@no_other_client
async def test_the_only_request_in_progress_runs_at_once_when_no_other_client_could_join_it(
    active_connections: Clients | None,
) -> None:
    rec = Recorder()
    b = make(rec, max_wait_s=10, active_connections=active_connections)
    await asyncio.wait_for(b.submit(torch.ones(1, 1), timeout_s=30, alone=True), 1)
    assert rec.sizes == [1]
    await b.stop()


async def test_the_only_request_in_progress_waits_for_another_active_client_to_share_its_batch() -> None:
    rec = Recorder()
    b = make(rec, max_wait_s=10, active_connections=Clients(2))  # another client, answered a moment ago
    first = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=30, alone=True))
    await asyncio.sleep(0.05)
    assert not first.done()
    second = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=30, alone=True))
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert rec.sizes == [2]
    await b.stop()


async def test_a_lone_request_after_the_threads_were_shut_down_is_refused_and_leaves_no_thread_taken() -> None:
    lanes = Lanes(ThreadPoolExecutor(1))
    b = make(Recorder(), lanes=lanes)
    lanes.shutdown()  # what a drain does last
    with pytest.raises(NotServing):
        await b.submit(torch.ones(1, 1), timeout_s=5, alone=True)
    assert lanes.idle
    await b.stop()


async def test_concurrent_requests_share_a_batch_and_each_gets_its_own_answer() -> None:
    rec, b = held()  # hold the model thread so that requests pile up
    first = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=5))
    await asyncio.sleep(0.01)
    rest = [asyncio.create_task(b.submit(torch.full((1, 1), float(i)), timeout_s=5)) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    rec.release.set()
    outs = await asyncio.gather(first, *rest)
    assert [float(o[0]) for (o,) in outs] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert rec.sizes == [1, 5]  # the first ran alone; the five queued behind it ran as one batch
    await b.stop()


async def test_large_requests_are_split_so_no_batch_exceeds_the_limit() -> None:
    rec = Recorder()
    b = make(rec)
    (out,) = await b.submit(torch.ones(20, 1), timeout_s=5)
    assert len(out) == 20 and max(rec.sizes) <= 8 and sum(rec.sizes) == 20
    await b.stop()


def deferred_rows() -> tuple[list[tuple[str, int]], type]:
    """A `batcher.Deferred` class, `Rows(rows, value)`, and the calls that made its inputs: (thread, parts made)."""
    made: list[tuple[str, int]] = []

    class Rows:
        def __init__(self, rows: int, value: float = 1.0, fails: bool = False) -> None:
            self.rows, self.value, self.fails = rows, value, fails

        def __len__(self) -> int:
            return self.rows

        def failure(self) -> Exception | None:
            return ValueError(f"rows of {self.value} could not be made") if self.fails else None

        def __call__(self) -> torch.Tensor:
            return self.together([self])

        @classmethod
        def together(cls, parts: list[Rows]) -> torch.Tensor:
            made.append((threading.current_thread().name, len(parts)))
            return torch.cat([torch.full((p.rows, 1), p.value) for p in parts])

    return made, Rows


async def test_deferred_inputs_are_made_on_the_batch_s_thread_unless_they_must_be_split_first() -> None:
    made, Rows = deferred_rows()
    rec = Recorder()
    b = make(rec)
    for rows in (3, 20):  # one batch; then more than the batch limit: made here, and split
        (out,) = await b.submit(Rows(rows), timeout_s=5)
        assert out.squeeze(1).tolist() == [2.0] * rows
    here = threading.current_thread().name
    assert made[0][0] != here and made[1][0] == here and rec.sizes == [3, 8, 8, 4]
    await b.stop()


async def test_deferred_inputs_of_one_class_in_a_batch_are_made_together_in_one_call() -> None:
    """One call for the batch (`latents.Prior`: the latents of all its requests), each part's rows still its own; a
    batch that mixes them with tensors makes each part in turn."""
    made, Rows = deferred_rows()
    rec, b = held()
    for second in (Rows(2, 2.0), torch.full((2, 1), 2.0)):
        busy = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=5))  # holds the model thread
        await asyncio.sleep(0.01)
        queued = [asyncio.create_task(b.submit(part, timeout_s=5)) for part in (Rows(1, 1.0), second, Rows(3, 3.0))]
        await asyncio.sleep(0.01)
        rec.release.set()
        outs = await asyncio.gather(*queued)
        await busy
        assert [out.squeeze(1).tolist() for (out,) in outs] == [[2.0], [4.0, 4.0], [6.0, 6.0, 6.0]]
        rec.release.clear()
    assert rec.sizes == [1, 6, 1, 6]
    assert [parts for _, parts in made] == [3, 1, 1]
    await b.stop()


async def test_a_deferred_part_that_could_not_be_made_fails_alone_and_the_batch_s_others_get_their_rows() -> None:
    """`uploads.Upload`: an upload whose pixels do not decode. Alone, in a batch, or made on the event loop to be split."""
    made, Rows = deferred_rows()
    rec, b = held()
    busy = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=5))  # holds the model thread
    await asyncio.sleep(0.01)
    queued = [asyncio.create_task(b.submit(part, timeout_s=5)) for part in (Rows(1, 1.0), Rows(2, 2.0, True), Rows(1, 3.0))]
    await asyncio.sleep(0.01)
    rec.release.set()
    first, failed, last = await asyncio.gather(*queued, return_exceptions=True)
    await busy
    assert rec.sizes == [1, 4] and [parts for _, parts in made] == [3]  # one batch
    assert first[0].squeeze(1).tolist() == [2.0] and last[0].squeeze(1).tolist() == [6.0]
    assert isinstance(failed, ValueError) and str(failed) == "rows of 2.0 could not be made"
    with pytest.raises(ValueError, match=r"rows of 5\.0"):
        await b.submit(Rows(1, 5.0, True), timeout_s=5, alone=True)
    with pytest.raises(ValueError, match=r"rows of 6\.0"):
        await b.submit(Rows(20, 6.0, True), timeout_s=5)
    assert rec.sizes == [1, 4, 1]  # the lone one computed as any batch is; the split one never queued
    await b.stop()


async def test_a_request_in_parts_gets_each_part_from_a_batch_of_its_own_in_order() -> None:
    rec, b = held()  # everything is queued before the first batch runs: the parts still do not merge
    parts = b.parts(torch.arange(10.0)[:, None], timeout_s=5, part_size=4)
    first = asyncio.ensure_future(anext(parts))
    await asyncio.sleep(0.01)
    rec.release.set()
    outs = [await first] + [part async for part in parts]
    assert [o.squeeze(1).tolist() for (o,) in outs] == [[0.0, 2.0, 4.0, 6.0], [8.0, 10.0, 12.0, 14.0], [16.0, 18.0]]
    assert rec.sizes == [4, 4, 2]
    await b.stop()


async def test_other_requests_join_the_batch_of_a_part() -> None:
    rec, b = held()
    busy = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=5))  # holds the model thread
    await asyncio.sleep(0.01)
    parts = b.parts(torch.ones(6, 1), timeout_s=5, part_size=3)
    first = asyncio.ensure_future(anext(parts))
    await asyncio.sleep(0)
    other = asyncio.create_task(b.submit(torch.ones(2, 1), timeout_s=5))
    await asyncio.sleep(0.01)
    rec.release.set()
    await asyncio.gather(busy, first, other)
    assert [len(o) for (o,) in [part async for part in parts]] == [3]
    assert rec.sizes == [1, 3, 5]  # the first part alone (the second may not join it), then the second with the other
    await b.stop()


async def test_then_turns_each_request_s_rows_into_its_answer_on_the_batch_s_thread() -> None:
    rec, b = held()
    threads: set[str] = set()

    def total(outputs: tuple[torch.Tensor, ...]) -> float:
        threads.add(threading.current_thread().name)
        return float(outputs[0].sum())

    busy = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=5))  # holds the model thread: the rest queue
    await asyncio.sleep(0.01)
    summed = b.parts(torch.arange(6.0)[:, None], timeout_s=5, part_size=3, then=total)
    first = asyncio.ensure_future(anext(summed))
    await asyncio.sleep(0)
    plain = asyncio.create_task(b.submit(torch.ones(2, 1), timeout_s=5))  # joins the second part's batch
    await asyncio.sleep(0.01)
    rec.release.set()
    await busy
    assert [await first] + [s async for s in summed] == [6.0, 24.0]  # 2 * (0 + 1 + 2), 2 * (3 + 4 + 5)
    (out,) = await plain
    assert out.squeeze(1).tolist() == [2.0, 2.0]  # the batch it shared with a `then` part gave it its own rows
    assert rec.sizes == [1, 3, 5]
    assert threads and threading.current_thread().name not in threads
    alone = [s async for s in b.parts(torch.ones(2, 1), timeout_s=5, part_size=8, alone=True, then=total)]
    assert alone == [4.0]  # the only request in progress, past the queue: through `then` as well
    await b.stop()


async def test_what_a_then_raises_fails_only_its_own_request_with_that_error() -> None:
    rec, b = held()

    def broken(outputs: tuple[torch.Tensor, ...]) -> None:
        raise ValueError("no")

    async def answer_through_broken() -> None:
        async for _ in b.parts(torch.ones(2, 1), timeout_s=5, part_size=8, alone=True, then=broken):
            pass

    busy = asyncio.create_task(b.submit(torch.zeros(1, 1), timeout_s=5))  # holds the model thread: the rest queue
    await asyncio.sleep(0.01)
    failing = asyncio.create_task(answer_through_broken())
    other = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=5))  # shares the failing one's batch
    await asyncio.sleep(0.01)
    rec.release.set()
    await busy
    with pytest.raises(ValueError, match="no"):
        await failing
    (out,) = await other
    assert out.tolist() == [[2.0]] and rec.sizes == [1, 3]
    with pytest.raises(ValueError, match="no"):  # the only request in progress, past the queue: the same
        await answer_through_broken()
    await b.stop()


async def test_parts_left_unread_are_dropped_and_a_late_part_is_a_deadline_error() -> None:
    rec = Recorder(delay_s=0.05)
    b = make(rec)
    parts = b.parts(torch.ones(16, 1), timeout_s=5, part_size=4)
    await anext(parts)
    await parts.aclose()  # the caller gave up after the first part
    await asyncio.sleep(0.2)
    assert sum(rec.sizes) < 16
    with pytest.raises(DeadlineExceeded):
        async for _ in b.parts(torch.ones(16, 1), timeout_s=0.08, part_size=4):
            pass
    await b.stop()


async def test_a_full_queue_rejects_at_once() -> None:
    rec, b = held(queue_size=4)
    running = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=5))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(b.submit(torch.ones(4, 1), timeout_s=5))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await b.submit(torch.ones(1, 1), timeout_s=5)
    rec.release.set()
    await asyncio.gather(running, queued)
    await b.stop()


async def test_a_request_past_its_deadline_gets_an_error_not_a_hang() -> None:
    rec, b = held()
    with pytest.raises(DeadlineExceeded):
        await b.submit(torch.ones(1, 1), timeout_s=0.05)
    rec.release.set()
    (out,) = await b.submit(torch.ones(1, 1), timeout_s=5)  # the batcher carries on
    assert float(out[0]) == 2.0
    await b.stop()


@pytest.mark.parametrize("alone", [False, True])
async def test_a_failing_batch_fails_only_its_own_requests_and_is_logged(
    alone: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def predict(x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            raise RuntimeError("boom")
        return x

    b = make(predict)
    with pytest.raises(BatchFailed, match="RuntimeError"):
        await b.submit(-torch.ones(2, 1), timeout_s=5, alone=alone)
    assert "a batch of 2 images failed" in caplog.text and "boom" in caplog.text
    (out,) = await b.submit(torch.ones(2, 1), timeout_s=5, alone=alone)
    assert out.tolist() == [[1.0], [1.0]]
    await b.stop()


async def test_out_of_memory_splits_the_batch_and_retries() -> None:
    sizes: list[int] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return x + 1

    b = make(predict)
    (out,) = await b.submit(torch.zeros(8, 1), timeout_s=5)
    assert out.squeeze(1).tolist() == [1.0] * 8
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # halved until each part fits
    await b.stop()


async def test_outputs_with_several_tensors_are_split_per_request() -> None:
    b = make(lambda x: (x, -x))
    mu, log_var = await b.submit(torch.ones(3, 2), timeout_s=5)
    assert mu.shape == log_var.shape == (3, 2) and float(log_var.sum()) == -6.0
    await b.stop()


async def test_outputs_are_finished_once_per_batch_on_the_model_thread_after_the_checks() -> None:
    finished: list[tuple[int, str]] = []

    def finish(out: torch.Tensor) -> torch.Tensor:
        finished.append((len(out), threading.current_thread().name))
        return out.to(torch.uint8)  # NaN would become an innocent-looking 0: the check must come first

    b = make(lambda x: x * 2, finish=finish)
    (out,) = await b.submit(torch.full((3, 1), 2.0), timeout_s=5)
    assert out.dtype == torch.uint8 and out.squeeze(1).tolist() == [4, 4, 4]
    assert finished == [(3, finished[0][1])] and finished[0][1] != threading.current_thread().name
    with pytest.raises(BatchFailed, match="InvalidOutput"):
        await b.submit(torch.full((2, 1), float("nan")), timeout_s=5)
    assert len(finished) == 1
    await b.stop()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_non_finite_value_anywhere_in_any_output_fails_its_batch(bad: float, dtype: torch.dtype) -> None:
    ok = torch.ones(4, 3, dtype=dtype)
    spoiled = ok.clone()
    spoiled[3, 2] = bad
    assert batcher.compute("m", lambda x: (ok, ok), batcher.as_float32, ok)[0].dtype == torch.float32
    with pytest.raises(batcher.InvalidOutput, match="non-finite"):
        batcher.compute("m", lambda x: (ok, spoiled), batcher.as_float32, ok)


async def test_after_stop_requests_are_refused_and_queued_ones_answered() -> None:
    rec, b = held()
    running = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=5))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(b.submit(torch.ones(1, 1), timeout_s=5))
    await asyncio.sleep(0.01)
    await b.stop()
    rec.release.set()
    with pytest.raises(NotServing):
        await queued
    with pytest.raises(NotServing):
        await b.submit(torch.ones(1, 1), timeout_s=5)
    running.cancel()
