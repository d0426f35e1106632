"""The input gate end to end: the served model and its gate in a real worker, read back by API and page.

A lateral X-ray, a CT slice, a photograph and noise each end "indeterminate" with their
reason; a frontal radiograph in the same study still gets its label. A model without a
gate is refused: its studies fail with `no_gate`.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.gate import GATE_FILE
from tests.conftest import CXR_DIR, REPO

pytestmark = pytest.mark.integration

CURRENT = REPO / "models" / "current"
OOD_DIR = CXR_DIR.parent / "ood"
# Held-out images (test split of the model, test patients of the OOD set).
FRONTAL = CXR_DIR / "images/normal/darkcovidnet__00001401_001.png"
LATERAL = OOD_DIR / "images/lateral_xray/ieee8023__pneumocystis-jiroveci-pneumonia-4-L.png"
CT = OOD_DIR / "images/ct/ieee8023__kjr-21-e24-g002-l-c.png"


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _uploads() -> dict[str, tuple[str, bytes]]:
    from skimage.data import astronaut

    noise = (np.random.default_rng(7).random((512, 512)) * 255).astype(np.uint8)
    return {
        "frontal": (FRONTAL.name, FRONTAL.read_bytes()),
        "lateral": (LATERAL.name, LATERAL.read_bytes()),
        "ct": (CT.name, CT.read_bytes()),
        "photo": ("astronaut.jpg", _encoded(astronaut(), "JPEG")),
        "noise": ("noise.png", _encoded(noise, "PNG")),
    }


EXPECTED = {"lateral": "not_frontal", "ct": "other_modality", "photo": "not_chest_xray",
            "noise": "not_chest_xray"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_non_frontal_images_are_indeterminate_with_their_reason(stack_factory, database_url):
    stack = stack_factory(database_url, CURRENT)
    uploads = _uploads()
    study = stack.upload(*uploads.values(), patient_ref="GATE-1")
    body = stack.wait(study["id"], timeout=300)
    assert body["status"] == "succeeded", body
    results = {kind: image["result"] for kind, image in zip(uploads, body["images"], strict=True)}
    frontal = results.pop("frontal")
    assert frontal["label"] in ("covid", "non-covid") and frontal["abstain_reason"] is None
    assert 0.0 <= frontal["probability_covid"] <= 1.0 and frontal["gate_version"].startswith("gate-")
    for kind, result in results.items():
        assert result["label"] == "indeterminate", (kind, result)
        assert result["abstain_reason"] == EXPECTED[kind], (kind, result)
        assert result["probability_covid"] is None and result["heatmap_url"] is None
        assert result["abstain_message"].startswith("No COVID-19 result")

    page = stack.get(body["page_url"])
    assert page.ok
    assert page.text.count("No COVID-19 result for this image") == 4
    assert "looks like a lateral (side) view" in page.text
    assert "does not look like a chest X-ray" in page.text
    assert page.text.count('class="heatmap"') == 1  # only the frontal image has one

    metrics = stack.get("/metrics").text
    version = frontal["model_version"]
    assert f'covidcxr_abstentions_total{{model_version="{version}",reason="not_chest_xray"}} 2.0' in metrics
    assert f'covidcxr_predictions_total{{label="indeterminate",model_version="{version}"}} 4.0' in metrics


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_model_without_a_gate_is_refused_by_the_worker(stack_factory, database_url, tiny_model_dir,
                                                         tmp_path: Path):
    ungated = tmp_path / "ungated"
    shutil.copytree(tiny_model_dir, ungated)
    (ungated / GATE_FILE).unlink()
    stack = stack_factory(database_url, ungated)
    body = stack.wait(stack.upload((FRONTAL.name, FRONTAL.read_bytes()))["id"])
    assert body["status"] == "failed"
    assert body["error"]["code"] == "no_gate" and "ml.training.gate" in body["error"]["message"]
    assert stack.worker.poll() is None
