"""Progress of long operations: a tqdm bar on a terminal, structured log lines elsewhere."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from syncd import progress
from syncd.config import LogSettings
from syncd.logs import setup_logging
from syncd.progress import Progress
from tests.e2e.helpers import log_records


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    setup_logging(LogSettings(format="json", level="info", progress_every_s=10), stream)
    yield stream
    for handler in list(root.handlers):
        if getattr(handler, "_syncd", False):
            root.removeHandler(handler)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    progress.configure(10.0)


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return log_records(stream.getvalue())


def test_log_lines_carry_done_total_percent_rate_and_eta_as_fields(json_log) -> None:
    clock = Clock()
    bar = Progress("verify", pipeline="p", total=1000, stream=io.StringIO(), clock=clock)
    clock.now += 5
    bar.update(100)  # before the interval: nothing yet
    assert records(json_log) == []
    clock.now += 5
    bar.update(200)
    clock.now += 10
    bar.update(400)
    bar.close()
    lines = records(json_log)
    assert [line["msg"].split(":")[0] for line in lines] == [
        "verify progress",
        "verify progress",
        "verify finished",
    ]
    first = lines[0]
    assert (first["done"], first["total"], first["percent"]) == (200, 1000, 20.0)
    assert first["rate"] == 20.0 and first["eta_s"] == 40.0
    assert first["pipeline"] == "p" and first["unit"] == "documents"
    assert lines[1]["rate"] == 20.0 and lines[1]["eta_s"] == 30.0


def test_a_resumed_run_counts_only_its_own_work_in_the_rate(json_log) -> None:
    clock = Clock()
    bar = Progress(
        "snapshot",
        pipeline="p",
        total=5_000_000,
        initial=4_321_521,
        stream=io.StringIO(),
        clock=clock,
    )
    clock.now += 10
    bar.update(4_321_521 + 1_000)
    line = records(json_log)[0]
    assert line["rate"] == 100.0  # not 4,322,521 documents in 10 seconds
    assert line["done"] == 4_322_521
    assert line["eta_s"] == pytest.approx((5_000_000 - 4_322_521) / 100, abs=0.1)


def test_an_unknown_total_logs_count_and_rate_without_percent(json_log) -> None:
    clock = Clock()
    bar = Progress(
        "dlq retry",
        pipeline="p",
        total=None,
        unit="dead letters",
        stream=io.StringIO(),
        clock=clock,
    )
    clock.now += 10
    bar.advance(50)
    line = records(json_log)[0]
    assert (line["total"], line["percent"], line["eta_s"], line["rate"]) == (None, None, None, 5.0)


def test_a_terminal_gets_a_bar_with_count_rate_and_eta_and_no_log_lines(json_log) -> None:
    screen = Terminal()
    bar = Progress("snapshot", pipeline="articles", total=100, initial=10, stream=screen)
    bar.update(50)
    bar.close()
    shown = screen.getvalue()
    assert "snapshot articles" in shown
    assert "50/100" in shown
    assert "documents/s" in shown  # the rate
    assert "<" in shown  # elapsed<remaining: the ETA
    assert records(json_log) == []


def test_an_interrupted_operation_logs_no_finished_line(json_log) -> None:
    clock = Clock()
    bar = Progress("repair", pipeline="p", total=10, stream=io.StringIO(), clock=clock)
    clock.now += 11
    bar.update(3)
    bar.close(finished=False)
    bar.close()
    assert [r["msg"].split(":")[0] for r in records(json_log)] == ["repair progress"]


def test_more_done_than_estimated_says_so_instead_of_a_fraction_over_one(json_log) -> None:
    # Documents inserted while a snapshot copies are copied too: the total counted at the
    # start was an estimate.
    clock = Clock()
    bar = Progress("snapshot", pipeline="p", total=2121, stream=io.StringIO(), clock=clock)
    clock.now += 10
    bar.update(2200)
    clock.now += 1
    bar.update(2288)
    bar.close()
    lines = records(json_log)
    assert [line["msg"] for line in lines] == [
        "snapshot progress: 2200 documents (estimated 2121 at the start), 220/s",
        "snapshot finished: 2288 documents (estimated 2121 at the start), 208/s",
    ]
    last = lines[-1]
    assert (last["done"], last["total"], last["percent"]) == (2288, 2121, 100.0)
    assert last["eta_s"] is None
