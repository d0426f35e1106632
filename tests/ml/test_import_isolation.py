"""The web process imports parts of ml/ and must never pull in TensorFlow or a web framework."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ["flask", "celery", "sqlalchemy"]
ML_FRAMEWORKS = ["tensorflow", "keras"]


def _loaded_after_import(modules: list[str]) -> set[str]:
    """Import modules in a fresh interpreter and return the top-level packages it then holds."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _web_side_modules() -> list[str]:
    modules = ["ml", "ml.preprocess", "ml.artifact", "ml.predictor"]
    # ml.imaging is written separately; check it too once it exists.
    if importlib.util.find_spec("ml.imaging") is not None:
        modules.append("ml.imaging")
    return modules


def test_web_side_modules_do_not_load_tensorflow_or_frameworks() -> None:
    loaded = _loaded_after_import(_web_side_modules())
    assert loaded.isdisjoint(ML_FRAMEWORKS + FRAMEWORKS), loaded & set(ML_FRAMEWORKS + FRAMEWORKS)


def test_model_modules_do_not_load_web_frameworks() -> None:
    loaded = _loaded_after_import(["ml.model", "ml.predictor", "ml.experiments.gradcam"])
    assert "tensorflow" in loaded or "keras" in loaded  # the check below is not vacuous
    assert loaded.isdisjoint(FRAMEWORKS), loaded & set(FRAMEWORKS)


def test_pack_reading_side_needs_neither_tensorflow_nor_pydicom() -> None:
    # ml.training.portable runs on GPU hosts with another Keras backend and no pydicom: what
    # it imports besides Keras (reading packs, sampling) must not pull either in.
    loaded = _loaded_after_import(["ml.training.pack", "ml.training.data", "ml.artifact"])
    assert loaded.isdisjoint(["tensorflow", "keras", "pydicom"]), loaded


def test_web_and_worker_never_import_training_evaluation_or_experiments() -> None:
    code = (
        "import json, sys\n"
        "import webapp, worker.celery_app, worker.pipeline, worker.tasks\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ml'))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ml.predictor" in loaded  # the worker's serving side is there: the check is not vacuous
    assert not [m for m in loaded if m.split(".")[1:2] in (["training"], ["evaluation"], ["experiments"])]
