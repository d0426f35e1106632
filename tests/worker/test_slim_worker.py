"""A worker that has only requirements-worker-cpu.txt installed serves the shipped model.

The worker runs in a fresh interpreter where every installed package outside the slim
requirements (and what they depend on) is made unimportable, as in an install made from that
file alone: no TensorFlow, Keras, scipy or scikit-learn. It processes a real study through the
pipeline on the ONNX export of models/current, and its probability must be the Keras one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO, TEST_REDIS_URL
from tests.ml.reference_outputs import CURRENT, STORED

# Run inside the worker interpreter before anything else: a finder that refuses every top-level
# module whose distributions are all outside the slim requirements' dependency closure.
BLOCKER = r"""
import importlib.abc, importlib.metadata as md, re, sys
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
wanted = [norm(l.split("#")[0].split("==")[0].split("[")[0].strip())
          for l in open("requirements-worker-cpu.txt") if l.split("#")[0].strip()]
closure, todo = set(), list(wanted)
while todo:
    name = todo.pop()
    if name in closure:
        continue
    closure.add(name)
    try:
        requires = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    for req in requires:
        if "extra ==" not in req:
            todo.append(norm(re.match(r"[A-Za-z0-9_.\-]+", req).group(0)))
BLOCKED = {top for top, dists in md.packages_distributions().items()
           if not any(norm(d) in closure for d in dists)}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is not in requirements-worker-cpu.txt")
sys.meta_path.insert(0, Refuse())
"""


@pytest.fixture(scope="module")
def shipped_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of models/current with its ONNX export (made where TensorFlow is installed)."""
    from ml.export import export_onnx

    model_dir = tmp_path_factory.mktemp("shipped") / CURRENT.resolve().name
    shutil.copytree(CURRENT.resolve(), model_dir)
    export_onnx(model_dir)
    return model_dir


def test_slim_worker_serves_the_shipped_model(shipped_onnx: Path, tmp_path: Path) -> None:
    queue = f"slim-worker-{uuid.uuid4().hex[:8]}"
    reference = json.loads(STORED.read_text())["images"][0]
    fixture = FIXTURES / reference["file"]
    code = BLOCKER + f"""
import io, sys
for name in ("tensorflow", "keras", "scipy", "sklearn"):
    try:
        __import__(name)
        raise SystemExit(name + " is importable: the blocker does not work")
    except ModuleNotFoundError:
        pass
from flask_migrate import upgrade
from werkzeug.datastructures import FileStorage
from webapp import create_app
from webapp.extensions import db
from webapp.models import Prediction
from webapp.uploads import create_study
app = create_app({{"SQLALCHEMY_DATABASE_URI": "sqlite:///{tmp_path}/w.db",
                  "MODEL_DIR": {str(shipped_onnx)!r}, "INFERENCE_BACKEND": "auto",
                  "CELERY": {{"broker_url": "{TEST_REDIS_URL}", "task_default_queue": "{queue}"}}}})
with app.app_context():
    upgrade()
    data = open({str(fixture)!r}, "rb").read()
    study = create_study([FileStorage(io.BytesIO(data), filename="x.png")])
    from worker import pipeline
    assert pipeline.run_study(study.id) == "succeeded"
    [row] = db.session.query(Prediction).all()
    print("RESULT", row.backend, row.model_version, repr(row.probability_covid), bool(row.heatmap_cam))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    import redis

    redis.Redis.from_url(TEST_REDIS_URL).delete(queue)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    _, backend, version, probability, heatmap = line.split()
    assert backend == "onnx" and heatmap == "True"
    assert version == json.loads(STORED.read_text())["model_version"]
    assert float(probability) == pytest.approx(reference["probability"], abs=1e-5)
