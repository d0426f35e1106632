"""The dashboard and /metrics agree with the rows: every expected number is computed here from what was inserted."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import roc_auc_score
from sqlalchemy import func, select

from tests.webapp.rows import add_study
from webapp import stats
from webapp.extensions import db
from webapp.models import Study, utcnow

# minutes ago created, status, queue wait s, run s, [(probability, label)], error, pcr, model
SPECS = [
    (10, "succeeded", 2, 1, [(0.9, "covid")], None, "positive", "v1"),
    (12, "succeeded", 4, 1, [(0.3, "non-covid"), (0.7, "covid")], None, "positive", "v1"),
    (14, "succeeded", 6, 1, [(0.2, "non-covid")], None, "negative", "v1"),
    (300, "succeeded", 8, 1, [(0.6, "covid")], None, "negative", "v2"),
    (320, "succeeded", 10, 1, [(0.4, "non-covid")], None, "positive", "v2"),
    (3 * 1440, "succeeded", 12, 1, [(0.1, "non-covid")], None, "unknown", "v2"),
    (20, "failed", 1, 1, [(0, "")], "corrupt_image", None, ""),
    (25, "failed", 1, 1, [(0, "")], "no_model", None, ""),
    (310, "failed", 1, 1, [(0, "")], "corrupt_image", None, ""),
    (1, "queued", 0, 0, [(0, "")], None, None, ""),
    (2, "running", 1, 0, [(0, "")], None, None, ""),
]


def inference_ms(i: int) -> float:
    return 100.0 * (i + 1)


@pytest.fixture
def rows(app, clinician_id):
    """SPECS inserted for the default clinician, timed against one 'now'."""
    now = utcnow()
    with app.app_context():
        for i, (ago, status, wait, run, preds, error, pcr, version) in enumerate(SPECS):
            add_study(clinician_id, status=status, created=now - timedelta(minutes=ago), queue_wait_s=wait,
                      run_s=run, predictions=preds, error_code=error, pcr_result=pcr, model_version=version,
                      inference_ms=inference_ms(i))
    return now


def finished_within(minutes: float) -> list[tuple]:
    """SPECS rows that finished within the last `minutes` (all finish within a minute of creation)."""
    return [s for s in SPECS if s[1] in ("succeeded", "failed") and s[0] < minutes]


def test_dashboard_numbers_match_the_rows(app, admin_client, rows):
    d = admin_client.get("/admin/dashboard.json?window=day").get_json()
    with app.app_context():
        by_status = dict(db.session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
    assert {k: d["studies"][k] for k in by_status} == by_status
    assert d["studies"]["pending"] == by_status["queued"] + by_status["running"]

    for window, minutes in (("hour", 60), ("day", 1440)):
        done = finished_within(minutes)
        t = d["throughput"][window]
        assert t["total_succeeded"] == sum(s[1] == "succeeded" for s in done)
        assert t["total_failed"] == sum(s[1] == "failed" for s in done)
        assert t["per_minute"] == pytest.approx(len(done) / minutes)
        assert sum(t["succeeded"]) == t["total_succeeded"]
    assert d["throughput"]["hour"]["total_succeeded"] == 3 and d["throughput"]["hour"]["total_failed"] == 2

    day = finished_within(1440)
    waits = [s[2] for s in day]
    e2e = [s[2] + s[3] for s in day if s[1] == "succeeded"]
    inference = [inference_ms(SPECS.index(s)) / 1000 for s in day if s[1] == "succeeded" for _ in s[4]]
    for key, values in (("queue_wait_s", waits), ("end_to_end_s", e2e), ("inference_s", inference)):
        got = d["latency"][key]
        assert got["n"] == len(values), key
        for q in (50, 95, 99):
            assert got[f"p{q}"] == pytest.approx(np.percentile(values, q), abs=1e-3), (key, q)

    reasons: dict[str, int] = {}
    for s in day:
        if s[5]:
            reasons[s[5]] = reasons.get(s[5], 0) + 1
    assert {f["reason"]: f["count"] for f in d["failures"]} == reasons == {"corrupt_image": 2, "no_model": 1}

    versions: dict[str, list[str]] = {}
    for s in day:
        if s[1] == "succeeded":
            versions.setdefault(s[7], []).extend(label for _, label in s[4])
    assert {m["model_version"]: (m["predictions"], m["covid_share"]) for m in d["model_versions"]} == {
        v: (len(labels), labels.count("covid") / len(labels)) for v, labels in versions.items()
    }
    all_labels = [label for labels in versions.values() for label in labels]
    assert (d["drift"]["total"], d["drift"]["total_covid"]) == (len(all_labels), all_labels.count("covid"))


def test_live_sensitivity_specificity_and_auroc_match_the_rows(admin_client, rows):
    graded = [s for s in SPECS if s[1] == "succeeded" and s[6] in ("positive", "negative")]
    truth = [s[6] == "positive" for s in graded]
    flagged = [any(label == "covid" for _, label in s[4]) for s in graded]
    scores = [max(p for p, _ in s[4]) for s in graded]
    tp = sum(t and f for t, f in zip(truth, flagged, strict=True))
    fn = sum(t and not f for t, f in zip(truth, flagged, strict=True))
    tn = sum(not t and not f for t, f in zip(truth, flagged, strict=True))
    fp = sum(not t and f for t, f in zip(truth, flagged, strict=True))
    perf = admin_client.get("/admin/dashboard.json").get_json()["performance"]
    o = perf["overall"]
    assert (o["tp"], o["fn"], o["tn"], o["fp"], o["n"]) == (tp, fn, tn, fp, len(graded)) == (2, 1, 1, 1, 5)
    assert o["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert o["specificity"] == pytest.approx(tn / (tn + fp))
    assert o["auroc"] == pytest.approx(roc_auc_score(truth, scores))
    lo, hi = o["sensitivity_ci"]
    assert lo < o["sensitivity"] < hi
    assert set(perf["by_model"]) == {"v1", "v2"} and perf["by_model"]["v1"]["n"] == 3
    assert perf["recorded"] == {"positive": 3, "negative": 2, "unknown": 1}


def test_dashboard_page_and_charts_render(admin_client, rows):
    page = admin_client.get("/admin/?window=day").data.decode()
    assert 'id="completed-hour">5<' in page and 'id="completed-day">8<' in page
    for window in ("hour", "day"):
        chart = admin_client.get(f"/admin/charts/throughput-{window}.svg")
        assert chart.status_code == 200 and chart.mimetype == "image/svg+xml" and b"<svg" in chart.data
    assert admin_client.get("/admin/charts/drift-week.svg").data.startswith(b"<?xml")
    assert admin_client.get("/admin/?window=year").status_code == 400


def test_metrics_in_prometheus_format_match_the_rows(anon_client, rows):
    text = anon_client.get("/metrics").data.decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }
    finished = [s for s in SPECS if s[1] in ("succeeded", "failed")]
    succeeded = [s for s in finished if s[1] == "succeeded"]
    assert samples[("covidcxr_studies_completed_total", (("status", "succeeded"),))] == len(succeeded)
    assert samples[("covidcxr_studies_completed_total", (("status", "failed"),))] == len(finished) - len(succeeded)
    assert samples[("covidcxr_studies_pending", (("status", "queued"),))] == 1
    assert samples[("covidcxr_study_failures_total", (("reason", "corrupt_image"),))] == 2
    assert samples[("covidcxr_predictions_total", (("label", "covid"), ("model_version", "v1")))] == 2
    assert samples[("covidcxr_queue_wait_seconds_count", ())] == len(finished)
    assert samples[("covidcxr_queue_wait_seconds_sum", ())] == pytest.approx(sum(s[2] for s in finished), abs=0.01)
    assert samples[("covidcxr_queue_wait_seconds_bucket", (("le", "5.0"),))] == sum(s[2] <= 5 for s in finished)
    assert samples[("covidcxr_end_to_end_seconds_count", ())] == len(succeeded)
    assert samples[("covidcxr_end_to_end_seconds_sum", ())] == pytest.approx(
        sum(s[2] + s[3] for s in succeeded), abs=0.01)
    n_predictions = sum(len(s[4]) for s in succeeded)
    assert samples[("covidcxr_inference_seconds_count", ())] == n_predictions
    assert samples[("covidcxr_model_performance", (("metric", "sensitivity"),))] == pytest.approx(2 / 3)
    assert samples[("covidcxr_ground_truth_studies_total", (("cell", "fp"),))] == 1
    assert ("covidcxr_queue_depth", ()) in samples


def test_auroc_and_wilson_against_known_values():
    assert stats.auroc([True, True, False, False], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.875)
    assert stats.auroc([True, False], [0.3, 0.3]) == 0.5
    assert stats.auroc([True, True], [0.1, 0.2]) is None
    lo, hi = stats.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert stats.wilson(0, 0) is None
