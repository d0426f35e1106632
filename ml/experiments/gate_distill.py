"""`python -m ml.experiments.gate_distill`: a small network of the gate's own, distilled from the
served one (EfficientNet-Lite0 with ImageNet weights at 128 px), and the gate refitted on it.

Why: beside the int8 classifier on an AVX-512 VNNI CPU the gate costs 17-21% of inference
(target <= 10%); its network is most of that (docs/experiments/gate, fourteenth session). The
student reads the same input (the classifier's 224 px caffe batch), resizes it to `--size`, takes
its grey plane and runs a plain stack of convolutions. It sees only the gate's training split
(and random variants of it, teacher features computed on each); validation and test images are
never trained on. What it learns (`--target`):

- `axes`: the teacher's features as the gate reads them, their coordinates on the 64 whitened
  principal axes of the training radiographs (Huber loss: non-radiographs lie far out); the
  shipped recipe then refits the gate on the student's 64 outputs in a copy of the artifact.
- `gate` (default): the gate's own terms of the teacher's features, each class logit's part from
  those axes and the log distance (the axes as a second output at weight 0.2); the student is
  then the gate (`StudentGate`: the served arithmetic, statistics, polarity model and thresholds
  on its seven values), measured with the shipped thresholds and with thresholds from
  validation radiographs; the refit on its axes output is measured too.

Reports (`ml.evaluation.gate_report`, per kind and source, test and validation), the student's
fidelity to the teacher per split and kind, and its scores are written under R.

    python -m ml.experiments.gate_distill --model M --work W --report R

M: the model artifact with its float32 ONNX export and its gate (`gate-1-08c59654`); W: a
scratch folder (inputs cache, the student, the artifact copy with the refitted gate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import read_metadata, sha256_file
from ml.gate import STAT_NAMES, Gate, image_statistics
from ml.preprocess import IMAGENET_BGR_MEAN, preprocess_gray, to_caffe
from ml.training.gate import (
    TRAIN_ONLY_SOURCES,
    _engine,
    _save_cache,
    fit_gate,
    gate_split,
    gate_splits,
    shipped_network,
)
from ml.training.gate_data import all_samples, cv_groups, inverted_pairs

AXES = 64


def decode_all(samples: list, model_dir: Path, work: Path, batch: int = 32) -> dict[str, Any]:
    """One decoding pass: the 224 px grey plane of every sample (float16, cached) and what
    `ml.training.gate.extract` caches (classifier features, statistics, COVID probability)."""
    cache = work / "inputs.npz"
    if cache.is_file():
        with np.load(cache) as npz:
            return {k: npz[k] for k in npz.files}
    meta = read_metadata(model_dir)
    engine, _ = _engine(model_dir, "onnx")
    grey = np.empty((len(samples), meta.input_size, meta.input_size), np.float16)
    done: dict[str, tuple] = {}
    start_t = time.perf_counter()
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        loaded = [s.load() for s in chunk]
        planes = np.stack([preprocess_gray(p, meta.input_size, version=meta.preprocess_version)
                           for p, _ in loaded])
        grey[start:start + len(chunk)] = planes
        out = engine.forward(to_caffe(planes), False)
        for s, (pixels, attrs), f, p in zip(chunk, loaded, out.features, out.probability,
                                            strict=True):
            done[s.key] = (f, image_statistics(pixels, attrs), float(p))
        if start // batch % 20 == 0:
            print(f"decoded {start + len(chunk)} of {len(samples)} "
                  f"({time.perf_counter() - start_t:.0f} s)", flush=True)
    keys = np.array([s.key for s in samples])
    stats = np.stack([done[k][1] for k in keys])
    probability = np.array([done[k][2] for k in keys])
    np.savez(cache, keys=keys, grey=grey, stats=stats, probability=probability)
    _save_cache(work / "extract.npz", done)  # the format ml.training.gate.extract reads
    return {"keys": keys, "grey": grey, "stats": stats, "probability": probability}


def variant(plane: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop, flip, small rotation and tone change of a 224 px grey plane (0-255)."""
    from PIL import Image

    size = plane.shape[0]
    image = Image.fromarray(plane.astype(np.float32), mode="F")
    if rng.random() < 0.5:
        image = image.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR,
                             fillcolor=float(np.median(plane[:8])))
    side = rng.uniform(0.6, 1.0)
    aspect = rng.uniform(0.85, 1.18)
    w, h = int(size * min(1.0, side * aspect)), int(size * min(1.0, side / aspect))
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    image = image.crop((x, y, x + w, y + h)).resize((size, size), Image.Resampling.BILINEAR)
    out = np.asarray(image, np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = np.clip(out / 255.0, 0, 1) ** rng.uniform(0.75, 1.35)
    out = out * rng.uniform(0.85, 1.1) + rng.uniform(-0.06, 0.06)
    return np.clip(out * 255.0, 0, 255)


def variants(grey: np.ndarray, index: np.ndarray, n: int,
             rng: np.random.Generator) -> np.ndarray:
    """n variants of each grey plane grey[index], as float16 (the caches' type)."""
    return np.stack([variant(grey[i].astype(np.float32), rng)
                     for i in np.repeat(index, n)]).astype(np.float16)


def teacher(network: Any, grey: np.ndarray, batch: int = 32) -> np.ndarray:
    """The served network's features of grey planes (as the classifier's caffe batch)."""
    return np.concatenate([network(to_caffe(grey[i:i + batch].astype(np.float32)))
                           for i in range(0, len(grey), batch)])


def student_model(size: int, width: int) -> Any:
    """A plain stack of 3 x 3 convolutions (ONNX Runtime runs them as GEMMs, unlike Lite0's
    depthwise ones), pooled by mean and max, to two outputs: `axes` (AXES whitened coordinates)
    and `gate` (the six class logits' parts from them and the log distance)."""
    import keras
    from keras import layers

    def conv(x: Any, filters: int, stride: int = 1, kernel: int = 3) -> Any:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    inputs = keras.Input((size, size, 1), name="grey")
    x = conv(layers.Rescaling(2.0, offset=-1.0)(inputs), width, 2)
    x = conv(x, 2 * width, 2)
    x = conv(x, 2 * width)
    x = conv(x, 4 * width, 2)
    x = conv(x, 4 * width)
    x = conv(x, 8 * width, 2)
    x = conv(x, 8 * width)
    x = conv(x, 16 * width, kernel=1)
    x = layers.Concatenate()([layers.GlobalAveragePooling2D()(x), layers.GlobalMaxPooling2D()(x)])
    x = layers.Dense(256, activation="relu")(x)
    outputs = {"axes": layers.Dense(AXES, name="axes")(x), "gate": layers.Dense(7, name="gate")(x)}
    return keras.Model(inputs, outputs, name="gate_student")


def resized(grey: np.ndarray, size: int, batch: int = 512) -> np.ndarray:
    """grey/255 resized as the exported network does it (tf.image.resize, bilinear)."""
    import tensorflow as tf

    out = np.empty((len(grey), size, size, 1), np.float16)
    for i in range(0, len(grey), batch):
        x = tf.convert_to_tensor(grey[i:i + batch, ..., None].astype(np.float32) / 255.0)
        out[i:i + batch] = tf.image.resize(x, (size, size), method="bilinear").numpy()
    return out


def export_student(model: Any, model_dir: Path, source_size: int, size: int) -> dict[str, Any]:
    """The student as the gate's network file: caffe batch in, AXES features out."""
    import tensorflow as tf
    import tf2onnx

    from ml.gate_features import FILE, SOURCE

    spec = (tf.TensorSpec([None, source_size, source_size, 3], tf.float32, name="image"),)
    mean0 = float(IMAGENET_BGR_MEAN[0])

    @tf.function(input_signature=spec)
    def graph(image: tf.Tensor) -> dict[str, tf.Tensor]:
        # Resize first (linear, so it commutes with the affine map): the element-wise work is
        # then done on size x size values, not 224 x 224 x 3 (1.3 of 1.9 ms at batch 1).
        small = tf.image.resize(image, (size, size), method="bilinear")[..., :1]
        out = model((small + mean0) * (1.0 / 255.0), training=False)
        return {"features": tf.identity(out["axes"], name="features"),
                "gate": tf.identity(out["gate"], name="gate")}

    tf2onnx.convert.from_function(graph, input_signature=spec, opset=17,
                                  output_path=str(model_dir / FILE))
    # Served through GateFeatures, which knows one source; the block says what it is.
    return {"source": SOURCE, "file": FILE, "sha256": sha256_file(model_dir / FILE),
            "input_size": size, "reads": f"the classifier's {source_size} px input batch",
            "dimensions": AXES, "distilled_from": "imagenet-efficientnet-lite0 at 128 px"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml.experiments.gate_distill")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("--cxr", type=Path, default=Path("../shared/data/cxr"))
    parser.add_argument("--ood", type=Path, default=Path("../shared/data/ood"))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--variants", type=int, default=3)
    parser.add_argument("--ood-variants", type=int, default=0,
                        help="variants of each training lateral film and CT image, beyond --variants")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--stage", choices=["all", "data", "train", "fit"], default="all")
    parser.add_argument("--target", choices=["axes", "gate"], default="gate",
                        help="what the student learns: the whitened axes only, or the gate's terms "
                        "(each class logit's part from the axes, the log distance; axes at 0.2)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from ml.gate_features import GateFeatures

    samples = all_samples(args.model, args.cxr, args.ood, train_fraction=1.0,
                          keep_sources=TRAIN_ONLY_SOURCES)
    bases = [s for s in samples if s.kind == "frontal" and gate_split(s) == "train"]
    samples += inverted_pairs(bases)
    data = decode_all(samples, args.model, args.work)
    splits = np.array(gate_splits(samples, "cross-validated"))
    train = splits == "train"
    print(f"{len(samples)} samples, {int(train.sum())} train", flush=True)
    meta = read_metadata(args.model)
    network = GateFeatures.load(args.model, shipped_network(args.model), threads=2)

    targets_path = args.work / f"targets-v{args.variants}.npz"
    if not targets_path.is_file():
        t0 = time.perf_counter()
        base_features = teacher(network, data["grey"])
        rng = np.random.default_rng(0)
        index = np.flatnonzero(train)
        extra = variants(data["grey"], index, args.variants, rng)
        extra_features = teacher(network, extra)
        np.savez(targets_path, base=base_features, extra=extra, extra_features=extra_features)
        print(f"teacher features: {time.perf_counter() - t0:.0f} s", flush=True)
    with np.load(targets_path) as npz:
        base_features, extra, extra_features = npz["base"], npz["extra"], npz["extra_features"]
    if args.ood_variants:
        # Lateral films and CT are a few dozen of thousands: more variants of the training ones.
        ood_path = args.work / f"targets-ood{args.ood_variants}.npz"
        if not ood_path.is_file():
            rng = np.random.default_rng(1)
            index = np.flatnonzero(train & np.isin([s.kind for s in samples], ["lateral_xray", "ct"]))
            more = variants(data["grey"], index, args.ood_variants, rng)
            np.savez(ood_path, extra=more, extra_features=teacher(network, more))
        with np.load(ood_path) as npz:
            extra = np.concatenate([extra, npz["extra"]])
            extra_features = np.concatenate([extra_features, npz["extra_features"]])
    if args.stage == "data":
        return 0

    shipped = Gate.load(args.model, meta)
    assert shipped is not None and shipped.extractor is not None

    def targets(features: np.ndarray) -> dict[str, np.ndarray]:
        """The gate's own terms: whitened axes, the axes' part of each class logit, log distance."""
        z = shipped.inputs(features, np.zeros((len(features), len(STAT_NAMES))))[0]
        terms = z @ shipped.weights[:, :AXES].T
        return {"axes": z, "gate": np.c_[terms, np.log((z * z).mean(axis=1))]}

    x_train = resized(np.concatenate([data["grey"][train], extra]), args.size).astype(np.float32)
    y_train = targets(np.concatenate([base_features[train], extra_features]))
    held = splits == "val"
    x_val, y_val = resized(data["grey"][held], args.size), targets(base_features[held])
    student_dir = args.work / (f"student-{args.size}-{args.width}-{args.target}"
                               + (f"-ood{args.ood_variants}" if args.ood_variants else ""))
    student_dir.mkdir(exist_ok=True)
    keras_path = student_dir / "student.keras"
    import keras

    if args.stage in ("all", "train") or not keras_path.is_file():
        keras.utils.set_random_seed(0)
        model = student_model(args.size, args.width)
        steps = args.epochs * int(np.ceil(len(x_train) / 64))
        schedule = keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.02)
        weights = {"axes": 1.0, "gate": 0.0} if args.target == "axes" else {"axes": 0.2, "gate": 1.0}
        model.compile(keras.optimizers.Adam(schedule),
                      loss={"axes": keras.losses.Huber(1.0), "gate": keras.losses.Huber(1.0)},
                      loss_weights=weights)
        print(f"student: {model.count_params()} parameters, {len(x_train)} training inputs",
              flush=True)
        t0 = time.perf_counter()
        history = model.fit(x_train, y_train, batch_size=64, epochs=args.epochs,
                            validation_data=(x_val, y_val), verbose=2, shuffle=True)
        model.save(keras_path)
        (student_dir / "history.json").write_text(json.dumps(
            {**{k: [float(v) for v in vs] for k, vs in history.history.items()},
             "seconds": time.perf_counter() - t0}, indent=1))
    model = keras.models.load_model(keras_path)
    if args.stage == "train":
        return 0

    copy = student_dir / "artifact"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(args.model, copy, symlinks=False)
    for name in ("gate.json", "gate.npz", "gate_features.onnx"):
        (copy / name).unlink(missing_ok=True)
    block = export_student(model, copy, meta.input_size, args.size)
    import onnxruntime as ort

    session = ort.InferenceSession(str(copy / block["file"]), providers=["CPUExecutionProvider"])
    outs = [session.run(["features", "gate"],
                        {"image": to_caffe(data["grey"][i:i + 64].astype(np.float32))})
            for i in range(0, len(samples), 64)]
    predicted = {"axes": np.concatenate([o[0] for o in outs]),
                 "gate": np.concatenate([o[1] for o in outs])}

    # How close the student comes, per kind and split, in the gate's own terms.
    target = targets(base_features)
    teacher_p, teacher_d = shipped.scores(base_features, data["stats"])
    kinds = np.array([s.kind for s in samples])
    student_gate = StudentGate(**{f.name: getattr(shipped, f.name) for f in fields(Gate)})
    student_p, student_d = student_gate.scores(predicted["gate"], data["stats"])
    fidelity = {}
    for split in ("train", "val", "test"):
        for kind in np.unique(kinds):
            rows = (splits == split) & (kinds == kind)
            if not rows.any():
                continue
            err = np.mean((predicted["axes"][rows] - target["axes"][rows]) ** 2, axis=1)
            fidelity[f"{split}/{kind}"] = {
                "n": int(rows.sum()),
                "axes_median_sq_error": float(np.median(err)),
                "teacher_distance_median": float(np.median(teacher_d[rows])),
                "student_distance_median": float(np.median(student_d[rows])),
                "log_distance_mean_abs_error": float(np.mean(np.abs(
                    predicted["gate"][rows, 6] - target["gate"][rows, 6]))),
                "p_frontal_mean_abs_error": float(np.mean(np.abs(student_p[rows, 0]
                                                                 - teacher_p[rows, 0]))),
            }
    print(json.dumps(fidelity, indent=1), flush=True)
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "fidelity.json").write_text(json.dumps(fidelity, indent=1) + "\n")
    np.savez(args.report / "scores.npz", kinds=kinds, splits=splits,
             sources=np.array([s.source for s in samples]), student_p=student_p[:, 0],
             student_d=student_d, teacher_p=teacher_p[:, 0], teacher_d=teacher_d)
    from ml.evaluation.gate_report import write_report
    from ml.training.gate import thresholds_for

    # The student as the gate: the shipped gate's arithmetic on the student's terms, with the
    # shipped thresholds, and with thresholds from validation radiographs (which the student
    # never saw), 2% in every source.
    sources = np.array([s.source for s in samples])
    val_radiographs = held & (kinds == "frontal")
    own = thresholds_for(student_p[val_radiographs, 0], student_d[val_radiographs], 0.02,
                         sources[val_radiographs])
    for name, (p_min, d_max) in {"shipped-thresholds": (shipped.min_frontal_probability,
                                                         shipped.max_distance),
                                 "val-thresholds": own}.items():
        gate = replace(student_gate, version=f"student-{args.size}-{args.width}-{name}",
                       min_frontal_probability=p_min, max_distance=d_max,
                       info={**shipped.info, "thresholds": {"min_frontal_probability": p_min,
                                                            "max_distance": d_max,
                                                            "chosen_on": name}})
        write_report(args.report / name, gate, samples,
                     {"features": predicted["gate"], "stats": data["stats"],
                      "probability": data["probability"]}, list(splits))
        print(f"{name}: P(frontal) >= {p_min:.3f}, distance <= {d_max:.3f}", flush=True)

    # The gate refitted on the student's axes by the shipped recipe.
    fit_data = {"features": predicted["axes"], "stats": data["stats"],
                "probability": data["probability"]}
    refit, info = fit_gate(copy, samples, fit_data, rule="cross-validated", features=block,
                           groups=cv_groups(samples, args.cxr, args.ood))
    report = write_report(args.report / "refit", refit, samples, fit_data, list(splits))
    print(f"refit {info['version']}: thresholds {info['thresholds']}; report {report}")
    return 0


class StudentGate(Gate):
    """The shipped gate's decision on a student's terms: its features are the axes' part of
    every class logit and the log distance (7 values), the statistics' part is computed."""

    def scores(self, features: np.ndarray, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.standardised(stats)
        logits = features[:, :6] + s @ self.weights[:, AXES:].T + self.bias
        log_odds = self.polarity_log_odds(s)
        if log_odds is not None:
            logits[:, self.classes.index("inverted")] += np.minimum(log_odds, 0.0)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return probabilities, np.exp(features[:, 6])


if __name__ == "__main__":
    sys.exit(main())
