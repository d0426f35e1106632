"""How much of the source each preprocessing version leaves for a shortcut to find.

    .venv/bin/python bench/source_cues.py [--size 64] [--held-out ieee8023-covid-chestxray]

For the raw decoded image and each ml.preprocess version, every image of the manifest is
decoded, preprocessed to --size px (serving code) and reduced to the thumbnail baseline's
32x32 features (ml.evaluation.baseline). Then, on the shipped model's patient-disjoint split:

- source balanced accuracy (mean recall over collections; chance 1/k): thumbnails ->
  collection, 5-fold cross-validated over all images, folds disjoint by patient (the test
  split alone holds too few collections per class); overall and within each class (the label is
  confounded with the source, so the within-class figures are the cue that a model could
  learn instead of the disease; within non-COVID it is mostly children vs adults, which no
  preprocessing should remove);
- thumbnail baseline AUROC (COVID vs not): internal (train -> test) and leave one source out
  (train without the held-out source and its patients -> all of its images), as
  ml.evaluation.evaluate computes it.

A version that removes source cues lowers within-class source accuracy; one that removes
them without the disease should also not raise the held-out baseline. This is a cheap screen
(about two minutes per version on two cores, no training); only a trained model's held-out
AUROC decides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ml.evaluation.baseline import (  # noqa: E402
    DEFAULT_C,
    ThumbnailBaseline,
    ThumbnailCache,
    logistic,
)
from ml.evaluation.evaluate import select_records  # noqa: E402
from ml.imaging import decode_image  # noqa: E402
from ml.preprocess import SUPPORTED_PREPROCESS_VERSIONS, preprocess_gray  # noqa: E402
from ml.training import data  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cxr"
SPLIT = ROOT / "models" / "current" / "split.csv"


def _source_cue(records: list, cache: ThumbnailCache) -> str:
    """Cross-validated balanced accuracy of thumbnails -> source, and how many sources."""
    sources = [r.source for r in records]
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    predicted = cross_val_predict(
        logistic(DEFAULT_C),
        cache.matrix(records),
        sources,
        groups=[r.patient_id or str(r.path) for r in records],
        cv=folds,
    )
    return f"{balanced_accuracy_score(sources, predicted):.3f} ({len(set(sources))})"


def _auroc(baseline: ThumbnailBaseline, train: list, test: list) -> float:
    baseline.fit(train)
    return float(roc_auc_score([r.target for r in test], baseline.predict_proba(test)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", default=str(DATA / "manifest.csv"))
    parser.add_argument("--split", default=str(SPLIT))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--held-out", default="ieee8023-covid-chestxray")
    args = parser.parse_args()

    records = data.load_manifest(args.manifest)
    split = data.read_split(args.split, records)
    train, test = split["train"], split["test"]
    mode = argparse.Namespace(
        subset="test", leave_one_source_out=args.held_out, split=args.split, manifest=args.manifest
    )
    held, loso_train, _ = select_records(mode, records, split)
    pixels = {r.path: decode_image(r.path.read_bytes()).pixels for r in records}
    print(
        f"{len(records)} images; split {args.split} (train {len(train)}, test {len(test)}); "
        f"held out {args.held_out} ({len(held)} images); preprocessed to {args.size} px"
    )

    header = (
        "| version | source bal. acc. (sources) | within non-COVID | within COVID "
        "| baseline AUROC internal | baseline AUROC held-out |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for version in ("raw", *SUPPORTED_PREPROCESS_VERSIONS):
        cache = ThumbnailCache()
        for path, image in pixels.items():
            if version != "raw":
                image = preprocess_gray(image, args.size, version=version) / np.float32(255.0)
            cache.put(path, image)
        cues = [_source_cue(records, cache)]
        cues += [_source_cue([r for r in records if r.target == t], cache) for t in (0, 1)]
        baseline = ThumbnailBaseline(cache=cache)
        internal = _auroc(baseline, train, test)
        loso = _auroc(baseline, loso_train, held)
        print(f"| {version} | {' | '.join(cues)} | {internal:.3f} | {loso:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
