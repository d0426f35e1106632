"""Which radiographs the input gate is fitted on (ml.training.gate_data), on the shipped split."""

from __future__ import annotations

import collections
from pathlib import Path

from ml.training.gate import TRAIN_ONLY_SOURCES
from ml.training.gate_data import all_samples

REPO = Path(__file__).resolve().parents[3]
CXR, OOD = REPO.parent / "shared" / "data" / "cxr", REPO.parent / "shared" / "data" / "ood"


def _fit_radiographs(**kwargs) -> collections.Counter:
    samples = all_samples(REPO / "models" / "current", CXR, OOD, keep_sources=TRAIN_ONLY_SOURCES,
                          **kwargs)
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys))  # nothing twice
    return collections.Counter(s.source for s in samples if s.kind == "frontal" and s.split == "train")


def test_min_per_source_tops_up_small_sources_only() -> None:
    uniform, topped = _fit_radiographs(), _fit_radiographs(min_per_source=160)
    for source, n in uniform.items():
        if source in TRAIN_ONLY_SOURCES or n >= 160:
            assert topped[source] == n, source  # untouched
        else:
            assert n < topped[source] == 160, source  # topped up, by hash: the same every time
    assert _fit_radiographs(min_per_source=160) == topped
