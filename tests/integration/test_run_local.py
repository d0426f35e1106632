"""`make run`'s launcher on its embedded defaults: embedded Redis, SQLite, a worker, the web; Ctrl-C stops all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import REPO, real_xray_paths
from tests.integration.conftest import _free_port

pytestmark = pytest.mark.integration


def test_launcher_serves_a_result_and_stops_cleanly(tiny_model_dir, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(PORT=str(port), MODEL_DIR=str(tiny_model_dir), SECRET_KEY="launcher-test",
               DATABASE_URL=f"sqlite:///{tmp_path / 'local.db'}", TF_CPP_MIN_LOG_LEVEL="2")
    log = open(tmp_path / "run.log", "w+b")
    proc = subprocess.Popen([sys.executable, "scripts/run_local.py"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # includes the one-time ONNX export
        while b"is running at" not in (tmp_path / "run.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "launcher did not come up"
            time.sleep(0.2)
        text = (tmp_path / "run.log").read_text()
        assert re.search(r"Embedded Redis on redis://127\.0\.0\.1:\d+/0", text)
        # It says how to make the first admin; doing so as told gives an account that works.
        command = re.search(r"(\.venv/bin/flask --app webapp:create_app users create --admin) \S+", text)
        assert command, text[-2000:]
        flask = [str(Path(sys.executable).parent / "flask"), "--app", "webapp:create_app"]
        made = subprocess.run([*flask, "users", "create", "--admin", "first@example.org"], cwd=REPO, env=env,
                              input="a long enough password\n" * 2, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        token = subprocess.run([*flask, "tokens", "create", "first@example.org", "--name", "launcher"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        auth = {"Authorization": f"Bearer {token.stdout.strip().splitlines()[-1]}"}
        children = psutil.Process(proc.pid).children(recursive=True)
        base = f"http://127.0.0.1:{port}"
        path = real_xray_paths(1)[0]
        created = requests.post(f"{base}/api/v1/studies", files={"files": (path.name, path.read_bytes())},
                                headers=auth, timeout=30).json()
        deadline = time.monotonic() + 120
        while not (body := requests.get(base + created["url"], headers=auth, timeout=10).json())["done"]:
            assert time.monotonic() < deadline, "no result from the worker"
            time.sleep(0.2)
        assert body["status"] == "succeeded", body
        # The launcher exported the model once, so the CPU worker serves it with ONNX Runtime.
        assert body["images"][0]["result"]["backend"] == "onnx", body
    finally:
        proc.send_signal(signal.SIGINT)
        # An impatient second signal while it stops must not leave the services behind.
        deadline = time.monotonic() + 10
        while "Stopping" not in (tmp_path / "run.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=90)
    assert returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left running: {[p.pid for p in alive]}"
