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
fidelity to the teacher per split and kind, and its scores are written under R; so are the
student as a screen in front of the served gate (`CascadeGate`: what the student confidently
clears is answered, the served gate judges the rest; limits from validation at several margins,
screen.json and cascade-margin*/) and both gates on inputs no stage trained on (novel.json).
`--mixup N` adds N mixtures of training planes to what the student learns from; `--leave-out
KIND` trains it without a kind, to see whether the screen fails safe on a kind it never saw.

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
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import read_metadata, sha256_file
from ml.gate import FLAT_STD, STAT_NAMES, Gate, image_statistics, tag_reason
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


def mixes(grey: np.ndarray, index: np.ndarray, partners: np.ndarray, n: int,
          rng: np.random.Generator) -> np.ndarray:
    """n convex mixtures l * a + (1 - l) * b of grey planes, a from index and b from partners
    (l uniform): inputs between kinds, where the teacher's answer is what the student must learn
    and a few dozen lateral films give it few examples (function matching with mixup, Beyer et
    al. 2022, "Knowledge distillation: a good teacher is patient and consistent")."""
    a = grey[rng.choice(index, n)].astype(np.float32)
    b = grey[rng.choice(partners, n)].astype(np.float32)
    mix = rng.uniform(0.0, 1.0, (n, 1, 1)).astype(np.float32)
    return (mix * a + (1.0 - mix) * b).astype(np.float16)


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
    parser.add_argument("--mixup", type=int, default=0,
                        help="mixtures of two training planes, one of them a lateral film or CT "
                        "image half the time, with the teacher's features on each mixture")
    parser.add_argument("--leave-out", default="", metavar="KIND",
                        help="train without any image of this kind (no variants, no mixtures) and "
                        "choose the screen without it: does the screen fail safe on a kind it "
                        "never saw?")
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
    kinds = np.array([s.kind for s in samples])
    kept = kinds != args.leave_out  # every kind unless one is left out
    keep = np.repeat(kept[train], args.variants)  # the variants are of the training images in order
    extra, extra_features = extra[keep], extra_features[keep]
    ood_kinds = np.isin(kinds, ["lateral_xray", "ct"])
    if args.ood_variants:
        # Lateral films and CT are a few dozen of thousands: more variants of the training ones.
        ood_path = args.work / f"targets-ood{args.ood_variants}.npz"
        if not ood_path.is_file():
            rng = np.random.default_rng(1)
            index = np.flatnonzero(train & ood_kinds)
            more = variants(data["grey"], index, args.ood_variants, rng)
            np.savez(ood_path, extra=more, extra_features=teacher(network, more))
        keep = np.repeat(kept[train & ood_kinds], args.ood_variants)
        with np.load(ood_path) as npz:
            extra = np.concatenate([extra, npz["extra"][keep]])
            extra_features = np.concatenate([extra_features, npz["extra_features"][keep]])
    if args.mixup:
        mix_path = args.work / (f"targets-mix{args.mixup}"
                                + (f"-without-{args.leave_out}" if args.leave_out else "") + ".npz")
        if not mix_path.is_file():
            rng = np.random.default_rng(2)
            index = np.flatnonzero(train & kept)
            ood = np.flatnonzero(train & ood_kinds & kept)
            half = args.mixup // 2
            more = np.concatenate([mixes(data["grey"], index, ood, half, rng),
                                   mixes(data["grey"], index, index, args.mixup - half, rng)])
            np.savez(mix_path, extra=more, extra_features=teacher(network, more))
        with np.load(mix_path) as npz:
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

    x_train = resized(np.concatenate([data["grey"][train & kept], extra]),
                      args.size).astype(np.float32)
    y_train = targets(np.concatenate([base_features[train & kept], extra_features]))
    held = (splits == "val") & kept
    x_val, y_val = resized(data["grey"][held], args.size), targets(base_features[held])
    student_dir = args.work / (f"student-{args.size}-{args.width}-{args.target}"
                               + (f"-ood{args.ood_variants}" if args.ood_variants else "")
                               + (f"-mix{args.mixup}" if args.mixup else "")
                               + (f"-without-{args.leave_out}" if args.leave_out else ""))
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

    # The student as a screen in front of the served gate (limits from validation).
    screens = screen_report(args.report, shipped, student_gate, samples, data, splits,
                            base_features, predicted["gate"], left_out=args.leave_out)
    test_frontal = (splits == "test") & (kinds == "frontal")
    novel_report(args.report, shipped, student_gate, network, session, data["grey"][test_frontal],
                 screens)

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


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def screen_limits(p: np.ndarray, d: np.ndarray, frontal: np.ndarray,
                  margin: float) -> tuple[float, float, float]:
    """The screen's limits from validation scores: (minimum logit P(frontal), maximum distance,
    share of radiographs cleared). Every non-radiograph must fall outside, `margin` logits short
    of the limit (an image is cleared above it); of all such pairs, the one that clears the most
    radiographs."""
    lp = logit(p)
    best = (np.inf, 0.0, 0.0)
    for d_max in np.quantile(d[frontal], np.linspace(0.05, 1.0, 96)):
        inside = ~frontal & (d <= d_max)
        p_min = (lp[inside].max() + margin) if inside.any() else -np.inf
        cleared = float(np.mean((lp[frontal] > p_min) & (d[frontal] <= d_max)))
        if cleared > best[2]:
            best = (float(p_min), float(d_max), cleared)
    return best


@dataclass(frozen=True)
class CascadeGate(Gate):
    """The served gate behind a screen: an image whose student scores (StudentGate) lie inside
    the screen's limits is answered without the served network; every other image gets the
    served gate's verdict. Tags and blank images decide first, as always. Its features are the
    teacher's features followed by the student's seven terms."""

    student: StudentGate | None = None
    screen: tuple[float, float] = (np.inf, 0.0)  # logit P(frontal) above, distance at most

    @classmethod
    def around(cls, served: Gate, student: StudentGate,
               screen: tuple[float, float]) -> CascadeGate:
        return cls(**{f.name: getattr(served, f.name) for f in fields(Gate)}, student=student,
                   screen=screen)

    def cleared(self, terms: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """Which images the screen answers without the served network (never a blank one)."""
        assert self.student is not None
        p, d = self.student.scores(terms, stats)
        return ((logit(p[:, self.classes.index("frontal")]) > self.screen[0])
                & (d <= self.screen[1]) & (stats[:, STAT_NAMES.index("std")] >= FLAT_STD))

    def assess(self, features: np.ndarray, stats: np.ndarray,
               attributes: Any) -> list:
        teacher, terms = features[:, :-7], features[:, -7:]
        cleared = self.cleared(terms, stats)
        served = Gate.assess(self, teacher, stats, attributes)
        return [replace(a, reason=None) if c and tag_reason(at) is None else a
                for a, c, at in zip(served, cleared, attributes, strict=True)]


def screen_report(report: Path, shipped: Gate, student_gate: StudentGate, samples: list,
                  data: dict[str, Any], splits: np.ndarray, teacher_features: np.ndarray,
                  terms: np.ndarray, margins: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0),
                  left_out: str = "") -> dict:
    """The cascade with limits chosen on validation at each margin: what it clears and the
    gate's report (test and validation) with it."""
    from ml.evaluation.gate_report import write_report

    p, d = student_gate.scores(terms, data["stats"])
    frontal_p = p[:, shipped.classes.index("frontal")]
    kinds = np.array([s.kind for s in samples])
    flat = data["stats"][:, STAT_NAMES.index("std")] < FLAT_STD
    val = (splits == "val") & ~flat & (kinds != left_out)
    out = {}
    for margin in margins:
        p_min, d_max, val_cleared = screen_limits(frontal_p[val], d[val],
                                                  kinds[val] == "frontal", margin)
        served = shipped.info.get("thresholds", {})
        chosen = (f"{served.get('chosen_on', 'validation split')}, for the served gate; behind a "
                  f"screen of the student: logit P(frontal) > {p_min:.3f} and distance <= "
                  f"{d_max:.3f}, chosen on validation {margin:g} logits clear of every "
                  "non-radiograph")
        gate = replace(CascadeGate.around(shipped, student_gate, (p_min, d_max)),
                       version=f"cascade-margin{margin:g}",
                       info={**shipped.info, "thresholds": {**served, "chosen_on": chosen}})
        cleared = gate.cleared(terms, data["stats"])
        test = splits == "test"
        entry = {"min_logit_p_frontal": p_min, "max_distance": d_max,
                 "val_radiographs_cleared": val_cleared,
                 "test_radiographs_cleared": float(cleared[test & (kinds == "frontal")].mean()),
                 "test_others_cleared": {k: int(cleared[test & (kinds == k)].sum())
                                         for k in np.unique(kinds) if k != "frontal"}}
        if left_out:  # never trained on, never chosen on: every split is held out for it
            unseen = (kinds == left_out) & ~flat
            entry["left_out"] = {
                "kind": left_out, "images": int(unseen.sum()),
                "cleared (answered by the cascade)": int(cleared[unseen].sum()),
                "nearest below limit": float(p_min - logit(frontal_p[unseen & (d <= d_max)]).max())
                if (unseen & (d <= d_max)).any() else None}
        # How far below the limit the nearest held-out non-radiograph of each split stayed.
        for split in ("val", "test"):
            near = (splits == split) & (kinds != "frontal") & ~flat & (d <= d_max)
            entry[f"{split}_nearest_other_below_limit"] = (
                float(p_min - logit(frontal_p[near]).max()) if near.any() else None)
        write_report(report / f"cascade-margin{margin:g}", gate, samples,
                     {"features": np.c_[teacher_features, terms], "stats": data["stats"],
                      "probability": data["probability"]}, list(splits))
        out[f"margin {margin:g}"] = entry
        print(f"screen, margin {margin:g}: {json.dumps(entry)}", flush=True)
    (report / "screen.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def novel_inputs(planes: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of kinds no stage trained on, made from frontal radiographs (224 px grey planes):
    turned sideways, upside down, four films tiled as a contact sheet, and a film at half size
    in a dark frame with a bright bar (a screenshot of a viewer)."""
    size = planes.shape[1]
    half = size // 2
    small = planes[:, ::2, ::2]
    tiles = np.empty_like(planes)
    for i in range(len(planes)):
        four = small[rng.choice(len(planes), 4, replace=False)]
        tiles[i] = np.block([[four[0], four[1]], [four[2], four[3]]])
    frame = np.full_like(planes, 20)
    frame[:, : size // 10] = 200
    frame[:, half - half // 2: half + half // 2, half - half // 2: half + half // 2] = small
    return {"sideways": np.rot90(planes, 1, axes=(1, 2)).copy(), "upside_down": planes[:, ::-1].copy(),
            "contact_sheet": tiles, "screenshot": frame}


def novel_report(report: Path, shipped: Gate, student_gate: StudentGate, network: Any,
                 student: Any, planes: np.ndarray, screens: dict[str, dict]) -> dict:
    """For novel_inputs of the given radiographs: how many the served gate abstains on, and how
    many of those each cascade would answer (the screen clears them). The served gate is the
    reference: what matters is where the student is more lenient than its teacher."""
    out: dict[str, dict] = {}
    for name, made in novel_inputs(planes, np.random.default_rng(5)).items():
        features = teacher(network, made)
        terms = np.concatenate([student.run(["gate"], {"image": to_caffe(made[i:i + 64].astype(
            np.float32))})[0] for i in range(0, len(made), 64)])
        stats = np.stack([image_statistics(m.astype(np.float32) / 255.0) for m in made])
        served = np.array([a.reason is not None for a in shipped.assess(features, stats,
                                                                        [None] * len(made))])
        entry = {"images": len(made), "served_gate_abstained": int(served.sum())}
        for margin, screen in screens.items():
            gate = CascadeGate.around(shipped, student_gate, (screen["min_logit_p_frontal"],
                                                              screen["max_distance"]))
            cascade = np.array([a.reason is not None for a in gate.assess(
                np.c_[features, terms], stats, [None] * len(made))])
            entry[f"cascade {margin}: abstained"] = int(cascade.sum())
            entry[f"cascade {margin}: answered where the served gate abstains"] = int(
                (served & ~cascade).sum())
        out[name] = entry
        print(f"novel {name}: {json.dumps(entry)}", flush=True)
    (report / "novel.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
