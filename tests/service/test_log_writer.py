"""The server's log lines: kept by the caller, written in bulk by a thread of their own."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from service.log_writer import BulkWriter, JsonFormatter


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, BulkWriter, io.StringIO]]:
    stream = io.StringIO()
    out = logging.StreamHandler(stream)
    out.setFormatter(JsonFormatter())
    writer = BulkWriter(out, interval_s=30)  # no periodic write within a test: only a warning or a close write
    logger = logging.getLogger(f"test_log_writer.{id(stream)}")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(writer)
    yield logger, writer, stream
    logger.removeHandler(writer)
    writer.close()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def written_within(stream: io.StringIO, count: int, seconds: float = 5) -> list[dict[str, object]]:
    give_up = time.monotonic() + seconds
    while len(lines(stream)) < count and time.monotonic() < give_up:
        time.sleep(0.01)
    return lines(stream)


def test_an_info_line_is_kept_for_the_writers_next_round(logged: tuple[logging.Logger, BulkWriter, io.StringIO]) -> None:
    logger, _, stream = logged
    logger.info("request", extra={"path": "/sample", "status": 200})
    time.sleep(0.05)
    assert stream.getvalue() == ""  # kept for the writer's next round


def test_a_warning_wakes_the_writer_which_writes_everything_kept_in_order(
    logged: tuple[logging.Logger, BulkWriter, io.StringIO],
) -> None:
    logger, _, stream = logged
    for i in range(300):  # more than one write's worth
        logger.info("request", extra={"status": 200 + i})
    logger.warning("model %s failed to load", "faces")
    written = written_within(stream, 301)
    assert [line["status"] for line in written[:300]] == [200 + i for i in range(300)]
    assert written[300] == {**written[300], "level": "warning", "msg": "model faces failed to load"}


def test_closing_writes_what_is_kept_and_stops_the_thread(logged: tuple[logging.Logger, BulkWriter, io.StringIO]) -> None:
    logger, writer, stream = logged
    logger.info("request", extra={"path": "/decode"})
    writer.close()  # what logging.shutdown does at exit
    assert [line["path"] for line in lines(stream)] == ["/decode"]
    assert not writer._thread.is_alive()
    logger.info("request", extra={"path": "/encode"})  # during shutdown, after the writer thread: written at once
    assert [line["path"] for line in lines(stream)] == ["/decode", "/encode"]


def test_a_line_that_cannot_be_formatted_is_reported_and_the_rest_are_written(
    logged: tuple[logging.Logger, BulkWriter, io.StringIO], capsys: pytest.CaptureFixture[str],
) -> None:
    _, writer, stream = logged
    for message, args in (("%d requests", ("not a number",)), ("fine", ())):  # the first fails in getMessage
        writer.handle(logging.makeLogRecord({"msg": message, "args": args, "levelno": logging.INFO, "levelname": "INFO"}))
    writer.flush()
    assert [line["msg"] for line in lines(stream)] == ["fine"]
    assert "Logging error" in capsys.readouterr().err
