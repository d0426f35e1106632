"""The shipped model's predictions are the same as when tests/fixtures/reference_outputs.json was stored."""

from __future__ import annotations

import json

import pytest

from tests.ml.reference_outputs import STORED, compute, isa


@pytest.fixture(scope="module")
def outputs() -> tuple[dict, dict]:
    return json.loads(STORED.read_text()), compute()


def test_preprocessing_is_bit_for_bit_the_stored_one(outputs):
    stored, now = outputs
    assert now["model_version"] == stored["model_version"]
    assert [i["input_sha256"] for i in now["images"]] == [
        i["input_sha256"] for i in stored["images"]
    ]


def test_probabilities_and_cams_match_the_stored_ones(outputs):
    stored, now = outputs
    if now["isa"] == stored["isa"]:
        # Same instruction set: the very same bits.
        for a, b in zip(now["images"], stored["images"], strict=True):
            assert (a["probability"], a["cam_sha256"]) == (b["probability"], b["cam_sha256"])
    else:
        # Another CPU may round float32 convolutions differently; the answer must not move.
        for a, b in zip(now["images"], stored["images"], strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
            assert a["cam_sum"] == pytest.approx(b["cam_sum"], rel=1e-4, abs=1e-3)
    assert isa() == now["isa"]
