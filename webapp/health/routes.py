"""/healthz says the process is up; /readyz says whether a study would get a result."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from ml.artifact import ArtifactError, read_metadata
from ml.gate import Gate
from webapp.broker import redis_client, workers_online
from webapp.extensions import db

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    """The process answers."""
    return jsonify({"status": "ok"})


def _check_database() -> dict[str, Any]:
    try:
        db.session.execute(text("SELECT 1"))
        return {"ok": True}
    except Exception as exc:
        db.session.rollback()
        return {"ok": False, "message": f"database unreachable ({type(exc).__name__})"}


def _check_broker() -> dict[str, Any]:
    try:
        redis_client().ping()
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "message": f"broker unreachable ({type(exc).__name__})"}


def _check_model() -> dict[str, Any]:
    try:
        meta = read_metadata(current_app.config["MODEL_DIR"])
        gate = Gate.load(current_app.config["MODEL_DIR"], meta)
        if gate is None:  # workers refuse such a model: every study would fail no_gate
            raise ArtifactError("no_gate", "the model has no input gate (gate.json)")
    except ArtifactError as exc:
        message = "no model installed" if exc.code == "no_model" else exc.message
        return {"ok": False, "message": message}
    return {"ok": True, "model_version": meta.model_version, "trained": meta.trained,
            "gate_version": gate.version}


def _check_workers(broker_ok: bool) -> dict[str, Any]:
    if not broker_ok:
        return {"ok": False, "count": 0, "message": "broker unreachable"}
    try:
        names = workers_online()
    except Exception as exc:
        return {"ok": False, "count": 0, "message": f"ping failed ({type(exc).__name__})"}
    if not names:
        return {"ok": False, "count": 0, "message": "no worker answered"}
    return {"ok": True, "count": len(names), "workers": names}


@bp.get("/readyz")
def readyz() -> Any:
    """200 when database, broker, model and a worker are all there; 503 naming what is missing."""
    checks = {"database": _check_database(), "broker": _check_broker(), "model": _check_model()}
    checks["workers"] = _check_workers(checks["broker"]["ok"])
    ready = all(c["ok"] for c in checks.values())
    response = jsonify({"ready": ready, "checks": checks})
    response.status_code = 200 if ready else 503
    return response
