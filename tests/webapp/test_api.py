"""JSON API v1 against a real database and the real Redis broker."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
import redis
from PIL import Image as PILImage

from tests.conftest import TEST_REDIS_URL, png_bytes, post_files, real_xray_paths


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a gigapixel image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    buf = io.BytesIO()
    frames = [PILImage.new("L", (64, 64), v) for v in (0, 255)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def dicom_without_pixels() -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "DX"
    ds.PatientName = "Doe^John"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def queued_messages(queue: str) -> list[dict]:
    r = redis.Redis.from_url(TEST_REDIS_URL)
    return [json.loads(m) for m in r.lrange(queue, 0, -1)]


def test_upload_real_xray_is_stored_queued_and_enqueued(client, queue_name):
    path = real_xray_paths(1, "covid")[0]
    original = path.read_bytes()
    response = post_files(client, [(path.name, original)], patient_ref="P-001", accession="A17")
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["status"] == "queued"
    assert response.headers["Location"] == f"/api/v1/studies/{body['id']}"
    assert body["patient_ref"] == "P-001" and body["accession"] == "A17"
    with PILImage.open(path) as im:
        assert (body["images"][0]["width"], body["images"][0]["height"]) == im.size
    assert body["images"][0]["result"] is None
    assert "not for diagnosis" in body["notice"].lower()
    # The broker carries only the hint: the task name and the study id.
    messages = queued_messages(queue_name)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "worker.tasks.process_study"
    assert body["id"] in messages[0]["headers"]["argsrepr"]
    # The bytes round-trip unchanged.
    got = client.get(body["images"][0]["original_url"])
    assert got.status_code == 200 and got.data == original


def test_get_study_and_unknown_ids(client):
    response = post_files(client, [("a.png", png_bytes()), ("b.png", png_bytes((80, 40)))])
    study_id = response.get_json()["id"]
    got = client.get(f"/api/v1/studies/{study_id}")
    assert got.status_code == 200
    assert [i["position"] for i in got.get_json()["images"]] == [0, 1]
    for bad in ("00000000-0000-0000-0000-000000000000", "not-a-uuid", "../etc"):
        missing = client.get(f"/api/v1/studies/{bad}")
        assert missing.status_code == 404
        assert missing.get_json()["error"]["code"] == "not_found"


def test_list_is_paginated_and_filtered(client):
    ids = [post_files(client, [("x.png", png_bytes())], patient_ref=f"P{i}").get_json()["id"]
           for i in range(3)]
    first = client.get("/api/v1/studies?per_page=2").get_json()
    assert first["total"] == 3 and len(first["items"]) == 2 and first["next"]
    second = client.get(first["next"]).get_json()
    assert len(second["items"]) == 1 and second["next"] is None
    seen = {s["id"] for s in first["items"] + second["items"]}
    assert seen == set(ids)
    only = client.get("/api/v1/studies?patient_ref=P1").get_json()
    assert [s["id"] for s in only["items"]] == [ids[1]]
    assert client.get("/api/v1/studies?status=queued").get_json()["total"] == 3
    assert client.get("/api/v1/studies?status=succeeded").get_json()["total"] == 0
    for query in ("page=0", "page=x", "per_page=-1", "status=bogus"):
        bad = client.get(f"/api/v1/studies?{query}")
        assert bad.status_code == 400, query
        assert bad.get_json()["error"]["code"] == "invalid_query"


def _truncated_png() -> bytes:
    data = real_xray_paths(1)[0].read_bytes()
    return data[: len(data) // 2]


BAD_INPUTS = [
    ("empty.png", lambda: b"", 422, "empty_file"),
    ("half.png", _truncated_png, 422, "corrupt_image"),
    ("notes.png", lambda: b"hello, this is text not an image\n", 415, "unsupported_format"),
    ("report.pdf", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "unsupported_format"),
    ("bomb.png", bomb_png, 413, "too_many_pixels"),
    ("anim.gif", animated_gif, 415, "unsupported_format"),
    ("nopixels.dcm", dicom_without_pixels, 422, "dicom_no_pixel_data"),
    ("tiny.png", lambda: png_bytes((8, 8)), 422, "bad_dimensions"),
]


@pytest.mark.parametrize("name,make,status,code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_get_clear_errors_and_store_nothing(client, queue_name, name, make, status, code):
    good = png_bytes()
    response = post_files(client, [("good.png", good), (name, make())])
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code
    assert name in error["message"]  # says which file is wrong
    # All or nothing: the good file was not stored, nothing was enqueued.
    assert client.get("/api/v1/studies").get_json()["total"] == 0
    assert queued_messages(queue_name) == []


def test_missing_files_and_too_many_files(client, app):
    none = client.post("/api/v1/studies", data={}, content_type="multipart/form-data")
    assert none.status_code == 400 and none.get_json()["error"]["code"] == "no_files"
    app.config["MAX_FILES_PER_STUDY"] = 2
    many = post_files(client, [(f"{i}.png", png_bytes()) for i in range(3)])
    assert many.status_code == 400 and many.get_json()["error"]["code"] == "too_many_files"


def test_oversize_image_and_oversize_request(client, app):
    app.config["MAX_IMAGE_BYTES"] = 1000
    big = png_bytes((256, 256), "RGB")
    big = big + b"\0" * max(0, 1500 - len(big))
    response = post_files(client, [("big.png", big)])
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "too_large_bytes"
    app.config["MAX_CONTENT_LENGTH"] = 10_000
    response = post_files(client, [("big.png", b"\x89PNG" + b"\0" * 20_000)])
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"


def test_path_like_file_names_are_neutralised(client):
    response = post_files(client, [("../../etc/passwd.png", png_bytes())])
    assert response.status_code == 202
    name = response.get_json()["images"][0]["filename"]
    assert "/" not in name and ".." not in name and name.endswith("passwd.png")


def test_invalid_patient_reference_is_rejected(client):
    response = post_files(client, [("a.png", png_bytes())], patient_ref="<script>alert(1)</script>")
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "invalid_patient_ref"


def test_unknown_route_and_method_are_json_errors(client):
    assert client.get("/api/v1/nothing").get_json()["error"]["code"] == "not_found"
    wrong = client.delete("/api/v1/studies")
    assert wrong.status_code == 405 and wrong.get_json()["error"]["code"] == "method_not_allowed"


def test_media_routes(client):
    body = post_files(client, [("a.png", png_bytes((100, 50)))]).get_json()
    image = body["images"][0]
    preview = client.get(image["preview_url"])
    assert preview.status_code == 200 and preview.data.startswith(b"\x89PNG")
    assert "private" in preview.headers["Cache-Control"]
    heatmap = client.get(f"/studies/{body['id']}/images/{image['id']}/heatmap.png")
    assert heatmap.status_code == 404
    other = post_files(client, [("b.png", png_bytes())]).get_json()
    # An image id that belongs to another study is not found through this study.
    crossed = client.get(f"/studies/{other['id']}/images/{image['id']}/original")
    assert crossed.status_code == 404
