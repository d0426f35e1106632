"""Admin dashboard views; accounts and the audit log are in admin/users.py, the blueprint in admin/blueprint.py."""

from __future__ import annotations

from typing import Any

from flask import Response, abort, jsonify, render_template, request

from webapp import charts, monitoring, stats
from webapp.admin.blueprint import bp
from webapp.models import utcnow
from webapp.security import admin_required


def _window() -> str:
    window = request.args.get("window", "day")
    if window not in stats.WINDOWS:
        abort(400, description=f"window must be one of {', '.join(stats.WINDOWS)}")
    return window


def dashboard_data(window: str) -> dict[str, Any]:
    """Everything the dashboard shows, from the database and the broker."""
    now = utcnow()
    return {
        "generated_at": now.isoformat(),
        "window": window,
        "studies": stats.current_counts(),
        "throughput": {w: stats.throughput(w, now) for w in ("hour", "day")},
        "queue_depth": monitoring.queue_depth_now(),
        "workers": monitoring.workers(),
        "latency": stats.latency(window, now),
        "failures": stats.failures(window, now),
        "model_versions": stats.model_versions(window, now),
        "abstentions": stats.abstentions(window, now),
        "drift": stats.drift(window, now),
        "performance": stats.performance(),
        "reader": stats.reader_performance(),
    }


@bp.get("/")
@admin_required
def dashboard() -> Any:
    """Throughput, queue, workers, latency, failures, model versions, drift and live accuracy."""
    window = _window()
    return render_template("admin/dashboard.html", d=dashboard_data(window), windows=stats.WINDOWS)


@bp.get("/dashboard.json")
@admin_required
def dashboard_json() -> Any:
    """The dashboard's numbers as JSON (the page and this agree: one function makes both)."""
    return jsonify(dashboard_data(_window()))


@bp.get("/charts/throughput-<window>.svg")
@admin_required
def throughput_chart(window: str) -> Response:
    """Completed studies per minute over the last hour or day."""
    if window not in ("hour", "day"):
        abort(404)
    return Response(charts.throughput_svg(stats.throughput(window)), mimetype="image/svg+xml")


@bp.get("/charts/drift-<window>.svg")
@admin_required
def drift_chart(window: str) -> Response:
    """Share of COVID-positive predictions over time."""
    if window not in stats.WINDOWS:
        abort(404)
    return Response(charts.drift_svg(stats.drift(window), window), mimetype="image/svg+xml")
