"""`make run`'s supervision rule (scripts/run_local.py Service) on small real processes.

The whole launcher with a killed worker is tests/integration/test_launcher_recovery.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest

from scripts import run_local
from scripts.run_local import Service

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
FAILS_AT_ONCE = [sys.executable, "-c", "raise SystemExit(3)"]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(run_local, "RESTART_DELAY_S", 0.05)
    monkeypatch.setattr(run_local, "MAX_RESTART_DELAY_S", 0.2)


def run_until(service: Service, predicate, timeout: float = 20.0) -> list[str]:
    """Call check() as the launcher's loop does until predicate(service); returns what it logged."""
    said: list[str] = []
    deadline = time.monotonic() + timeout
    while not predicate(service):
        assert time.monotonic() < deadline, said
        news = service.check(time.monotonic())
        if news:
            said.append(news)
        time.sleep(0.01)
    return said


def test_a_killed_service_is_restarted_and_says_so():
    worker = Service("worker", SLEEPER, dict(os.environ))
    worker.start()
    try:
        first = worker.proc.pid
        os.kill(first, signal.SIGKILL)
        said = run_until(worker, lambda s: s.restarts == 1)
        assert said[0].startswith("worker exited with status -9 after 0 s; restarting it in 0 s")
        assert said[0].endswith("the web server keeps serving")
        assert said[1] == f"worker restarted (pid {worker.proc.pid}, restart 1)"
        assert worker.proc.pid != first and worker.proc.poll() is None
        assert not worker.gave_up
    finally:
        worker.stop()


def test_the_delay_doubles_while_a_service_dies_young_and_resets_once_it_stays_up(monkeypatch):
    monkeypatch.setattr(run_local, "RESTART_DELAY_S", 1.0)
    monkeypatch.setattr(run_local, "MAX_RESTART_DELAY_S", 4.0)
    beat = Service("beat", SLEEPER, dict(os.environ))
    beat.start()
    try:
        delays = []
        for _ in range(4):
            beat.proc.kill()
            beat.proc.wait()
            now = time.monotonic()
            assert "restarting it in" in beat.check(now)
            delays.append(beat.restart_at - now)
            beat.restart_at = now  # do not wait the delay out here
            assert beat.check(now).startswith("beat restarted")
        assert [round(d) for d in delays] == [1, 2, 4, 4]
        beat.started_at -= run_local.STABLE_AFTER_S  # it has stayed up since
        beat.proc.kill()
        beat.proc.wait()
        now = time.monotonic()
        beat.check(now)
        assert round(beat.restart_at - now) == 1
    finally:
        beat.stop()


def test_a_service_that_cannot_start_makes_the_launcher_give_up():
    web = Service("web", FAILS_AT_ONCE, dict(os.environ))
    web.start()
    said = run_until(web, lambda s: s.gave_up)
    assert said[-1] == ("web exited with status 3 5 times in a row right after starting; "
                        "giving up, stopping")
    assert sum("restarted" in line for line in said) == run_local.GIVE_UP_AFTER - 1


def test_signals_never_make_it_give_up():
    worker = Service("worker", SLEEPER, dict(os.environ))
    worker.start()
    try:
        for _ in range(run_local.GIVE_UP_AFTER + 2):
            pid = worker.proc.pid
            os.kill(pid, signal.SIGKILL)
            run_until(worker, lambda s, pid=pid: s.proc is not None and s.proc.pid != pid)
        assert not worker.gave_up
    finally:
        worker.stop()


def test_what_a_dead_service_left_behind_is_killed_before_it_restarts():
    # A parent that starts a child in its own process group, as gunicorn starts its workers.
    parent = Service("web", [sys.executable, "-c",
                             "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                             "time.sleep(60)"], dict(os.environ))
    parent.start()
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 20
        while not (children := psutil.Process(parent.proc.pid).children()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(parent.proc.pid, signal.SIGKILL)
        run_until(parent, lambda s: s.restart_at is not None)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        parent.stop()
        for child in children:
            if child.is_running():
                child.kill()
