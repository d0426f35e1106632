"""Group commit across task threads (worker/grouping.py), with real threads."""

from __future__ import annotations

import threading
import time

import pytest

from worker.grouping import Group


class SlowFirstRun:
    """Doubles each item; the first run holds the group long enough for others to gather."""

    def __init__(self, hold_s: float = 0.3) -> None:
        self.runs: list[list[int]] = []
        self.hold_s = hold_s
        self.first_started = threading.Event()

    def __call__(self, items):
        self.runs.append(list(items))
        if len(self.runs) == 1:
            self.first_started.set()
            time.sleep(self.hold_s)
        if -1 in items:
            raise ValueError("bad item")
        return [2 * i for i in items]


def behind_a_first_run(group: Group, run: SlowFirstRun, items: list[int]) -> dict[int, object]:
    """Call group(1), then call it with `items` from their own threads while that run holds."""
    first = threading.Thread(target=group, args=(1,))
    first.start()
    assert run.first_started.wait(5)
    got = call_in_threads(group, items)
    first.join(5)
    return got


def call_in_threads(group: Group, items: list[int]) -> dict[int, object]:
    got: dict[int, object] = {}

    def one(item: int) -> None:
        try:
            got[item] = group(item)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each caller got
            got[item] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    return got


def test_a_lone_call_runs_at_once():
    run = SlowFirstRun(hold_s=0)
    group = Group(run)
    start = time.perf_counter()
    assert group(21) == 42
    assert time.perf_counter() - start < 0.04  # no timer to wait out
    assert run.runs == [[21]]


def test_calls_that_arrive_during_a_run_are_run_together_and_each_gets_its_own_result():
    run = SlowFirstRun()
    group = Group(run)
    got = behind_a_first_run(group, run, list(range(2, 8)))
    assert got == {i: 2 * i for i in range(2, 8)}
    assert run.runs[0] == [1] and sorted(run.runs[1]) == list(range(2, 8)) and len(run.runs) == 2
    assert (group.runs, group.items) == (2, 7)


def test_no_run_takes_more_than_max_size():
    run = SlowFirstRun()
    group = Group(run, max_size=3)
    got = behind_a_first_run(group, run, list(range(2, 12)))
    assert got == {i: 2 * i for i in range(2, 12)}
    assert all(len(r) <= 3 for r in run.runs)
    assert sorted(i for r in run.runs for i in r) == list(range(1, 12))


def test_an_error_reaches_every_caller_of_that_run_and_only_them():
    run = SlowFirstRun()
    group = Group(run)
    got = behind_a_first_run(group, run, [-1, 2, 3])
    assert all(isinstance(got[i], ValueError) for i in (-1, 2, 3))  # they ran together
    assert group(4) == 8  # the group goes on
    with pytest.raises(ValueError, match="bad item"):
        group(-1)


def test_a_run_that_returns_the_wrong_number_of_results_fails_its_callers():
    group = Group(lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        group(1)
