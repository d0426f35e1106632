"""Liveness, readiness and behaviour when the database is down."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.conftest import REPO, TEST_REDIS_URL


def test_healthz(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_names_what_is_missing(client, app, tmp_path):
    # No worker listens on this test's queue/app, and the broker is real.
    body = client.get("/readyz")
    assert body.status_code == 503
    checks = body.get_json()["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"]
    assert checks["model"]["ok"] and checks["model"]["trained"] is False
    app.config["MODEL_DIR"] = str(tmp_path / "nothing-here")
    checks = client.get("/readyz").get_json()["checks"]
    assert checks["model"] == {"ok": False, "message": "no model installed"}


def test_readyz_reports_a_model_without_its_input_gate(client, app, tiny_model_dir, tmp_path):
    import shutil

    assert client.get("/readyz").get_json()["checks"]["model"]["gate_version"].startswith("gate-")
    ungated = tmp_path / "ungated"
    shutil.copytree(tiny_model_dir, ungated)
    (ungated / "gate.json").unlink()
    app.config["MODEL_DIR"] = str(ungated)
    checks = client.get("/readyz").get_json()["checks"]
    assert checks["model"] == {"ok": False, "message": "the model has no input gate (gate.json)"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_database_down_gives_503_not_500(tiny_model_dir):
    from webapp import create_app

    port = _closed_port()
    app = create_app({
        "SQLALCHEMY_DATABASE_URI": f"postgresql+psycopg://postgres@127.0.0.1:{port}/none?connect_timeout=2",
        "MODEL_DIR": str(tiny_model_dir),
        "CELERY": {"broker_url": TEST_REDIS_URL},
    })
    client = app.test_client()
    # Checking the token needs the database: that is where the outage shows.
    response = client.get("/api/v1/studies", headers={"Authorization": "Bearer cxr_anything"})
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "database_unavailable"
    ready = client.get("/readyz").get_json()
    assert ready["ready"] is False and ready["checks"]["database"]["ok"] is False


def test_web_process_never_imports_tensorflow(tiny_model_dir, tmp_path):
    code = f"""
import io, sys
from flask_migrate import upgrade
from PIL import Image
from webapp import create_app
app = create_app({{"SQLALCHEMY_DATABASE_URI": "sqlite:///{tmp_path}/w.db", "MODEL_DIR": "{tiny_model_dir}",
                  "CELERY": {{"broker_url": "{TEST_REDIS_URL}", "task_default_queue": "isolation-check"}}}})
with app.app_context():
    upgrade()
    from webapp import accounts, tokens
    user = accounts.create_user("a@example.org", "a long enough password", "admin")
    secret = tokens.create_token(user, "t")[1]
c = app.test_client()
c.environ_base["HTTP_AUTHORIZATION"] = "Bearer " + secret
buf = io.BytesIO(); Image.new("L", (64, 64)).save(buf, "PNG")
r = c.post("/api/v1/studies", data={{"files": [(io.BytesIO(buf.getvalue()), "a.png")]}})
assert r.status_code == 202, r.get_json()
sid = r.get_json()["id"]
urls = ["/studies", "/studies/" + sid, "/api/v1/studies", "/readyz", "/metrics", "/admin/",
        "/admin/charts/throughput-day.svg", "/admin/charts/drift-day.svg", "/admin/audit",
        r.get_json()["images"][0]["preview_url"]]
for url in urls:
    assert c.get(url).status_code in (200, 503), url
bad = sorted(m for m in ("tensorflow", "keras", "onnxruntime") if m in sys.modules)
print("LOADED", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout
    import redis

    redis.Redis.from_url(TEST_REDIS_URL).delete("isolation-check")
