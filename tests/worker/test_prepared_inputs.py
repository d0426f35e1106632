"""Model inputs prepared at intake (ml/prepared.py): stored with the upload, read by the worker
instead of decoding the image again, the same results either way, dropped when the study is done."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from ml.artifact import read_metadata
from ml.gate import image_statistics
from ml.imaging import decode_image
from ml.prepared import decode, input_key
from ml.preprocess import preprocess_gray
from tests.conftest import real_xray_paths
from tests.dicom_objects import cxr_dataset, new_study
from tests.dicom_objects import encode as dicom_bytes
from tests.worker.test_pipeline import upload
from webapp.extensions import db
from webapp.models import Image, Prediction, PreparedInput
from worker import pipeline

RESULT_COLUMNS = ("probability_covid", "label", "threshold", "model_version", "abstain_reason",
                  "gate_version", "gate_frontal_probability", "gate_distance", "heatmap_cam")


def colour_jpeg() -> bytes:
    """A colourful photograph-like JPEG: its colourfulness reaches the gate from the upload."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def files() -> list[tuple[str, bytes]]:
    """Two frontal X-rays, a photograph, and a lateral DICOM film (de-identified on upload): its
    tags reach the gate from the stored row, as they do from a decode."""
    xrays = real_xray_paths(2)
    lateral = dicom_bytes(cxr_dataset(xrays[0], new_study(), view="LL"))
    return ([(p.name, p.read_bytes()) for p in xrays]
            + [("photo.jpg", colour_jpeg()), ("lateral.dcm", lateral)])


def prepared_rows(study_id: str) -> list[PreparedInput]:
    return list(db.session.scalars(select(PreparedInput).join(Image, Image.id == PreparedInput.image_id)
                                   .where(Image.study_id == study_id).order_by(Image.position)))


def results(study_id: str) -> list[tuple]:
    rows = db.session.scalars(select(Prediction).join(Image).where(Image.study_id == study_id)
                              .order_by(Image.position))
    return [tuple(getattr(r, c) for c in RESULT_COLUMNS) for r in rows]


def test_an_upload_stores_what_the_served_model_reads(app, client):
    study_id = upload(client, *files())
    with app.app_context():
        meta = read_metadata(app.config["MODEL_DIR"])
        rows = prepared_rows(study_id)
        assert len(rows) == 4 and all(r.key == input_key(meta) for r in rows)
        for (_, data), row in zip(files(), rows, strict=True):
            decoded = decode_image(data)
            prepared = decode(row.data, meta.input_size)
            assert np.array_equal(prepared.gray, preprocess_gray(
                decoded.pixels, meta.input_size, version=meta.preprocess_version))
            assert np.array_equal(prepared.statistics,
                                  image_statistics(decoded.pixels, decoded.attributes))
        assert decode(rows[2].data, meta.input_size).statistics[6] > 0  # colourfulness kept


def test_prepared_and_decoded_studies_get_the_same_results(app, client):
    prepared_id, decoded_id = upload(client, *files()), upload(client, *files())
    with app.app_context():
        for row in prepared_rows(decoded_id):
            db.session.delete(row)  # as if uploaded where the web had no model
        db.session.commit()
        assert pipeline.run_study(prepared_id) == "succeeded"
        assert pipeline.run_study(decoded_id) == "succeeded"
        assert results(prepared_id) == results(decoded_id)
        assert [r[4] for r in results(prepared_id)][3] == "not_frontal"  # from the stored tags


def test_the_worker_neither_reads_nor_decodes_the_uploads_of_a_prepared_study(app, client,
                                                                            monkeypatch):
    study_id = upload(client, *files())

    def refuse(what: str):
        def call(*args, **kwargs):
            raise AssertionError(what)
        return call

    monkeypatch.setattr(pipeline, "decode_image", refuse("decoded a prepared image"))
    monkeypatch.setattr(pipeline, "_uploads", refuse("read the uploaded files (megabytes each)"))
    with app.app_context():
        assert pipeline.run_study(study_id) == "succeeded"
        assert len(results(study_id)) == 4


def test_an_input_prepared_for_another_model_is_not_used(app, client, monkeypatch):
    """One image without a matching input (another model's key, or bytes of another size):
    the whole study is decoded, as one batch."""
    study_id, short_id = upload(client, *files()), upload(client, *files())
    calls = []
    monkeypatch.setattr(pipeline, "decode_image",
                        lambda *a, **k: calls.append(1) or decode_image(*a, **k))
    with app.app_context():
        prepared_rows(study_id)[1].key = "0:9:999"
        prepared_rows(short_id)[0].data = b"\0" * 64
        db.session.commit()
        assert pipeline.run_study(study_id) == "succeeded"
        assert pipeline.run_study(short_id) == "succeeded"
    assert len(calls) == 8


def test_without_a_model_at_upload_nothing_is_prepared(app, client, tmp_path):
    served = app.config["MODEL_DIR"]
    app.config["MODEL_DIR"] = str(tmp_path / "no-model-here")
    study_id = upload(client, *files())
    app.config["MODEL_DIR"] = served
    with app.app_context():
        assert prepared_rows(study_id) == []
        assert pipeline.run_study(study_id) == "succeeded"  # decoded by the worker
        assert len(results(study_id)) == 4


def test_a_site_may_turn_preparing_off(app, client):
    app.config["PREPARE_INPUTS"] = False
    study_id = upload(client, *files())
    with app.app_context():
        assert prepared_rows(study_id) == []
        assert pipeline.run_study(study_id) == "succeeded"


def test_the_sweeper_drops_the_inputs_of_finished_studies_only(app, client):
    done_id, waiting_id = upload(client, *files()), upload(client, *files())
    with app.app_context():
        assert pipeline.run_study(done_id) == "succeeded"
        assert pipeline.drop_prepared() == 4
        assert prepared_rows(done_id) == [] and len(prepared_rows(waiting_id)) == 4
        assert pipeline.drop_prepared() == 0
        assert db.session.scalars(select(Image).where(Image.study_id == done_id)).all()
        assert pipeline.run_study(waiting_id) == "succeeded"
