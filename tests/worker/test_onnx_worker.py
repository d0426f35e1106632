"""A CPU worker on the ONNX backend processes studies without ever loading TensorFlow."""

from __future__ import annotations

import subprocess
import sys
import uuid

from tests.conftest import FIXTURES, REPO, TEST_REDIS_URL


def test_onnx_worker_pipeline_never_imports_tensorflow(tiny_onnx_model_dir, tmp_path):
    queue = f"onnx-worker-{uuid.uuid4().hex[:8]}"
    fixture = sorted(FIXTURES.glob("*.png"))[0]
    code = f"""
import io, sys
from flask_migrate import upgrade
from werkzeug.datastructures import FileStorage
from webapp import create_app
from webapp.extensions import db
from webapp.models import Prediction
from webapp.uploads import create_study
app = create_app({{"SQLALCHEMY_DATABASE_URI": "sqlite:///{tmp_path}/w.db",
                  "MODEL_DIR": {str(tiny_onnx_model_dir)!r}, "INFERENCE_BACKEND": "auto",
                  "CELERY": {{"broker_url": "{TEST_REDIS_URL}", "task_default_queue": "{queue}"}}}})
with app.app_context():
    upgrade()
    data = open({str(fixture)!r}, "rb").read()
    study = create_study([FileStorage(io.BytesIO(data), filename="x.png")])
    from worker import pipeline
    assert pipeline.run_study(study.id) == "succeeded"
    [row] = db.session.query(Prediction).all()
    assert row.backend == "onnx" and row.heatmap_cam and row.heatmap_png is None, row.backend
print("LOADED", sorted(m for m in ("tensorflow", "keras", "tf2onnx") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=180)
    import redis

    redis.Redis.from_url(TEST_REDIS_URL).delete(queue)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout
