"""ml.experiments.gate_int8: the input gate's own network quantised to int8 (research only;
the figures are in docs/experiments/gate/README.md, sixth session)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.artifact import read_metadata
from ml.experiments import gate_int8
from ml.imaging import decode_image
from ml.preprocess import preprocess_batch
from tests.conftest import REPO, real_xray_paths

CURRENT = REPO / "models" / "current"


@dataclass(frozen=True)
class XraySample:
    """What quantise_network reads of a gate sample: its decoded pixels."""

    path: Path

    def load(self):
        decoded = decode_image(self.path.read_bytes())
        return decoded.pixels, decoded.attributes


def test_the_int8_network_is_smaller_and_reads_radiographs_like_the_float32_one(tmp_path):
    meta = read_metadata(CURRENT)
    block = json.loads((CURRENT / "gate.json").read_text())["features"]
    fp32 = CURRENT / block["file"]
    out = tmp_path / "gate_features.int8.onnx"
    samples = [XraySample(p) for p in real_xray_paths(6)]
    done = gate_int8.quantise_network(fp32, out, samples[:4], meta.input_size,
                                      meta.preprocess_version, images=4)
    assert done["kept_fp32"]  # the first convolution stays float32
    assert out.stat().st_size < fp32.stat().st_size / 2
    batch = preprocess_batch([s.load()[0] for s in samples[4:]], size=meta.input_size,
                             version=meta.preprocess_version)
    a = gate_int8.session(fp32, 1).run(None, {"image": batch})[0]
    b = gate_int8.session(out, 1).run(None, {"image": batch})[0]
    assert a.shape == b.shape == (2, block["dimensions"])
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert np.all(cosine > 0.9) and not np.allclose(a, b)  # close, but int8
