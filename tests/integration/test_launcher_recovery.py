"""`make run`'s launcher keeps the stack up: a SIGKILLed worker, beat or embedded Redis is started
again, says so, and the web server answers throughout."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import REPO, real_xray_paths
from tests.integration.conftest import _free_port

pytestmark = pytest.mark.integration


def service_pid(launcher: subprocess.Popen, name: str) -> int | None:
    """The pid of the launcher's child running `name` (worker, beat, web or redis)."""
    for child in psutil.Process(launcher.pid).children():
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if name == "redis" and child.name() == "redis-server":  # it rewrites its argv
            return child.pid
        if name == "web" and any(a.endswith("gunicorn") for a in cmd[:2]):
            return child.pid
        if "worker.celery_app" in cmd and cmd[cmd.index("worker.celery_app") + 1] == name:
            return child.pid
    return None


class HealthPoller(threading.Thread):
    """GET /healthz every 0.1 s until stopped; keeps what failed and the slowest answer.

    On a shared 2-core machine an answer can take seconds; refused or failed is what counts.
    """

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.failures, self.polls, self.slowest_s = base, [], 0, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            started = time.monotonic()
            try:
                status = requests.get(f"{self.base}/healthz", timeout=30).status_code
                if status != 200:
                    self.failures.append(status)
            except requests.RequestException as exc:
                self.failures.append(type(exc).__name__)
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            self.polls += 1


def test_killed_worker_beat_and_redis_are_restarted_while_the_web_keeps_serving(
    tiny_model_dir, tmp_path
):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(PORT=str(port), MODEL_DIR=str(tiny_model_dir), SECRET_KEY="launcher-test",
               DATABASE_URL=f"sqlite:///{tmp_path / 'local.db'}", TF_CPP_MIN_LOG_LEVEL="2")
    log_path = tmp_path / "run.log"
    launcher = subprocess.Popen([sys.executable, "scripts/run_local.py"], cwd=REPO, env=env,
                                stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)

    def wait_for_log(pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, log_path.read_text(errors="replace")):
            assert launcher.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n" + log_path.read_text()[-3000:]
            time.sleep(0.2)

    poller = HealthPoller(f"http://127.0.0.1:{port}")
    children: list[psutil.Process] = []
    try:
        wait_for_log("is running at", timeout=300)  # includes the one-time ONNX export
        poller.start()
        for name in ("worker", "beat", "redis"):
            old = service_pid(launcher, name)
            assert old, f"no {name} under the launcher"
            os.kill(old, signal.SIGKILL)
            wait_for_log(rf"{name} exited with status -9 after \d+ s; restarting it in 1 s; "
                         "the web server keeps serving")
            wait_for_log(rf"{name} restarted \(pid \d+, restart 1\)")
            new = service_pid(launcher, name)
            assert new and new != old
        # The restarted stack still does the work: an account, a study, its result.
        flask = [str(Path(sys.executable).parent / "flask"), "--app", "webapp:create_app"]
        made = subprocess.run([*flask, "users", "create", "--admin", "first@example.org",
                               "--generate-password"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        token = subprocess.run([*flask, "tokens", "create", "first@example.org", "--name", "t"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        auth = {"Authorization": f"Bearer {token.stdout.strip().splitlines()[-1]}"}
        base = f"http://127.0.0.1:{port}"
        path = real_xray_paths(1)[0]
        created = requests.post(f"{base}/api/v1/studies", headers=auth, timeout=30,
                                files={"files": (path.name, path.read_bytes())}).json()
        deadline = time.monotonic() + 120
        while not (body := requests.get(base + created["url"], headers=auth, timeout=10).json())["done"]:
            assert time.monotonic() < deadline, "no result from the restarted worker"
            time.sleep(0.2)
        assert body["status"] == "succeeded", body
        poller.done.set()
        poller.join(10)
        print(f"\nhealthz polls={poller.polls} failures={len(poller.failures)} "
              f"slowest_s={poller.slowest_s:.2f}")
        assert poller.polls > 20 and poller.failures == [], poller.failures
        children = psutil.Process(launcher.pid).children(recursive=True)
    finally:
        poller.done.set()
        launcher.send_signal(signal.SIGINT)
        returncode = launcher.wait(timeout=90)
    assert returncode == 0, log_path.read_text()[-3000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left running: {[p.pid for p in alive]}"
