"""Upload through HTTP, a real Celery worker on the real Redis, results read back: SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import real_xray_paths

pytestmark = pytest.mark.integration


def test_real_xrays_get_results_from_the_worker(stack_factory, database_url, tiny_model_dir):
    stack = stack_factory(database_url, tiny_model_dir)
    covid, normal = real_xray_paths(1, "covid")[0], real_xray_paths(1, "normal")[0]
    started = time.perf_counter()
    first = stack.upload((covid.name, covid.read_bytes()), patient_ref="E2E-1")
    body = stack.wait(first["id"])
    elapsed = time.perf_counter() - started
    print(f"\nupload-to-result seconds={elapsed:.2f} database={database_url.split(':')[0]}")
    assert body["status"] == "succeeded", body
    result = body["images"][0]["result"]
    assert 0 <= result["probability_covid"] <= 1 and result["model_trained"] is False
    heatmap = stack.get(result["heatmap_url"])
    assert heatmap.ok and heatmap.content.startswith(b"\x89PNG")
    # A second study with two images on the warm worker, and the list shows both.
    second = stack.upload((covid.name, covid.read_bytes()), (normal.name, normal.read_bytes()))
    body = stack.wait(second["id"])
    assert [i["result"] is not None for i in body["images"]] == [True, True]
    listing = stack.get("/api/v1/studies").json()
    assert {s["id"] for s in listing["items"]} == {first["id"], second["id"]}
    assert all(s["status"] == "succeeded" for s in listing["items"])
    ready = requests.get(f"{stack.base_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.json()
    assert stack.worker.poll() is None


def test_without_a_model_studies_fail_with_a_reason_and_the_worker_lives(
    stack_factory, tmp_path, postgres_server_url
):
    from tests.conftest import create_postgres_database, drop_postgres_database

    url = create_postgres_database(postgres_server_url)
    try:
        stack = stack_factory(url, tmp_path / "no-model-here")
        path = real_xray_paths(1)[0]
        bodies = [stack.wait(stack.upload((path.name, path.read_bytes()))["id"]) for _ in range(2)]
        for body in bodies:
            assert body["status"] == "failed"
            assert body["error"] == {"code": "no_model", "message": "no model installed"}
        ready = requests.get(f"{stack.base_url}/readyz", timeout=10).json()
        assert ready["checks"]["model"] == {"ok": False, "message": "no model installed"}
        assert stack.worker.poll() is None
    finally:
        for proc in (stack.worker, stack.web):
            proc.terminate()
            proc.wait(timeout=30)
        drop_postgres_database(postgres_server_url, url)
