"""The input gate's own network (EfficientNet-Lite0) quantised to int8: cost and verdicts.

    python -m ml.experiments.gate_int8 --model DIR [--cache NPZ] [--calibration-images 256]

Research only; nothing here is served. The shipped gate runs its ImageNet network in float32
beside the classifier, costing about 7% of float32 inference at batch 8 but 11% at batch 1
and 13% of the int8 variant's (fifth session, AVX2). This quantises that network the way
`ml.export --int8` quantises the classifier (ml/training/quantize.py: folded batch norm,
percentile ranges from training radiographs, int8 weights per channel, uint8 activations, the
first convolution float32; Lite0's activations are ReLU6, exported as Clip, so there is no
equalisation) and measures:

- cost per image, one process, side by side: the float32 and int8 networks and the classifier
  (float32, and its int8 variant when the artifact has one) at batch 1, 4 and 8, on one thread
  (as a batcher lane runs it) and on all usable cores;
- parity: the shipped gate's verdicts on the int8 network's features against the float32
  network's, on every image of the gate's data (validation and test: each kind, each source);
- a gate refitted on the int8 features by the shipped recipe (thresholds on validation): its
  abstentions per kind and source, beside the shipped gate's.
Results: docs/experiments/gate/README.md ("Sixth session").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ml.experiments.gate_cv import shipped_features
from ml.experiments.gate_generic import best_ms
from ml.experiments.gate_variants import shipped_recipe
from ml.training.gate import (
    TRAIN_ONLY_SOURCES,
    extract,
    extract_own_features,
    gate_split,
)
from ml.training.gate_data import Sample

COMPONENTS = 64
OP_TYPES = ("Conv", "Clip", "Add")


def quantise_network(fp32: Path, out: Path, samples: Sequence[Sample], input_size: int,
                     preprocess_version: str, images: int) -> dict:
    """int8 copy of the gate's network, calibrated on `images` of the given training radiographs."""
    from ml.preprocess import preprocess_batch
    from ml.training.quantize import Recipe, quantise

    recipe = Recipe(calibration_images=images, equalise_alpha=0.0, op_types=OP_TYPES)
    chosen = list(samples)[:images]

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(chosen), recipe.chunk):
            yield preprocess_batch([s.load()[0] for s in chosen[start:start + recipe.chunk]],
                                   size=input_size, version=preprocess_version)

    return quantise(fp32, out, batches, recipe)


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session as the gate's network runs (ml.gate_features)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cost(model_dir: Path, networks: dict[str, Path], threads: Sequence[int],
         batches: Sequence[int] = (1, 4, 8), rounds: int = 7) -> list[str]:
    """One line per (threads, batch): ms per image of each network and the classifier(s)."""
    from ml.artifact import read_metadata
    from ml.backends import OnnxBackend

    meta = read_metadata(model_dir)
    rng = np.random.default_rng(0)
    lines = []
    for n in threads:
        runs = {}
        for name, path in networks.items():
            s = session(path, n)
            runs[f"gate {name}"] = lambda b, s=s: s.run(None, {"image": b})
        variants = {"classifier fp32": False}
        if (model_dir / "model.int8.onnx").is_file():
            variants["classifier int8"] = True
        for name, int8 in variants.items():
            engine = OnnxBackend.load(model_dir, meta, int8=int8, threads=n)
            runs[name] = lambda b, e=engine: e.forward(b, True)
        for size in batches:
            batch = rng.normal(0, 60, (size, meta.input_size, meta.input_size, 3)).astype(np.float32)
            times = {name: best_ms(run, batch, rounds) for name, run in runs.items()}
            lines.append(f"threads {n}, batch {size}: " + ", ".join(
                f"{name} {ms:.2f} ms" for name, ms in times.items()) + "; gate/classifier: " + ", ".join(
                f"{g.removeprefix('gate ')}/{c.removeprefix('classifier ')} "
                f"{times[g] / times[c]:.1%}" for g in times if g.startswith("gate")
                for c in times if c.startswith("classifier")))
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from ml.artifact import read_metadata
    from ml.backends import usable_cpus
    from ml.gate import Gate
    from ml.training.gate_data import KIND_CLASS, all_samples

    parser = argparse.ArgumentParser(prog="python -m ml.experiments.gate_int8",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--cxr", type=Path, default=Path("../shared/data/cxr"))
    parser.add_argument("--ood", type=Path, default=Path("../shared/data/ood"))
    parser.add_argument("--cache", type=Path, help="features cache (as ml.training.gate's)")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--out", type=Path, help="keep the int8 network here (default: temporary)")
    args = parser.parse_args(argv)
    meta = read_metadata(args.model)
    info = json.loads((args.model / "gate.json").read_text())
    block = info.get("features")
    if not block:
        parser.error(f"{args.model}: the shipped gate reads the classifier's features")
    cache = args.cache or Path("bench/out") / f"gate-{meta.model_version}.npz"
    samples = all_samples(args.model, args.cxr, args.ood, keep_sources=TRAIN_ONLY_SOURCES)
    data = extract(samples, args.model, cache)
    threads = usable_cpus()
    fp32 = shipped_features(args.model, samples, cache)
    splits = np.array([gate_split(s) for s in samples])
    calibration = [s for s, split in zip(samples, splits, strict=True)
                   if split == "train" and s.kind == "frontal"]
    with tempfile.TemporaryDirectory(prefix="gate-int8-") as tmp:
        out = args.out or Path(tmp) / "gate_features.int8.onnx"
        done = quantise_network(args.model / block["file"], out, calibration, meta.input_size,
                                meta.preprocess_version, args.calibration_images)
        print(f"int8 network: {out.stat().st_size / 1e6:.1f} MB, kept float32: {done['kept_fp32']}")
        int8_session = session(out, threads)
        int8_features = extract_own_features(
            samples, lambda b: int8_session.run(None, {"image": b})[0], args.model,
            cache.with_name(f"{cache.stem}-gate-features-int8-{args.calibration_images}.npz"))
        lines = cost(args.model, {"fp32": args.model / block["file"], "int8": out},
                     sorted({1, threads}))

    stats = data["stats"]
    classes = np.array([KIND_CLASS[s.kind] for s in samples])
    kinds, sources = np.array([s.kind for s in samples]), np.array([s.source for s in samples])
    frontal = classes == "frontal"
    delta = np.abs(int8_features - fp32)
    print(f"features |int8 - fp32|: median {np.median(delta):.4f}, p99 {np.quantile(delta, 0.99):.4f}"
          f" (fp32 median |value| {np.median(np.abs(fp32)):.4f}); cosine median "
          f"{np.median((fp32 * int8_features).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8_features, axis=1) + 1e-12)):.5f}")
    shipped = Gate.load(args.model, meta)
    assert shipped is not None
    verdicts = {name: np.array([v.reason or "" for v in shipped.assess(f, stats, [None] * len(f))])
                for name, f in (("fp32", fp32), ("int8", int8_features))}
    for split in ("val", "test"):
        here = splits == split
        same = verdicts["fp32"][here] == verdicts["int8"][here]
        flips = here & ((verdicts["fp32"] == "") != (verdicts["int8"] == ""))
        print(f"shipped gate, {split}: verdicts equal {same.mean():.2%} of {here.sum()}; abstain/answer "
              f"flips {int(flips.sum())} (" + ", ".join(
                  f"{k} {int((flips & (kinds == k) & ~frontal).sum())}" for k in np.unique(kinds[here & ~frontal]))
              + f", radiographs {int((flips & frontal).sum())})")
    for name, features in (("shipped recipe on fp32 features", fp32),
                           ("shipped recipe on int8 features", int8_features)):
        shipped_recipe(name, features, stats, classes, splits, kinds, sources)
    print("\n".join(["cost (ms per image, best of 7):"] + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
