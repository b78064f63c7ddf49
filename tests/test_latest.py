"""LatestValueWorker: works on the newest value, never blocks the poster, survives a failing round."""

from __future__ import annotations

import threading

from gpuphase.agent.latest import LatestValueWorker


def test_values_posted_while_busy_fold_into_the_newest():
    release, busy = threading.Event(), threading.Event()
    seen: list[int] = []

    def work(value: int) -> None:
        seen.append(value)
        if value == 1:
            busy.set()
            release.wait(5)

    worker = LatestValueWorker("test-latest", work).start()
    try:
        worker.post(1)
        assert busy.wait(5)
        for value in range(2, 10):  # posted while 1 is being worked on: must not block
            worker.post(value)
        release.set()
        assert worker.wait_idle(5)
        assert seen == [1, 9]
    finally:
        worker.stop()


def test_a_failing_round_is_logged_and_the_next_value_still_worked_on(caplog):
    seen: list[int] = []

    def work(value: int) -> None:
        if value == 1:
            raise RuntimeError("boom")
        seen.append(value)

    worker = LatestValueWorker("test-latest", work).start()
    try:
        worker.post(1)
        assert worker.wait_idle(5)
        worker.post(2)
        assert worker.wait_idle(5)
        assert seen == [2]
        assert "test-latest failed" in caplog.text
    finally:
        worker.stop()


def test_stop_ends_the_thread_and_idle_is_immediate_when_nothing_was_posted():
    worker = LatestValueWorker("test-latest", lambda value: None).start()
    assert worker.wait_idle(0.1)
    worker.stop()
    assert not worker._thread.is_alive()
