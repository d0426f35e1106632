"""About this model: the served model's card as a page and as JSON, linked from results."""

from __future__ import annotations

import shutil
from pathlib import Path

from ml.artifact import read_metadata
from tests.conftest import REPO

CARD = """# Model card

Research use only. Not for diagnosis.

| split | AUROC |
|---|---|
| internal test | 0.978 |

Reports: [held-out](../../docs/experiments/x/report.md), see also [the paper](https://example.org/p).

<script>alert(1)</script>
"""


def _with_card(app, tiny_model_dir: Path, tmp_path: Path, text: str = CARD) -> Path:
    model_dir = tmp_path / "carded"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "MODEL_CARD.md").write_text(text)
    app.config["MODEL_DIR"] = str(model_dir)
    return model_dir


def test_page_renders_the_card_without_raw_html(app, client, tiny_model_dir, tmp_path):
    _with_card(app, tiny_model_dir, tmp_path)
    page = client.get("/model")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "<table>" in html and "<td>0.978</td>" in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    # A repository path is shown as text; a web link stays a link.
    assert 'title="../../docs/experiments/x/report.md"' in html
    assert 'href="../../docs/experiments' not in html
    assert 'href="https://example.org/p"' in html
    assert read_metadata(tiny_model_dir).model_version in html


def test_page_says_when_the_model_has_no_card(client):
    html = client.get("/model").get_data(as_text=True)
    assert "No model card to show" in html and "ships no MODEL_CARD.md" in html


def test_api_gives_the_card_and_its_url(app, client, tiny_model_dir, tmp_path):
    _with_card(app, tiny_model_dir, tmp_path)
    body = client.get("/api/v1/model").get_json()
    assert body["model_card_url"] == "/model" and body["model_card"] == CARD
    assert body["model_version"] == read_metadata(tiny_model_dir).model_version
    assert body["notice"] == "Research use only. Not for diagnosis."


def test_api_without_a_model_is_503_with_a_reason(app, client, tmp_path):
    app.config["MODEL_DIR"] = str(tmp_path / "nothing")
    response = client.get("/api/v1/model")
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "no_model"


def test_the_shipped_card_renders(app, client):
    app.config["MODEL_DIR"] = str(REPO / "models" / "current")
    html = client.get("/model").get_data(as_text=True)
    assert "Research use only" in html and read_metadata(REPO / "models" / "current").model_version in html
    assert "<h2>" in html and "<table>" in html


def test_signed_out_visitors_do_not_see_it(anon_client):
    assert anon_client.get("/model").status_code in (302, 401)
    assert anon_client.get("/api/v1/model").status_code == 401


def test_a_result_links_to_the_card_of_its_model(app, client, clinician_id, tiny_model_dir):
    from tests.webapp.rows import add_study

    version = read_metadata(tiny_model_dir).model_version
    with app.app_context():
        study_id = add_study(clinician_id, model_version=version)
    body = client.get(f"/api/v1/studies/{study_id}").get_json()
    [result] = [i["result"] for i in body["images"] if i["result"]]
    assert result["model_card_url"] == f"/model?version={result['model_version']}"
    html = client.get(result["model_card_url"]).get_data(as_text=True)
    assert "About this model" in html
    assert "no longer served" not in html
    html = client.get("/model?version=resnet50-cxr-old").get_data(as_text=True)
    assert "produced by model resnet50-cxr-old, which is no longer served" in html


def test_a_result_of_the_int8_variant_is_described_as_such(app, client, tiny_model_dir, tmp_path):
    import json

    from ml.artifact import sha256_file
    from ml.backends import INT8_FILE, INT8_INFO_FILE

    model_dir = _with_card(app, tiny_model_dir, tmp_path)
    meta = read_metadata(model_dir)
    (model_dir / INT8_FILE).write_bytes(b"int8 stand-in")
    info = {"file": INT8_FILE, "sha256": sha256_file(model_dir / INT8_FILE),
            "weights_sha256": meta.weights_sha256, "parity": {"passed": False},
            "serving": {"model_version": meta.model_version + "+int8", "threshold": 0.2467}}
    (model_dir / INT8_INFO_FILE).write_text(json.dumps(info))
    html = client.get(f"/model?version={meta.model_version}%2Bint8").get_data(as_text=True)
    assert "int8 variant" in html and "0.2467" in html and "no longer served" not in html
    # A "+int8" version the artifact does not serve (its variant was re-exported since) is old.
    info["serving"]["model_version"] = meta.model_version + "+int8-other"
    (model_dir / INT8_INFO_FILE).write_text(json.dumps(info))
    html = client.get(f"/model?version={meta.model_version}%2Bint8").get_data(as_text=True)
    assert "no longer served" in html and 'id="variant"' not in html
