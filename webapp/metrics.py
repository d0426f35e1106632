"""GET /metrics in Prometheus format, computed from the database at scrape time.

The database is the truth and every gunicorn worker reads the same rows, so
any process answers the same numbers and nothing is lost on restart. The
histograms count every finished study (bucket counts are one SQL query each).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, abort, current_app
from flask_login import current_user
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select

from webapp import monitoring, stats
from webapp.extensions import db
from webapp.jobs import StudyStatus
from webapp.models import AuditEvent, Prediction, Study

bp = Blueprint("metrics", __name__)

WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def seconds_between(later: Any, earlier: Any) -> Any:
    """SQL for (later - earlier) in seconds, on SQLite and PostgreSQL."""
    if db.engine.dialect.name == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return func.extract("epoch", later - earlier)


def _histogram(name: str, doc: str, value: Any, where: list[Any], buckets: tuple) -> HistogramMetricFamily:
    columns = [func.sum(case((value <= b, 1), else_=0)) for b in buckets]
    row = db.session.execute(
        select(*columns, func.count(), func.coalesce(func.sum(value), 0.0)).where(*where)
    ).one()
    *counts, total, total_sum = row
    family = HistogramMetricFamily(name, doc)
    family.add_metric(
        [], [(str(float(b)), int(c or 0)) for b, c in zip(buckets, counts, strict=True)]
        + [("+Inf", int(total))], float(total_sum or 0.0)
    )
    return family


class DatabaseCollector:
    """Counters, gauges and histograms read from the rows on every scrape."""

    def collect(self) -> Iterator[Any]:
        statuses = stats.current_counts()
        pending = GaugeMetricFamily("covidcxr_studies_pending", "Studies waiting or running now", labels=["status"])
        done = CounterMetricFamily("covidcxr_studies_completed", "Studies finished, by final status", labels=["status"])
        for status in StudyStatus:
            target = done if status in (StudyStatus.SUCCEEDED, StudyStatus.FAILED) else pending
            target.add_metric([status.value], statuses[status.value])
        yield pending
        yield done

        failures = CounterMetricFamily("covidcxr_study_failures", "FAILED studies by reason", labels=["reason"])
        for code, n in db.session.execute(
            select(Study.error_code, func.count()).where(Study.status == StudyStatus.FAILED)
            .group_by(Study.error_code)
        ):
            failures.add_metric([code or "unknown"], n)
        yield failures

        predictions = CounterMetricFamily(
            "covidcxr_predictions", "Image predictions by model version and label",
            labels=["model_version", "label"],
        )
        for version, label, n in db.session.execute(
            select(Prediction.model_version, Prediction.label, func.count())
            .group_by(Prediction.model_version, Prediction.label)
        ):
            predictions.add_metric([version, label], n)
        yield predictions

        abstained = CounterMetricFamily(
            "covidcxr_abstentions", "Images the input gate gave no reading for, by model version and reason",
            labels=["model_version", "reason"],
        )
        for row in stats.abstentions():
            abstained.add_metric([row["model_version"], row["reason"]], row["count"])
        yield abstained

        wait = seconds_between(Study.started_at, Study.queued_at)
        yield _histogram("covidcxr_queue_wait_seconds", "Queue wait of finished studies (started - queued)",
                         wait, [Study.finished_at.is_not(None), Study.started_at.is_not(None)], WAIT_BUCKETS)
        yield _histogram("covidcxr_inference_seconds", "Model time per image",
                         Prediction.inference_ms / 1000.0, [], INFERENCE_BUCKETS)
        e2e = seconds_between(Study.finished_at, Study.created_at)
        yield _histogram("covidcxr_end_to_end_seconds", "Upload to result of succeeded studies",
                         e2e, [Study.status == StudyStatus.SUCCEEDED], WAIT_BUCKETS)

        perf = stats.performance()["overall"]
        truth = CounterMetricFamily("covidcxr_ground_truth_studies",
                                    "Graded studies (RT-PCR recorded) by confusion cell", labels=["cell"])
        for cell in ("tp", "fn", "tn", "fp"):
            truth.add_metric([cell], perf[cell])
        yield truth
        quality = GaugeMetricFamily("covidcxr_model_performance",
                                    "Live performance against RT-PCR outcomes", labels=["metric"])
        for metric in ("sensitivity", "specificity", "auroc"):
            if perf[metric] is not None:
                quality.add_metric([metric], perf[metric])
        yield quality

        events = CounterMetricFamily("covidcxr_audit_events", "Audit log entries by action", labels=["action"])
        for action, n in db.session.execute(
            select(AuditEvent.action, func.count()).group_by(AuditEvent.action)
        ):
            events.add_metric([action], n)
        yield events

        depth = monitoring.queue_depth_now()
        if depth is not None:
            yield GaugeMetricFamily("covidcxr_queue_depth", "Messages waiting in the studies queue", value=depth)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format (public unless METRICS_PUBLIC=0, then admins only)."""
    if not current_app.config["METRICS_PUBLIC"] and not current_user.is_admin:
        abort(403, description="metrics are for admins")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
