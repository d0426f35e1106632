"""Images the input gate abstained on: shown in plain words without a reading, counted by reason."""

from __future__ import annotations

from sqlalchemy import select

from tests.webapp.rows import add_study
from webapp.extensions import db
from webapp.models import Image, Prediction


def _abstain(study_id: str, position: int, reason: str) -> None:
    """Mark one image's prediction as the gate's abstention, as the worker writes it."""
    prediction = db.session.scalars(
        select(Prediction).join(Image).where(Image.study_id == study_id, Image.position == position)
    ).one()
    prediction.label, prediction.abstain_reason = "indeterminate", reason
    prediction.gate_version, prediction.heatmap_png = "gate-1-test", None
    db.session.commit()


def _study(app, owner_id: int, **kwargs) -> str:
    with app.app_context():
        study_id = add_study(owner_id, predictions=[(0.91, "covid"), (0.7734, "covid")], **kwargs)
        _abstain(study_id, 1, "not_frontal")
    return study_id


def test_api_gives_the_reason_and_no_probability(app, client, clinician_id):
    study_id = _study(app, clinician_id)
    body = client.get(f"/api/v1/studies/{study_id}").get_json()
    answered, abstained = (image["result"] for image in body["images"])
    assert answered["label"] == "covid" and answered["abstain_reason"] is None
    assert answered["probability_covid"] == 0.91 and answered["heatmap_url"]
    assert abstained["label"] == "indeterminate" and abstained["abstain_reason"] == "not_frontal"
    assert abstained["probability_covid"] is None and abstained["heatmap_url"] is None
    assert "lateral (side) view" in abstained["abstain_message"]
    assert abstained["gate_version"] == "gate-1-test"


def test_page_says_why_and_never_shows_the_probability(app, client, clinician_id):
    study_id = _study(app, clinician_id)
    page = client.get(f"/studies/{study_id}").data.decode()
    assert "No COVID-19 result for this image" in page and "lateral (side) view" in page
    assert "No COVID-19 result:" not in page  # said once, not repeated by the message
    assert page.count("reads frontal") == 1  # and what the model reads, once
    assert "0.773" not in page  # the kept probability is not a reading
    assert page.count('class="heatmap"') == 1
    # The preview is captioned as what was sent, not as an X-ray: a CT slice may be under it.
    assert "<figcaption>X-ray</figcaption>" not in page and "As uploaded" in page


def test_dashboard_and_metrics_count_abstentions_by_reason_and_version(app, admin_client, clinician_id):
    _study(app, clinician_id, model_version="v-a")
    _study(app, clinician_id, model_version="v-a")
    _study(app, clinician_id, model_version="v-b", pcr_result="negative")
    data = admin_client.get("/admin/dashboard.json").get_json()
    assert data["abstentions"] == [
        {"model_version": "v-a", "reason": "not_frontal", "count": 2},
        {"model_version": "v-b", "reason": "not_frontal", "count": 1},
    ]
    models = {m["model_version"]: m for m in data["model_versions"]}
    assert models["v-a"]["abstained"] == 2 and models["v-a"]["covid_share"] == 1.0
    # The graded study's score is its answered image's probability, not the abstained one's.
    assert data["performance"]["overall"]["n"] == 1
    text = admin_client.get("/metrics").data.decode()
    assert 'covidcxr_abstentions_total{model_version="v-a",reason="not_frontal"} 2.0' in text
    page = admin_client.get("/admin/").data.decode()
    assert 'id="abstentions"' in page and "not_frontal" in page
