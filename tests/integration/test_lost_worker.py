"""A worker lost mid-study, on the real stack (Redis, a real worker process, the real sweeper),
on SQLite and PostgreSQL: its study is re-run once its lease runs out, long before the broker's
visibility timeout, and a worker that was only frozen cannot add a second result when it wakes.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo

from tests.conftest import REPO, real_xray_paths
from tests.integration.test_faults import predictions_per_image, xray

pytestmark = pytest.mark.integration

LEASE_S = 3
LEASES = {
    "LEASE_S": str(LEASE_S),
    "HEARTBEAT_S": "1",
    "SWEEP_INTERVAL_S": "1",
    "STALE_AFTER_S": "600",
    # The broker would hand the message back only after an hour: the lease is what recovers it.
    "VISIBILITY_TIMEOUT_S": "3600",
    # Nothing prepared at upload: the worker decodes, where the slow marker holds it RUNNING.
    "PREPARE_INPUTS": "0",
}
# Workers started with this PYTHONPATH take SLOW_DECODE_S (default an hour) on a marked image.
SLOW = str(Path(__file__).parent / "slow") + os.pathsep + str(REPO)


def slow_xray() -> tuple[str, bytes]:
    """A real X-ray carrying the marker tests/integration/slow/sitecustomize.py waits on."""
    path = real_xray_paths(1)[0]
    info = PngInfo()
    info.add_text("Comment", "SLOW-DECODE")
    buf = io.BytesIO()
    PILImage.open(path).save(buf, format="PNG", pnginfo=info)
    return "slow.png", buf.getvalue()


def wait_running(stack, study_id: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.get(f"/api/v1/studies/{study_id}").json()["status"] != "running":
        assert time.monotonic() < deadline, (stack.log_dir / "worker.log").read_text()[-3000:]
        time.sleep(0.1)


def log_text(stack, name: str) -> str:
    return (stack.log_dir / f"{name}.log").read_text(errors="replace")


def test_study_of_a_killed_worker_is_rerun_by_the_sweeper_once_its_lease_runs_out(
    stack_factory, database_url, tiny_model_dir
):
    stack = stack_factory(database_url, tiny_model_dir, worker=False, beat=True, extra_env=LEASES)
    stack.start_worker(concurrency=1, extra_env={"PYTHONPATH": SLOW})
    study_id = stack.upload(slow_xray(), xray(1))["id"]
    wait_running(stack, study_id)
    stack.worker.send_signal(signal.SIGKILL)
    stack.worker.wait(10)
    killed = time.monotonic()
    stack.start_worker()  # a healthy one, as the launcher or Compose would start
    body = stack.wait(study_id, timeout=90)
    recovered_s = time.monotonic() - killed
    print(f"\nkilled-to-result seconds={recovered_s:.1f} database={database_url.split(':')[0]}")
    assert body["status"] == "succeeded", body
    assert body["attempts"] == 2  # the lost run and the re-run, nothing more
    # The sweep runs as a task on the worker; beat only sends it every SWEEP_INTERVAL_S.
    assert f"event=study_requeued study={study_id} attempts=1 was=running" in log_text(stack, "worker")
    # Lease, a sweep, a new worker's start-up (TensorFlow here: most of it) and the run; not an hour.
    assert recovered_s < 90
    counts = predictions_per_image(database_url)
    assert len(counts) == 2 and set(counts.values()) == {1}


def test_a_frozen_worker_taken_for_lost_cannot_add_a_second_result(
    stack_factory, database_url, tiny_model_dir
):
    stack = stack_factory(database_url, tiny_model_dir, worker=False, beat=True, extra_env=LEASES)
    # One thread: while its study runs, the frozen worker takes no other message off the queue.
    frozen = stack.start_worker(concurrency=1, extra_env={"PYTHONPATH": SLOW, "SLOW_DECODE_S": "6"})
    study_id = stack.upload(slow_xray(), xray(1))["id"]
    wait_running(stack, study_id)
    frozen.send_signal(signal.SIGSTOP)  # no heartbeats, but alive, holding its claim
    try:
        stack.start_worker()
        body = stack.wait(study_id, timeout=90)
        assert body["status"] == "succeeded" and body["attempts"] == 2, body
    finally:
        frozen.send_signal(signal.SIGCONT)
    # Awake again, it finishes its decode and its inference; its write is discarded.
    deadline = time.monotonic() + 90
    while f"event=finish_discarded study={study_id} token=1" not in log_text(stack, "worker"):
        assert time.monotonic() < deadline, log_text(stack, "worker")[-4000:]
        time.sleep(0.2)
    assert f"event=lease_lost study={study_id} token=1" in log_text(stack, "worker")
    body = stack.get(f"/api/v1/studies/{study_id}").json()
    assert body["status"] == "succeeded" and body["attempts"] == 2
    counts = predictions_per_image(database_url)
    assert len(counts) == 2 and set(counts.values()) == {1}
