"""ml/prepared.py: the stored form of a model input, and the batch made from it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ml.artifact import read_metadata
from ml.gate import STAT_NAMES, image_statistics
from ml.imaging import decode_image
from ml.prepared import decode, encode, input_key, model_batch, prepare
from ml.preprocess import preprocess_batch
from tests.conftest import real_xray_paths


def test_the_batch_from_prepared_inputs_is_the_predictors_own(tiny_model_dir):
    """Bit for bit what Predictor.preprocess makes of the decoded images, at any input size."""
    images = [decode_image(p.read_bytes()) for p in real_xray_paths(3)]
    tiny = read_metadata(tiny_model_dir)
    for meta in (tiny, replace(tiny, input_size=224)):
        stored = [encode(prepare(i.pixels, i.attributes, meta)) for i in images]
        prepared = [decode(data, meta.input_size) for data in stored]
        assert np.array_equal(model_batch(prepared), preprocess_batch(
            [i.pixels for i in images], size=meta.input_size, version=meta.preprocess_version))
        for image, p in zip(images, prepared, strict=True):
            assert p.gray.shape == (meta.input_size, meta.input_size)
            assert np.array_equal(p.statistics, image_statistics(image.pixels, image.attributes))
            assert len(p.statistics) == len(STAT_NAMES)


def test_bytes_of_another_shape_are_not_an_input(tiny_model_dir):
    meta = read_metadata(tiny_model_dir)
    data = encode(prepare(np.full((64, 64), 0.5, np.float32), None, meta))
    assert decode(data, meta.input_size) is not None
    assert decode(data, meta.input_size + 1) is None
    assert decode(data[:-4], meta.input_size) is None


def test_the_key_names_what_the_input_depends_on(tiny_model_dir):
    meta = read_metadata(tiny_model_dir)
    assert input_key(meta) == input_key(replace(meta, model_version="another"))
    assert input_key(meta) != input_key(replace(meta, input_size=meta.input_size * 2))
    other = "1" if meta.preprocess_version != "1" else "2"
    assert input_key(meta) != input_key(replace(meta, preprocess_version=other))
